"""Attention of the DeepSeek-V2 decoder: MHA (``use_mla: false``) and MLA.

Legend: B rows, T new tokens, S keys (cached + new), H heads, Hk kv heads, hd head size,
dn qk_nope_head_dim, dr qk_rope_head_dim, dv v_head_dim, r kv_lora_rank.

* MHA (tiny) is transformers' Llama attention: q/k/v/o without bias, GQA-capable,
  half-split RoPE, scale hd^-0.5.
* MLA: q = q_proj(x) or q_b_proj(RMSNorm(q_a_proj(x))); kv_a_proj_with_mqa(x) = [latent
  (r) | k_pe (dr)]; the latent is RMS-normalised (kv_a_layernorm); RoPE (interleaved) on
  q_pe and on the single shared k_pe; kv_b_proj maps the latent to per-head [k_nope | v].
  Scale (dn + dr)^-0.5, times mscale^2 under YaRN with mscale_all_dim.
  Two equivalent computations, both kept and tested against each other:
  - ``expanded``: decompress k_nope / v for all S keys, then ordinary attention. Used for
    prefill (many queries: the decompression is amortised).
  - ``absorbed``: fold W_uk into the query and W_uv into the output, attend directly over
    the cached [latent | k_pe] (one shared kv "head" of width r + dr). Used for decode:
    it reads only the compressed cache, which is the point of MLA.
  In a decode step on the CPU the absorbed form runs as one native call where
  ``MLA.native_decode`` allows (``native.mla_decode``, ``native/mla.c``: float32, bf16 or
  int8 projections, the float32 or bf16 cache read in place through the block tables);
  ``allow_native = False`` keeps the torch path, the reference it is tested against.
Masks are additive with the dtype's min (finite), softmax in float32 (SDPA on CPU keeps
float32 throughout), so fully masked padding rows stay finite instead of NaN.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import LanguageConfig
from . import native, ops
from .cache import StepContext
from .ops import Linear, RMSNorm, weight_matmul
from .rope import apply_rope


class MHA(nn.Module):
    def __init__(self, cfg: LanguageConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.h, self.hk, self.hd = cfg.num_attention_heads, cfg.kv_heads, cfg.head_dim
        self.scale = cfg.softmax_scale
        bias = cfg.attention_bias
        self.q_proj = Linear(cfg.hidden_size, self.h * self.hd, bias=bias)
        self.k_proj = Linear(cfg.hidden_size, self.hk * self.hd, bias=bias)
        self.v_proj = Linear(cfg.hidden_size, self.hk * self.hd, bias=bias)
        self.o_proj = Linear(self.h * self.hd, cfg.hidden_size, bias=bias)

    def forward(self, x: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        b, t, _ = x.shape
        if t == 1 and self.native_decode(x, ctx):
            k_cache, v_cache = ctx.cache.layers[self.layer]
            out = native.mha_decode(x.view(b, -1), self.q_proj.weight, self.k_proj.weight, self.v_proj.weight,
                                    self.o_proj.weight, (self.q_proj.bias, self.k_proj.bias, self.v_proj.bias,
                                                         self.o_proj.bias),
                                    self.h, self.hk, ctx.cos, ctx.sin, k_cache, v_cache, ctx.table,
                                    ctx.write_pos[:, 0], self.scale)
            return out.view(b, 1, -1)
        q = self.q_proj(x).view(b, t, self.h, self.hd).transpose(1, 2)  # [B, H, T, hd]
        k = self.k_proj(x).view(b, t, self.hk, self.hd).transpose(1, 2)  # [B, Hk, T, hd]
        v = self.v_proj(x).view(b, t, self.hk, self.hd)  # [B, T, Hk, hd]
        q = apply_rope(q, ctx.cos, ctx.sin, interleaved=False)
        k = apply_rope(k, ctx.cos, ctx.sin, interleaved=False).transpose(1, 2)  # [B, T, Hk, hd]
        if ctx.cache is not None:
            k, v = ctx.write_and_read(self.layer, (k, v))  # [B, S, Hk, hd]
        if ops.attention_in_bf16(x, self.q_proj.weight) and self.hd % 2 == 0:
            # bf16 products (ops.attention_bf16), grouped kv heads read in place; out [B, T, H, hd]
            bf = torch.bfloat16
            out = torch.empty((b, t, self.h, self.hd), dtype=q.dtype)
            ops.attention_bf16(q.to(bf), k.transpose(1, 2).to(bf), v.transpose(1, 2).to(bf), self.scale,
                               ctx.mask, out=out.transpose(1, 2))
            return self.o_proj(out.view(b, t, self.h * self.hd))
        k, v = k.transpose(1, 2).to(q.dtype), v.transpose(1, 2).to(q.dtype)  # [B, Hk, S, hd]
        if self.hk != self.h:
            k = k.repeat_interleave(self.h // self.hk, dim=1)
            v = v.repeat_interleave(self.h // self.hk, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=ctx.mask, scale=self.scale)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, self.h * self.hd))

    def native_decode(self, x: torch.Tensor, ctx: StepContext) -> bool:
        """A decode step (one token per row) with bf16 weights and a float32 cache: the
        whole block in one native call (``native.mha_decode``)."""
        if (ctx.cache is None or ctx.cache.dtype != torch.float32 or ctx.cos.shape[-1] != self.hd
                or self.hd > 1024):  # the C side's RoPE buffer
            return False
        return ops.native_block(x, self.q_proj.weight, self.k_proj.weight, self.v_proj.weight, self.o_proj.weight)


class MLA(nn.Module):
    def __init__(self, cfg: LanguageConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.h = cfg.num_attention_heads
        self.dn, self.dr, self.dv, self.r = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
        self.scale = cfg.softmax_scale
        d = cfg.hidden_size
        qd = self.h * (self.dn + self.dr)
        if cfg.q_lora_rank is None:
            self.q_proj = Linear(d, qd, bias=False)
        else:
            self.q_a_proj = Linear(d, cfg.q_lora_rank, bias=cfg.attention_bias)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, cfg.rms_norm_eps)
            self.q_b_proj = Linear(cfg.q_lora_rank, qd, bias=False)
        self.kv_a_proj_with_mqa = Linear(d, self.r + self.dr, bias=cfg.attention_bias)
        self.kv_a_layernorm = RMSNorm(self.r, cfg.rms_norm_eps)
        self.kv_b_proj = Linear(self.r, self.h * (self.dn + self.dv), bias=False)
        self.o_proj = Linear(self.h * self.dv, d, bias=cfg.attention_bias)
        # Prefill (T > threshold) decompresses; decode attends over the compressed cache.
        self.absorb_max_tokens = 1
        # Decode steps run the whole block natively where ``native_decode`` allows; False:
        # always the torch path below (the reference the native block is tested against).
        self.allow_native = True

    def _query(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "q_proj"):
            return self.q_proj(x)
        return self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))

    def forward(self, x: torch.Tensor, ctx: StepContext, absorbed: bool | None = None) -> torch.Tensor:
        b, t, _ = x.shape
        if t == 1 and absorbed is not False and self.native_decode(x, ctx):
            return self._decode_native(x, ctx)
        q = self._query(x).view(b, t, self.h, self.dn + self.dr).transpose(1, 2)  # [B, H, T, dn+dr]
        q_nope, q_pe = q.split([self.dn, self.dr], dim=-1)
        kv = self.kv_a_proj_with_mqa(x)  # [B, T, r+dr]
        latent, k_pe = kv.split([self.r, self.dr], dim=-1)
        latent = self.kv_a_layernorm(latent)
        q_pe = apply_rope(q_pe, ctx.cos, ctx.sin, interleaved=True)
        k_pe = apply_rope(k_pe[:, None], ctx.cos, ctx.sin, interleaved=True)[:, 0]  # [B, T, dr]
        ckv = torch.cat([latent, k_pe], dim=-1)  # [B, T, r+dr]: what the cache holds
        if ctx.cache is not None:
            (ckv,) = ctx.write_and_read(self.layer, (ckv,))  # [B, S, r+dr]
            ckv = ckv.to(x.dtype)
        if absorbed is None:
            absorbed = t <= self.absorb_max_tokens
        if absorbed:
            out = self._absorbed(q_nope, q_pe, ckv, ctx.mask)
        elif ops.attention_in_bf16(x, self.kv_b_proj.weight):
            out = self._expanded_bf16(q_nope, q_pe, ckv, ctx.mask)
        else:
            out = self._expanded(q_nope, q_pe, ckv, ctx.mask)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, self.h * self.dv))  # out [B, H, T, dv]

    def native_decode(self, x: torch.Tensor, ctx: StepContext) -> bool:
        """A decode step (``ops.decoding()``, one token per row) the native block takes:
        float32 activations, a float32 or bf16 cache, float32 or bf16 weights (int8 ones for
        the projections but ``kv_b_proj``), native blocks on and the kernels built."""
        if not (self.allow_native and ops.native_blocks and ops.decoding_active() and ctx.cache is not None
                and ctx.table is not None and x.dtype == torch.float32 and x.is_cpu and ctx.cos.shape[-1] == self.dr):
            return False
        if ctx.cache.dtype not in (torch.float32, torch.bfloat16) or not native.mla_weight(self.kv_b_proj.weight,
                                                                                             quantised=False):
            return False
        q = (self.q_proj,) if hasattr(self, "q_proj") else (self.q_a_proj, self.q_b_proj)
        for proj in (*q, self.kv_a_proj_with_mqa, self.o_proj):
            if not native.mla_weight(proj.weight):
                return False
        return native.available()

    def native_layer(self) -> native.MLALayer:
        """The block's weights as ``native/mla.c`` takes them (``native.mla_layer``; ValueError
        where it cannot): built per step here, kept across steps by ``decode_plan``."""
        lora = not hasattr(self, "q_proj")
        return native.mla_layer(
            self.q_b_proj.weight if lora else self.q_proj.weight, self.kv_a_proj_with_mqa.weight,
            self.kv_a_layernorm.weight, self.kv_b_proj.weight, self.o_proj.weight, d=self.o_proj.out_features,
            r=self.r, heads=self.h, dn=self.dn, dr=self.dr, dv=self.dv, eps=self.kv_a_layernorm.eps, scale=self.scale,
            q_a=self.q_a_proj.weight if lora else None, q_norm=self.q_a_layernorm.weight if lora else None,
            q_eps=self.q_a_layernorm.eps if lora else None,
            biases=(self.q_a_proj.bias if lora else None, self.kv_a_proj_with_mqa.bias, self.o_proj.bias))

    def _decode_native(self, x: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        b = x.shape[0]
        (pool,) = ctx.cache.layers[self.layer]
        out = native.mla_run(self.native_layer(), x.reshape(b, -1), cos=ctx.cos, sin=ctx.sin, cache=pool,
                             table=ctx.table, pos=ctx.write_pos[:, 0])
        return out.view(b, 1, -1)

    def _kv_b(self) -> torch.Tensor:
        return self.kv_b_proj.weight.view(self.h, self.dn + self.dv, self.r)  # [H, dn+dv, r]

    def _expanded(self, q_nope, q_pe, ckv, mask) -> torch.Tensor:
        b, s, _ = ckv.shape
        latent, k_pe = ckv.split([self.r, self.dr], dim=-1)
        kv = self.kv_b_proj(latent).view(b, s, self.h, self.dn + self.dv).transpose(1, 2)  # [B, H, S, dn+dv]
        k_nope, v = kv.split([self.dn, self.dv], dim=-1)
        k = torch.cat([k_nope, k_pe[:, None].expand(b, self.h, s, self.dr)], dim=-1)
        q = torch.cat([q_nope, q_pe], dim=-1)
        pad = q.shape[-1] - self.dv
        if pad > 0 and q.device.type == "cpu":
            # torch's fused CPU attention takes one head size for q, k and v; with v's 128
            # against q's 192 it fell back to the unfused path (every head's [T, S] scores
            # materialised): 1.5-1.9x slower on prefill chunks. Zero columns appended to v
            # leave the other columns' sums as they were; they are cut off below.
            v = F.pad(v, (0, pad))
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale)[..., : self.dv]

    def _expanded_bf16(self, q_nope, q_pe, ckv, mask) -> torch.Tensor:
        """``_expanded`` with bf16 products (``ops.attention_in_bf16``): k_nope / v expanded
        in bf16 (the bits ``kv_b_proj``'s float32 result has, rounded back), q and k
        assembled in bf16, ``ops.attention_bf16``; float32 [B, H, T, dv] (a view of [B, T, H, dv],
        so the caller's transpose is free)."""
        b, s, _ = ckv.shape
        h, t = self.h, q_nope.shape[2]
        latent, k_pe = ckv.split([self.r, self.dr], dim=-1)
        w = self.kv_b_proj.weight
        # on AMX tiles where it takes the weight (float32 sums rounded to bf16 once, as oneDNN's
        # bf16 result; [1431, 512] x [512, 4096]: 4.8 -> ~2.5 ms), else oneDNN
        kv = (ops.linear(latent, w) if ops.amx_bf16(latent, w) else ops.linear_narrow(latent, w)).to(torch.bfloat16)
        kv = kv.view(b, s, h, self.dn + self.dv)
        k = torch.empty((b, s, h, self.dn + self.dr), dtype=torch.bfloat16)
        k[..., : self.dn] = kv[..., : self.dn]
        k[..., self.dn:] = k_pe[:, :, None]
        q = torch.empty((b, t, h, self.dn + self.dr), dtype=torch.bfloat16)
        q[..., : self.dn] = q_nope.transpose(1, 2)
        q[..., self.dn:] = q_pe.transpose(1, 2)
        out = torch.empty((b, t, h, self.dv), dtype=torch.float32)
        ops.attention_bf16(q.transpose(1, 2), k.transpose(1, 2), kv[..., self.dn:].transpose(1, 2), self.scale,
                           mask, out=out.transpose(1, 2))
        return out.transpose(1, 2)

    def _absorbed(self, q_nope, q_pe, ckv, mask) -> torch.Tensor:
        b, h, t, _ = q_nope.shape
        w = self._kv_b()
        w_uk, w_uv = w[:, : self.dn], w[:, self.dn:]  # [H, dn, r], [H, dv, r]
        q_lat = weight_matmul(q_nope, w_uk)  # [B, H, T, dn] @ [H, dn, r] -> [B, H, T, r]
        q = torch.cat([q_lat, q_pe], dim=-1).reshape(b, 1, h * t, self.r + self.dr)
        k = ckv[:, None]  # [B, 1, S, r+dr]: one shared kv head
        v = ckv[:, None, :, : self.r]  # [B, 1, S, r]
        m = mask
        if m is not None:
            m = m.expand(b, 1, t, m.shape[-1])[:, :, None].expand(b, 1, h, t, m.shape[-1]).reshape(b, 1, h * t, -1)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=m, scale=self.scale)  # [B, 1, H*T, r]
        o = o.view(b, h, t, self.r)
        return weight_matmul(o, w_uv.transpose(1, 2))  # [B, H, T, r] @ [H, r, dv] -> [B, H, T, dv]
