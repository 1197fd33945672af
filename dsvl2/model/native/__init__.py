"""Native decode kernels for bf16 weights on x86 CPUs with AVX2 + FMA (``bf16.c``, ``layers.c``,
``step.c``).

Why: a decode step is one matrix-vector product per weight, so its speed is the speed
at which the weights stream from memory. torch's bf16 CPU GEMV converts and multiplies
at ~7 GB/s per core here (compute-bound: two cores reach ~14 of the ~18 GB/s the memory
gives) and re-reads the whole weight for every row of a batch (a 16-row product costs
16 GEMVs). ``bf16.c`` widens bf16 by a shift, accumulates in float32 and reads each
weight row once for all rows, and runs a whole MoE layer (sort by expert, gate / up,
SiLU, down, weighted sum) in one call and one parallel region. ``layers.c`` does the small
parts of a decode step (RMSNorm, the greedy router, the whole MHA attention block) in one
call each: as torch ops they cost more time than their bytes (~1200 ops per step).
``step.c`` runs all decoder layers of a decode step in one call where every block has a
native version (``model/decode_plan.py`` decides), so no Python runs between the layers.

Numbers: activations stay float32 (torch's bf16 path rounds them to bf16 first), so the
result is closer to the float32 reference than the torch bf16 path's; a row's bits do
not depend on the other rows (see ``bf16.c``). ``tests/test_native.py`` checks both
against the float32 reference and the torch path.

Build: on first use, with the system C compiler (``$CC`` or ``cc``; ``-O3 -mavx2 -mfma
-fopenmp``), into ``~/.cache/dsvl2/native`` (``DSVL2_CACHE_DIR`` moves it), keyed by the
source's hash; linked against ``libgomp.so.1``, which torch has already loaded, so the
kernels share torch's thread team. Where there is no such CPU or compiler, or
``DSVL2_NATIVE=0``, ``available()`` is False and the model uses torch's kernels;
``status()`` says which and why (``dsvl2 info`` prints it).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

HERE = Path(__file__).parent
SOURCES = (HERE / "bf16.c", HERE / "layers.c", HERE / "step.c")  # + products.h, which all include
_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_status: str | None = None
_local = threading.local()


def _cache_dir() -> Path:
    base = os.environ.get("DSVL2_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "dsvl2")
    return Path(base) / "native"


def _cpu_ok() -> tuple[bool, str]:
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False, f"not an x86-64 CPU ({platform.machine()})"
    from ..kernels import cpu_info

    _, flags = cpu_info()
    missing = [f for f in ("avx2", "fma", "f16c") if f not in flags]
    if missing:
        return False, f"CPU lacks {', '.join(missing)}"
    return True, ""


def _build() -> tuple[ctypes.CDLL | None, str]:
    if os.environ.get("DSVL2_NATIVE", "1").strip().lower() in ("0", "false", "no", "off"):
        return None, "disabled by DSVL2_NATIVE=0"
    ok, why = _cpu_ok()
    if not ok:
        return None, why
    src = b"".join(p.read_bytes() for p in (*SOURCES, HERE / "products.h"))
    cc = os.environ.get("CC", "cc")
    flags = ["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-ffp-contract=off", "-fPIC", "-shared"]
    key = hashlib.sha256(src + " ".join([cc, *flags]).encode()).hexdigest()[:16]
    out = _cache_dir() / f"bf16-{key}.so"
    if not out.is_file():
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
                part = Path(tmp) / out.name
                r = subprocess.run([cc, *flags, *map(str, SOURCES), "-o", str(part), "-lm"],
                                   capture_output=True, text=True, timeout=120)
                if r.returncode != 0:
                    return None, f"compiling {' + '.join(p.name for p in SOURCES)} with {cc} failed: {(r.stderr or r.stdout).strip()[:300]}"
                os.replace(part, out)  # atomic: a concurrent build just replaces the same file
        except (OSError, subprocess.SubprocessError) as e:
            return None, f"no C compiler usable ({cc}): {e}"
    try:
        lib = ctypes.CDLL(str(out))
    except OSError as e:
        return None, f"loading {out} failed: {e}"
    i64, p = ctypes.c_int64, ctypes.c_void_p
    lib.dsvl2_linear.argtypes = [p, i64, i64, p, i64, p, p]
    lib.dsvl2_linear.restype = None
    lib.dsvl2_linear_i8.argtypes = [p, i64, i64, p, p, i64, p]
    lib.dsvl2_linear_i8.restype = None
    lib.dsvl2_moe.argtypes = [p, i64, i64, p, p, i64, p, p, p, i64, i64, p, p, p, i64, p, p, p]
    lib.dsvl2_moe.restype = ctypes.c_int
    f32 = ctypes.c_float
    lib.dsvl2_rmsnorm.argtypes = [p, i64, i64, p, ctypes.c_int, f32, p]
    lib.dsvl2_rmsnorm.restype = None
    lib.dsvl2_route_greedy.argtypes = [p, i64, i64, i64, ctypes.c_int, ctypes.c_int, f32, p, p]
    lib.dsvl2_route_greedy.restype = None
    lib.dsvl2_mha_decode.argtypes = [p, i64, i64, i64, i64, i64, p, p, p, p, p, p, p, p, p, p, p, p, i64, i64,
                                     p, p, f32, p, p]
    lib.dsvl2_mha_decode.restype = ctypes.c_int
    lib.dsvl2_mha_scratch.argtypes = [i64] * 5
    lib.dsvl2_mha_scratch.restype = i64
    lib.dsvl2_decode_layers.argtypes = [p, i64, i64, p, i64, p, i64, i64, i64, f32, f32, i64, ctypes.c_int,
                                        ctypes.c_int, f32, p, p, i64, i64, p, p, p, p, i64, p, p, p]
    lib.dsvl2_decode_layers.restype = ctypes.c_int
    lib.dsvl2_decode_scratch.argtypes = [i64] * 9
    lib.dsvl2_decode_scratch.restype = i64
    lib.dsvl2_decode_order.argtypes = [i64] * 3
    lib.dsvl2_decode_order.restype = i64
    return lib, f"AVX2 bf16 decode kernels ({out.name})"


def _load() -> ctypes.CDLL | None:
    global _lib, _status
    if _status is None:
        with _lock:
            if _status is None:
                _lib, _status = _build()
    return _lib


def available() -> bool:
    return _load() is not None


def status() -> dict:
    lib = _load()
    return {"native_decode": lib is not None, "reason": _status}


def reset() -> None:
    """Forget the build decision (tests that change DSVL2_NATIVE)."""
    global _lib, _status
    with _lock:
        _lib, _status = None, None


def _require() -> ctypes.CDLL:
    lib = _load()
    if lib is None:
        raise RuntimeError(f"native decode kernels unavailable: {_status}")
    return lib


def bf16_weight(w) -> bool:
    """A weight the kernels take as it is: a contiguous bf16 CPU tensor."""
    return isinstance(w, torch.Tensor) and w.dtype == torch.bfloat16 and w.is_cpu and w.is_contiguous()


def usable(x: torch.Tensor, *weights: torch.Tensor) -> bool:
    """Float32 CPU activations against contiguous bf16 CPU weights, and kernels built."""
    if x.dtype != torch.float32 or not x.is_cpu or (_lib is None and not available()):
        return False
    for w in weights:  # a loop, not all(<generator>): this runs for every product of a step
        if not bf16_weight(w):
            return False
    return True


def usable_int8(x: torch.Tensor, *weights) -> bool:
    """Float32 CPU activations against int8 ``QuantWeight`` s, and kernels built."""
    return (x.dtype == torch.float32 and x.device.type == "cpu"
            and all(getattr(w, "kind", None) == "int8" for w in weights) and available())


def _scratch(n: int, dtype: torch.dtype) -> torch.Tensor:
    bufs = getattr(_local, "bufs", None)
    if bufs is None:
        bufs = _local.bufs = {}
    buf = bufs.get(dtype)
    if buf is None or buf.numel() < n:
        buf = bufs[dtype] = torch.empty(max(n, 1), dtype=dtype)
    return buf


# The wrappers below run a few hundred times per decode step: they avoid torch calls that
# are not needed (a reshape or a view costs 2-4 us, as much as the call into C).


def _flat(x: torch.Tensor) -> torch.Tensor:
    """x itself when contiguous (the C side takes it as [numel / K, K]), else a contiguous copy."""
    return x if x.is_contiguous() else x.contiguous()


def linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ w.T + bias``: x float32 [..., K], w bf16 [N, K] -> float32 [..., N]."""
    *lead, k = x.shape
    n = w.shape[0]
    x = _flat(x)
    y = torch.empty((*lead, n), dtype=torch.float32)
    b = None
    if bias is not None:
        b = bias.float().contiguous()
    _require().dsvl2_linear(x.data_ptr(), x.numel() // k, k, w.data_ptr(), n, None if b is None else b.data_ptr(),
                            y.data_ptr())
    return y


