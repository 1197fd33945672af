"""Mixture-of-experts layer: router (gate) and grouped expert dispatch.

Legend: N tokens, D width, E routed experts, K experts per token, F expert width, G groups.

Routing (the reference's MoEGate; tests/data/golden/README.md): gate logits in float32;
softmax or sigmoid scores; then
* ``greedy``: top-K of the scores;
* ``group_limited_greedy``: group score = max of the group, keep ``topk_group`` groups,
  masked experts set to 0.0, top-K;
* ``noaux_tc``: choice on sigmoid + ``e_score_correction_bias``; group score = sum of the
  group's top-2 biased scores; masked experts set to 0.0 (not -inf: this matters when
  biased scores are negative); top-K on the biased scores; weights are the UNBIASED
  scores of the chosen experts.
Then if K > 1 and ``norm_topk_prob``: w / (sum + 1e-20); always times
``routed_scaling_factor``. ``Gate.reference_route`` is this in torch; decode steps run
it natively (``native.route``, one call). Shared experts (one MLP of width F * n_shared)
are added unweighted.

Dispatch: routed expert weights are stacked ``[E, F, D]`` / ``[E, D, F]`` (the loader,
``checkpoint/load.py``, stacks the per-expert checkpoint tensors). Token-expert pairs are sorted by
expert and each expert that received tokens runs once on its batch of tokens; experts
without tokens cost nothing. ``reference_dispatch`` is the obviously-right per-token
version kept as the test reference.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import LanguageConfig
from . import buckets, native, ops
from .ops import GatedMLP, gated_mlp
from .quant import QuantWeight
from .native import amx
from .scratch import buffer


@dataclass
class Routing:
    """Router decision for N tokens: expert ids [N, K] (unsorted) and weights [N, K]."""

    idx: torch.Tensor
    weight: torch.Tensor


class Gate(nn.Module):
    """The router: ``forward`` runs the native router (``native.route``: gate product,
    scores, group limits, top-K, normalisation and scaling in one call) in a decode step
    with bf16 weights and float32 activations, ``reference_route`` (torch) everywhere else.
    The two choose the same experts except on exact ties, which the native router gives
    to the lower expert id and torch.topk breaks in an order of its own
    (tests/test_native_router.py)."""

    def __init__(self, cfg: LanguageConfig):
        super().__init__()
        self.cfg = cfg
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.hidden_size))
        if cfg.topk_method == "noaux_tc":
            self.e_score_correction_bias = nn.Parameter(torch.zeros(cfg.n_routed_experts, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> Routing:
        if ops.native_block(x, self.weight):
            cfg = self.cfg
            idx, weight = native.route(x, self.weight, cfg.num_experts_per_tok, cfg.topk_method,
                                       cfg.scoring_func == "sigmoid", bool(cfg.norm_topk_prob),
                                       float(cfg.routed_scaling_factor), getattr(self, "e_score_correction_bias", None),
                                       cfg.n_group, cfg.topk_group)
            return Routing(idx, weight)
        return self.reference_route(x)

    def reference_route(self, x: torch.Tensor) -> Routing:
        """The torch router for x [N, D] (the reference's MoEGate, see the module docstring):
        what ``forward`` runs outside native decode blocks, and what tests compare the
        native router with. Expert ids come in torch.topk's (unsorted) order."""
        cfg = self.cfg
        n = x.shape[0]
        if ops.native_product(x, self.weight):
            logits = native.linear(x, self.weight)  # float32 products of the bf16 weight, no upcast copy
        else:
            logits = F.linear(x.float(), self.weight.float())  # [N, E] always float32
        scores = logits.softmax(-1) if cfg.scoring_func == "softmax" else logits.sigmoid()
        k = cfg.num_experts_per_tok
        if cfg.topk_method == "greedy":
            weight, idx = torch.topk(scores, k, dim=-1, sorted=False)
        else:
            choice = scores
            if cfg.topk_method == "noaux_tc":
                choice = scores + self.e_score_correction_bias.float()[None]
            grouped = choice.view(n, cfg.n_group, -1)  # [N, G, E/G]
            if cfg.topk_method == "noaux_tc":
                group_scores = grouped.topk(2, dim=-1).values.sum(-1)
            else:
                group_scores = grouped.max(dim=-1).values  # [N, G]
            keep = torch.topk(group_scores, cfg.topk_group, dim=-1, sorted=False).indices
            group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, keep, True)
            expert_mask = group_mask[:, :, None].expand_as(grouped).reshape(n, -1)
            masked = choice.masked_fill(~expert_mask, 0.0)
            idx = torch.topk(masked, k, dim=-1, sorted=False).indices
            weight = scores.gather(1, idx)
        if k > 1 and cfg.norm_topk_prob:
            weight = weight / (weight.sum(-1, keepdim=True) + 1e-20)
        return Routing(idx, weight * cfg.routed_scaling_factor)


