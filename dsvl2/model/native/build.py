"""Building and loading the native kernels' shared library (the C sources next to this file).

Build: when a model loads (``dsvl2.load`` calls ``prepare``; else on first use), with the
system C compiler (``$CC`` or ``cc``; ``-O3 -mavx2 -mfma -fopenmp``), into
``<cache>/native/bf16-<hash>.so`` (``dsvl2/cachedir.py``: ``$DSVL2_CACHE_DIR``, else
``$XDG_CACHE_HOME/dsvl2``, else ``~/.cache/dsvl2``), keyed by the sources' hash; linked
against ``libgomp.so.1``, which torch has already loaded, so the kernels share torch's
thread team. The library is code run in this process, so it is loaded only from a cache
that no one else can write (``cachedir``: folders 0700, ours, not group / other-writable,
no symlinks; the ``.so`` likewise, a regular file), through the descriptor that was
checked (``/proc/self/fd/N``). Where the cache fails those checks the kernels are built
for this process alone in a private temporary directory, with one warning (a compile of a
few seconds in every process until the cache is fixed). Where there is no such CPU or
compiler, or ``DSVL2_NATIVE=0``, ``available()`` is False and the model uses torch's
kernels (decode several times slower), with one warning; ``status()`` says which and why
(``dsvl2 info`` prints it).
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import logging
import os
import platform
import secrets
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

from ... import cachedir
from .cpu import cpu_info

HERE = Path(__file__).parent
SOURCES = (HERE / "bf16.c", HERE / "layers.c", HERE / "step.c", HERE / "mla.c",
           HERE / "int4.c", HERE / "mlp.c", HERE / "dequant.c", HERE / "attention.c",
           HERE / "gelu.c", HERE / "layernorm.c", HERE / "rope.c", HERE / "amx.c", HERE / "amx_attention.c")
HEADERS = (HERE / "products.h", HERE / "amx.h")
FLAGS = ("-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-ffp-contract=off", "-fPIC", "-shared")
log = logging.getLogger("dsvl2.native")
_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_status: str | None = None


def cpu_ok() -> tuple[bool, str]:
    """(whether this CPU and system can run the kernels, why not: "" when they can)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False, f"not an x86-64 CPU ({platform.machine()})"
    if not cachedir.POSIX:
        return False, "not a POSIX system"
    _, flags = cpu_info()
    missing = [f for f in ("avx2", "fma", "f16c") if f not in flags]
    if missing:
        return False, f"CPU lacks {', '.join(missing)}"
    return True, ""


def _spec() -> tuple[str, str]:
    """(compiler, the library's file name: keyed by the sources, the compiler and its flags)."""
    src = b"".join(p.read_bytes() for p in (*SOURCES, *HEADERS))
    cc = os.environ.get("CC", "cc")
    key = hashlib.sha256(src + " ".join([cc, *FLAGS]).encode()).hexdigest()[:16]
    return cc, f"bf16-{key}.so"


def cache_path() -> Path:
    """The path the kernels are cached at (and loaded from, once checked) with this
    environment (``DSVL2_CACHE_DIR``, ``XDG_CACHE_HOME``, ``CC``)."""
    return cachedir.root() / "native" / _spec()[1]


class _CompileError(Exception):
    pass


def _compile(cc: str, into: str) -> str:
    """Build the library in the private folder ``into``; its path (mode 0700 whatever the
    umask). Raises ``_CompileError``: no compiler, or it failed."""
    part = os.path.join(into, "kernels.so")
    try:
        r = subprocess.run([cc, *FLAGS, *map(str, SOURCES), "-o", part, "-lm"],
                           capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.SubprocessError) as e:
        raise _CompileError(f"no C compiler usable ({cc}): {e}") from None
    if r.returncode != 0:
        raise _CompileError(f"compiling {' + '.join(p.name for p in SOURCES)} with {cc} failed: "
                            f"{(r.stderr or r.stdout).strip()[:300]}")
    os.chmod(part, 0o700)
    return part