def linear_int8(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x @ (scale[:, None] * q).T``: x float32 [..., K], q int8 [N, K], scale bf16 [N] -> float32 [..., N]."""
    if q.dtype != torch.int8 or scale.dtype != torch.bfloat16 or not (q.is_contiguous() and scale.is_contiguous()):
        raise TypeError("linear_int8 takes contiguous int8 values and bf16 scales")
    lead, k = x.shape[:-1], x.shape[-1]
    n = q.shape[0]
    x2 = x.reshape(-1, k).to(torch.float32).contiguous()
    y = torch.empty(x2.shape[0], n, dtype=torch.float32)
    _require().dsvl2_linear_i8(x2.data_ptr(), x2.shape[0], k, q.data_ptr(), scale.data_ptr(), n, y.data_ptr())
    return y.view(*lead, n)


def _moe(x: torch.Tensor, idx: torch.Tensor | None, wt: torch.Tensor | None, gate, up, down,
         scales: tuple | None = None) -> torch.Tensor:
    """x [..., D]; gate / up / down: [E, F, D] / [E, D, F] stacks, or one MLP's [F, D] / [D, F]
    (E = 1), bf16 or int8 values with ``scales`` = their bf16 per-row scales."""
    d = x.shape[-1]
    t = x.numel() // d
    e, f = (1, gate.shape[0]) if gate.dim() == 2 else gate.shape[:2]
    k = 1 if idx is None else idx.shape[1]
    p = t * k
    x = _flat(x)
    out = torch.empty(x.shape, dtype=torch.float32)
    scratch = _scratch(p * (2 * d + 2 * f), torch.float32)
    order = _scratch(p + 2 * e + 1, torch.int64)
    gs = us = ds = None
    esize = 2
    if scales is not None:
        gs, us, ds = (sc.data_ptr() for sc in scales)
        esize = 1
    rc = _require().dsvl2_moe(x.data_ptr(), t, d, None if idx is None else idx.data_ptr(),
                              None if wt is None else wt.data_ptr(), k, gate.data_ptr(), up.data_ptr(),
                              down.data_ptr(), e, f, out.data_ptr(), scratch.data_ptr(), order.data_ptr(),
                              esize, gs, us, ds)
    if rc != 0:
        raise ValueError(f"expert ids must be in [0, {e}), got {idx.min().item()}..{idx.max().item()}")
    return out


def experts_int8(x: torch.Tensor, idx: torch.Tensor, wt: torch.Tensor, gate, up, down) -> torch.Tensor:
    """``experts`` for int8 ``QuantWeight`` stacks (values [E, N, K] int8, scales [E, N] bf16)."""
    ws = (gate, up, down)
    if any(w.kind != "int8" or not (w.data.is_contiguous() and w.scale.is_contiguous()) for w in ws):
        raise TypeError("experts_int8 takes contiguous int8 QuantWeights")
    return _moe(x, idx.to(torch.int64).contiguous(), wt.to(torch.float32).contiguous(),
                gate.data, up.data, down.data, tuple(w.scale for w in ws))


def experts(x: torch.Tensor, idx: torch.Tensor, wt: torch.Tensor, gate: torch.Tensor, up: torch.Tensor,
            down: torch.Tensor) -> torch.Tensor:
    """SiLU-gated experts: x float32 [T, D], idx [T, k], wt [T, k]; gate / up [E, F, D], down [E, D, F]."""
    return _moe(x, _flat(idx.to(torch.int64)), _flat(wt.to(torch.float32)), gate, up, down)


def gated_mlp(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """``down(silu(gate(x)) * up(x))`` for one MLP: gate / up [F, D], down [D, F]; x [..., D]."""
    return _moe(x, None, None, gate, up, down)


def gated_mlp_int8(x: torch.Tensor, gate, up, down) -> torch.Tensor:
    """``gated_mlp`` for int8 ``QuantWeight`` s (values [N, K] int8, scales [N] bf16)."""
    ws = (gate, up, down)
    if any(w.kind != "int8" or not (w.data.is_contiguous() and w.scale.is_contiguous()) for w in ws):
        raise TypeError("gated_mlp_int8 takes contiguous int8 QuantWeights")
    return _moe(x.to(torch.float32), None, None, gate.data, up.data, down.data, tuple(w.scale for w in ws))


# ---- the small parts of a decode step (layers.c) ---------------------------------------


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm of float32 x [..., D] with a float32 or bf16 weight [D] -> float32."""
    if weight.dtype not in (torch.float32, torch.bfloat16) or not weight.is_contiguous():
        raise TypeError("rmsnorm takes a contiguous float32 or bf16 weight")
    x = _flat(x)
    y = torch.empty_like(x)
    d = x.shape[-1]
    _require().dsvl2_rmsnorm(x.data_ptr(), x.numel() // d, d, weight.data_ptr(), weight.dtype == torch.bfloat16,
                             eps, y.data_ptr())
    return y


def route_greedy(x: torch.Tensor, gate: torch.Tensor, k: int, sigmoid: bool, norm: bool,
                 scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy top-k routing of float32 x [T, D] by a bf16 gate [E, D]: (idx int64 [T, k]
    in descending score order, weights float32 [T, k])."""
    logits = linear(x, gate)  # [T, E], overwritten with the scores
    t, e = logits.shape
    if not 0 < k <= e:
        raise ValueError(f"experts per token must be in [1, {e}], got {k}")
    idx = torch.empty(t, k, dtype=torch.int64)
    wt = torch.empty(t, k, dtype=torch.float32)
    _require().dsvl2_route_greedy(logits.data_ptr(), t, e, k, int(sigmoid), int(norm), scaling,
                                  idx.data_ptr(), wt.data_ptr())
    return idx, wt


def mha_decode(x: torch.Tensor, wq: torch.Tensor, wk: torch.Tensor, wv: torch.Tensor, wo: torch.Tensor,
               biases: tuple, heads: int, kv_heads: int, cos: torch.Tensor, sin: torch.Tensor,
               k_cache: torch.Tensor, v_cache: torch.Tensor, rows: torch.Tensor, pos: torch.Tensor,
               scale: float) -> torch.Tensor:
    """One MHA decode step: x float32 [B, D] (normalised), bf16 weights, float32 cache
    [R, S, Hk, hd] written at (rows[b], pos[b]) and attended over slots 0..pos[b];
    cos / sin float32 [B, hd]. Returns the attention block's output [B, D]."""
    *lead, d = x.shape
    b = x.numel() // d
    hd = k_cache.shape[-1]
    r, s = k_cache.shape[:2]
    cos, sin, rows, pos = step_rows(b, hd, cos, sin, rows, pos)
    x = _flat(x)
    lib = _require()
    scratch = _scratch(lib.dsvl2_mha_scratch(b, heads, kv_heads, hd, s), torch.float32)
    out = torch.empty((*lead, d), dtype=torch.float32)
    biases = [None if t is None else t.float().contiguous() for t in biases]  # kept alive for the call
    ptrs = [None if t is None else t.data_ptr() for t in biases]
    rc = lib.dsvl2_mha_decode(x.data_ptr(), b, d, heads, kv_heads, hd, wq.data_ptr(), wk.data_ptr(),
                              wv.data_ptr(), wo.data_ptr(), *ptrs, cos.data_ptr(), sin.data_ptr(),
                              k_cache.data_ptr(), v_cache.data_ptr(), r, s, rows.data_ptr(), pos.data_ptr(),
                              scale, out.data_ptr(), scratch.data_ptr())
    if rc != 0:
        raise decode_error(rc, r, s, rows, pos, hd=hd, heads=heads, kv_heads=kv_heads)
    return out


def step_rows(b: int, hd: int, cos: torch.Tensor, sin: torch.Tensor, rows: torch.Tensor,
              pos: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """A decode step's per-row inputs as the C side takes them: cos / sin float32 [B, hd]
    (checked), cache rows / slots int64 [B], all contiguous."""
    if cos.numel() != b * hd or sin.numel() != b * hd:
        raise ValueError(f"cos / sin must hold {b} x {hd} values, got {tuple(cos.shape)} / {tuple(sin.shape)}")
    return _flat(cos), _flat(sin), _flat(rows.to(torch.int64)), _flat(pos.to(torch.int64))


def decode_error(rc: int, r: int, s: int, rows: torch.Tensor, pos: torch.Tensor, *, hd: int | None = None,
                 heads: int | None = None, kv_heads: int | None = None, layer: int | None = None) -> ValueError:
    """The error for a non-zero return of ``dsvl2_mha_decode`` / ``dsvl2_decode_layers``."""
    where = "" if layer is None or layer < 0 else f"layer {layer}: "
    if rc == -2:
        return ValueError(f"{where}head size must be <= 1024 and heads a multiple of kv heads, got "
                          f"{hd} / {heads} / {kv_heads}")
    return ValueError(f"{where}cache rows must be in [0, {r}) and slots in [0, {s}), got rows "
                      f"{rows.tolist()} and slots {pos.tolist()}")
