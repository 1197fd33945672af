"""Quantised weights: int8 per output channel, int4 group-wise; their formats and kernels.

A weight is a format, not a model (DESIGN.md): a ``QuantWeight`` stands where a float
weight ``[..., N, K]`` stood (a ``Linear.weight``, a stacked ``Experts.gate_proj``) and
``ops.linear`` / ``ops.gated_mlp`` hand it the product. The model code does not change.

Stored format (safetensors, the official key names; see ``dsvl2.quantize``):
* int8: ``<name>`` int8 ``[N, K]`` and ``<name>_scale`` bf16 ``[N]``; w = q * scale.
* int4: ``<name>`` uint8 ``[N, K/2]`` (two values per byte, column 2j in the low nibble,
  stored as q + 8) and ``<name>_scale`` bf16 ``[N, K/G]``; w = q * scale of its group.
  The group size G is the scale's shape: K / scale.shape[-1].
Symmetric, scale = absmax / qmax rounded to bf16 first, so the dequantised value is
exactly q * (stored scale) in every kernel. Scales are bf16 because torch's CPU kernels
take the scales in the activations' dtype and decode runs in bf16.

Kernels, measured on an AVX2-only CPU (benchmarks/bench_quant_kernels.py) and chosen by
step kind, never by row count (see ``ops``):
* int8 inside ``ops.decoding()``: ``torch._weight_int8pack_mm`` with bf16 activations
  (~2x the bf16 GEMV: half the bytes); elsewhere (prefill) the weight is dequantised to
  fp32 in row blocks into a reused buffer and one fp32 GEMM runs (int8pack_mm is ~2x
  slower than that at 512 rows).
* int4: ``torch._weight_int4pack_mm_for_cpu`` (bf16 activations) in every step kind; its
  packed layout is opaque, so the weight is kept only in that layout (converted from the
  stored format at load). Where the kernel cannot take a shape (N not a multiple of
  16), the stored format is kept and dequantised to bf16 per call.
Both torch kernels give each row the same bits whatever the number of rows (a test
checks it), so a decode row does not depend on its batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import native
from .scratch import upcast  # the per-thread reused buffer

INT4_GROUPS = (128, 64, 32)  # preferred first: 128 measured fastest on the real shapes
BLOCK_ROWS = 2048


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

    ``kind``: "int8" (q int8, scale bf16 [..., N]), "int4pack" (torch's CPU int4 layout,
    scales_zeros bf16 [..., K/G, N, 2]), "int4" (stored format, dequantised per call).
    """

    def __init__(self, kind: str, shape: tuple[int, ...], data: torch.Tensor, scale: torch.Tensor, group: int = 0):
        self.kind, self.shape, self.data, self.scale, self.group = kind, torch.Size(shape), data, scale, group

    # ---- construction
    @classmethod
    def empty(cls, bits: int, shape: tuple[int, ...], group: int = 0) -> "QuantWeight":
        """Uninitialised storage for a (stacked) weight; filled slot by slot with ``set``."""
        *lead, n, k = shape
        if bits == 8:
            return cls("int8", shape, torch.empty(shape, dtype=torch.int8), torch.empty(*lead, n, dtype=torch.bfloat16))
        if n % 16 == 0 and k % 32 == 0:
            return cls("int4pack", shape, torch.empty(*lead, n, k // 2, dtype=torch.uint8),
                       torch.zeros(*lead, k // group, n, 2, dtype=torch.bfloat16), group)
        return cls("int4", shape, torch.empty(*lead, n, k // 2, dtype=torch.uint8),
                   torch.empty(*lead, n, k // group, dtype=torch.bfloat16), group)

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
    def linear(self, x: torch.Tensor, decoding: bool) -> torch.Tensor:
        """``x @ W.T`` for x [..., K], in x's dtype. ``decoding``: the step kind (see ``ops``)."""
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        if self.kind == "int8":
            if decoding and native.usable_int8(x2, self):
                y = native.linear_int8(x2, self.data, self.scale)  # float32 activations, see model/native
            elif decoding:
                y = torch._weight_int8pack_mm(x2.to(torch.bfloat16).contiguous(), self.data, self.scale)
            else:
                y = self._dequant_gemm(x2)
        elif self.kind == "int4pack":
            y = torch._weight_int4pack_mm_for_cpu(x2.to(torch.bfloat16).contiguous(), self.data, self.group, self.scale)
        else:
            y = F.linear(x2.to(torch.bfloat16), dequantize(self.data, self.scale, 4, torch.bfloat16))
        return y.to(x.dtype).reshape(*lead, self.shape[-2])

    def _dequant_gemm(self, x: torch.Tensor) -> torch.Tensor:
        n = self.shape[-2]
        xf = x.float()
        parts = []
        for i in range(0, n, BLOCK_ROWS):
            w = upcast(self.data[i:i + BLOCK_ROWS], torch.float32)
            w.mul_(self.scale[i:i + BLOCK_ROWS].float()[:, None])
            parts.append(F.linear(xf, w))
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)

    def __repr__(self) -> str:
        return f"QuantWeight({self.kind}, shape={list(self.shape)}" + (f", group={self.group})" if self.group else ")")
