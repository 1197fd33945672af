"""Native kernels for x86 CPUs with AVX2 + FMA (AVX-512 chosen at run time where it helps):
decode with bf16 / int8 / int4 weights (``bf16.c``, ``layers.c``, ``step.c``, ``mla.c``,
``int4.c``, ``mlp.c``) and the dequantisation of quantised weights for prefill GEMMs
(``dequant.c``).

Why: a decode step is one matrix-vector product per weight, so its speed is the speed
at which the weights stream from memory. torch's bf16 CPU GEMV converts and multiplies
at ~7 GB/s per core here (compute-bound: two cores reach ~14 of the ~18 GB/s the memory
gives) and re-reads the whole weight for every row of a batch (a 16-row product costs
16 GEMVs). ``bf16.c`` widens bf16 by a shift, accumulates in float32 and reads each
weight row once for all rows; ``mlp.c`` runs a whole MoE layer (sort by expert, gate / up,
SiLU, down, weighted sum) in one call and one parallel region, its products in ``bf16.c`` or
``int4.c``. ``layers.c`` does the small parts of a decode step (RMSNorm, the router, the
whole MHA attention block) in one call each: as torch ops they cost more time than their
bytes (~1200 ops per step).
``step.c`` runs all decoder layers of a decode step in one call where every block has a
native version (``model/decode_plan.py`` decides), so no Python runs between the layers.
``mla.c`` runs a whole MLA attention block of a decode step (the absorbed form over the
compressed cache, read through the block tables) in one call; ``mla_layer`` checks a
layer's weights once, for callers that keep them (the plan).
``int4.c`` does the products of int4 weights in their stored format (``model/quant.py``:
dequantised in registers, each weight row read once for all rows), the products of a MoE
layer (or one gated MLP) of them, and dequantises blocks of rows for the prefill GEMMs;
``dequant.c`` does the same for int8 (values x bf16 row scales, one pass).
``gelu.c`` applies the vision tower's tanh GELU to a float32 hidden in place;
``layernorm.c`` adds a bf16 result to the tower's float32 stream and LayerNorms it in one
pass; ``rope.c`` rotates a prefill's queries and keys in one pass (torch's bits). ``attention.c`` runs the attention of prefill and of the vision tower with bf16
products on CPUs with AVX-512 BF16, where the kernel policy runs the products around it in
bf16; ``amx_attention.c`` runs the same numbers on Intel AMX tiles. ``amx.c`` (wrapper:
``native/amx.py``) runs the experts' and the quantised layers' prefill products on AMX
tiles, reading bf16, int8 or int4 weights in their stored format (``amx.h``: what the two
AMX files share).

Numbers: activations stay float32 (torch's bf16 path rounds them to bf16 first), so the
result is closer to the float32 reference than the torch bf16 path's; a row's bits do
not depend on the other rows (see ``bf16.c``). ``tests/test_native.py`` checks both
against the float32 reference and the torch path.

Build and loading: ``build.py`` (the library is built when a model loads, into the checked
cache of ``dsvl2/cachedir.py``; where it cannot be, ``available()`` is False and the model
uses torch's kernels, with one warning).

Checks: every wrapper below checks its arguments' dtypes, devices, contiguity and the
sizes the C code indexes with, and raises ``ValueError`` naming the argument before any C
runs (attribute comparisons only: they run a few hundred times per decode step).
Activations (x) and per-row inputs (idx, wt, cos, sin, block tables, positions) may be
non-contiguous (then copied); weights and KV pools must be contiguous; index tensors may
have any integer dtype (widened to int64).
"""

from __future__ import annotations

import ctypes
import threading
import weakref

import torch
import torch.nn.functional as F

from .build import (FLAGS, HERE, SOURCES, available, cache_path, cpu_ok, prepare, require, reset, stand_in,
                    status)
from .cpu import cpu_info

__all__ = ["FLAGS", "HERE", "SOURCES", "available", "cache_path", "cpu_ok", "prepare", "require", "reset",
           "stand_in", "status"]  # and the kernels' wrappers below

_local = threading.local()


def bf16_weight(w) -> bool:
    """A weight the kernels take as it is: a contiguous bf16 CPU tensor."""
    return isinstance(w, torch.Tensor) and w.dtype == torch.bfloat16 and w.is_cpu and w.is_contiguous()


def usable(x: torch.Tensor, *weights: torch.Tensor) -> bool:
    """Float32 CPU activations against contiguous bf16 CPU weights, and kernels built."""
    if x.dtype != torch.float32 or not x.is_cpu or not available():
        return False
    for w in weights:  # a loop, not all(<generator>): this runs for every product of a step
        if not bf16_weight(w):
            return False
    return True


def usable_int8(x: torch.Tensor, *weights) -> bool:
    """Float32 CPU activations against int8 ``QuantWeight`` s, and kernels built."""
    return (x.dtype == torch.float32 and x.is_cpu
            and all(getattr(w, "kind", None) == "int8" for w in weights) and available())


def usable_int4(x: torch.Tensor, *weights) -> bool:
    """Float32 CPU activations against int4 ``QuantWeight`` s in the stored format whose
    group size is a multiple of 32 (every size ``quant.int4_group`` picks), and kernels built."""
    for w in weights:
        if getattr(w, "kind", None) != "int4" or w.group % 32:
            return False
    return x.dtype == torch.float32 and x.is_cpu and available()


def scratch_buffer(n: int, dtype: torch.dtype) -> torch.Tensor:
    """A work buffer of at least ``n`` elements of ``dtype`` for a C call: this thread's,
    kept and reused (grown when too small); its content is garbage."""
    bufs = getattr(_local, "bufs", None)
    if bufs is None:
        bufs = _local.bufs = {}
    buf = bufs.get(dtype)
    if buf is None or buf.numel() < n:
        with torch.inference_mode(False):  # writable outside inference mode too (see scratch.buffer)
            buf = bufs[dtype] = torch.empty(max(n, 1), dtype=dtype)
    return buf


# The wrappers below run a few hundred times per decode step: they avoid torch calls that
# are not needed (a reshape or a view costs 2-4 us, as much as the call into C), and check
# their arguments with attribute comparisons only (50-150 ns each); a message is built
# only when a check fails. Every size the C code indexes with is checked here, before C
# runs (block ids and positions, and expert ids, are checked in C: their values).

_F32, _BF16, _I8, _I64 = torch.float32, torch.bfloat16, torch.int8, torch.int64
_NORM_WEIGHT = (torch.float32, torch.bfloat16)
_INTS = frozenset((torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8))


def describe(t) -> str:
    """A tensor's dtype, shape, device and layout, for error messages."""
    if not isinstance(t, torch.Tensor):
        return type(t).__name__
    s = f"{str(t.dtype).replace('torch.', '')} {list(t.shape)}"
    if t.device.type != "cpu":
        s += f" on {t.device}"
    if not t.is_contiguous():
        s += ", not contiguous"
    return s


def _bad(fn: str, name: str, t, expected: str) -> ValueError:
    return ValueError(f"native.{fn}: {name} must be {expected}, got {describe(t)}")


def _flat(x: torch.Tensor) -> torch.Tensor:
    """x itself when contiguous (the C side takes it as [numel / K, K]), else a contiguous copy."""
    return x if x.is_contiguous() else x.contiguous()


def _as_i64(t: torch.Tensor) -> torch.Tensor:
    """An integer tensor as contiguous int64 (itself when it is)."""
    if t.dtype is not _I64:
        t = t.to(_I64)
    return t if t.is_contiguous() else t.contiguous()


def _as_f32(t: torch.Tensor) -> torch.Tensor:
    """A floating tensor as contiguous float32 (itself when it is)."""
    if t.dtype is not _F32:
        t = t.float()
    return t if t.is_contiguous() else t.contiguous()


def linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ w.T + bias``: x float32 [..., K], w bf16 [N, K] contiguous, bias [N] (any float
    dtype) or None -> float32 [..., N]."""
    if not (x.dtype is _F32 and x.is_cpu and x.ndim):
        raise _bad("linear", "x", x, "float32 [..., K] on the CPU")
    *lead, k = x.shape
    if not (w.dtype is _BF16 and w.is_cpu and w.ndim == 2 and w.is_contiguous() and w.shape[1] == k and k):
        raise _bad("linear", "w", w, f"contiguous bf16 [N, {k}] (K = x's last size, > 0) on the CPU")
    n = w.shape[0]
    b = None
    if bias is not None:
        if not (bias.is_cpu and bias.dtype.is_floating_point and bias.shape == (n,)):
            raise _bad("linear", "bias", bias, f"a float tensor [{n}] (N = w's rows) on the CPU")
        b = _as_f32(bias)
    if not x.is_contiguous():
        x = x.contiguous()
    y = torch.empty((*lead, n), dtype=_F32)
    lib = require()
    lib.dsvl2_linear(x.data_ptr(), x.numel() // k, k, w.data_ptr(), n, None if b is None else b.data_ptr(),
                     y.data_ptr())
    return y


def linear_int8(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x @ (scale[:, None] * q).T``: x float32 [..., K], q int8 [N, K], scale bf16 [N]
    (both contiguous) -> float32 [..., N]."""
    if not (x.dtype is _F32 and x.is_cpu and x.ndim):
        raise _bad("linear_int8", "x", x, "float32 [..., K] on the CPU")
    *lead, k = x.shape
    if not (q.dtype is _I8 and q.is_cpu and q.ndim == 2 and q.is_contiguous() and q.shape[1] == k and k):
        raise _bad("linear_int8", "q", q, f"contiguous int8 [N, {k}] (K = x's last size, > 0) on the CPU")
    n = q.shape[0]
    if not (scale.dtype is _BF16 and scale.is_cpu and scale.is_contiguous() and scale.shape == (n,)):
        raise _bad("linear_int8", "scale", scale, f"contiguous bf16 [{n}] (N = q's rows) on the CPU")
    x = _flat(x)
    y = torch.empty((*lead, n), dtype=_F32)
    lib = require()
    lib.dsvl2_linear_i8(x.data_ptr(), x.numel() // k, k, q.data_ptr(), scale.data_ptr(), n, y.data_ptr())
    return y


def _routing(fn: str, idx: torch.Tensor, wt: torch.Tensor, t: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """A MoE call's routing checked (expert ids [T, k], weights [T, k]) and widened to int64 /
    float32: (idx, wt, k)."""
    if not (idx.is_cpu and idx.ndim == 2 and idx.shape[0] == t and idx.shape[1] and
            (idx.dtype is _I64 or idx.dtype in _INTS)):
        raise _bad(fn, "idx", idx, f"integer expert ids [{t}, k] (T = x's tokens, k > 0) on the CPU")
    k = idx.shape[1]
    if not (wt.is_cpu and wt.dtype.is_floating_point and wt.shape == (t, k)):
        raise _bad(fn, "wt", wt, f"float weights [{t}, {k}] (idx's shape) on the CPU")
    return _as_i64(idx), _as_f32(wt), k


def _moe(fn: str, x: torch.Tensor, idx: torch.Tensor | None, wt: torch.Tensor | None, gate, up, down,
         scales: tuple | None = None) -> torch.Tensor:
    """x [..., D]; gate / up / down: [E, F, D] / [E, D, F] stacks, or one MLP's [F, D] / [D, F]
    (E = 1), bf16, or int8 values with ``scales`` = their bf16 per-row scales ([E, F] / [E, D],
    or [F] / [D]); idx [T, k] (any integer dtype) and wt [T, k] (any float dtype), or None
    for one dense MLP. ``fn``: the public name, for errors."""
    wdtype, wname = (_BF16, "bf16") if scales is None else (_I8, "int8")
    if not (x.dtype is _F32 and x.is_cpu and x.ndim and x.shape[-1]):
        raise _bad(fn, "x", x, "float32 [..., D] (D > 0) on the CPU")
    d = x.shape[-1]
    if gate.ndim == 3:
        e, f = gate.shape[0], gate.shape[1]
        shapes = ((e, f, d), (e, f, d), (e, d, f))
    elif gate.ndim == 2:
        e, f = 1, gate.shape[0]
        shapes = ((f, d), (f, d), (d, f))
    else:
        raise _bad(fn, "gate", gate, f"contiguous {wname} [E, F, {d}] or [F, {d}] (D = x's width) on the CPU")
    for name, t, shape in zip(("gate", "up", "down"), (gate, up, down), shapes):
        if not (t.dtype is wdtype and t.is_cpu and t.is_contiguous() and t.shape == shape and f):
            raise _bad(fn, name, t, f"contiguous {wname} {list(shape)} on the CPU (gate / up [E, F, D], down "
                                    "[E, D, F], or [F, D] / [D, F]; D = x's width; F > 0)")
    gs = us = ds = None
    if scales is not None:
        for name, t, shape in zip(("gate scale", "up scale", "down scale"), scales, shapes):
            if not (t.dtype is _BF16 and t.is_cpu and t.is_contiguous() and t.shape == shape[:-1]):
                raise _bad(fn, name, t, f"contiguous bf16 {list(shape[:-1])} (one per weight row) on the CPU")
        gs, us, ds = (sc.data_ptr() for sc in scales)
    x, idx, wt, t, k, out, scratch, order = _moe_buffers(fn, x, idx, wt, e, f)
    lib = require()
    rc = lib.dsvl2_moe(x.data_ptr(), t, d, None if idx is None else idx.data_ptr(),
                       None if wt is None else wt.data_ptr(), k, gate.data_ptr(), up.data_ptr(),
                       down.data_ptr(), e, f, out.data_ptr(), scratch.data_ptr(), order.data_ptr(),
                       2 if scales is None else 1, gs, us, ds)
    if rc != 0:
        raise ValueError(f"expert ids must be in [0, {e}), got {idx.min().item()}..{idx.max().item()}")
    return out


def _moe_buffers(fn: str, x: torch.Tensor, idx, wt, e: int, f: int) -> tuple:
    """What mlp.c's ``dsvl2_moe`` and ``dsvl2_moe_i4`` take besides the weights, for x
    [..., D] through E experts of width F: (x flat, idx / wt checked and widened or None,
    tokens T, choices k, out [T, D], float32 scratch, int64 order)."""
    d = x.shape[-1]
    t = x.numel() // d
    k = 1
    if idx is not None:
        idx, wt, k = _routing(fn, idx, wt, t)
    p = t * k
    x = _flat(x)
    out = torch.empty(x.shape, dtype=_F32)
    return (x, idx, wt, t, k, out, scratch_buffer(p * (2 * d + 2 * f), _F32), scratch_buffer(p + 2 * e + 1, _I64))


def _int8(fn: str, ws: tuple) -> tuple[tuple, tuple]:
    """The values and the scales of int8 ``QuantWeight`` s (checked in ``_moe``)."""
    for name, w in zip(("gate", "up", "down"), ws):
        if getattr(w, "kind", None) != "int8":
            raise ValueError(f"native.{fn}: {name} must be an int8 QuantWeight, got "
                             f"{getattr(w, 'kind', None) or type(w).__name__}")
    return tuple(w.data for w in ws), tuple(w.scale for w in ws)


def experts_int8(x: torch.Tensor, idx: torch.Tensor, wt: torch.Tensor, gate, up, down) -> torch.Tensor:
    """``experts`` for int8 ``QuantWeight`` stacks (values [E, N, K] int8, scales [E, N] bf16)."""
    (g, u, dn), scales = _int8("experts_int8", (gate, up, down))
    return _moe("experts_int8", x, idx, wt, g, u, dn, scales)


def experts(x: torch.Tensor, idx: torch.Tensor, wt: torch.Tensor, gate: torch.Tensor, up: torch.Tensor,
            down: torch.Tensor) -> torch.Tensor:
    """SiLU-gated experts: x float32 [T, D], idx [T, k], wt [T, k]; gate / up [E, F, D], down [E, D, F]."""
    return _moe("experts", x, idx, wt, gate, up, down)


def gated_mlp(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """``down(silu(gate(x)) * up(x))`` for one MLP: gate / up [F, D], down [D, F]; x [..., D]."""
    return _moe("gated_mlp", x, None, None, gate, up, down)


def gated_mlp_int8(x: torch.Tensor, gate, up, down) -> torch.Tensor:
    """``gated_mlp`` for int8 ``QuantWeight`` s (values [N, K] int8, scales [N] bf16)."""
    (g, u, dn), scales = _int8("gated_mlp_int8", (gate, up, down))
    return _moe("gated_mlp_int8", x, None, None, g, u, dn, scales)


# ---- int4 weights in the stored format (int4.c) ------------------------------------------
# values uint8 [..., N, K/2] (two columns a byte), scales bf16 [..., N, K/G]; G (the group
# size) a multiple of 32 that divides K (``quant.int4_group`` picks 128, 64 or 32).

_U8 = torch.uint8


def _int4_group(fn: str, name: str, q: torch.Tensor, scale: torch.Tensor, shape: tuple[int, ...]) -> int:
    """Check one int4 weight of logical shape [..., N, K] (its values and scales); its group size."""
    *lead, k = shape
    if not (isinstance(q, torch.Tensor) and q.dtype is _U8 and q.is_cpu and q.is_contiguous() and k % 32 == 0 and k
            and q.shape == (*lead, k // 2)):
        raise _bad(fn, f"{name} values", q, f"contiguous uint8 {[*lead, k // 2]} on the CPU (the weight "
                                            f"{list(shape)}, its width a positive multiple of 32)")
    ng = scale.shape[-1] if isinstance(scale, torch.Tensor) and scale.ndim == len(shape) else 0
    if not (ng and scale.dtype is _BF16 and scale.is_cpu and scale.is_contiguous() and scale.shape[:-1] == tuple(lead)
            and k % ng == 0 and (k // ng) % 32 == 0):
        raise _bad(fn, f"{name} scales", scale, f"contiguous bf16 {[*lead, 'K/G']} on the CPU, G (the group size) a "
                                                f"multiple of 32 dividing K = {k}")
    return k // ng


QUANT_VARIANTS = ("avx2", "avx2-digits", "avx512", "avx512-vnni")  # in order of preference


def quant_variant(name: str | None = None) -> str:
    """The instruction set of the quantised products (int4, and int8 but for prefill's
    dequantisation) in this process, the highest the CPU has: "avx512-vnni" where the CPU
    has AVX-512 VNNI (int4 products of groups of 128 by integer digits of the activations,
    ``int4.c``; int8 as "avx512"), "avx512" where it has AVX-512F, else "avx2-digits" (the
    same digits and the same bits on AVX2; int8 as "avx2"); "avx2" (int8 and int4 widened
    to float32 on AVX2) is the fallback the digits replace (``int4.c``, ``bf16.c``; each
    row's bits depend on the variant, never on the batch). ``name`` chooses one (or the
    highest below it the CPU has): tests run each here."""
    if name is not None and name not in QUANT_VARIANTS:
        raise ValueError(f"native.quant_variant: name must be one of {', '.join(QUANT_VARIANTS)} or None, got {name!r}")
    lib = require()
    return QUANT_VARIANTS[lib.dsvl2_quant_variant(-1 if name is None else QUANT_VARIANTS.index(name))]


def prefetch(nbytes: int | None = None) -> int:
    """How many bytes ahead of the read position the decode products (``bf16.c``, ``int4.c``)
    prefetch each weight row: chosen per CPU when the library loads (2,048 on Intel CPUs,
    512 on others: measured on an AMX Xeon and on Zen 4, ``bf16.c``). ``nbytes`` (a multiple
    of 64 in [0, 16384]) sets it for this process; results never depend on it, only speed."""
    if nbytes is not None and (isinstance(nbytes, bool) or not isinstance(nbytes, int) or not 0 <= nbytes <= 16384
                               or nbytes % 64):
        raise ValueError(f"native.prefetch: nbytes must be a multiple of 64 in [0, 16384] or None, got {nbytes!r}")
    return int(require().dsvl2_prefetch(-1 if nbytes is None else nbytes))


def streams(count: int | None = None) -> int:
    """How many weight streams a thread reads side by side in the AVX-512 int8 and int4
    (digits) decode products: chosen per CPU when the library loads (4 on Intel CPUs,
    measured on an AMX Xeon; 3 on others, as measured on Zen 3 / Zen 4: ``bf16.c``,
    ``int4.c``). ``count`` (3 or 4) sets it for this process; results never depend on it."""
    if count is not None and (isinstance(count, bool) or not isinstance(count, int) or count not in (3, 4)):
        raise ValueError(f"native.streams: count must be 3, 4 or None, got {count!r}")
    return int(require().dsvl2_streams(-1 if count is None else count))


def linear_int4(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x @ w.T`` for the int4 weight w = (values - 8) * scale of its group: x float32
    [..., K]; q uint8 [N, K/2], scale bf16 [N, K/G] (both contiguous) -> float32 [..., N]."""
    if not (x.dtype is _F32 and x.is_cpu and x.ndim):
        raise _bad("linear_int4", "x", x, "float32 [..., K] on the CPU")
    *lead, k = x.shape
    if not (isinstance(q, torch.Tensor) and q.ndim == 2):
        raise _bad("linear_int4", "q values", q, f"contiguous uint8 [N, {k // 2}] (K = x's last size) on the CPU")
    n = q.shape[0]
    g = _int4_group("linear_int4", "q", q, scale, (n, k))
    x = _flat(x)
    m = x.numel() // k
    y = torch.empty((*lead, n), dtype=_F32)
    xp = scratch_buffer(m * k, _F32)
    lib = require()
    lib.dsvl2_linear_i4(x.data_ptr(), m, k, q.data_ptr(), scale.data_ptr(), g, n, y.data_ptr(), xp.data_ptr())
    return y


def dequantize_int4(q: torch.Tensor, scale: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """The int4 weight (q uint8 [N, K/2], scale bf16 [N, K/G]) written into ``out``: contiguous
    float32 [N, K] (exact), or bf16 [N, K] (the float32 value rounded to nearest even). Returns out."""
    if not (isinstance(out, torch.Tensor) and out.dtype in (_F32, _BF16) and out.is_cpu and out.ndim == 2
            and out.is_contiguous()):
        raise _bad("dequantize_int4", "out", out, "a contiguous float32 or bf16 [N, K] on the CPU")
    n, k = out.shape
    g = _int4_group("dequantize_int4", "q", q, scale, (n, k))
    lib = require()
    lib.dsvl2_dequant_i4(q.data_ptr(), scale.data_ptr(), n, k, g, out.data_ptr(), int(out.dtype is _BF16))
    return out


DEQUANT_VARIANTS = ("avx2", "avx512")


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor, out: torch.Tensor, variant: str | None = None
                    ) -> torch.Tensor:
    """The int8 weight q * scale (q int8 [N, K], scale bf16 [N], both contiguous) written into
    ``out`` in one pass (``dequant.c``): contiguous float32 [N, K] (exact), or bf16 [N, K] (the
    float32 value rounded to nearest even: torch's ``q.to(bf16) * scale``). ``variant``:
    "avx2" or "avx512" (AVX2 on a CPU without AVX-512 BW), None for the best the CPU has;
    the bits are the same. Returns out."""
    fn = "dequantize_int8"
    if not (isinstance(out, torch.Tensor) and out.dtype in (_F32, _BF16) and out.is_cpu and out.ndim == 2
            and out.is_contiguous()):
        raise _bad(fn, "out", out, "a contiguous float32 or bf16 [N, K] on the CPU")
    n, k = out.shape
    if not (isinstance(q, torch.Tensor) and q.dtype is _I8 and q.is_cpu and q.is_contiguous() and q.shape == (n, k)):
        raise _bad(fn, "q", q, f"contiguous int8 [{n}, {k}] (out's shape) on the CPU")
    if not (isinstance(scale, torch.Tensor) and scale.dtype is _BF16 and scale.is_cpu and scale.is_contiguous()
            and scale.shape == (n,)):
        raise _bad(fn, "scale", scale, f"contiguous bf16 [{n}] (one per row of q) on the CPU")
    if variant is not None and variant not in DEQUANT_VARIANTS:
        raise ValueError(f"native.{fn}: variant must be one of {', '.join(DEQUANT_VARIANTS)} or None, "
                         f"got {variant!r}")
    lib = require()
    lib.dsvl2_dequant_i8(q.data_ptr(), scale.data_ptr(), n, k, out.data_ptr(), int(out.dtype is _BF16),
                         -1 if variant is None else DEQUANT_VARIANTS.index(variant))
    return out


def _moe_int4(fn: str, x: torch.Tensor, idx: torch.Tensor | None, wt: torch.Tensor | None, gate, up,
              down) -> torch.Tensor:
    """x [..., D]; gate / up / down: int4 ``QuantWeight`` s in the stored format, [E, F, D] /
    [E, D, F] stacks, or one MLP's [F, D] / [D, F] (E = 1); idx [T, k] (any integer dtype)
    and wt [T, k] (any float dtype), or None for one dense MLP. ``fn``: the public name."""
    for name, w in zip(("gate", "up", "down"), (gate, up, down)):
        if getattr(w, "kind", None) != "int4":
            raise ValueError(f"native.{fn}: {name} must be an int4 QuantWeight (stored format), got "
                             f"{getattr(w, 'kind', None) or type(w).__name__}")
    if not (x.dtype is _F32 and x.is_cpu and x.ndim and x.shape[-1]):
        raise _bad(fn, "x", x, "float32 [..., D] (D > 0) on the CPU")
    d = x.shape[-1]
    stacked = idx is not None
    if not (gate.data.ndim == (3 if stacked else 2) and gate.data.shape[-2]):
        want = f"[E, F, {d // 2}]" if stacked else f"[F, {d // 2}]"
        raise _bad(fn, "gate values", gate.data, f"contiguous uint8 {want} (F > 0) on the CPU")
    e, f = (gate.data.shape[0], gate.data.shape[1]) if stacked else (1, gate.data.shape[0])
    lead = (e,) if stacked else ()
    gd = _int4_group(fn, "gate", gate.data, gate.scale, (*lead, f, d))
    if _int4_group(fn, "up", up.data, up.scale, (*lead, f, d)) != gd:
        raise ValueError(f"native.{fn}: gate and up must have one group size, got {gd} and {d // up.scale.shape[-1]}")
    gf = _int4_group(fn, "down", down.data, down.scale, (*lead, d, f))
    x, idx, wt, t, k, out, scratch, order = _moe_buffers(fn, x, idx, wt, e, f)
    lib = require()
    rc = lib.dsvl2_moe_i4(x.data_ptr(), t, d, idx.data_ptr() if stacked else None,
                          wt.data_ptr() if stacked else None, k, gate.data.data_ptr(), gate.scale.data_ptr(),
                          up.data.data_ptr(), up.scale.data_ptr(), down.data.data_ptr(), down.scale.data_ptr(), e, f,
                          gd, gf, out.data_ptr(), scratch.data_ptr(), order.data_ptr())
    if rc != 0:
        raise ValueError(f"expert ids must be in [0, {e}), got {idx.min().item()}..{idx.max().item()}")
    return out


def experts_int4(x: torch.Tensor, idx: torch.Tensor, wt: torch.Tensor, gate, up, down) -> torch.Tensor:
    """``experts`` for int4 ``QuantWeight`` stacks in the stored format: x float32 [T, D],
    idx [T, k] (any integer dtype), wt [T, k] (any float dtype); gate / up values [E, F, D/2]
    with scales [E, F, D/Gd], down values [E, D, F/2] with scales [E, D, F/Gf]."""
    return _moe_int4("experts_int4", x, idx, wt, gate, up, down)


def gated_mlp_int4(x: torch.Tensor, gate, up, down) -> torch.Tensor:
    """``gated_mlp`` for int4 ``QuantWeight`` s in the stored format (gate / up values [F, D/2]
    with scales [F, D/Gd], down values [D, F/2] with scales [D, F/Gf]): the three products
    and the SiLU in one call (``dsvl2_moe_i4`` with one expert), as ``decode_plan`` runs it."""
    return _moe_int4("gated_mlp_int4", x, None, None, gate, up, down)


# ---- the small parts of a decode step (layers.c) ---------------------------------------


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm of float32 x [..., D] with a contiguous float32 or bf16 weight [D] -> float32."""
    if not (x.dtype is _F32 and x.is_cpu and x.ndim):
        raise _bad("rmsnorm", "x", x, "float32 [..., D] on the CPU")
    d = x.shape[-1]
    if not (weight.dtype in _NORM_WEIGHT and weight.is_cpu and weight.is_contiguous() and weight.shape == (d,)
            and d):
        raise _bad("rmsnorm", "weight", weight, f"contiguous float32 or bf16 [{d}] (D = x's last size, > 0) "
                                                "on the CPU")
    if not x.is_contiguous():
        x = x.contiguous()
    y = torch.empty_like(x)
    lib = require()
    lib.dsvl2_rmsnorm(x.data_ptr(), x.numel() // d, d, weight.data_ptr(), weight.dtype is _BF16, eps, y.data_ptr())
    return y


def gelu_tanh_(x: torch.Tensor) -> torch.Tensor:
    """The tanh GELU of a contiguous float32 CPU tensor, in place (``gelu.c``: to a few
    float32 ulps of ``F.gelu(x, approximate="tanh")``); returns x."""
    if not (x.dtype is _F32 and x.is_cpu and x.is_contiguous()):
        raise _bad("gelu_tanh_", "x", x, "a contiguous float32 tensor on the CPU")
    if x.numel():
        require().dsvl2_gelu_tanh(x.data_ptr(), x.numel())
    return x


_gelu_table: list = []  # the bf16 GELU table, built on first use


def gelu_table() -> torch.Tensor:
    """int16 [65537]: entry u = the bits of the tanh GELU of the bf16 v whose bits are u, as
    ``gelu_tanh_`` computes it in float32 (within a few float32 ulps of the exact value),
    rounded once to bf16: the float32 tower's GELU, rounded. Then one 0 (the gathers read 32
    bits at a 16-bit index). Not ``F.gelu`` on bf16 bit for bit: torch's vectorised formula
    loses the values below ~1e-7 where 1 + tanh(u) cancels (x < -5), which this keeps."""
    if not _gelu_table:
        u = torch.arange(1 << 16, dtype=torch.int32)
        v = torch.where(u >= 1 << 15, u - (1 << 16), u).to(torch.int16).view(_BF16)
        g = gelu_tanh_(v.float()).to(_BF16).view(torch.int16)
        _gelu_table.append(torch.cat([g, g.new_zeros(1)]))
    return _gelu_table[0]


def gelu_tanh_bf16_(x: torch.Tensor) -> torch.Tensor:
    """The tanh GELU of a contiguous bf16 CPU tensor, in place, by table (``gelu.c``,
    ``gelu_table``: the float32 GELU rounded once); returns x."""
    if not (x.dtype is _BF16 and x.is_cpu and x.is_contiguous()):
        raise _bad("gelu_tanh_bf16_", "x", x, "a contiguous bf16 tensor on the CPU")
    if x.numel():
        require().dsvl2_gelu_tanh_bf16(x.data_ptr(), x.numel(), gelu_table().data_ptr())
    return x


def add_layernorm_(x: torch.Tensor, y: torch.Tensor | None, weight: torch.Tensor | None,
                   bias: torch.Tensor | None, eps: float, out_dtype: torch.dtype = _BF16) -> torch.Tensor:
    """``x += y`` in place, then ``LayerNorm(x)`` over the last dimension, in one pass a row
    (``layernorm.c``): x float32 [..., W], rows contiguous, W a multiple of 8; y bf16 of x's
    shape or None (nothing added); weight / bias [W] in any float dtype (used as float32) or
    None; the result a new ``out_dtype`` (bf16: rounded to nearest even; or float32) tensor
    of x's shape. The moments in float32 (not torch's summation order: within float32
    rounding of the float64 LayerNorm, tests/test_native_layernorm.py)."""
    fn = "add_layernorm_"
    if not (isinstance(x, torch.Tensor) and x.dtype is _F32 and x.is_cpu and x.is_contiguous() and x.ndim >= 1
            and x.shape[-1] % 8 == 0 and x.shape[-1] > 0):
        raise _bad(fn, "x", x, "a contiguous float32 CPU tensor whose last dimension is a multiple of 8")
    w_ = x.shape[-1]
    if y is not None and not (isinstance(y, torch.Tensor) and y.dtype is _BF16 and y.is_cpu and y.is_contiguous()
                              and y.shape == x.shape):
        raise _bad(fn, "y", y, f"None or a contiguous bf16 CPU tensor of x's shape {list(x.shape)}")
    params = []
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and not (isinstance(t, torch.Tensor) and t.is_cpu and t.dtype.is_floating_point
                                  and t.shape == (w_,)):
            raise _bad(fn, name, t, f"None or a float [{w_}] CPU tensor")
        params.append(None if t is None else t.detach().to(_F32).contiguous())
    if out_dtype not in (_F32, _BF16):
        raise ValueError(f"native.{fn}: out_dtype must be torch.float32 or torch.bfloat16, got {out_dtype}")
    out = torch.empty(x.shape, dtype=out_dtype)
    ptr = (lambda t: None if t is None else t.data_ptr())
    require().dsvl2_add_layernorm(x.data_ptr(), ptr(y), x.numel() // w_, w_, ptr(params[0]), ptr(params[1]),
                                  float(eps), out.data_ptr(), int(out_dtype is _BF16))
    return out


ROPE_MAX_DIM = 1024  # rope.c keeps a row on its stack


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """``model.rope.apply_rope``'s result, bit for bit, in one pass (``rope.c``): x float32
    [B, H, T, D] (any strides, the last dimension contiguous; D even, at most
    ``ROPE_MAX_DIM``), cos / sin float32 [B or 1, T, D]; a new contiguous float32 tensor."""
    fn = "rope"
    if not (isinstance(x, torch.Tensor) and x.dtype is _F32 and x.is_cpu and x.ndim == 4 and x.stride(3) == 1
            and x.shape[3] % 2 == 0 and 0 < x.shape[3] <= ROPE_MAX_DIM):
        raise _bad(fn, "x", x, f"float32 [B, H, T, D] on the CPU, the last dimension contiguous, D even and at "
                               f"most {ROPE_MAX_DIM}")
    b, h, t, d = x.shape
    for name, c in (("cos", cos), ("sin", sin)):
        if not (isinstance(c, torch.Tensor) and c.dtype is _F32 and c.is_cpu and c.ndim == 3
                and c.shape[0] in (1, b) and tuple(c.shape[1:]) == (t, d)):
            raise _bad(fn, name, c, f"float32 [{b} or 1, {t}, {d}] on the CPU")
    cos, sin = cos.contiguous(), sin.contiguous()
    out = torch.empty(b, h, t, d, dtype=_F32)
    if out.numel():
        st = torch.tensor(x.stride()[:3], dtype=_I64)
        require().dsvl2_rope(x.data_ptr(), st.data_ptr(), b, h, t, d, cos.data_ptr(), sin.data_ptr(),
                             t * d if cos.shape[0] == b and b > 1 else 0, int(bool(interleaved)), out.data_ptr())
    return out


def route_greedy(x: torch.Tensor, gate: torch.Tensor, k: int, sigmoid: bool, norm: bool,
                 scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy top-k routing of float32 x [T, D] by a bf16 gate [E, D]: (idx int64 [T, k]
    in descending score order, weights float32 [T, k])."""
    if not (x.dtype is _F32 and x.is_cpu and x.ndim == 2):
        raise _bad("route_greedy", "x", x, "float32 [T, D] on the CPU")
    d = x.shape[1]
    if not (gate.dtype is _BF16 and gate.is_cpu and gate.ndim == 2 and gate.is_contiguous() and gate.shape[1] == d
            and d):
        raise _bad("route_greedy", "gate", gate, f"contiguous bf16 [E, {d}] (D = x's width, > 0) on the CPU")
    t, e = x.shape[0], gate.shape[0]
    if not 0 < k <= e:
        raise ValueError(f"native.route_greedy: experts per token must be in [1, {e}], got {k}")
    logits = linear(x, gate)  # [T, E], overwritten with the scores
    idx = torch.empty(t, k, dtype=_I64)
    wt = torch.empty(t, k, dtype=_F32)
    lib = require()
    lib.dsvl2_route_greedy(logits.data_ptr(), t, e, k, int(sigmoid), int(norm), scaling, idx.data_ptr(),
                           wt.data_ptr())
    return idx, wt


ROUTE_METHODS = {"greedy": 0, "group_limited_greedy": 1, "noaux_tc": 2}  # the C side's method numbers


def route(x: torch.Tensor, gate: torch.Tensor, k: int, method: str, sigmoid: bool, norm: bool, scaling: float,
          bias: torch.Tensor | None = None, n_group: int | None = None,
          topk_group: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The MoE router of every ``topk_method`` (``Gate.reference_route`` in ``model/moe.py``
    is the torch version and the definition): float32 x [T, D] by a gate [E, D]
    (contiguous bf16, or float32), sigmoid or softmax scores -> (idx int64 [T, k] in
    descending (biased) choice order, weights float32 [T, k]).

    ``greedy`` runs ``route_greedy``'s C code (same bits). ``group_limited_greedy`` and
    ``noaux_tc`` (with ``bias``, the ``e_score_correction_bias`` [E], any float dtype) keep
    ``topk_group`` of ``n_group`` groups of experts. An exact tie goes to the lower expert
    (group) id; torch.topk breaks exact ties in an order of its own, so the two can differ
    only there (``layers.c`` ``dsvl2_route``)."""
    fn = "route"
    if not (x.dtype is _F32 and x.is_cpu and x.ndim == 2):
        raise _bad(fn, "x", x, "float32 [T, D] on the CPU")
    d = x.shape[1]
    if not ((gate.dtype is _BF16 or gate.dtype is _F32) and gate.is_cpu and gate.ndim == 2 and gate.is_contiguous()
            and gate.shape[1] == d and d):
        raise _bad(fn, "gate", gate, f"contiguous bf16 or float32 [E, {d}] (D = x's width, > 0) on the CPU")
    t, e = x.shape[0], gate.shape[0]
    m = ROUTE_METHODS.get(method)
    if m is None:
        raise ValueError(f"native.{fn}: method must be one of {', '.join(ROUTE_METHODS)}, got {method!r}")
    if not 0 < k <= e:
        raise ValueError(f"native.{fn}: experts per token must be in [1, {e}], got {k}")
    if m == 2:
        if not (isinstance(bias, torch.Tensor) and bias.is_cpu and bias.dtype.is_floating_point
                and bias.shape == (e,)):
            raise _bad(fn, "bias", bias, f"a float tensor [{e}] (E = gate's rows) on the CPU for noaux_tc")
        bias = _as_f32(bias)
    elif bias is not None:
        raise ValueError(f"native.{fn}: bias is used by noaux_tc only, got one for {method}")
    g = tg = 1
    if m:
        if not (isinstance(n_group, int) and 0 < n_group and e % n_group == 0
                and isinstance(topk_group, int) and 0 < topk_group <= n_group):
            raise ValueError(f"native.{fn}: {method} needs n_group dividing the {e} experts and topk_group in "
                             f"[1, n_group], got n_group {n_group!r}, topk_group {topk_group!r}")
        if m == 2 and e // n_group < 2:
            raise ValueError(f"native.{fn}: noaux_tc scores a group by its two best experts, so groups need at "
                             f"least 2 experts, got {e} experts in {n_group} groups")
        g, tg = n_group, topk_group
    if not x.is_contiguous():
        x = x.contiguous()
    lib = require()
    # logits [T, E] float32, overwritten with the scores: the bf16 gate's product as ``linear``
    # computes it (into scratch: nothing outlives the call), a float32 gate's as the torch path's
    if gate.dtype is _BF16:
        logits = scratch_buffer(t * e, _F32)
        lib.dsvl2_linear(x.data_ptr(), t, d, gate.data_ptr(), e, None, logits.data_ptr())
    else:
        logits = torch.nn.functional.linear(x, gate)
    idx = torch.empty(t, k, dtype=_I64)
    wt = torch.empty(t, k, dtype=_F32)
    rc = lib.dsvl2_route(logits.data_ptr(), t, e, k, m, int(sigmoid), None if bias is None else bias.data_ptr(), g,
                         tg, int(norm), scaling, idx.data_ptr(), wt.data_ptr())
    if rc != 0:  # the checks above cover every refusal of the C side
        raise ValueError(f"native.{fn}: the kernel refused method {method}, k {k}, {e} experts, n_group {g}, "
                         f"topk_group {tg}")
    return idx, wt


def mha_decode(x: torch.Tensor, wq: torch.Tensor, wk: torch.Tensor, wv: torch.Tensor, wo: torch.Tensor,
               biases: tuple, heads: int, kv_heads: int, cos: torch.Tensor, sin: torch.Tensor,
               k_cache: torch.Tensor, v_cache: torch.Tensor, table: torch.Tensor, pos: torch.Tensor,
               scale: float) -> torch.Tensor:
    """One MHA decode step: x float32 [B, D] (normalised), bf16 weights (wq [H hd, D], wk / wv
    [Hk hd, D], wo [D, H hd]; biases (bq, bk, bv, bo), each None or of the matching size),
    float32 block pools [NB, BS, Hk, hd] (contiguous, the same shape) written at row b's
    position pos[b] through its block table (table [B, W] int64) and attended over its
    positions 0..pos[b]; cos / sin float32 [B, hd]. Returns the attention block's output [B, D]."""
    fn = "mha_decode"
    if not (k_cache.dtype is _F32 and k_cache.is_cpu and k_cache.ndim == 4 and k_cache.is_contiguous()):
        raise _bad(fn, "k_cache", k_cache, "a contiguous float32 block pool [NB, BS, Hk, hd] on the CPU")
    nb, bs, hk, hd = k_cache.shape
    if not (v_cache.dtype is _F32 and v_cache.is_cpu and v_cache.is_contiguous() and v_cache.shape == k_cache.shape):
        raise _bad(fn, "v_cache", v_cache, f"contiguous float32 {list(k_cache.shape)} (k_cache's shape) on the CPU")
    if not (0 < kv_heads == hk and 0 < heads and heads % kv_heads == 0 and 0 < hd <= 1024 and nb and bs):
        raise ValueError(f"native.{fn}: heads must be a positive multiple of kv_heads, kv_heads the pools' kv heads, "
                         f"the head size in [1, 1024] and the pools not empty; got heads {heads}, kv_heads {kv_heads},"
                         f" pools [NB, BS, Hk, hd] = {list(k_cache.shape)}")
    if not (x.dtype is _F32 and x.is_cpu and x.ndim == 2):
        raise _bad(fn, "x", x, "float32 [B, D] on the CPU")
    b, d = x.shape
    nq, nkv = heads * hd, hk * hd
    for name, w, shape in (("wq", wq, (nq, d)), ("wk", wk, (nkv, d)), ("wv", wv, (nkv, d)), ("wo", wo, (d, nq))):
        if not (w.dtype is _BF16 and w.is_cpu and w.is_contiguous() and w.shape == shape):
            raise _bad(fn, name, w, f"contiguous bf16 {list(shape)} (H = {heads}, Hk = {hk}, hd = {hd}, D = x's "
                                    f"width {d}) on the CPU")
    if len(biases) != 4:
        raise ValueError(f"native.{fn}: biases must be (bq, bk, bv, bo), got {len(biases)} entries")
    keep = []  # float32 copies, alive for the call
    for name, t, n in zip(("bq", "bk", "bv", "bo"), biases, (nq, nkv, nkv, d)):
        if t is not None:
            if not (t.is_cpu and t.dtype.is_floating_point and t.shape == (n,)):
                raise _bad(fn, name, t, f"None or a float tensor [{n}] on the CPU")
            t = _as_f32(t)
        keep.append(t)
    cos, sin, table, pos = step_rows(b, hd, cos, sin, table, pos)
    x = _flat(x)
    lib = require()
    w = table.shape[1]
    scratch = scratch_buffer(lib.dsvl2_mha_scratch(b, heads, kv_heads, hd, w * bs), _F32)
    out = torch.empty((b, d), dtype=_F32)
    ptrs = [None if t is None else t.data_ptr() for t in keep]
    rc = lib.dsvl2_mha_decode(x.data_ptr(), b, d, heads, kv_heads, hd, wq.data_ptr(), wk.data_ptr(),
                              wv.data_ptr(), wo.data_ptr(), *ptrs, cos.data_ptr(), sin.data_ptr(),
                              k_cache.data_ptr(), v_cache.data_ptr(), nb, bs, table.data_ptr(), w, pos.data_ptr(),
                              scale, out.data_ptr(), scratch.data_ptr())
    if rc != 0:
        raise decode_error(rc, nb, bs, table, pos, hd=hd, heads=heads, kv_heads=kv_heads)
    return out


def step_rows(b: int, hd: int, cos: torch.Tensor, sin: torch.Tensor, table: torch.Tensor,
              pos: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """A decode step's per-row inputs as the C side takes them: cos / sin float32 [B, hd]
    (checked), block tables int64 [B, W] and positions int64 [B], all contiguous. Raises
    ``ValueError`` for other dtypes / sizes, or tensors not on the CPU."""
    for name, t in (("cos", cos), ("sin", sin)):
        if not (t.dtype is _F32 and t.is_cpu and t.ndim and t.shape[-1] == hd and t.numel() == b * hd):
            raise _bad("step_rows", name, t, f"float32 [{b}, {hd}] (B rows x head size) on the CPU")
    if not (table.is_cpu and table.ndim == 2 and table.shape[0] == b and table.shape[1] and
            (table.dtype is _I64 or table.dtype in _INTS)):
        raise _bad("step_rows", "table", table, f"integer block tables [{b}, W] (B rows, W > 0) on the CPU")
    if not (pos.is_cpu and pos.numel() == b and (pos.dtype is _I64 or pos.dtype in _INTS)):
        raise _bad("step_rows", "pos", pos, f"integer positions [{b}] (B rows) on the CPU")
    return _flat(cos), _flat(sin), _as_i64(table), _as_i64(pos)


def decode_error(rc: int, nb: int, bs: int, table: torch.Tensor, pos: torch.Tensor, *, hd: int | None = None,
                 heads: int | None = None, kv_heads: int | None = None, layer: int | None = None) -> ValueError:
    """The error for a non-zero return of ``dsvl2_mha_decode`` / ``dsvl2_decode_layers``."""
    where = "" if layer is None or layer < 0 else f"layer {layer}: "
    if rc == -2:
        return ValueError(f"{where}head size must be <= 1024 and heads a multiple of kv heads, got "
                          f"{hd} / {heads} / {kv_heads}")
    return ValueError(f"{where}each row's positions must lie in its block table ({table.shape[1]} blocks of "
                      f"{bs}) and block ids in [0, {nb}), got positions {pos.tolist()} and tables {table.tolist()}")


# ---- the MLA attention block (mla.c) ---------------------------------------------------


class _MLAWeight(ctypes.Structure):  # products.h dsvl2_mla_weight
    _fields_ = [("w", ctypes.c_void_p), ("scale", ctypes.c_void_p), ("kind", ctypes.c_int64)]


class MLALayer(ctypes.Structure):
    """One MLA layer's weights as ``mla.c`` takes them (products.h ``dsvl2_mla``), filled by
    ``mla_layer``; ``keep``: the float32 bias copies it points to."""
    _fields_ = ([(n, ctypes.c_int64) for n in ("D", "H", "dn", "dr", "dv", "r", "qr")]
                + [(n, _MLAWeight) for n in ("q", "q_a", "q_b", "kv_a", "kv_b", "o")]
                + [(n, ctypes.c_void_p) for n in ("b_q_a", "b_kv_a", "b_o", "q_norm", "kv_norm")]
                + [(n, ctypes.c_int64) for n in ("q_norm_bf16", "kv_norm_bf16")]
                + [(n, ctypes.c_float) for n in ("q_eps", "kv_eps", "scale")])


_MLA_KINDS = {_F32: 0, _BF16: 1}  # mla.c W_F32, W_BF16; W_INT8 = 2
_MLA_POOL = (_F32, _BF16)


def mla_weight(w, quantised: bool = True) -> bool:
    """A weight ``mla_decode`` takes as it is: a contiguous float32 or bf16 CPU tensor, or
    (``quantised``) an int8 ``QuantWeight``."""
    if isinstance(w, torch.Tensor):
        return w.dtype in _MLA_KINDS and w.is_cpu and w.is_contiguous()
    return quantised and getattr(w, "kind", None) == "int8" and w.data.is_cpu


def _mla_w(fn: str, name: str, w, shape: tuple[int, int], quantised: bool, into: _MLAWeight) -> None:
    """Check one weight of ``mla_decode`` and point ``into`` at it."""
    if isinstance(w, torch.Tensor):
        if w.dtype in _MLA_KINDS and w.is_cpu and w.is_contiguous() and w.shape == shape:
            into.w, into.scale, into.kind = w.data_ptr(), None, _MLA_KINDS[w.dtype]
            return
    elif quantised and getattr(w, "kind", None) == "int8":
        q, sc = w.data, w.scale
        if not (q.dtype is _I8 and q.is_cpu and q.is_contiguous() and q.shape == shape):
            raise _bad(fn, f"{name} (int8 values)", q, f"contiguous int8 {list(shape)} on the CPU")
        if not (sc.dtype is _BF16 and sc.is_cpu and sc.is_contiguous() and sc.shape == shape[:1]):
            raise _bad(fn, f"{name} (int8 scales)", sc, f"contiguous bf16 [{shape[0]}] on the CPU")
        into.w, into.scale, into.kind = q.data_ptr(), sc.data_ptr(), 2
        return
    allowed = "contiguous float32 or bf16" + (" (or an int8 QuantWeight)" if quantised else "")
    raise _bad(fn, name, w, f"{allowed} {list(shape)} on the CPU")


def _mla_norm(fn: str, name: str, w, n: int) -> tuple[int, int]:
    if not (isinstance(w, torch.Tensor) and w.dtype in _NORM_WEIGHT and w.is_cpu and w.is_contiguous()
            and w.shape == (n,)):
        raise _bad(fn, name, w, f"contiguous float32 or bf16 [{n}] on the CPU")
    return w.data_ptr(), int(w.dtype is _BF16)


def mla_layer(wq, kv_a, kv_norm: torch.Tensor, kv_b: torch.Tensor, wo, *, d: int, r: int, heads: int, dn: int,
              dr: int, dv: int, eps: float, scale: float, q_a=None, q_norm: torch.Tensor | None = None,
              q_eps: float | None = None, biases: tuple = (None, None, None)) -> MLALayer:
    """One MLA layer's weights checked and pointed to, for ``mla_decode`` or a caller that
    keeps them for many steps (``model/decode_plan.py``): D the width, r the kv_lora_rank;
    the other arguments as ``mla_decode``. The weights must stay where they are while the
    result is used."""
    return _mla_layer("mla_layer", wq, kv_a, kv_norm, kv_b, wo, d, r, heads, dn, dr, dv, eps, scale, q_a, q_norm,
                      q_eps, biases)


def _mla_layer(fn: str, wq, kv_a, kv_norm, kv_b, wo, d, r, heads, dn, dr, dv, eps, scale, q_a, q_norm, q_eps,
               biases) -> MLALayer:
    if not (all(isinstance(v, int) and v > 0 for v in (d, r, heads, dn, dr, dv)) and dr % 2 == 0):
        raise ValueError(f"native.{fn}: heads, dn, dv, the width D and the kv_lora_rank r (a pool's last size - dr) "
                         f"must be positive, dr positive and even; got heads {heads}, dn {dn}, dr {dr}, dv {dv}, "
                         f"D {d}, r {r}")
    lk, nq = r + dr, heads * (dn + dr)
    layer = MLALayer(D=d, H=heads, dn=dn, dr=dr, dv=dv, r=r, qr=0, q_eps=0.0, kv_eps=eps, scale=scale)
    if q_a is None:
        _mla_w(fn, "wq", wq, (nq, d), True, layer.q)
    else:
        qr = q_a.shape[0] if len(q_a.shape) == 2 else 0
        if not qr or q_eps is None:
            raise ValueError(f"native.{fn}: q_a must be [qr, D] with qr > 0 and q_eps given, got "
                             f"{describe(q_a)}, q_eps {q_eps!r}")
        layer.qr, layer.q_eps = qr, q_eps
        _mla_w(fn, "q_a", q_a, (qr, d), True, layer.q_a)
        _mla_w(fn, "wq (q_b)", wq, (nq, qr), True, layer.q_b)
        layer.q_norm, layer.q_norm_bf16 = _mla_norm(fn, "q_norm", q_norm, qr)
    _mla_w(fn, "kv_a", kv_a, (lk, d), True, layer.kv_a)
    _mla_w(fn, "kv_b", kv_b, (heads * (dn + dv), r), False, layer.kv_b)
    _mla_w(fn, "wo", wo, (d, heads * dv), True, layer.o)
    layer.kv_norm, layer.kv_norm_bf16 = _mla_norm(fn, "kv_norm", kv_norm, r)
    if len(biases) != 3:
        raise ValueError(f"native.{fn}: biases must be (q_a, kv_a, o), got {len(biases)} entries")
    layer.keep = []  # float32 copies, alive as long as the layer
    for name, t, n in zip(("b_q_a", "b_kv_a", "b_o"), biases, (layer.qr, lk, d)):
        if t is not None:
            if not (isinstance(t, torch.Tensor) and t.is_cpu and t.dtype.is_floating_point and t.shape == (n,) and n):
                raise _bad(fn, name, t, f"None or a float tensor [{n}] on the CPU" + ("" if n else " (no q_a: None)"))
            t = _as_f32(t)
            layer.keep.append(t)
            setattr(layer, name, t.data_ptr())
    return layer


def mla_run(layer: MLALayer, x: torch.Tensor, *, cos: torch.Tensor, sin: torch.Tensor, cache: torch.Tensor,
            table: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """One MLA decode step of a layer ``mla_layer`` built: the other arguments as ``mla_decode``."""
    if not isinstance(layer, MLALayer):
        raise ValueError(f"native.mla_run: layer must be an MLALayer (native.mla_layer), got {type(layer).__name__}")
    return _mla_run("mla_run", layer, x, cos, sin, cache, table, pos)


def _mla_run(fn: str, layer: MLALayer, x, cos, sin, cache, table, pos) -> torch.Tensor:
    lk = layer.r + layer.dr
    if not (isinstance(cache, torch.Tensor) and cache.dtype in _MLA_POOL and cache.is_cpu and cache.ndim == 3
            and cache.is_contiguous() and cache.shape[0] and cache.shape[1] and cache.shape[2] == lk):
        raise _bad(fn, "cache", cache, f"a contiguous float32 or bf16 block pool [NB, BS, {lk}] (NB, BS > 0; r + dr "
                                       f"= {layer.r} + {layer.dr}) on the CPU")
    nb, bs = cache.shape[:2]
    if not (x.dtype is _F32 and x.is_cpu and x.ndim == 2 and x.shape[1] == layer.D):
        raise _bad(fn, "x", x, f"float32 [B, {layer.D}] (B rows of the layer's width) on the CPU")
    b = x.shape[0]
    cos, sin, table, pos = step_rows(b, layer.dr, cos, sin, table, pos)
    x = _flat(x)
    lib = require()
    w = table.shape[1]
    scratch = scratch_buffer(lib.dsvl2_mla_scratch(b, layer.H, layer.dn, layer.dr, layer.dv, layer.r, layer.qr,
                                                   w * bs), _F32)
    out = torch.empty((b, layer.D), dtype=_F32)
    rc = lib.dsvl2_mla_decode(ctypes.byref(layer), x.data_ptr(), b, cos.data_ptr(), sin.data_ptr(),
                              cache.data_ptr(), int(cache.dtype is _BF16), nb, bs, table.data_ptr(), w,
                              pos.data_ptr(), out.data_ptr(), scratch.data_ptr())
    if rc == -1:
        raise decode_error(rc, nb, bs, table, pos)
    if rc != 0:  # mla_layer's checks cover every size the C side refuses
        raise ValueError(f"native.{fn}: the kernel refused heads {layer.H}, dn {layer.dn}, dr {layer.dr}, "
                         f"dv {layer.dv}, r {layer.r}")
    return out


def mla_decode(x: torch.Tensor, wq, kv_a, kv_norm: torch.Tensor, kv_b: torch.Tensor, wo, *, heads: int, dn: int,
               dr: int, dv: int, eps: float, cos: torch.Tensor, sin: torch.Tensor, cache: torch.Tensor,
               table: torch.Tensor, pos: torch.Tensor, scale: float, q_a=None, q_norm: torch.Tensor | None = None,
               q_eps: float | None = None, biases: tuple = (None, None, None)) -> torch.Tensor:
    """One MLA decode step (``mla.c``; ``model/attention.py`` MLA is the torch version): x
    float32 [B, D] (normalised); wq [H (dn + dr), D] (q_proj), or with ``q_a`` [qr, D] and
    ``q_norm`` [qr] (eps ``q_eps``) q_b_proj's [H (dn + dr), qr]; kv_a [r + dr, D]
    (kv_a_proj_with_mqa), kv_norm [r] (kv_a_layernorm, eps ``eps``), kv_b [H (dn + dv), r],
    wo [D, H dv]. Weights: contiguous float32 or bf16; wq / q_a / kv_a / wo also int8
    ``QuantWeight`` s. ``biases``: (q_a, kv_a, o) biases, each None or of the matching size.
    cache: the layer's block pool [NB, BS, r + dr] (contiguous float32 or bf16), written at
    row b's position pos[b] through its block table (table [B, W]) and attended over its
    positions 0..pos[b]; cos / sin float32 [B, dr]. Returns the block's output [B, D].
    ``mla_layer`` + ``mla_run``: D and r are x's width and the pool's last size - dr."""
    fn = "mla_decode"
    if not (isinstance(cache, torch.Tensor) and cache.dtype in _MLA_POOL and cache.is_cpu and cache.ndim == 3):
        raise _bad(fn, "cache", cache, "a contiguous float32 or bf16 block pool [NB, BS, r + dr] on the CPU")
    if not (x.dtype is _F32 and x.is_cpu and x.ndim == 2 and x.shape[1]):
        raise _bad(fn, "x", x, "float32 [B, D] (D > 0) on the CPU")
    r = cache.shape[2] - dr if isinstance(dr, int) else 0
    layer = _mla_layer(fn, wq, kv_a, kv_norm, kv_b, wo, x.shape[1], r, heads, dn, dr, dv, eps, scale, q_a, q_norm,
                       q_eps, biases)
    return _mla_run(fn, layer, x, cos, sin, cache, table, pos)


# ---- prefill and vision attention with bf16 products (attention.c) --------------------------

ATTENTION_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_bf16")
# A mask value at or below this hides its key: its weight exp(s + mask - max) is exactly 0
# whenever any key of the row is visible (the model's masks use the dtype's min).
HIDDEN = -1e30
_attention: list = [None, False]  # (the library it was decided for, whether the kernel runs)


def attention_usable() -> bool:
    """``attention_bf16`` runs here: the kernels built, by a compiler with the AVX-512 BF16
    intrinsics (``attention.c``), on a CPU with AVX-512 BF16."""
    if not available():
        return False
    lib = require()
    if _attention[0] is not lib:
        flags = cpu_info()[1]
        _attention[:] = [lib, all(f in flags for f in ATTENTION_FLAGS) and bool(lib.dsvl2_attention_built())]
    return _attention[1]


def _attention_limits(mask: torch.Tensor, b: int, t: int, s: int) -> torch.Tensor:
    """int32 [B, T]: 1 + the last key each query row sees (0: none). The kernel skips the keys
    after it (all hidden). One mask serves every layer of a step: the limits are kept for the
    next call with the same mask (same object, unchanged, same B), which is not kept alive."""
    memo = getattr(_local, "attention_limits", None)
    if memo is not None and memo[0]() is mask and memo[1] == (mask._version, b):
        return memo[2]
    last = ((mask[:, 0] > HIDDEN) * torch.arange(1, s + 1, dtype=torch.int32)).amax(-1)  # [B or 1, T]
    lim = last.to(torch.int32).expand(b, t).contiguous()
    _local.attention_limits = (weakref.ref(mask), (mask._version, b), lim)
    return lim


def _attention_args(fn: str, q, k, v, mask, out) -> tuple:
    """The checks of ``attention_bf16`` (shared with ``attention_bf16_torch``): ``ValueError``
    naming the argument, else (B, H, Hk, T, S, dk, dv, the mask as float32 with its last
    dimension contiguous or None, out or a new float32 one)."""

    def four(name, x, want):
        if not (isinstance(x, torch.Tensor) and x.dtype is _BF16 and x.is_cpu and x.ndim == 4 and x.stride(3) == 1
                and all(n > 0 for n in x.shape)):
            raise _bad(fn, name, x, f"bf16 {want} on the CPU, no size 0, the last dimension contiguous")

    four("q", q, "[B, H, T, dk]")
    b, h, t, dk = q.shape
    four("k", k, f"[{b}, Hk, S, {dk}]")
    four("v", v, f"[{b}, Hk, S, dv]")
    hk, s = k.shape[1], k.shape[2]
    if k.shape[0] != b or k.shape[3] != dk or h % hk or dk % 2:
        raise _bad(fn, "k", k, f"bf16 [{b}, Hk, S, {dk}] with Hk dividing {h} (q's heads) and dk even")
    dv = v.shape[3]
    if v.shape[:3] != (b, hk, s) or dv % 2:
        raise _bad(fn, "v", v, f"bf16 [{b}, {hk}, {s}, dv] (k's rows) with dv even")
    if mask is not None:
        if not (isinstance(mask, torch.Tensor) and mask.is_cpu and mask.dtype.is_floating_point and mask.ndim == 4
                and mask.shape[0] in (1, b) and mask.shape[1:] == (1, t, s)):
            raise _bad(fn, "mask", mask, f"a float mask [{b} or 1, 1, {t}, {s}] on the CPU")
        if mask.dtype is not _F32 or mask.stride(3) != 1:
            mask = mask.to(_F32).contiguous()
    if out is None:
        out = torch.empty((b, h, t, dv), dtype=_F32)
    elif not (isinstance(out, torch.Tensor) and out.dtype in (_F32, _BF16) and out.is_cpu
              and out.shape == (b, h, t, dv) and out.stride(3) == 1):
        raise _bad(fn, "out", out, f"float32 or bf16 [{b}, {h}, {t}, {dv}] on the CPU, the last dimension contiguous")
    return b, h, hk, t, s, dk, dv, mask, out


def attention_bf16(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                   mask: torch.Tensor | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """``softmax(scale q k^T + mask) v`` per head with bf16 products (``attention.c``: scores
    accumulated in float32, softmax in float32, its weights rounded to bf16 for the product
    with v): q bf16 [B, H, T, dk], k / v bf16 [B, Hk, S, dk] / [B, Hk, S, dv] (H a multiple
    of Hk: grouped kv heads), any strides with the last dimension contiguous, dk and dv even;
    mask: an additive float mask [B or 1, 1, T, S] or None; out: float32 or bf16 [B, H, T, dv]
    (last dimension contiguous) written in place, or None for a new float32 one. Returns out.
    Only where ``attention_usable()``."""
    return _attention_call("attention_bf16", require().dsvl2_attention_bf16, q, k, v, scale, mask, out,
                           memory_rc=-1, missing="this build of the kernels lacks it (attention_usable() is False)")


def attention_bf16_amx(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                       mask: torch.Tensor | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """``attention_bf16``'s contract, checks and numbers on Intel AMX tiles
    (``amx_attention.c``): the same float32 scores, softmax (the same function), bf16
    weights and division by the float32 sum; only the order of the float32 sums differs.
    ``RuntimeError`` where AMX is not usable (``amx.usable()``)."""
    return _attention_call("attention_bf16_amx", require().dsvl2_amx_attention, q, k, v, scale, mask, out,
                           memory_rc=-3, missing="AMX is not usable on this CPU / kernel / build")


def _attention_call(fn: str, entry, q, k, v, scale, mask, out, memory_rc: int, missing: str) -> torch.Tensor:
    """Check the arguments (``_attention_args``), derive the mask's limits and strides, call
    ``entry`` (attention.c's signature) and return out; ``MemoryError`` where it returned
    ``memory_rc`` (its scratch), ``RuntimeError`` saying ``missing`` for any other failure."""
    b, h, hk, t, s, dk, dv, mask, out = _attention_args(fn, q, k, v, mask, out)
    mst = (0, 0)
    lim = None
    if mask is not None:
        lim = _attention_limits(mask, b, t, s)
        mst = (mask.stride(0) if mask.shape[0] == b else 0, mask.stride(2))
    st = torch.tensor([*q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3], *mst], dtype=_I64)
    rc = entry(q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), int(out.dtype is _BF16), b, h, hk, t, s,
               dk, dv, float(scale), None if mask is None else mask.data_ptr(),
               None if lim is None else lim.data_ptr(), st.data_ptr())
    if rc == memory_rc:
        raise MemoryError(f"native.{fn}: no memory for the kernel's scratch (S = {s}, dk = {dk}, dv = {dv})")
    if rc != 0:
        raise RuntimeError(f"native.{fn}: {missing}")
    return out


def attention_bf16_torch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                         mask: torch.Tensor | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """``attention_bf16``'s contract and checks, computed by torch's
    ``scaled_dot_product_attention`` on the bf16 inputs, on any CPU. Its fused kernel keeps
    scores and softmax in float32 and rounds the weights to bf16 for the product with v, as
    ``attention.c`` does, but in blocks of keys (each block's weights rounded against the
    running maximum) and with the result rounded to bf16 before it is written to ``out``.
    Its products run on oneDNN's AMX tiles where the CPU has them: 2.2x the native kernel on
    7 vision tiles, 1.7-1.8x on a 1,431-token causal prefill (MHA and MLA head sizes; an
    Intel Xeon with AMX, 2 threads), so the kernel policy measures both
    (``policy.choose``). dv < dk (MLA): v padded with zero columns, which leave the
    other columns' sums as they were (torch runs a dv != dk call unfused, ~8x slower);
    dv > dk: q and k padded, which leaves the scores as they were. Grouped kv heads are
    read in place (``enable_gqa``)."""
    b, h, hk, t, s, dk, dv, mask, out = _attention_args("attention_bf16_torch", q, k, v, mask, out)
    if dv < dk:
        v = F.pad(v, (0, dk - dv))
    elif dv > dk:
        q, k = F.pad(q, (0, dv - dk)), F.pad(k, (0, dv - dk))
    got = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=float(scale), enable_gqa=hk != h)
    return out.copy_(got[..., :dv])