class Experts(nn.Module):
    """E routed SiLU-gated experts with stacked weights."""

    def __init__(self, n: int, hidden: int, width: int):
        super().__init__()
        self.gate_proj = nn.Parameter(torch.empty(n, width, hidden))  # [E, F, D]
        self.up_proj = nn.Parameter(torch.empty(n, width, hidden))    # [E, F, D]
        self.down_proj = nn.Parameter(torch.empty(n, hidden, width))  # [E, D, F]

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        return gated_mlp(x, self.gate_proj[e], self.up_proj[e], self.down_proj[e])

    def forward(self, x: torch.Tensor, routing: Routing) -> torch.Tensor:
        """Grouped dispatch: x [N, D] -> [N, D]."""
        kernel = self.native_kernel(x) if ops.decoding_active() else None
        if kernel is not None:  # the whole layer in one native call: each chosen expert's weights read once
            return kernel(x, routing.idx, routing.weight)
        # Otherwise (prefill, or no native kernels) one expert at a time on its tokens.
        n, k = routing.idx.shape
        flat = routing.idx.reshape(-1)  # [N*K]
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=self.gate_proj.shape[0]).tolist()
        token = order // k  # token of each sorted pair
        if not ops.decoding_active() and self.amx_ready():
            return self.amx_prefill(x, token, routing.weight.reshape(-1)[order].float(), counts)
        if not ops.decoding_active() and self.dequantisable():  # decode rows must not depend on the batch: no GEMM
            return self.quantised_prefill(x, token, routing.weight.reshape(-1)[order].float(), counts)
        w = routing.weight.reshape(-1)[order].to(x.dtype)
        out = torch.zeros_like(x)
        for e, pairs, sel in expert_runs(token, counts):
            out.index_add_(0, sel, self.expert(e, x.index_select(0, sel)) * w[pairs, None])
        return out

    def dequantisable(self) -> bool:
        """Quantised experts whose matrices can be dequantised one expert at a time (int8, and
        int4 in the stored format; not torch's opaque int4pack layout)."""
        return all(isinstance(w, QuantWeight) and w.kind in ("int8", "int4")
                   for w in (self.gate_proj, self.up_proj, self.down_proj))

    def amx_ready(self) -> bool:
        """The products of these experts outside decode run on AMX tiles (``native/amx.py``):
        bf16 products chosen by the kernel policy, AMX usable, and every matrix bf16, int8 or
        int4 in the stored format, of a shape the kernel takes."""
        if not (ops.big_products_in_weights_dtype() and amx.active()):
            return False
        for w in (self.gate_proj, self.up_proj, self.down_proj):
            if not (w.amx_takes() if isinstance(w, QuantWeight) else
                    w.dtype is torch.bfloat16 and amx.takes(*w.shape[-2:])):
                return False
        return True

    def amx_prefill(self, x: torch.Tensor, token: torch.Tensor, w: torch.Tensor, counts: list[int]
                    ) -> torch.Tensor:
        """The per-expert loop on AMX tiles, one call an expert (``native.amx.expert``: the
        stored weights read once, no dequantised copy, no per-shape kernel): arguments as
        ``quantised_prefill``. The activations enter the products as bf16 (as on the bf16
        GEMM path); gate and up come out in float32, SiLU, product and routing weight in
        float32 (the weight applied before the down product, rounded to bf16 once), then the
        down product's float32 rows are summed per token. Every expert runs here, whatever
        its number of rows: that number depends on the other rows of the batch, so a kernel
        chosen by it (the native decode kernel for experts of at most 4 rows, until Dec 7)
        made a row's numbers depend on its batch (tests/test_server.py's eight concurrent
        clients caught it). The price: a 64-token prompt of the small model 1.25-1.34 ->
        1.44-1.52 s of prefill (its experts have 1-4 rows, where a tile panel's
        dequantisation, not the multiply, is the cost)."""
        xd = x.to(torch.bfloat16)
        out = torch.zeros_like(x)
        for e, pairs, sel in expert_runs(token, counts):
            # the rows sel of xd, their results added into out's rows sel (index_add_'s bits)
            amx.expert(xd, _amx_slot(self.gate_proj, e), _amx_slot(self.up_proj, e), _amx_slot(self.down_proj, e),
                       w[pairs], rows=sel, out=out)
        return out

    def native_kernel(self, x: torch.Tensor):
        """The native decode kernel of these experts (``native.experts`` / ``_int8`` /
        ``_int4``: float32 activations, the whole layer in one call, each chosen expert's
        weights read once for its rows), as ``f(rows, idx [T, k], wt [T, k])``, or None where
        it does not run. Decode steps use it."""
        g, u, d = self.gate_proj, self.up_proj, self.down_proj
        if native.usable(x, g, u, d):
            return lambda xs, idx, wt: native.experts(xs, idx, wt, g, u, d)
        if native.usable_int8(x, g, u, d):
            return lambda xs, idx, wt: native.experts_int8(xs, idx, wt, g, u, d)
        if native.usable_int4(x, g, u, d):
            return lambda xs, idx, wt: native.experts_int4(xs, idx, wt, g, u, d)
        return None

    def quantised_prefill(self, x: torch.Tensor, token: torch.Tensor, w: torch.Tensor, counts: list[int]
                          ) -> torch.Tensor:
        """The per-expert loop for quantised experts outside decode: x [N, D]; the (token,
        choice) pairs sorted by expert (``token`` [N*K] their tokens, ``w`` [N*K] float32 their
        weights, ``counts`` [E] pairs per expert). Per used expert and matrix: the slot is
        dequantised (``QuantWeight.dequantize_into``, one native pass) into one reused
        buffer, then one GEMM, in the dtype the kernel policy chose for big products
        (``ops.big_products_in_weights_dtype``: bf16 rounds the weight and the activations, as
        the bf16 weights' path does). Gate and up side by side in one [2F, D] buffer and one
        GEMM measured slower in the layer (benchmarks/bench_quant_kernels.py, ``fused``).
        SiLU, product and routing weight in float32, the weight applied before the down GEMM
        (F values per pair instead of D)."""
        dtype = torch.bfloat16 if ops.big_products_in_weights_dtype() else torch.float32
        f, d = self.gate_proj.shape[-2:]
        wbuf = buffer(f * d, dtype)  # the per-thread buffer block GEMMs use too
        fd, df = wbuf.view(f, d), wbuf.view(d, f)
        xd = x.to(dtype)
        out = torch.zeros_like(x)
        for e, pairs, sel in expert_runs(token, counts):
            # [c', D]: bf16 rows padded to a bucket (buckets.py); index_select 6x faster than xd[sel]
            xe, c = buckets.padded_rows(xd.index_select(0, sel))
            g = F.linear(xe, self.gate_proj.dequantize_into(fd, e))[:c].float()  # [c, F]
            u = F.linear(xe, self.up_proj.dequantize_into(fd, e))[:c].float()
            a, _ = buckets.padded_rows(F.silu(g).mul_(u).mul_(w[pairs, None]).to(dtype))
            out.index_add_(0, sel, F.linear(a, self.down_proj.dequantize_into(df, e))[:c].to(x.dtype))
        return out

    def reference_dispatch(self, x: torch.Tensor, routing: Routing) -> torch.Tensor:
        """Per-token, per-choice loop: slow and obviously right (test reference only)."""
        out = torch.zeros_like(x)
        for t in range(x.shape[0]):
            for j in range(routing.idx.shape[1]):
                e = int(routing.idx[t, j])
                out[t] += self.expert(e, x[t:t + 1])[0] * routing.weight[t, j].to(x.dtype)
        return out


