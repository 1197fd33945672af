"""DeepSeek-V2 decoder (the language half of DeepSeek-VL2).

Legend: B rows, T tokens, S keys, D width, V vocab, L layers, K experts per token.

Pre-norm blocks: x + attn(RMSNorm(x)); x + mlp(RMSNorm(x)), where mlp is a dense SiLU MLP
for layers < ``first_k_dense_replace`` or not a multiple of ``moe_layer_freq``, else MoE.
Final RMSNorm, untied ``lm_head``, logits returned in float32.

``forward`` takes input embeddings (text embeddings with image features already
scattered in) and a ``StepContext`` built by one of the two helpers:
* ``padded_context``: one whole, left-padded batch without a cache (the reference's
  prefill): pad-aware positions (cumsum of the mask - 1), causal mask that hides pads;
* ``step_context``: rows that continue in a KV cache (chunked prefill, decode,
  continuous batching): row b's T tokens are at positions start[b] .. start[b] + T - 1,
  only the first n[b] are real.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..config import LanguageConfig
from . import decode_plan
from .attention import MHA, MLA
from .cache import KVCache, StepContext
from .moe import MoE, Routing
from .ops import GatedMLP, Linear, RMSNorm
from .rope import RotaryEmbedding


@dataclass
class LMOutput:
    logits: torch.Tensor | None  # [B, T, V] float32 (or [B, 1, V] with last_only)
    hidden_states: list[torch.Tensor] | None = None  # L + 1 entries of [B, T, D]; last = final norm output
    routing: dict[int, Routing] = field(default_factory=dict)  # layer -> idx / weight [B, T, K]
    last_hidden: torch.Tensor | None = None  # [B, T, D] final-norm output


class DecoderLayer(nn.Module):
    def __init__(self, cfg: LanguageConfig, i: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = MLA(cfg, i) if cfg.use_mla else MHA(cfg, i)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.is_moe = cfg.is_moe_layer(i)
        self.mlp = MoE(cfg) if self.is_moe else GatedMLP(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x: torch.Tensor, ctx: StepContext) -> tuple[torch.Tensor, Routing | None]:
        x = x + self.self_attn(self.input_layernorm(x), ctx)
        h = self.post_attention_layernorm(x)
        if self.is_moe:
            out, routing = self.mlp(h)
            b, t = x.shape[:2]
            routing = Routing(routing.idx.view(b, t, -1), routing.weight.view(b, t, -1))
            return x + out, routing
        return x + self.mlp(h), None


class DeepseekV2Model(nn.Module):
    def __init__(self, cfg: LanguageConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class LanguageModel(nn.Module):
    """DeepseekV2ForCausalLM: ``model.*`` and ``lm_head`` as in the checkpoints."""

    def __init__(self, cfg: LanguageConfig):
        super().__init__()
        self.cfg = cfg
        self.model = DeepseekV2Model(cfg)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.rotary = RotaryEmbedding(cfg)
        # called as f(layer, routing) for every MoE layer of every forward (routing [B, T, K]),
        # on the module path and the fused decode path alike (benchmarks count experts so)
        self.routing_observers: list = []

    def __getstate__(self):
        # the decode plan holds raw pointers (ctypes): never pickled or copied, rebuilt on use
        return {k: v for k, v in self.__dict__.items() if k != "_decode_plan"}

    def rebuild_rotary(self, device: torch.device | str) -> None:
        """Compute the rotary frequencies again, on ``device``: they are a non-persistent
        buffer (in no checkpoint), so a model built on the meta device and filled by
        ``load_state_dict(..., assign=True)`` has none yet."""
        self.rotary = RotaryEmbedding(self.cfg).to(device)

    def embed(self, ids: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.model.embed_tokens(ids).to(dtype)

    # ---- contexts ---------------------------------------------------------------------
    def padded_context(self, attention_mask: torch.Tensor, dtype: torch.dtype = torch.float32):
        """Left-padded batch without cache: (positions [B, T], StepContext)."""
        am = attention_mask.bool()
        positions = am.long().cumsum(-1) - 1
        positions = positions.masked_fill(~am, 1)  # pads: any position; the reference uses 1
        t = am.shape[1]
        causal = torch.ones(t, t, dtype=torch.bool, device=am.device).tril()
        visible = causal[None] & am[:, None, :]  # [B, T, S]
        cos, sin = self.rotary(positions)
        return positions, StepContext(cos, sin, _additive(visible, dtype))

    def step_context(self, cache: KVCache, start: torch.Tensor, n: torch.Tensor, t: int,
                     table: torch.Tensor, dtype: torch.dtype = torch.float32):
        """Rows continuing in ``cache``: start [B] tokens already cached, n [B] real tokens of
        T, table [B, W] each row's block table (``cache.block_table``)."""
        dev = cache.device
        start, n = start.to(dev), n.to(dev)
        offs = torch.arange(t, device=dev)
        positions = start[:, None] + offs[None]  # [B, T]
        kv_len = int((start + t).max())
        s = torch.arange(kv_len, device=dev)
        visible = (s[None, None] <= positions[:, :, None]) & (s[None, None] < (start + n)[:, None, None])
        cos, sin = self.rotary(positions)
        real = offs[None] < n[:, None]  # [B, T]
        ctx = StepContext(cos, sin, _additive(visible, dtype), cache=cache, table=table.to(dev),
                          write_pos=positions, real=real, kv_len=kv_len, valid=start + n)
        return positions, ctx

    # ---- forward ----------------------------------------------------------------------
    def forward(self, inputs_embeds: torch.Tensor, ctx: StepContext, *, output_hidden_states: bool = False,
                output_routing: bool = False, logits: str = "all") -> LMOutput:
        """inputs_embeds [B, T, D] -> logits for ``logits`` in {'all', 'last', 'none'}."""
        x = inputs_embeds
        hidden = [x] if output_hidden_states else None
        routing: dict[int, Routing] = {}
        plan = decode_plan.plan_for(self, x, ctx) if hidden is None else None
        if plan is not None:  # a decode step with every block native: all layers in one call
            x, routing = plan.run(x, ctx)
        else:
            for i, layer in enumerate(self.model.layers):
                x, r = layer(x, ctx)
                if r is not None:
                    routing[i] = r
                if hidden is not None and i + 1 < len(self.model.layers):
                    hidden.append(x)
        for i, r in routing.items():
            for observe in self.routing_observers:
                observe(i, r)
        if not output_routing:
            routing = {}
        x = self.model.norm(x)
        if hidden is not None:
            hidden.append(x)
        out = None
        if logits == "all":
            out = self.lm_head(x).float()
        elif logits == "last":
            out = self.lm_head(x[:, -1:]).float()
        return LMOutput(out, hidden, routing, x)


def _additive(visible: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """bool [B, T, S] -> additive float mask [B, 1, T, S]: 0 where visible, dtype min elsewhere."""
    mask = torch.zeros(visible.shape, dtype=dtype, device=visible.device)
    return mask.masked_fill_(~visible, torch.finfo(dtype).min)[:, None]
