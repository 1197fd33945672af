"""What the native kernels trust: where the library is loaded from (dsvl2/cachedir.py,
model/native ``_build``), the kernel-choice cache (model/native/policy.py), and the arguments each
ctypes entry point hands to C (model/native wrappers, decode_plan ``run``).

* A library planted at the exact path the loader would use (one whose constructor writes a
  marker file) is never loaded when anyone but us could have written it: a group / other
  writable cache folder or library, another owner (as root), a symlinked library or folder.
  The kernels are then built in a private temporary folder, with one warning.
* A cache folder of ours (0700) is created, used, and reused without compiling again.
* Wrong dtypes, shapes, layouts, devices and sizes into each entry point raise
  ``ValueError`` before any C runs (the library is replaced by one that fails the test
  when touched).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from dsvl2 import cachedir
from dsvl2.config import LanguageConfig
from dsvl2.model import decode_plan, native
from dsvl2.model.native import build as native_build
from dsvl2.model.native import policy as kernels
from dsvl2.model.cache import KVCache, row_tables
from dsvl2.model.language import LanguageModel
from dsvl2.model.quant import QuantWeight
from dsvl2.model.rope import RotaryEmbedding

needs_native = pytest.mark.skipif(not native.cpu_ok()[0], reason=f"CPU: {native.cpu_ok()[1]}")
CC = os.environ.get("CC", "cc")
needs_cc = pytest.mark.skipif(shutil.which(CC) is None, reason=f"no C compiler ({CC})")
as_root = pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="chown needs root")
OTHER_UID = 65534  # nobody


@pytest.fixture
def fresh(monkeypatch, caplog):
    """A build decision of its own (the kernels are loaded again afterwards, from the real cache)."""
    monkeypatch.delenv("DSVL2_NATIVE", raising=False)
    caplog.set_level(logging.WARNING, logger="dsvl2.native")
    native.reset()
    yield caplog
    native.reset()


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "dsvl2.native" and r.levelno == logging.WARNING]


def _plant(lib: Path, marker: Path, work: Path) -> None:
    """A shared library at ``lib`` whose constructor writes ``marker`` when it is loaded."""
    src = work / "plant.c"
    src.write_text('#include <stdio.h>\n'
                   '__attribute__((constructor)) static void planted(void) {\n'
                   f'    FILE *f = fopen("{marker}", "w");\n'
                   '    if (f) { fputs("loaded", f); fclose(f); }\n'
                   '}\n')
    lib.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([CC, "-shared", "-fPIC", str(src), "-o", str(lib)], check=True, capture_output=True)


def _plant_works(lib: Path, marker: Path) -> bool:
    """Loading the planted library does write the marker (in another process): the test's
    plant is live, so its absence above means the loader never loaded it."""
    subprocess.run([sys.executable, "-c", "import ctypes, sys; ctypes.CDLL(sys.argv[1])", str(lib)], check=True)
    found = marker.exists()
    marker.unlink(missing_ok=True)
    return found


def _kernels_work() -> None:
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(3, 40, generator=g), (torch.randn(24, 40, generator=g) * 0.1).to(torch.bfloat16)
    ref = x.double() @ w.double().T
    assert torch.allclose(native.linear(x, w).double(), ref, rtol=1e-5, atol=1e-5)


def _unsafe(case: str, root: Path, tmp: Path, marker: Path) -> Path:
    """Set up the cache at ``root`` as ``case`` says, with a planted library where the loader
    looks (or a symlink there); the planted file (to check afterwards that it is intact)."""
    lib = native.cache_path()
    assert lib == root / "native" / lib.name  # the helper computes the loader's path
    folder = lib.parent
    folder.mkdir(parents=True, mode=0o700)
    root.chmod(0o700)
    planted = lib
    if case in ("symlinked library", "symlinked folder"):
        planted = tmp / "elsewhere" / lib.name  # ours, 0700 dir, 0755 file: only the link is wrong
        _plant(planted, marker, tmp)
        planted.parent.chmod(0o700)
        if case == "symlinked library":
            lib.symlink_to(planted)
        else:
            folder.rmdir()
            folder.symlink_to(planted.parent, target_is_directory=True)
        return planted
    _plant(lib, marker, tmp)
    lib.chmod(0o755)
    if case == "cache folder 0777":
        root.chmod(0o777)
        folder.chmod(0o777)
    elif case == "native folder 0777":
        folder.chmod(0o777)
    elif case == "library 0775":
        lib.chmod(0o775)
    elif case == "folder of another user":
        os.chown(folder, OTHER_UID, OTHER_UID)
    elif case == "library of another user":
        os.chown(lib, OTHER_UID, OTHER_UID)
    else:
        raise AssertionError(case)
    return planted


@needs_native
@needs_cc
@pytest.mark.parametrize("case", [
    "cache folder 0777", "native folder 0777", "library 0775", "symlinked library", "symlinked folder",
    pytest.param("folder of another user", marks=as_root), pytest.param("library of another user", marks=as_root),
])
def test_planted_library_is_never_loaded(case, fresh, tmp_path, monkeypatch):
    root = tmp_path / "cache"
    root.mkdir()
    monkeypatch.setenv("DSVL2_CACHE_DIR", str(root))
    marker = tmp_path / "marker"
    planted = _unsafe(case, root, tmp_path, marker)
    before = planted.read_bytes()

    assert native.available(), native.status()["reason"]
    assert not marker.exists(), "the planted library was loaded"
    assert "built for this process only" in native.status()["reason"]
    _kernels_work()  # from the private temporary folder
    warned = _warnings(fresh)
    assert len(warned) == 1 and "private temporary directory" in warned[0], warned
    assert str(root) in warned[0]  # says which cache it refused
    assert planted.read_bytes() == before  # the user's files are left as they are
    assert _plant_works(planted, marker)


@needs_native
def test_own_cache_folder_is_created_private_used_and_reused(fresh, tmp_path, monkeypatch):
    root = tmp_path / "new" / "dsvl2"  # neither exists yet
    monkeypatch.setenv("DSVL2_CACHE_DIR", str(root))
    old = os.umask(0)  # a permissive umask must not make anything group / other-writable
    try:
        assert native.prepare("cpu"), native.status()["reason"]
    finally:
        os.umask(old)
    lib = native.cache_path()
    assert "built into" in native.status()["reason"]
    for p in (root.parent, root, lib.parent):
        st = os.lstat(p)
        assert stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o700 and st.st_uid == os.geteuid(), p
    st = os.lstat(lib)
    assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o700 and st.st_uid == os.geteuid()
    assert [p.name for p in lib.parent.iterdir()] == [lib.name]  # no build folder left behind
    _kernels_work()

    native.reset()
    assert native.available()
    # reused, not built again: a build says "built into" and installs a new file (a new inode)
    assert "cached in" in native.status()["reason"]
    assert os.lstat(lib).st_ino == st.st_ino
    _kernels_work()
    assert _warnings(fresh) == []


def test_cache_root_follows_dsvl2_cache_dir_then_xdg_then_home(monkeypatch, tmp_path):
    monkeypatch.setenv("DSVL2_CACHE_DIR", str(tmp_path / "d"))
    assert cachedir.root() == tmp_path / "d"
    monkeypatch.delenv("DSVL2_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cachedir.root() == tmp_path / "xdg" / "dsvl2"
    # one function for both caches
    assert native.cache_path().parent == tmp_path / "xdg" / "dsvl2" / "native"
    assert kernels.cache_file() == tmp_path / "xdg" / "dsvl2" / "kernels.json"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/path")  # invalid per the XDG spec: ignored
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cachedir.root() == tmp_path / "home" / ".cache" / "dsvl2"


# ---- kernels.json: data, but only ours is believed -------------------------------------


@pytest.mark.parametrize("case", ["group-writable", "symlink", pytest.param("another owner", marks=as_root),
                                  "folder 0777"])
def test_kernel_choice_cache_not_ours_is_ignored(case, monkeypatch, tmp_path):
    monkeypatch.delenv("DSVL2_BIG_PRODUCTS", raising=False)
    monkeypatch.setattr(kernels, "load_per_cpu", lambda: 0.0)  # measurements on a quiet machine stand
    root = tmp_path / "cache"
    monkeypatch.setenv("DSVL2_CACHE_DIR", str(root))
    calls = []

    def measure(dtype):
        calls.append(dtype)
        return {torch.float32: 100.0, torch.bfloat16: 50.0}[dtype]

    first = kernels.choose("cpu", torch.bfloat16, flags={"amx_bf16"}, measure=measure)
    path = kernels.cache_file()
    assert first.big_products == "fp32" and len(calls) == 2
    assert stat.S_IMODE(os.lstat(path).st_mode) == 0o600 and stat.S_IMODE(os.lstat(root).st_mode) == 0o700
    kernels.choose("cpu", torch.bfloat16, flags={"amx_bf16"}, measure=measure)
    assert len(calls) == 2  # ours: reused

    data = json.loads(path.read_text())
    for v in data.values():
        v.update(big_products="bf16", reason="PLANTED")
    planted = json.dumps(data)
    if case == "symlink":
        path.unlink()
        (tmp_path / "elsewhere.json").write_text(planted)
        path.symlink_to(tmp_path / "elsewhere.json")
    else:
        path.write_text(planted)
        if case == "group-writable":
            path.chmod(0o664)
        elif case == "another owner":
            os.chown(path, OTHER_UID, OTHER_UID)
        else:
            root.chmod(0o777)
    again = kernels.choose("cpu", torch.bfloat16, flags={"amx_bf16"}, measure=measure)
    assert again.reason != "PLANTED" and again.big_products == "fp32"
    assert len(calls) == 4  # measured again


# ---- arguments: checked before any C runs ----------------------------------------------


class _NoC:
    """Stands in for the library: touching it means a call reached C."""

    def __getattr__(self, name):
        pytest.fail(f"{name} was called with arguments that should have been refused")


D, F, E, T, K = 32, 16, 4, 3, 2
H, HK, HD, NB, BS = 4, 2, 8, 3, 4


def _f32(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _bf16(*shape, seed=0):
    return (_f32(*shape, seed=seed) * 0.1).to(torch.bfloat16)


def _noncontig(t):
    """The same values in a non-contiguous layout."""
    return t.t().contiguous().t() if t.dim() == 2 else torch.stack([t, t], -1)[..., 0]


def _meta(t):
    return torch.empty(t.shape, dtype=t.dtype, device="meta")


def _q8(*shape, seed=0):
    *lead, n, k = shape
    g = torch.Generator().manual_seed(seed)
    return QuantWeight("int8", shape, torch.randint(-127, 128, shape, dtype=torch.int8, generator=g),
                       (torch.rand(*lead, n, generator=g) * 0.01).to(torch.bfloat16))


def _args(entry: str) -> dict:
    """Valid arguments of each entry point (keyword names as the wrappers call them)."""
    if entry == "linear":
        return dict(x=_f32(T, D), w=_bf16(8, D), bias=_f32(8))
    if entry == "linear_int8":
        q = _q8(8, D)
        return dict(x=_f32(T, D), q=q.data, scale=q.scale)
    if entry in ("experts", "experts_int8"):
        mk = _bf16 if entry == "experts" else _q8
        return dict(x=_f32(T, D), idx=torch.tensor([[0, 3], [1, 2], [3, 3]]), wt=torch.rand(T, K),
                    gate=mk(E, F, D, seed=1), up=mk(E, F, D, seed=2), down=mk(E, D, F, seed=3))
    if entry in ("gated_mlp", "gated_mlp_int8"):
        mk = _bf16 if entry == "gated_mlp" else _q8
        return dict(x=_f32(T, D), gate=mk(F, D, seed=1), up=mk(F, D, seed=2), down=mk(D, F, seed=3))
    if entry == "rmsnorm":
        return dict(x=_f32(2, D), weight=_bf16(D), eps=1e-6)
    if entry == "route_greedy":
        return dict(x=_f32(T, D), gate=_bf16(E, D), k=K, sigmoid=False, norm=True, scaling=1.0)
    if entry == "mha_decode":
        return dict(x=_f32(2, D), wq=_bf16(H * HD, D, seed=1), wk=_bf16(HK * HD, D, seed=2),
                    wv=_bf16(HK * HD, D, seed=3), wo=_bf16(D, H * HD, seed=4), biases=(None, _f32(HK * HD), None, None),
                    heads=H, kv_heads=HK, cos=torch.ones(2, 1, HD), sin=torch.zeros(2, 1, HD),
                    k_cache=torch.zeros(NB, BS, HK, HD), v_cache=torch.zeros(NB, BS, HK, HD),
                    table=torch.tensor([[0, 1], [2, 0]]), pos=torch.tensor([5, 2]), scale=HD ** -0.5)
    if entry == "step_rows":
        return dict(b=2, hd=HD, cos=torch.ones(2, HD), sin=torch.zeros(2, HD), table=torch.tensor([[0, 1], [2, 0]]),
                    pos=torch.tensor([5, 2]))
    raise AssertionError(entry)


def _call(entry: str, a: dict):
    if entry in ("experts_int8", "gated_mlp_int8", "experts", "gated_mlp"):
        names = ("x", "idx", "wt", "gate", "up", "down") if "experts" in entry else ("x", "gate", "up", "down")
        return getattr(native, entry)(*(a[n] for n in names))
    return getattr(native, entry)(**a)


def _set(name, value):
    return lambda a: {**a, name: value(a[name]) if callable(value) else value}


def _quant(name, part, value):
    """An int8 QuantWeight argument with its values / scales replaced."""
    def f(a):
        w = a[name]
        data, scale = (value(w.data), w.scale) if part == "data" else (w.data, value(w.scale))
        return {**a, name: QuantWeight("int8", w.shape, data, scale)}
    return f


MULTIPLE = "heads must be a positive multiple of kv_heads"
SPECIAL = {MULTIPLE, r"head size in \[1, 1024\]", "pools not empty", "experts per token"}
BAD = {  # entry point: [(what, change to valid arguments, the argument the message names, or a SPECIAL message)]
    "linear": [
        ("x bf16", _set("x", lambda t: t.to(torch.bfloat16)), "x"),
        ("x not on the CPU", _set("x", _meta), "x"),
        ("x a scalar", _set("x", torch.tensor(1.0)), "x"),
        ("w float32", _set("w", lambda t: t.float()), "w"),
        ("w width != x's", _set("w", _bf16(8, D - 1)), "w"),
        ("w 1-D", _set("w", _bf16(D)), "w"),
        ("w not contiguous", _set("w", _noncontig), "w"),
        ("w not on the CPU", _set("w", _meta), "w"),
        ("K = 0", lambda a: {**a, "x": _f32(T, 0), "w": _bf16(8, 0)}, "w"),
        ("bias size", _set("bias", _f32(7)), "bias"),
        ("bias integer", _set("bias", torch.zeros(8, dtype=torch.int64)), "bias"),
    ],
    "linear_int8": [
        ("x float64", _set("x", lambda t: t.double()), "x"),
        ("q uint8", _set("q", lambda t: t.to(torch.uint8)), "q"),
        ("q width != x's", _set("q", torch.zeros(8, D + 1, dtype=torch.int8)), "q"),
        ("q not contiguous", _set("q", _noncontig), "q"),
        ("scale size", _set("scale", lambda t: t[:-1]), "scale"),
        ("scale float32", _set("scale", lambda t: t.float()), "scale"),
        ("scale not contiguous", _set("scale", _noncontig), "scale"),
    ],
    "experts": [
        ("x bf16", _set("x", lambda t: t.to(torch.bfloat16)), "x"),
        ("x width != the weights' D", _set("x", _f32(T, D - 1)), "gate"),  # D: x's width
        ("x not on the CPU", _set("x", _meta), "x"),
        ("gate [E, D, F]", _set("gate", _bf16(E, D, F)), "gate"),
        ("gate 4-D", _set("gate", _bf16(1, E, F, D)), "gate"),
        ("up fewer experts", _set("up", _bf16(E - 1, F, D)), "up"),
        ("down [E, F, D]", _set("down", _bf16(E, F, D)), "down"),
        ("down float32", _set("down", lambda t: t.float()), "down"),
        ("gate not contiguous", _set("gate", lambda t: t.transpose(1, 2).contiguous().transpose(1, 2)), "gate"),
        ("F = 0", lambda a: {**a, "gate": _bf16(E, 0, D), "up": _bf16(E, 0, D), "down": _bf16(E, D, 0)}, "gate"),
        ("idx rows != tokens", _set("idx", lambda t: t[:2]), "idx"),
        ("idx float", _set("idx", lambda t: t.float()), "idx"),
        ("idx 1-D", _set("idx", lambda t: t[:, 0]), "idx"),
        ("idx k = 0", lambda a: {**a, "idx": a["idx"][:, :0], "wt": a["wt"][:, :0]}, "idx"),
        ("wt shape != idx's", _set("wt", lambda t: t[:, :1]), "wt"),
        ("wt integer", _set("wt", lambda t: t.long()), "wt"),
    ],
    "experts_int8": [
        ("gate int4", _set("gate", lambda w: QuantWeight("int4", w.shape, w.data, w.scale)), "gate"),
        ("up a tensor", _set("up", lambda w: w.data), "up"),
        ("down values [E, F, D]", _set("down", _q8(E, F, D)), "down"),
        ("gate values not contiguous", _quant("gate", "data", lambda t: t.transpose(1, 2).contiguous()
                                                                           .transpose(1, 2)), "gate"),
        ("up scales [E, D]", _quant("up", "scale", lambda t: torch.zeros(E, D, dtype=torch.bfloat16)), "up scale"),
        ("down scales float32", _quant("down", "scale", lambda t: t.float()), "down scale"),
        ("idx rows != tokens", _set("idx", lambda t: t[1:]), "idx"),
        ("x bf16", _set("x", lambda t: t.to(torch.bfloat16)), "x"),
    ],
    "gated_mlp": [
        ("x width != the weights' D", _set("x", _f32(T, D + 2)), "gate"),
        ("x float64", _set("x", lambda t: t.double()), "x"),
        ("gate [D, F]", _set("gate", _bf16(D, F)), "gate"),
        ("up 1-D", _set("up", _bf16(F * D)), "up"),
        ("up not contiguous", _set("up", _noncontig), "up"),
        ("down [F, D]", _set("down", _bf16(F, D)), "down"),
        ("down not on the CPU", _set("down", _meta), "down"),
        ("gate 1-D", _set("gate", _bf16(D)), "gate"),
    ],
    "gated_mlp_int8": [
        ("down kind int4pack", _set("down", lambda w: QuantWeight("int4pack", w.shape, w.data, w.scale)), "down"),
        ("gate values [D, F]", _set("gate", _q8(D, F)), "gate"),
        ("gate scales [D]", _quant("gate", "scale", lambda t: torch.zeros(D, dtype=torch.bfloat16)), "gate scale"),
        ("up values bf16", _quant("up", "data", lambda t: t.to(torch.bfloat16)), "up"),
        ("x float16", _set("x", lambda t: t.half()), "x"),
    ],
    "rmsnorm": [
        ("x bf16", _set("x", lambda t: t.to(torch.bfloat16)), "x"),
        ("x not on the CPU", _set("x", _meta), "x"),
        ("weight size", _set("weight", _bf16(D - 1)), "weight"),
        ("weight [1, D]", _set("weight", _bf16(1, D)), "weight"),
        ("weight float16", _set("weight", lambda t: t.half()), "weight"),
        ("weight not contiguous", _set("weight", _noncontig), "weight"),
        ("D = 0", lambda a: {**a, "x": _f32(2, 0), "weight": _bf16(0)}, "weight"),
    ],
    "route_greedy": [
        ("x 3-D", _set("x", lambda t: t[None]), "x"),
        ("x bf16", _set("x", lambda t: t.to(torch.bfloat16)), "x"),
        ("gate width != x's", _set("gate", _bf16(E, D + 1)), "gate"),
        ("gate float32", _set("gate", lambda t: t.float()), "gate"),
        ("gate not contiguous", _set("gate", _noncontig), "gate"),
        ("k > E", _set("k", E + 1), "experts per token"),
        ("k = 0", _set("k", 0), "experts per token"),
    ],
    "mha_decode": [
        ("x 3-D", _set("x", lambda t: t[:, None]), "x"),
        ("x bf16", _set("x", lambda t: t.to(torch.bfloat16)), "x"),
        ("wq [D, D + 8]", _set("wq", _bf16(H * HD, D + 8)), "wq"),
        ("wk rows of H heads", _set("wk", _bf16(H * HD, D)), "wk"),
        ("wv float32", _set("wv", lambda t: t.float()), "wv"),
        ("wo transposed", _set("wo", _bf16(H * HD + 8, D)), "wo"),
        ("wo not contiguous", _set("wo", _noncontig), "wo"),
        ("bk size", _set("biases", (None, _f32(HK * HD + 1), None, None)), "bk"),
        ("bo integer", _set("biases", (None, None, None, torch.zeros(D, dtype=torch.int64))), "bo"),
        ("three biases", _set("biases", (None, None, None)), "biases"),
        ("heads not a multiple of kv_heads", _set("heads", 3), MULTIPLE),
        ("kv_heads != the pools'", lambda a: {**a, "kv_heads": 1, "wk": _bf16(HD, D), "wv": _bf16(HD, D)},
         MULTIPLE),
        ("kv_heads 0", _set("kv_heads", 0), MULTIPLE),
        ("head size > 1024", lambda a: {**a, "k_cache": torch.zeros(1, 1, HK, 1040),
                                        "v_cache": torch.zeros(1, 1, HK, 1040)}, r"head size in \[1, 1024\]"),
        ("k_cache not contiguous", _set("k_cache", lambda t: t.transpose(0, 1).contiguous().transpose(0, 1)),
         "k_cache"),
        ("k_cache float16", _set("k_cache", lambda t: t.half()), "k_cache"),
        ("k_cache 3-D", _set("k_cache", lambda t: t[0]), "k_cache"),
        ("k_cache not on the CPU", _set("k_cache", _meta), "k_cache"),
        ("v_cache other shape", _set("v_cache", torch.zeros(NB + 1, BS, HK, HD)), "v_cache"),
        ("v_cache not contiguous", _set("v_cache", lambda t: t.transpose(0, 1).contiguous().transpose(0, 1)),
         "v_cache"),
        ("empty pools", lambda a: {**a, "k_cache": torch.zeros(0, BS, HK, HD), "v_cache": torch.zeros(0, BS, HK, HD)},
         "pools not empty"),
        ("cos head size", _set("cos", torch.ones(2, HD - 2)), "cos"),
        ("sin bf16", _set("sin", lambda t: t.to(torch.bfloat16)), "sin"),
        ("cos rows", _set("cos", torch.ones(3, HD)), "cos"),
        ("table 1-D", _set("table", lambda t: t[:, 0]), "table"),
        ("table rows", _set("table", lambda t: t[:1]), "table"),
        ("table float", _set("table", lambda t: t.float()), "table"),
        ("table width 0", _set("table", lambda t: t[:, :0]), "table"),
        ("pos rows", _set("pos", torch.tensor([1, 2, 3])), "pos"),
        ("pos float", _set("pos", lambda t: t.float()), "pos"),
        ("pos not on the CPU", _set("pos", _meta), "pos"),
    ],
    "step_rows": [
        ("cos float64", _set("cos", lambda t: t.double()), "cos"),
        ("table bool", _set("table", lambda t: t > 0), "table"),
        ("pos too few", _set("pos", torch.tensor([1])), "pos"),
    ],
}
CASES = [pytest.param(entry, change, name if name in SPECIAL else rf"\b{re.escape(name)} must be",
                      id=f"{entry}: {what}")
         for entry, cases in BAD.items() for what, change, name in cases]


@needs_native
@pytest.mark.parametrize("entry", sorted(BAD))
def test_valid_arguments_run(entry):
    """The valid arguments the cases below start from do run (so each case's one change is what is refused)."""
    _call(entry, _args(entry))


@needs_native
@pytest.mark.parametrize("entry", sorted(set(BAD) - {"step_rows"}))
def test_non_contiguous_activations_are_copied_not_refused(entry):
    a = _args(entry)
    a2 = {**a, "x": _noncontig(a["x"])}
    assert not a2["x"].is_contiguous() and torch.equal(a2["x"], a["x"])
    if entry == "mha_decode":  # it writes the pools: compare on copies
        a2 = {**a2, "k_cache": a["k_cache"].clone(), "v_cache": a["v_cache"].clone()}
    same = [torch.equal(p, q) for p, q in zip(*(
        (r if isinstance(r, tuple) else (r,)) for r in (_call(entry, a), _call(entry, a2))))]
    assert all(same)


@pytest.mark.parametrize("entry,change,pattern", CASES)
def test_bad_arguments_raise_before_c(entry, change, pattern, monkeypatch):
    args = change(_args(entry))
    with native.stand_in(_NoC()), pytest.raises(ValueError, match=pattern):
        _call(entry, args)


# ---- the decode plan's run --------------------------------------------------------------


def _plan_and_step():
    cfg = LanguageConfig(hidden_size=D, intermediate_size=48, num_hidden_layers=2, vocab_size=40, n_routed_experts=E,
                         num_experts_per_tok=K, moe_intermediate_size=F, topk_method="greedy", use_mla=False,
                         num_attention_heads=H, num_key_value_heads=HK, first_k_dense_replace=1, n_shared_experts=1)
    lm = LanguageModel(cfg)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in lm.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    lm = lm.to(torch.bfloat16)
    lm.rotary = RotaryEmbedding(cfg)
    plan = decode_plan.DecodePlan(lm)
    cache = KVCache(cfg, 1 + 2 * 4, block_size=4)
    for pair in cache.layers:
        for t in pair:
            t.zero_()
    start = torch.tensor([3, 6])
    _, ctx = lm.step_context(cache, start, torch.ones_like(start), 1, row_tables(2, 16, 4))
    x = lm.embed(torch.tensor([[5], [7]]))
    return plan, x, ctx


def _with_layers(ctx, layers):
    return SimpleNamespace(cache=SimpleNamespace(layers=layers), cos=ctx.cos, sin=ctx.sin, table=ctx.table,
                           write_pos=ctx.write_pos)


PLAN_BAD = {
    "x bf16": (lambda x, c: (x.to(torch.bfloat16), c), "x must be float32"),
    "x [B, D]": (lambda x, c: (x[:, 0], c), "x must be float32"),
    "x two tokens": (lambda x, c: (torch.cat([x, x], 1), c), "x must be float32"),
    "x width": (lambda x, c: (x[..., :-1], c), "x must be float32"),
    "one layer's pools missing": (lambda x, c: (x, _with_layers(c, c.cache.layers[:1])), "cache has 1 layers"),
    "layer 1 keys not contiguous": (lambda x, c: (x, _with_layers(c, [c.cache.layers[0], (
        c.cache.layers[1][0].transpose(0, 1).contiguous().transpose(0, 1), c.cache.layers[1][1])])), "layer 1"),
    "layer 1 values bigger": (lambda x, c: (x, _with_layers(c, [c.cache.layers[0], (
        c.cache.layers[1][0], torch.zeros(20, 4, HK, HD))])), "layer 1"),
    "layer 0 bf16": (lambda x, c: (x, _with_layers(c, [tuple(t.to(torch.bfloat16) for t in c.cache.layers[0]),
                                                       c.cache.layers[1]])), "layer 0"),
    "pools' head size": (lambda x, c: (x, _with_layers(c, [(torch.zeros(9, 4, HK, HD * 2),) * 2] * 2)), "layer 0's cache must be"),
    "cos bf16": (lambda x, c: (x, SimpleNamespace(**{**vars(_with_layers(c, c.cache.layers)),
                                                     "cos": c.cos.to(torch.bfloat16)})), "cos"),
}


@needs_native
def test_plan_runs_with_valid_arguments():
    plan, x, ctx = _plan_and_step()
    out, routing = plan.run(x, ctx)
    assert out.shape == (2, 1, D) and sorted(routing) == [1]


@pytest.mark.parametrize("what", sorted(PLAN_BAD))
def test_plan_refuses_bad_arguments_before_c(what, monkeypatch):
    plan, x, ctx = _plan_and_step()
    change, match = PLAN_BAD[what]
    x, ctx = change(x, ctx)
    with native.stand_in(_NoC()), pytest.raises(ValueError, match=match):
        plan.run(x, ctx)


@needs_native
def test_plan_is_not_built_for_weights_of_other_sizes():
    plan, _, _ = _plan_and_step()
    lm = LanguageModel(plan.cfg).to(torch.bfloat16)
    assert decode_plan.DecodePlan.build(lm) is not None
    # a weight of another size than the config's: step.c would index past it
    lm.model.layers[1].mlp.experts.register_parameter(
        "down_proj", torch.nn.Parameter(torch.zeros(E, D, F - 1, dtype=torch.bfloat16)))
    assert decode_plan.DecodePlan.build(lm) is None


# ---- when the kernels are built, and what a fallback says -------------------------------


def test_load_builds_the_kernels(monkeypatch):
    import dsvl2.api

    seen = []
    monkeypatch.setattr(native, "prepare", lambda device="cpu": seen.append(str(device)) or False)
    model = dsvl2.api.load("demo", device="cpu")
    try:
        assert seen == ["cpu"]
    finally:
        model.driver.close()


@needs_native
def test_prepare_builds_nothing_for_other_devices(monkeypatch, fresh, tmp_path):
    monkeypatch.setenv("DSVL2_CACHE_DIR", str(tmp_path))  # a build would create its folder here
    assert native.prepare("meta") is False and native.prepare(torch.device("cuda")) is False
    assert list(tmp_path.iterdir()) == []
    assert native.prepare("cpu") and list(tmp_path.iterdir())  # where a CPU build does


@pytest.mark.parametrize("why", ["disabled", "cpu", "compiler"])
def test_fallback_to_torch_is_one_warning_saying_why_and_what_it_costs(why, monkeypatch, fresh, tmp_path):
    monkeypatch.setenv("DSVL2_CACHE_DIR", str(tmp_path))
    if why == "disabled":
        monkeypatch.setenv("DSVL2_NATIVE", "0")
        expected = "DSVL2_NATIVE=0"
    elif why == "cpu":
        monkeypatch.setattr(native_build, "cpu_ok", lambda: (False, "CPU lacks avx2"))
        expected = "CPU lacks avx2"
    else:
        if not native.cpu_ok()[0]:
            pytest.skip("no compile is tried on this CPU")
        monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
        expected = "no C compiler usable"
    for _ in range(3):
        assert not native.prepare("cpu") and not native.available()
    assert native.status()["native_decode"] is False
    warned = _warnings(fresh)
    assert len(warned) == 1, warned
    assert expected in warned[0] and "several times slower" in warned[0]