def _amx_slot(weight, e: int) -> tuple:
    """Expert ``e``'s matrix of ``weight`` (a bf16 [E, N, K] stack or a stacked int8 / int4
    ``QuantWeight``) as ``native.amx`` takes it: (values, scale, group)."""
    if isinstance(weight, QuantWeight):
        return weight.amx_args(e)
    return weight[e], None, 0


def expert_runs(token: torch.Tensor, counts: list[int]):
    """For (token, choice) pairs sorted by expert (``token`` [N*K] their tokens, ``counts``
    [E] pairs per expert): (expert, its pairs' slice, their tokens) for each expert that
    received pairs, in ascending id."""
    start = 0
    for e, c in enumerate(counts):
        if c:
            yield e, slice(start, start + c), token[start:start + c]
        start += c


class MoE(nn.Module):
    def __init__(self, cfg: LanguageConfig):
        super().__init__()
        self.gate = Gate(cfg)
        self.experts = Experts(cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size)
        self.shared_experts = None
        if cfg.n_shared_experts:
            self.shared_experts = GatedMLP(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, Routing]:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])  # [N, D]
        routing = self.gate(flat)
        out = self.experts(flat, routing)
        if self.shared_experts is not None:
            out = out + self.shared_experts(flat)
        return out.view(shape), routing
