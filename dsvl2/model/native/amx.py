"""Prefill products on Intel AMX tiles (``amx.c``): ``y = x @ W.T`` for bf16 activations and a
weight stored as bf16, int8 or int4, the quantised formats dequantised on the way into the
tiles.

Why: with bf16 products on AMX the multiply is no longer what a routed expert's prefill
waits for. Through torch, each expert matrix was dequantised into a buffer (written,
then read), then oneDNN reordered that buffer into its own layout (read, written, read)
before multiplying, and built a new kernel for each new row count. ``amx.c`` reads the
stored weight once, 32 rows at a time into a panel that stays in L2, and keeps nothing
per shape.

When: the model calls it (``moe.Experts``) for the products of the routed experts outside
decode (``Experts.amx_ready``): where the kernel policy runs big products in bf16
(``ops.big_products_in_weights_dtype``), the CPU and kernel grant AMX (``usable``), and
``enabled`` (the environment variable ``DSVL2_AMX=0`` turns it off at import).
Measured on a 2-thread Xeon with AMX, each weight read from memory (whole layers:
``benchmarks/bench_quant_kernels.py --moe-prefill``): against dequantise-then-oneDNN, an
int8 / int4 expert matrix takes 0.4-0.65x the time at 16-256 rows, 0.8-0.9x at 512-768,
0.98-1.0x at 1,431; a bf16 one (no dequantisation on either side) 0.55-0.8x at 16-256
rows, 0.96-1.04x at 768-1,431. So every routed expert of a prefill runs here; the dense layers' products
(all the prompt's rows, bf16 or dequantised blocks) stay on oneDNN.

Numbers: see ``amx.c``: bf16 and int4 weights as the bf16 values ``dequantize_into``
writes, int8 weights exact (the per-row scale applied to the float32 sums); float32 sums
in the tile unit's order. A row's result does not depend on the other rows.
"""

from __future__ import annotations

import os

import torch

from . import describe
from .build import available, require

enabled = os.environ.get("DSVL2_AMX", "1") != "0"

_usable: list = [None, False]  # (the library it was decided for, the answer)
_ERRORS = {-1: "AMX is not usable on this CPU / kernel", -2: "a shape amx.c does not take", -3: "out of memory"}


def usable() -> bool:
    """The kernels are built with the AMX code (GCC >= 11, x86-64), the CPU has AMX-TILE and
    AMX-BF16, and the kernel granted this process the tile state."""
    if not available():
        return False
    lib = require()
    if _usable[0] is not lib:
        _usable[:] = [lib, bool(lib.dsvl2_amx_usable())]
    return _usable[1]


def active() -> bool:
    """The AMX kernels run here and are not switched off (``enabled``, ``usable()``)."""
    return enabled and usable()


def takes(n: int, k: int, group: int = 0) -> bool:
    """A weight [n, k] (int4: groups of ``group`` along k) has a shape ``linear`` takes."""
    return n > 0 and k > 0 and n % 32 == 0 and k % 32 == 0 and (not group or (group % 32 == 0 and k % group == 0))


def _bad(name: str, t, expected: str) -> ValueError:
    return ValueError(f"native.amx: {name} must be {expected}, got {describe(t)}")


