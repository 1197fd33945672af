"""Rotary position embeddings of the DeepSeek-V2 family.

Two conventions live in the family and both are reproduced (docs/reference-quirks.md,
"Rotary embeddings"):
* MHA (tiny, transformers' Llama attention): half-split rotation, pairs (i, i + d/2);
* MLA: the rope part is first de-interleaved (pairs (2i, 2i+1) -> evens then odds) and
  then rotated half-split, i.e. the GPT-J interleaved convention, with outputs in the
  de-interleaved order (that order is what the reference caches and dots with).

Frequencies: plain (theta^(-2i/d)), linear scaling (positions / factor) and DeepSeek-V2
YaRN (a ramp between interpolated and extrapolated frequencies over the dims given by
beta_fast / beta_slow, cos / sin multiplied by mscale(factor, mscale) /
mscale(factor, mscale_all_dim)). Everything is computed in float32 from the positions,
so any position works without a precomputed table.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..config import LanguageConfig, yarn_mscale
from ..errors import ConfigError
from . import native

# The native pass for prefill rows (``apply_rope``); tests switch it off to compare.
native_rope = True


def _yarn_correction_dim(rotations: float, dim: int, base: float, max_pos: int) -> float:
    return (dim * math.log(max_pos / (rotations * 2 * math.pi))) / (2 * math.log(base))


def yarn_inv_freq(dim: int, base: float, factor: float, original_max_pos: int,
                  beta_fast: float = 32, beta_slow: float = 1) -> torch.Tensor:
    """Blend of extrapolated (1/base^..) and interpolated (1/(factor*base^..)) frequencies."""
    exponents = torch.arange(0, dim, 2, dtype=torch.float32) / dim
    freq_extra = 1.0 / (base ** exponents)
    freq_inter = 1.0 / (factor * base ** exponents)
    low = max(math.floor(_yarn_correction_dim(beta_fast, dim, base, original_max_pos)), 0)
    high = min(math.ceil(_yarn_correction_dim(beta_slow, dim, base, original_max_pos)), dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extra_mask = 1.0 - ramp  # 1 -> keep the original frequency (high-frequency dims)
    return freq_inter * (1 - extra_mask) + freq_extra * extra_mask


class RotaryEmbedding(nn.Module):
    """cos / sin for given positions: positions [B, T] -> ([B, T, d], [B, T, d])."""

    def __init__(self, cfg: LanguageConfig):
        super().__init__()
        dim = cfg.rope_dim
        base = float(cfg.rope_theta)
        rs = cfg.rope_scaling
        self.interleaved = cfg.use_mla
        self.position_scale = 1.0
        self.mscale = 1.0
        kind = None if rs is None else rs.get("type")
        if kind is None:
            inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
        elif kind == "linear":
            inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
            self.position_scale = 1.0 / float(rs["factor"])
        elif kind == "yarn" and cfg.use_mla:
            factor = float(rs["factor"])
            inv_freq = yarn_inv_freq(dim, base, factor, int(rs.get("original_max_position_embeddings", 4096)),
                                     rs.get("beta_fast", 32), rs.get("beta_slow", 1))
            # reference defaults mscale=1, mscale_all_dim=0; an explicit 0 means 0 (factor 1), not the default
            m, m_all = rs.get("mscale", 1), rs.get("mscale_all_dim", 0)
            self.mscale = yarn_mscale(factor, 1 if m is None else m) / yarn_mscale(factor, m_all or 0)
        else:
            raise ConfigError(f"rope_scaling type {kind!r} is not supported with use_mla={cfg.use_mla} "
                              "(supported: none and 'linear' for both, 'yarn' for MLA)")
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t = positions.float()
        if self.position_scale != 1.0:
            t = t * self.position_scale
        freqs = t[..., None] * self.inv_freq  # [B, T, d/2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [B, T, d]
        cos, sin = emb.cos(), emb.sin()
        if self.mscale != 1.0:
            cos, sin = cos * self.mscale, sin * self.mscale
        return cos, sin


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """x [B, H, T, d]; cos / sin [B, T, d]. Interleaved: de-interleave first (MLA). A float32
    CPU prefill of more than one token takes the native pass (``native.rope``: the same bits,
    one pass instead of seven) where the kernels are built and autograd does not track x."""
    if (native_rope and x.dtype == torch.float32 and x.is_cpu and x.ndim == 4 and x.shape[2] > 1
            and not x.requires_grad
            and x.stride(3) == 1 and x.shape[3] % 2 == 0 and x.shape[3] <= native.ROPE_MAX_DIM
            and cos.dtype == torch.float32 and sin.dtype == torch.float32 and native.available()):
        return native.rope(x, cos, sin, interleaved)
    if interleaved:
        b, h, t, d = x.shape
        x = x.view(b, h, t, d // 2, 2).transpose(3, 4).reshape(b, h, t, d)
    cos, sin = cos[:, None].to(x.dtype), sin[:, None].to(x.dtype)
    return x * cos + _rotate_half(x) * sin
