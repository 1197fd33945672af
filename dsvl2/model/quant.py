"""Quantised weights: int8 per output channel, int4 group-wise; their formats and kernels.

A weight is a format, not a model: a ``QuantWeight`` stands where a float weight
``[..., N, K]`` stood (a ``Linear.weight``, a stacked ``Experts.gate_proj``) and
``ops.linear`` / ``ops.gated_mlp`` hand it the product. The model code does not change.

Stored format (safetensors, the official key names; written by
``dsvl2.checkpoint.quantised``):
* int8: ``<name>`` int8 ``[N, K]`` and ``<name>_scale`` bf16 ``[N]``; w = q * scale.
* int4: ``<name>`` uint8 ``[N, K/2]`` (two values per byte, column 2j in the low nibble,
  stored as q + 8) and ``<name>_scale`` bf16 ``[N, K/G]``; w = q * scale of its group.
  The group size G is the scale's shape: K / scale.shape[-1].
Symmetric, scale = absmax / qmax rounded to bf16 first, so the dequantised value is
exactly q * (stored scale) in every kernel. Scales are bf16 because torch's CPU kernels
take the scales in the activations' dtype and decode runs in bf16.

Kernels, chosen by step kind, never by row count (see ``ops``); numbers from
benchmarks/bench_quant_kernels.py on a 2-thread Zen 4 (AVX-512, avx512_bf16):
* inside ``ops.decoding()``: the native kernels (``model/native``: ``linear_int8`` /
  ``linear_int4``, and whole MoE layers in ``experts_int8`` / ``experts_int4``): float32
  activations, each weight row read once for all rows, int4 dequantised in registers from
  the stored format (or, where the CPU has AVX-512 VNNI and the groups are of 128, its
  nibbles multiplied in integers with three 8-bit digits of each activation: within
  2^-22 of the largest activation of each block of 128, see ``native/int4.c``). A base MoE
  layer in int4 (72 experts, top-6) takes 1.5 / 5.4 / 18 ms at 1 / 4 / 16 tokens (0.92 /
  0.89 / 0.68 of the measured read bandwidth), against 2.5 / 9.4 / 26 ms for the
  per-expert loop over torch's int4pack mm. Without the native kernels:
  ``torch._weight_int8pack_mm`` (bf16 activations) for int8, torch's
  ``_weight_int4pack_mm_for_cpu`` for int4 (see below).
* everywhere else (prefill, vision): the weight is dequantised a block of rows at a time
  (``BLOCK_ELEMS`` values: a whole expert matrix of the real models) into a reused
  per-thread buffer, in one native pass (``native.dequantize_int8`` / ``dequantize_int4``;
  torch ops with the same bits without the kernels), and one GEMM runs per block
  (``F.linear``), in the dtype the kernel policy chose for big products
  (``ops.big_products_in_weights_dtype``): float32, or on CPUs with native bf16 matrix
  units bf16 (the dequantised weight rounded to bf16, the activations too, the result back
  in x's dtype: what the bf16 weights' path does). Routed experts: ``moe.Experts``
  dequantises each used expert's slot (``dequantize_into``) the same way. 1431 rows
  through a layer's routed experts (random top-6, bf16 products, load ~1): small int8
  0.44 s (0.81 of the bf16 GEMM peak), against 0.51 s with torch's two-pass int8
  dequantisation; base int4 0.67 s, against 0.71 s with three ``block_gemm`` s per expert
  and 1.42 s with the int4pack mm; the small dense layer's int8 gate: 170 ms, against
  416 ms in float32 blocks.
* int4 layout: the stored format wherever the native kernels are built ("int4"). Without
  them, torch's CPU int4 layout ("int4pack", converted at load; opaque, so that weight is
  kept only in it and its prefill also runs the int4pack mm), or, where that kernel cannot
  take the shape (N not a multiple of 16), the stored format dequantised per call.
Every decode kernel gives each row the same bits whatever the number of rows (a test
checks it), so a decode row does not depend on its batch.
"""

from __future__ import annotations

import torch

from . import buckets, native, pages
from .native import amx
from .scratch import buffer  # the per-thread reused buffer

