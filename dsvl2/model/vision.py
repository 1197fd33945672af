"""SigLIP vision tower and the 2x2 downsample MLP projector.

Legend: N tiles, P patches per tile (27 * 27 = 729), W tower width, D language width.

Notable choices (all from the reference; docs/reference-quirks.md, "Vision tower and
projector"):
* the 14x14 stride-14 conv sees 27 * 14 = 378 of the 384 pixels; the border is dropped;
* learned absolute position embedding, no class token, no pre-norm;
* pre-LN blocks with qkv bias, GELU (tanh) MLP, LayerNorm eps 1e-6, and the final
  LayerNorm IS applied; the attention-pool head exists in checkpoints but is unused, so
  its weights are accepted and dropped by the loader (``checkpoint/load.py``);
* projector: zero-pad 27x27 to 28x28 (bottom / right), 2x2 blocks with features ordered
  channel-major (``F.unfold`` order: c * 4 + dy * 2 + dx), then Linear -> GELU (erf) ->
  Linear (deeper projectors add Linear + GELU pairs in between).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ProjectorConfig, VisionConfig
from . import native, ops
from .ops import LayerNorm, Linear, attention_in_bf16

# Where the tower's products and attention run in bf16 and the native kernels are built,
# each residual add and the LayerNorm after it run as one native pass that hands the next
# product its bf16 input (``VisionTransformer.forward``); tests switch it off to compare.
fused_norms = True


class PatchEmbed(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.proj = nn.Conv2d(3, cfg.width, kernel_size=cfg.patch_size, stride=cfg.patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, b = self.proj.weight, self.proj.bias
        x = F.conv2d(x, w.to(x.dtype), b.to(x.dtype), stride=self.proj.stride)  # [N, W, 27, 27]
        # [N, P, W], made contiguous once: the transposed view's layout would otherwise carry
        # through every residual add of the tower (an add keeps its input's strides), and each
        # LayerNorm would copy it to contiguous again (7 tiles of the real tower, bf16 products
        # on an AMX Xeon: 4.0 -> 3.5 s, the same bits)
        return x.flatten(2).transpose(1, 2).contiguous()


class Attention(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.heads = cfg.heads
        self.qkv = Linear(cfg.width, 3 * cfg.width, bias=True)
        self.proj = Linear(cfg.width, cfg.width, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [N, P, W] -> [N, P, W], in the products' dtype (``ops.linear_narrow``)."""
        n, p, w = x.shape
        hd = w // self.heads
        qkv = self.qkv.narrow(x)  # bf16 where the products are (ops.linear_narrow)
        narrow = qkv.dtype
        if narrow is torch.bfloat16 and attention_in_bf16(x, self.qkv.weight, tower=True) and hd % 2 == 0:
            return self.bf16(qkv)
        heads = torch.empty((n, p, self.heads, hd), dtype=narrow)  # the heads side by side, for proj
        q, k, v = qkv.view(n, p, 3, self.heads, hd).permute(2, 0, 3, 1, 4).to(x.dtype).unbind(0)  # [N, H, P, hd]
        out = F.scaled_dot_product_attention(q, k, v)  # scale 1/sqrt(hd), no mask
        heads.copy_(out.transpose(1, 2))  # [N, H, P, hd] -> [N, P, H, hd], the products' dtype
        return self.proj.narrow(heads.view(n, p, w))

    def bf16(self, qkv: torch.Tensor) -> torch.Tensor:
        """The attention with bf16 products (the policy's kernel, ``ops.tower_attention_bf16``) on
        qkv [N, P, 3 W] bf16: q, k, v read in place from qkv, the result written in place into
        the heads side by side, then proj: bf16 [N, P, W]."""
        n, p, w3 = qkv.shape
        w = w3 // 3
        hd = w // self.heads
        q, k, v = qkv.view(n, p, 3, self.heads, hd).permute(2, 0, 3, 1, 4).unbind(0)  # [N, H, P, hd]
        heads = torch.empty((n, p, self.heads, hd), dtype=qkv.dtype)
        ops.tower_attention_bf16(q, k, v, hd ** -0.5, out=heads.transpose(1, 2))
        return self.proj.narrow(heads.view(n, p, w))