def _install(part: str, dfd: int, name: str) -> None:
    """Copy the built library into the checked cache folder open at ``dfd`` as ``name``:
    written to a new file there (O_EXCL, 0700) and renamed over ``name`` (atomic: a
    concurrent build just replaces the same file), both relative to ``dfd``, so no path
    outside that folder is involved."""
    tmp = f".{name}.{secrets.token_hex(8)}.part"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o700, dir_fd=dfd)
    try:
        with open(fd, "wb") as dst, open(part, "rb") as src:
            shutil.copyfileobj(src, dst)
            dst.flush()
            os.fsync(dst.fileno())
        os.replace(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
    except BaseException:
        try:
            os.unlink(tmp, dir_fd=dfd)
        except OSError:
            pass
        raise


def _dlopen(fd: int, path: Path) -> ctypes.CDLL:
    """Load the checked library open at ``fd``: through ``/proc/self/fd``, i.e. the very
    file that was checked; without /proc, by its path if that is still the same file."""
    proc = f"/proc/self/fd/{fd}"
    try:
        if os.path.exists(proc):
            return ctypes.CDLL(proc)
        st, now = os.fstat(fd), os.lstat(path)
        if (st.st_dev, st.st_ino) != (now.st_dev, now.st_ino):
            raise OSError("it changed while it was being loaded")
        return ctypes.CDLL(str(path))
    except OSError as e:
        raise OSError(f"loading {path} failed: {e}") from None


def _load_checked(dfd: int, folder: Path, name: str) -> ctypes.CDLL:
    """Load ``name`` from the folder open at ``dfd`` if it is a regular file (not a symlink)
    of ours that group / others cannot write; ``FileNotFoundError`` / ``cachedir.Untrusted``."""
    fd = cachedir.open_file(dfd, folder, name)
    try:
        return _dlopen(fd, folder / name)
    finally:
        os.close(fd)


def _build() -> tuple[ctypes.CDLL | None, str]:
    if os.environ.get("DSVL2_NATIVE", "1").strip().lower() in ("0", "false", "no", "off"):
        return None, "disabled by DSVL2_NATIVE=0"
    ok, why = cpu_ok()
    if not ok:
        return None, why
    cc, name = _spec()
    refused: Exception | None = None  # why the cache is not used
    dfd = -1
    try:
        dfd, folder = cachedir.open_dir("native")  # created 0700, or checked: ours, not group / other-writable
    except (cachedir.Untrusted, OSError) as e:
        refused = e
    try:
        if refused is None:
            try:
                return _ready(_load_checked(dfd, folder, name), name, f"cached in {folder}")
            except FileNotFoundError:
                pass
            except (cachedir.Untrusted, OSError) as e:  # a symlink, not ours, writable by others, not loadable
                refused = e
        tmp = tempfile.mkdtemp(prefix="dsvl2-native-")  # 0700, ours: the compiler's output stays private
        try:
            try:
                part = _compile(cc, tmp)
            except _CompileError as e:
                return None, str(e)
            if refused is None:
                try:
                    _install(part, dfd, name)
                    return _ready(_load_checked(dfd, folder, name), name, f"built into {folder}")
                except (cachedir.Untrusted, OSError) as e:  # read-only, full, ...
                    refused = e
            log.warning("not using the native kernel cache: %s. The decode kernels were built in a private "
                        "temporary directory for this process instead, so every process that loads a model compiles "
                        "them again (a few seconds each) until the cache is fixed: make it a directory of yours that "
                        "group and others cannot write (chmod go-w), remove it, or set DSVL2_CACHE_DIR", refused)
            try:
                tfd = os.open(tmp, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
                try:
                    why = cachedir.why_untrusted(os.fstat(tfd), "dir")
                    if why:
                        raise cachedir.Untrusted(f"{tmp} is {why}")
                    lib = _load_checked(tfd, Path(tmp), os.path.basename(part))
                finally:
                    os.close(tfd)
            except (cachedir.Untrusted, OSError) as e:
                return None, f"loading the kernels built in a private temporary directory failed: {e}"
            return _ready(lib, name, f"built for this process only: {refused}")
        finally:
            shutil.rmtree(tmp, ignore_errors=True)  # a loaded library stays mapped
    finally:
        if dfd >= 0:
            os.close(dfd)


def _ready(lib: ctypes.CDLL, name: str, where: str) -> tuple[ctypes.CDLL | None, str]:
    try:
        _declare(lib)
    except AttributeError as e:  # a library of that name without our functions
        return None, f"{name} ({where}) is not a build of these kernels: {e}"
    return lib, f"native bf16 / int8 / int4 kernels ({name}, {where})"


def _declare(lib: ctypes.CDLL) -> None:
    i64, p = ctypes.c_int64, ctypes.c_void_p
    lib.dsvl2_linear.argtypes = [p, i64, i64, p, i64, p, p]
    lib.dsvl2_linear.restype = None
    lib.dsvl2_linear_i8.argtypes = [p, i64, i64, p, p, i64, p]
    lib.dsvl2_linear_i8.restype = None
    lib.dsvl2_linear_i4.argtypes = [p, i64, i64, p, p, i64, i64, p, p]
    lib.dsvl2_linear_i4.restype = None
    lib.dsvl2_dequant_i4.argtypes = [p, p, i64, i64, i64, p, ctypes.c_int]
    lib.dsvl2_dequant_i4.restype = None
    lib.dsvl2_dequant_i8.argtypes = [p, p, i64, i64, p, ctypes.c_int, ctypes.c_int]
    lib.dsvl2_dequant_i8.restype = ctypes.c_int
    lib.dsvl2_moe_i4.argtypes = [p, i64, i64, p, p, i64, p, p, p, p, p, p, i64, i64, i64, i64, p, p, p]
    lib.dsvl2_moe_i4.restype = ctypes.c_int
    lib.dsvl2_quant_variant.argtypes = [ctypes.c_int]
    lib.dsvl2_quant_variant.restype = ctypes.c_int
    lib.dsvl2_prefetch.argtypes = [i64]
    lib.dsvl2_prefetch.restype = i64
    lib.dsvl2_streams.argtypes = [ctypes.c_int]
    lib.dsvl2_streams.restype = ctypes.c_int
    lib.dsvl2_moe.argtypes = [p, i64, i64, p, p, i64, p, p, p, i64, i64, p, p, p, i64, p, p, p]
    lib.dsvl2_moe.restype = ctypes.c_int
    f32 = ctypes.c_float
    lib.dsvl2_rmsnorm.argtypes = [p, i64, i64, p, ctypes.c_int, f32, p]
    lib.dsvl2_rmsnorm.restype = None
    lib.dsvl2_gelu_tanh.argtypes = [p, i64]
    lib.dsvl2_gelu_tanh.restype = None
    lib.dsvl2_gelu_tanh_bf16.argtypes = [p, i64, p]
    lib.dsvl2_gelu_tanh_bf16.restype = None
    lib.dsvl2_add_layernorm.argtypes = [p, p, i64, i64, p, p, f32, p, ctypes.c_int]
    lib.dsvl2_add_layernorm.restype = None
    lib.dsvl2_rope.argtypes = [p, p, i64, i64, i64, i64, p, p, i64, ctypes.c_int, p]
    lib.dsvl2_rope.restype = None
    lib.dsvl2_route_greedy.argtypes = [p, i64, i64, i64, ctypes.c_int, ctypes.c_int, f32, p, p]
    lib.dsvl2_route_greedy.restype = None
    lib.dsvl2_route.argtypes = [p, i64, i64, i64, ctypes.c_int, ctypes.c_int, p, i64, i64, ctypes.c_int, f32, p, p]
    lib.dsvl2_route.restype = ctypes.c_int
    lib.dsvl2_mha_decode.argtypes = [p, i64, i64, i64, i64, i64, p, p, p, p, p, p, p, p, p, p, p, p, i64, i64,
                                     p, i64, p, f32, p, p]
    lib.dsvl2_mha_decode.restype = ctypes.c_int
    lib.dsvl2_mha_scratch.argtypes = [i64] * 5
    lib.dsvl2_mha_scratch.restype = i64
    lib.dsvl2_decode_layers.argtypes = [p, p, i64, p, ctypes.c_int, p, p, i64, i64, p, i64, p, p, p, p, p, p]
    lib.dsvl2_decode_layers.restype = ctypes.c_int
    lib.dsvl2_decode_scratch.argtypes = [p, i64, i64]
    lib.dsvl2_decode_scratch.restype = i64
    lib.dsvl2_decode_order.argtypes = [i64] * 3
    lib.dsvl2_decode_order.restype = i64
    lib.dsvl2_mla_decode.argtypes = [p, p, i64, p, p, p, ctypes.c_int, i64, i64, p, i64, p, p, p]
    lib.dsvl2_mla_decode.restype = ctypes.c_int
    lib.dsvl2_mla_scratch.argtypes = [i64] * 8
    lib.dsvl2_mla_scratch.restype = i64
    lib.dsvl2_amx_usable.argtypes = []
    lib.dsvl2_amx_usable.restype = ctypes.c_int
    lib.dsvl2_amx_linear.argtypes = [p, i64, i64, i64, ctypes.c_int, p, p, i64, i64, p, i64]
    lib.dsvl2_amx_linear.restype = ctypes.c_int
    lib.dsvl2_amx_expert.argtypes = [p, p, i64, i64, i64, ctypes.c_int, p, p, p, p, p, p, i64, i64, p, p]
    lib.dsvl2_amx_expert.restype = ctypes.c_int
    lib.dsvl2_attention_built.argtypes = []
    lib.dsvl2_attention_built.restype = ctypes.c_int
    lib.dsvl2_attention_bf16.argtypes = [p, p, p, p, ctypes.c_int, i64, i64, i64, i64, i64, i64, i64, f32, p, p, p]
    lib.dsvl2_attention_bf16.restype = ctypes.c_int
    lib.dsvl2_amx_attention.argtypes = lib.dsvl2_attention_bf16.argtypes
    lib.dsvl2_amx_attention.restype = ctypes.c_int


def _load() -> ctypes.CDLL | None:
    global _lib, _status
    if _status is None:
        with _lock:
            if _status is None:
                _lib, _status = _build()
                if _lib is None:  # once per decision (``reset`` forgets it)
                    log.warning("native decode kernels unavailable (%s): decode steps with bf16, int8 or int4 weights "
                                "on the CPU run torch's kernels instead, several times slower", _status)
    return _lib


def prepare(device: torch.device | str = "cpu") -> bool:
    """Build or load the kernels now (``dsvl2.load`` calls this, so the compile happens
    while the model loads, not inside the first request); whether they are available.
    Nothing to do for a model on another device (they are CPU kernels)."""
    if torch.device(device).type != "cpu":
        return False
    return available()


def available() -> bool:
    return _load() is not None


def status() -> dict:
    """Whether the kernels are built and loaded, why (or why not), the decode products'
    prefetch distance in bytes (``native.prefetch``) and weight streams a thread
    (``native.streams``; both None without the kernels)."""
    lib = _load()
    return {"native_decode": lib is not None, "reason": _status,
            "prefetch_bytes": None if lib is None else int(lib.dsvl2_prefetch(-1)),
            "weight_streams": None if lib is None else int(lib.dsvl2_streams(-1))}


def reset() -> None:
    """Forget the build decision (tests that change DSVL2_NATIVE)."""
    global _lib, _status
    with _lock:
        _lib, _status = None, None


@contextlib.contextmanager
def stand_in(lib, status: str = "stand-in"):
    """Within the block, ``lib`` is the loaded library (this process, every thread). A test
    seam: a stand-in whose every C function raises shows that a wrapper refuses bad
    arguments before any C runs. The real decision is restored afterwards."""
    global _lib, _status
    with _lock:
        before = _lib, _status
        _lib, _status = lib, status
    try:
        yield lib
    finally:
        with _lock:
            _lib, _status = before


def require() -> ctypes.CDLL:
    """The loaded kernels (built first if needed); ``RuntimeError`` saying why where there are none."""
    lib = _load()
    if lib is None:
        raise RuntimeError(f"native decode kernels unavailable: {_status}")
    return lib