INT4_GROUPS = (128, 64, 32)  # preferred first: 128 measured fastest on the real shapes
# Values dequantised per prefill block: 4 Mi (16 MB as float32) holds a whole expert matrix
# of the real models (base: 2560 x 1536), so an expert's product is one GEMM, while the
# lm_head (129280 x 1280) is done in 33 blocks instead of one 660 MB temporary.
BLOCK_ELEMS = 1 << 22


def int4_group(k: int) -> int | None:
    """The group size used for a K-wide int4 weight, or None if no group fits."""
    return next((g for g in INT4_GROUPS if k % g == 0), None)


# ---- quantise / dequantise (stored format) -------------------------------------------------

def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float [..., N, K] -> (int8 [..., N, K], bf16 scale [..., N])."""
    w = w.float()
    scale = (w.abs().amax(-1) / 127).clamp_min(1e-12).to(torch.bfloat16)
    q = torch.round(w / scale.float()[..., None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


def quantize_int4(w: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """float [..., N, K] -> (packed uint8 [..., N, K/2], bf16 scale [..., N, K/G])."""
    w = w.float()
    *lead, n, k = w.shape
    g = w.reshape(*lead, n, k // group, group)
    scale = (g.abs().amax(-1) / 7).clamp_min(1e-12).to(torch.bfloat16)
    q = torch.round(g / scale.float()[..., None]).clamp_(-8, 7).reshape(*lead, n, k)
    return pack_int4((q + 8).to(torch.uint8)), scale


def pack_int4(u: torch.Tensor) -> torch.Tensor:
    """uint8 values 0..15 [..., K] -> bytes [..., K/2] (even column in the low nibble)."""
    return u[..., 0::2] | (u[..., 1::2] << 4)


def unpack_int4(p: torch.Tensor) -> torch.Tensor:
    """bytes [..., K/2] -> signed values -8..7 as int8 [..., K]."""
    lo, hi = p & 15, p >> 4
    return torch.stack((lo, hi), -1).flatten(-2).to(torch.int8) - 8


def dequantize(q: torch.Tensor, scale: torch.Tensor, bits: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Stored format -> float weight [..., N, K] (the reference every kernel is tested against)."""
    if bits == 8:
        return (q.to(torch.float32) * scale.float()[..., None]).to(dtype)
    v = unpack_int4(q).float()
    *lead, n, k = v.shape
    groups = scale.shape[-1]
    v = v.reshape(*lead, n, groups, k // groups) * scale.float()[..., None]
    return v.reshape(*lead, n, k).to(dtype)


# ---- the in-memory weight --------------------------------------------------------------------

class QuantWeight:
    """A quantised weight [..., N, K] in the kernel's layout; indexable on its leading dims.

    ``kind``: "int8" (q int8, scale bf16 [..., N]), "int4" (stored format: q uint8
    [..., N, K/2], scale bf16 [..., N, K/G]), "int4pack" (torch's CPU int4 layout,
    scales_zeros bf16 [..., K/G, N, 2]; only where the native kernels are not built).
    """

    def __init__(self, kind: str, shape: tuple[int, ...], data: torch.Tensor, scale: torch.Tensor, group: int = 0):
        self.kind, self.shape, self.data, self.scale, self.group = kind, torch.Size(shape), data, scale, group

    # ---- construction
    @classmethod
    def empty(cls, bits: int, shape: tuple[int, ...], group: int = 0) -> "QuantWeight":
        """Uninitialised storage for a (stacked) weight; filled slot by slot with ``set_data``
        / ``set_scale``. int4 keeps the stored format where the native kernels are built."""
        *lead, n, k = shape
        if bits == 8:
            return cls("int8", shape, pages.empty(shape, torch.int8), torch.empty(*lead, n, dtype=torch.bfloat16))
        if not native.available() and n % 16 == 0 and k % 32 == 0:
            return cls("int4pack", shape, pages.empty((*lead, n, k // 2), torch.uint8),
                       torch.zeros(*lead, k // group, n, 2, dtype=torch.bfloat16), group)
        return cls("int4", shape, pages.empty((*lead, n, k // 2), torch.uint8),
                   torch.empty(*lead, n, k // group, dtype=torch.bfloat16), group)

    @classmethod
    def quantize(cls, w: torch.Tensor, bits: int) -> "QuantWeight":
        """A float weight [N, K] quantised in the stored format (int4: groups of
        ``int4_group(K)``) and held as the loader holds it."""
        qw = cls.empty(bits, tuple(w.shape), (int4_group(w.shape[-1]) or 0) if bits == 4 else 0)
        qw.quantize_slot((), w)
        return qw

    def quantize_slot(self, index: tuple[int, ...], w: torch.Tensor) -> None:
        """Fill slot ``index`` (() for an unstacked weight) by quantising the float weight w."""
        q, scale = quantize_int8(w) if self.bits == 8 else quantize_int4(w, self.group)
        self.set_data(index, q)
        self.set_scale(index, scale)

    def set_data(self, index: tuple[int, ...], q: torch.Tensor) -> None:
        """Fill slot ``index`` (() for an unstacked weight) from the stored format's values."""
        if self.kind == "int4pack":
            u = unpack_int4(q).to(torch.int32) + 8
            self.data[index].copy_(torch._convert_weight_to_int4pack_for_cpu(u.contiguous(), 2))
        else:
            self.data[index].copy_(q)

    def set_scale(self, index: tuple[int, ...], scale: torch.Tensor) -> None:
        if self.kind == "int4pack":
            self.scale[index][..., 0].copy_(scale.t())  # zero point stays 0: w = (u - 8) * scale
        else:
            self.scale[index].copy_(scale)

    @property
    def bits(self) -> int:
        return 8 if self.kind == "int8" else 4

    @property
    def dtype(self) -> torch.dtype:  # what the weight computes like (for callers that ask)
        return torch.bfloat16

    @property
    def device(self) -> torch.device:
        return self.data.device

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size() + self.scale.numel() * self.scale.element_size()

    def __getitem__(self, i) -> "QuantWeight":
        if not isinstance(i, int):
            raise TypeError("a QuantWeight is indexed by one integer (an expert)")
        return QuantWeight(self.kind, self.shape[1:], self.data[i], self.scale[i], self.group)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float weight; only for unstacked int8 / int4 (stored) weights and tests."""
        if self.kind == "int4pack":
            n, k = self.shape[-2:]
            eye = torch.eye(k, dtype=torch.bfloat16)
            return torch._weight_int4pack_mm_for_cpu(eye, self.data, self.group, self.scale).t().to(dtype)
        return dequantize(self.data, self.scale, self.bits, dtype)

    # ---- the product
    def linear(self, x: torch.Tensor, decoding: bool, bf16_products: bool = False) -> torch.Tensor:
        """``x @ W.T`` for x [..., K], in x's dtype. ``decoding``: the step kind; ``bf16_products``:
        outside decoding, the products run in bf16 (``ops.big_products_in_weights_dtype``)."""
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        if self.kind == "int4pack":
            y = torch._weight_int4pack_mm_for_cpu(x2.to(torch.bfloat16).contiguous(), self.data, self.group, self.scale)
        elif not decoding and bf16_products and self.amx_ready():  # stored weight read once, no padding
            y = amx.linear(x2.to(torch.bfloat16), *self.amx_args())
        elif not decoding:
            y = self.block_gemm(x2, torch.bfloat16 if bf16_products else torch.float32, pad=True)
        elif self.kind == "int8" and native.usable_int8(x2, self):
            y = native.linear_int8(x2, self.data, self.scale)  # float32 activations, see model/native
        elif self.kind == "int8":
            y = torch._weight_int8pack_mm(x2.to(torch.bfloat16).contiguous(), self.data, self.scale)
        elif native.usable_int4(x2, self):
            y = native.linear_int4(x2, self.data, self.scale)
        else:  # int4 stored format without the native kernels: a decode product in bf16
            y = self.block_gemm(x2, torch.bfloat16)
        return y.to(x.dtype).reshape(*lead, self.shape[-2])

    def amx_ready(self) -> bool:
        """Its bf16 products outside decode run on AMX tiles (``native/amx.py``): an unstacked
        int8 or int4 weight of a shape the kernel takes, AMX usable and not switched off."""
        return len(self.shape) == 2 and self.amx_takes() and amx.active()

    def amx_takes(self) -> bool:
        """An int8 or int4 (stored format) weight, or stack of them, whose matrices have a
        shape ``native.amx`` takes."""
        return self.kind in ("int8", "int4") and amx.takes(*self.shape[-2:], self.amx_args()[2])

    def amx_args(self, index: int | None = None) -> tuple:
        """(values, scale, group) of the weight, or of slot ``index`` of a stack, as
        ``native.amx`` takes them (the group only for int4)."""
        group = self.group if self.kind == "int4" else 0
        if index is None:
            return self.data, self.scale, group
        return self.data[index], self.scale[index], group

    def block_gemm(self, x: torch.Tensor, dtype: torch.dtype, pad: bool = False) -> torch.Tensor:
        """``x @ W.T`` for x [M, K] (an unstacked weight): W dequantised in blocks of rows into
        the per-thread buffer in ``dtype``, one GEMM per block with x cast to ``dtype``; the
        result in ``dtype``. ``pad`` (prefill): bf16 rows padded to a bucket (``buckets.py``)."""
        n, k = self.shape[-2:]
        rows = max(1, min(n, BLOCK_ELEMS // k))
        xd = x.to(dtype)
        parts = [buckets.linear(xd, self.dequantized_rows(i, min(n, i + rows), dtype), pad=pad)
                 for i in range(0, n, rows)]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)

    def dequantized_rows(self, start: int, stop: int, dtype: torch.dtype) -> torch.Tensor:
        """Rows [start, stop) of the float weight in ``dtype`` (float32, or the bf16 rounding of
        the float32 value), written into the per-thread buffer: valid until the next
        ``dequantized_rows`` / ``scratch.upcast`` / ``scratch.buffer`` of this dtype on this thread."""
        k = self.shape[-1]
        whole = start == 0 and stop == self.shape[-2]  # the usual case: no slicing
        q = self.data if whole else self.data[start:stop]
        s = self.scale if whole else self.scale[start:stop]
        return self._write_dequantized(q, s, buffer((stop - start) * k, dtype).view(stop - start, k))

    def dequantize_into(self, out: torch.Tensor, index: int | None = None) -> torch.Tensor:
        """The float weight (slot ``index`` of a stack, or the whole unstacked weight) written
        into ``out`` [N, K]: contiguous float32 (exact) or bf16 (the float32 value rounded to
        nearest even). For the prefill products (``moe.Experts``); returns out."""
        if index is None:
            return self._write_dequantized(self.data, self.scale, out)
        return self._write_dequantized(self.data[index], self.scale[index], out)

    def _write_dequantized(self, q: torch.Tensor, s: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """Values ``q`` and scales ``s`` of rows of this weight, dequantised into ``out``: in
        one native pass where the kernels are built, else by torch ops with the same bits."""
        if self.kind == "int8":  # q * s is exact in float32 (7 + 8 bits); in bf16 one rounding of it
            if native.available():
                return native.dequantize_int8(q, s, out)
            return out.copy_(q).mul_(s.to(out.dtype)[:, None])
        if self.kind != "int4":
            raise ValueError(f"{self.kind} weights cannot be dequantised by rows (int8 and int4 stored formats can)")
        if self.group % 32 == 0 and native.available():  # every group ``int4_group`` picks
            return native.dequantize_int4(q, s, out)
        return out.copy_(dequantize(q, s, 4))

    def __repr__(self) -> str:
        return f"QuantWeight({self.kind}, shape={list(self.shape)}" + (f", group={self.group})" if self.group else ")")


def hold(module: torch.nn.Module, name: str, qw: QuantWeight) -> None:
    """Put ``qw`` where the module's parameter ``name`` was (a ``QuantWeight`` is not a
    parameter: the parameter is removed first, as the loader does)."""
    del module._parameters[name]
    setattr(module, name, qw)