class Mlp(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.fc1 = Linear(cfg.width, cfg.mlp_hidden, bias=True)
        self.fc2 = Linear(cfg.mlp_hidden, cfg.width, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [N, P, W] -> [N, P, W] in the products' dtype: with bf16 products the hidden
        [N, P, 4304] stays bf16 (GELU on bf16 gives the bits of GELU in float32 rounded by
        fc2's cast; ``ops.linear_narrow``). Prepacked (``VisionTransformer.prepack``), fc1 and
        the GELU are one oneDNN call that rounds once (``prepack.py``)."""
        return self.fc2.narrow(self.fc1.narrow(x, gelu_tanh=True))


class Block(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.norm1 = LayerNorm(cfg.width, eps=1e-6)
        self.attn = Attention(cfg)
        self.norm2 = LayerNorm(cfg.width, eps=1e-6)
        self.mlp = Mlp(cfg)

    def products(self) -> tuple:
        """Its four Linears (qkv, proj, fc1, fc2): what ``VisionTransformer.prepack`` reorders
        and ``VisionTransformer.warm`` runs."""
        return self.attn.qkv, self.attn.proj, self.mlp.fc1, self.mlp.fc2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the residual stream stays in x's dtype: x + a bf16 result promotes exactly
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))

    def fused(self, x: torch.Tensor, h: torch.Tensor, after: LayerNorm, out_dtype: torch.dtype) -> torch.Tensor:
        """``forward`` on the fused path (``VisionTransformer.forward``): x the float32 stream,
        updated in place; h = norm1(x) in bf16. Returns ``after`` (the next block's norm1, or
        the tower's final norm) of the block's output, in ``out_dtype``."""
        a = self.attn.bf16(self.attn.qkv.narrow(h))
        h = native.add_layernorm_(x, a, self.norm2.weight, self.norm2.bias, self.norm2.eps)
        m = self.mlp(h)
        return native.add_layernorm_(x, m, after.weight, after.bias, after.eps, out_dtype)


class VisionTransformer(nn.Module):
    """SigLIP ViT: pixels [N, 3, S, S] -> features [N, P, W] (after the final LayerNorm)."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg)
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.num_patches, cfg.width))
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))
        self.norm = LayerNorm(cfg.width, eps=1e-6)

    def prepack(self) -> bool:
        """Reorder the blocks' bf16 weights once for oneDNN (``prepack.py``: +0.82 GB at the
        real size); True if every one was. Worth it only where the products run in bf16."""
        done = [lin.prepack(self.cfg.num_patches) for b in self.blocks for lin in b.products()]
        return bool(done) and all(done)

    def warm(self, tiles: int, dtype: torch.dtype) -> None:
        """The patch embedding and one block's prepacked products on ``tiles`` tiles of zeros
        (``DeepseekVL2.warm_vision``): oneDNN creates its kernels for each new row count,
        and keeps them process-wide. Nothing of the model changes."""
        size = self.cfg.image_size
        self.patch_embed(torch.zeros(tiles, 3, size, size, dtype=dtype))
        if self.blocks:
            for lin in self.blocks[0].products():
                if lin.packed is not None:
                    lin.narrow(torch.zeros(tiles, self.cfg.num_patches, lin.weight.shape[1], dtype=lin.weight.dtype))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(pixels) + self.pos_embed.to(pixels.dtype)  # [N, P, W]
        if self.fused_here(x):
            # each residual add + the next LayerNorm in one native pass (``Block.fused``):
            # the same products and attention, the LayerNorms within float32 rounding of
            # torch's (not its bits); 3 passes and 3 new tensors fewer each time
            first = self.blocks[0].norm1
            h = native.add_layernorm_(x, None, first.weight, first.bias, first.eps)
            for i, block in enumerate(self.blocks):
                last = i + 1 == len(self.blocks)
                after = self.norm if last else self.blocks[i + 1].norm1
                h = block.fused(x, h, after, torch.float32 if last else torch.bfloat16)
            return h
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def fused_here(self, x: torch.Tensor) -> bool:
        """The fused path applies: on (``fused_norms``), the native kernels built, a contiguous
        float32 stream of a width the kernel takes (a multiple of 8) that autograd does not
        track (it is updated in place), products and attention in bf16
        (``ops.narrow_product``, ``ops.attention_in_bf16``), an even head size."""
        if not (fused_norms and self.blocks and x.dtype is torch.float32 and x.is_contiguous()
                and not x.requires_grad
                and self.cfg.width % 8 == 0 and (self.cfg.width // self.cfg.heads) % 2 == 0):
            return False
        w = self.blocks[0].attn.qkv.weight
        return ops.narrow_product(x, w) and attention_in_bf16(x, w, tower=True) and native.available()


class Projector(nn.Module):
    """features [N, P, W] -> image tokens [N, (ceil(27/2))^2 = 196, D]."""

    def __init__(self, cfg: ProjectorConfig):
        super().__init__()
        self.ratio = cfg.downsample_ratio
        dims = [cfg.input_dim * cfg.downsample_ratio ** 2] + [cfg.hidden] * (cfg.depth - 1) + [cfg.n_embed]
        layers: list[nn.Module] = []
        for i in range(cfg.depth):
            if i:
                layers.append(nn.GELU())
            layers.append(Linear(dims[i], dims[i + 1], bias=True))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, p, w = x.shape
        side = int(round(p ** 0.5))
        r = self.ratio
        pad = (-side) % r
        x = x.view(n, side, side, w)
        if pad:
            x = F.pad(x, (0, 0, 0, pad, 0, pad))  # zero rows / columns at the bottom / right
        g = (side + pad) // r
        # [N, gy, dy, gx, dx, W] -> [N, gy, gx, W, dy, dx]: channel-major blocks (unfold order)
        x = x.view(n, g, r, g, r, w).permute(0, 1, 3, 5, 2, 4).reshape(n, g * g, w * r * r)
        return self.layers(x)