def _weight(name: str, k: int, values, scale, group: int) -> tuple[int, int]:
    """(amx.c's fmt, N) of a weight [N, k] given as ``linear`` takes it; ``ValueError`` naming
    ``name`` otherwise."""
    if not (isinstance(values, torch.Tensor) and values.is_cpu and values.ndim == 2 and values.is_contiguous()):
        raise _bad(name, values, "a contiguous 2-d weight on the CPU")
    n = values.shape[0]
    if values.dtype is torch.bfloat16:
        fmt, kk = 0, k
    elif values.dtype is torch.int8:
        fmt, kk = 1, k
    elif values.dtype is torch.uint8:
        fmt, kk = 2, k // 2
    else:
        raise _bad(name, values, "bf16, int8 or uint8 (int4 pairs)")
    if values.shape[1] != kk:
        raise _bad(name, values, f"[N, {kk}] for K = {k}")
    if fmt == 2 and not (group > 0 and group % 32 == 0 and k % group == 0):
        raise ValueError(f"native.amx: {name}'s group must be a multiple of 32 dividing K = {k} for int4 values, "
                         f"got {group!r}")
    if not takes(n, k):
        raise _bad(name, values, f"a weight with N and K multiples of 32 (K = {k})")
    sname = "scale" if name == "values" else f"{name} scale"
    if fmt == 0:
        if scale is not None:
            raise _bad(sname, scale, "None for bf16 values")
    else:
        shape = (n,) if fmt == 1 else (n, k // group)
        if not (isinstance(scale, torch.Tensor) and scale.dtype is torch.bfloat16 and scale.is_cpu
                and scale.is_contiguous() and tuple(scale.shape) == shape):
            raise _bad(sname, scale, f"contiguous bf16 {list(shape)} on the CPU")
    return fmt, n


def _rows(x) -> tuple[int, int]:
    if not (isinstance(x, torch.Tensor) and x.dtype is torch.bfloat16 and x.is_cpu and x.ndim == 2
            and x.shape[0] > 0 and x.stride(1) == 1 and x.stride(0) >= x.shape[1]):
        raise _bad("x", x, "bf16 [M, K] (M > 0) on the CPU, its rows contiguous")
    return x.shape


def _check(rc: int, fn: str) -> None:
    if rc:
        raise RuntimeError(f"native.amx.{fn}: {_ERRORS.get(rc, rc)}")


def linear(x: torch.Tensor, values: torch.Tensor, scale: torch.Tensor | None = None, group: int = 0,
           out: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ W.T`` in float32 [M, N] (into ``out`` when given: float32 [M, N], rows stride
    >= N, last dim contiguous). x: bf16 [M, K], its rows contiguous. W [N, K], one of:
    bf16 ``values`` [N, K] (scale None); int8 ``values`` [N, K] with bf16 per-row ``scale``
    [N]; int4 ``values`` uint8 [N, K/2] (two a byte, low nibble first, as ``quant`` stores
    them) with bf16 ``scale`` [N, K/group]. All on the CPU, the weight and scales
    contiguous; N, K multiples of 32 (``takes``). ``ValueError`` naming the argument
    otherwise; ``RuntimeError`` where AMX is not usable."""
    m, k = _rows(x)
    fmt, n = _weight("values", k, values, scale, group)
    if out is None:
        out = torch.empty(m, n, dtype=torch.float32)
    elif not (isinstance(out, torch.Tensor) and out.dtype is torch.float32 and out.is_cpu and out.ndim == 2
              and tuple(out.shape) == (m, n) and out.stride(1) == 1 and out.stride(0) >= n):
        raise _bad("out", out, f"float32 [{m}, {n}] on the CPU, its last dim contiguous")
    _check(require().dsvl2_amx_linear(x.data_ptr(), x.stride(0), m, k, fmt, values.data_ptr(),
                                      None if scale is None else scale.data_ptr(), group if fmt == 2 else 0, n,
                                      out.data_ptr(), out.stride(0)), "linear")
    return out


def expert(x: torch.Tensor, gate: tuple, up: tuple, down: tuple, wt: torch.Tensor,
           rows: torch.Tensor | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """One SiLU-gated expert on its rows in one call (``amx.c`` ``dsvl2_amx_expert``):
    ``down(bf16(silu(gate x) * up x * wt))`` in float32 [M, D]. x: bf16 [M, D], contiguous;
    gate / up: ``(values, scale, group)`` of an [F, D] weight, down of a [D, F] one, as
    ``linear`` takes them, all three in one format; wt: float32 [M] (each row's routing
    weight). The same numbers as ``linear`` for gate and up, then SiLU in float32 (a vector
    exponential: a few ulps), times up and wt, rounded to bf16 once, ``linear`` for down.
    With ``rows`` (int64 [M], each in [0, T)) and ``out`` (float32 [T, D], contiguous): the
    expert runs on x's rows ``rows`` (x [T, D]) and adds its results into ``out``'s rows
    ``rows`` (``out.index_add_(0, rows, y)``'s bits), returning ``out``: the MoE layer's
    gather and sum without their own passes."""
    t, d = _rows(x)
    if not x.is_contiguous():
        raise _bad("x", x, "contiguous bf16 [M, D]")
    m = t
    if (rows is None) != (out is None):
        raise ValueError("native.amx.expert: rows and out go together (both or neither)")
    if rows is not None:
        if not (isinstance(rows, torch.Tensor) and rows.dtype is torch.int64 and rows.is_cpu and rows.ndim == 1
                and rows.is_contiguous() and rows.numel() > 0):
            raise _bad("rows", rows, "a contiguous int64 [M] (M > 0) on the CPU")
        lo, hi = (int(v) for v in torch.aminmax(rows))  # one pass: this runs for every expert of a prefill
        if lo < 0 or hi >= t:
            raise ValueError(f"native.amx.expert: rows must be in [0, {t}) (x's rows), got [{lo}, {hi}]")
        if not (isinstance(out, torch.Tensor) and out.dtype is torch.float32 and out.is_cpu and out.is_contiguous()
                and tuple(out.shape) == (t, d)):
            raise _bad("out", out, f"contiguous float32 [{t}, {d}] on the CPU (x's rows)")
        m = rows.numel()
    fg, f = _weight("gate", d, *gate)
    fu, fu_n = _weight("up", d, *up)
    fd, dn = _weight("down", f, *down)
    if fu_n != f or dn != d or not fg == fu == fd:
        raise ValueError(f"native.amx.expert: gate / up must be [F, {d}] and down [{d}, F] in one format, got "
                         f"{_describe_all(gate, up, down)}")
    if not (isinstance(wt, torch.Tensor) and wt.dtype is torch.float32 and wt.is_cpu and wt.is_contiguous()
            and tuple(wt.shape) == (m,)):
        raise _bad("wt", wt, f"contiguous float32 [{m}] on the CPU")
    y = torch.empty(m, d, dtype=torch.float32) if out is None else out
    ptr = (lambda t: None if t is None else t.data_ptr())
    _check(require().dsvl2_amx_expert(x.data_ptr(), ptr(rows), m, d, f, fg, gate[0].data_ptr(), ptr(gate[1]),
                                      up[0].data_ptr(), ptr(up[1]), down[0].data_ptr(), ptr(down[1]),
                                      gate[2] if fg == 2 else 0, down[2] if fg == 2 else 0, wt.data_ptr(),
                                      y.data_ptr()), "expert")
    return y


def _describe_all(*weights: tuple) -> str:
    return ", ".join(describe(w[0]) for w in weights)
