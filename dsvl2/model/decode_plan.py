"""All decoder layers of a decode step in one native call (``native/step.c``).

Legend: B rows, D width, L layers, K experts per token.

When: in a decode step (``ops.decoding()``, one token per row) where every block would run
natively anyway (``ops.native_block``: float32 activations, bf16 weights, kernels built;
the step's own conditions are the attention module's, ``MHA.native_decode``),
for models whose blocks all have a native version: MHA attention with a float32 cache,
greedy routing or dense MLPs (the tiny variant). Elsewhere (MLA, group-limited or
noaux_tc routing, float32 or quantised weights, prefill, ``output_hidden_states``) the
module path runs.

The call strings together the same native blocks in the module path's order, so its
result equals the module path's bit for bit (``tests/test_decode_plan.py``).
``ops.native_blocks = False`` turns it off with the other blocks; ``enabled = False``
here turns off only this (the per-block native path then runs).

A plan is built on a model's first eligible step and kept (``plan_of``); it holds the
weight tensors it points to and checks on every step that they are still the model's, at
the same address (a parameter replaced, moved or cast makes it rebuild; a bias changed in
place too, since the plan points to a float32 copy of it). ``runs`` counts the steps run
through a plan in this process (tests and benchmarks read it).
"""

from __future__ import annotations

import ctypes

import torch

from . import native
from .attention import MHA
from .moe import MoE, Routing
from .ops import GatedMLP

enabled = True
runs = 0  # decode steps run through a plan in this process

_P = ctypes.c_void_p


class _Layer(ctypes.Structure):  # native/step.c dsvl2_layer
    _fields_ = [(n, _P) for n in ("ln1", "ln2", "wq", "wk", "wv", "wo", "bq", "bk", "bv", "bo", "gate",
                                  "mg", "mu", "md", "sg", "su", "sd")] + [(n, ctypes.c_int64) for n in ("E", "F", "Fs")]


class DecodePlan:
    """The pointers of every decoder layer's weights, in ``native/step.c``'s layout."""

    def __init__(self, lm):
        cfg = lm.cfg
        self.cfg = cfg
        # the sizes step.c indexes every layer's weights with, checked against each weight here
        d, h, hk, hd = cfg.hidden_size, cfg.num_attention_heads, cfg.kv_heads, cfg.head_dim
        self.d, self.h, self.hk, self.hd = d, h, hk, hd
        if not (d > 0 and hk > 0 and h > 0 and h % hk == 0 and 0 < hd <= 1024):
            raise _NotNative(f"heads {h} / kv heads {hk} / head size {hd} have no native version")
        k = cfg.num_experts_per_tok
        # (module, parameter name, tensor, its address, its version): what must not change
        self.refs: list[tuple[torch.nn.Module, str, torch.Tensor, int, int]] = []
        self.keep: list[torch.Tensor] = []  # float32 bias copies the pointers refer to
        layers = lm.model.layers
        self.table = (_Layer * len(layers))()
        self.moe_layers = []
        emax = fmax = 1
        for i, layer in enumerate(layers):
            att = layer.self_attn
            e = self.table[i]
            e.ln1 = self._weight(layer.input_layernorm, "weight", (d,))
            e.ln2 = self._weight(layer.post_attention_layernorm, "weight", (d,))
            for name, shape in (("q", (h * hd, d)), ("k", (hk * hd, d)), ("v", (hk * hd, d)), ("o", (d, h * hd))):
                proj = getattr(att, f"{name}_proj")
                setattr(e, f"w{name}", self._weight(proj, "weight", shape))
                bias = getattr(proj, "bias", None)
                if bias is not None:
                    if bias.shape != shape[:1] or not bias.dtype.is_floating_point:
                        raise _NotNative(f"{name}_proj.bias is {list(bias.shape)}, not {list(shape[:1])}")
                    self.refs.append((proj, "bias", bias, bias.data_ptr(), bias._version))
                    self.keep.append(bias.detach().float().contiguous().clone())
                    setattr(e, f"b{name}", self.keep[-1].data_ptr())
            mlp = layer.mlp
            if isinstance(mlp, MoE):
                ex = mlp.experts
                ne, f = ex.gate_proj.shape[0], ex.gate_proj.shape[1]
                if not (ne > 0 and f > 0 and 0 < k <= ne):
                    raise _NotNative(f"{k} of {ne} experts of width {f} has no native version")
                e.gate = self._weight(mlp.gate, "weight", (ne, d))
                e.mg, e.mu, e.md = (self._weight(ex, n, shape) for n, shape in
                                    (("gate_proj", (ne, f, d)), ("up_proj", (ne, f, d)), ("down_proj", (ne, d, f))))
                e.E, e.F = ne, f
                if mlp.shared_experts is not None:
                    s = mlp.shared_experts
                    fs = s.gate_proj.weight.shape[0]
                    e.sg, e.su, e.sd = (self._weight(getattr(s, n), "weight", shape) for n, shape in
                                        (("gate_proj", (fs, d)), ("up_proj", (fs, d)), ("down_proj", (d, fs))))
                    e.Fs = fs
                self.moe_layers.append(i)
            else:
                f = mlp.gate_proj.weight.shape[0]
                e.mg, e.mu, e.md = (self._weight(getattr(mlp, n), "weight", shape) for n, shape in
                                    (("gate_proj", (f, d)), ("up_proj", (f, d)), ("down_proj", (d, f))))
                e.E, e.F = 1, f
            emax, fmax = max(emax, e.E), max(fmax, e.F, e.Fs)
        self.emax, self.fmax = emax, fmax
        self.nl = len(layers)

    def _weight(self, module, name: str, shape: tuple[int, ...]) -> int:
        t = getattr(module, name, None)
        if not native.bf16_weight(t):
            raise _NotNative(f"{type(module).__name__}.{name} is not a contiguous bf16 CPU tensor")
        if t.shape != shape or not all(shape):
            raise _NotNative(f"{type(module).__name__}.{name} is {list(t.shape)}, not {list(shape)}")
        self.refs.append((module, name, t, t.data_ptr(), -1))
        return t.data_ptr()

    @classmethod
    def build(cls, lm) -> DecodePlan | None:
        """A plan for ``lm`` (a ``LanguageModel``), or None where some block is not native."""
        cfg = lm.cfg
        if cfg.use_mla or cfg.topk_method != "greedy" or not native.available():
            return None
        if not all(isinstance(layer.self_attn, MHA) and isinstance(layer.mlp, (MoE, GatedMLP))
                   for layer in lm.model.layers):
            return None
        try:
            return cls(lm)
        except _NotNative:
            return None

    def current(self) -> bool:
        """Every tensor the plan points to is still the model's, where it was (biases: unchanged)."""
        for module, name, t, ptr, version in self.refs:
            if getattr(module, name, None) is not t or t.data_ptr() != ptr or (version >= 0 and t._version != version):
                return False
        return True

    def run(self, x: torch.Tensor, ctx) -> tuple[torch.Tensor, dict[int, Routing]]:
        """x float32 [B, 1, D] embeddings -> (last layer's output [B, 1, D], routing per MoE layer)."""
        global runs
        runs += 1
        cfg = self.cfg
        d, h, hk, hd = self.d, self.h, self.hk, self.hd
        if not (x.dtype is torch.float32 and x.is_cpu and x.ndim == 3 and x.shape[1] == 1 and x.shape[2] == d):
            raise ValueError(f"decode plan: x must be float32 [B, 1, {d}] on the CPU, got {native.describe(x)}")
        b = x.shape[0]
        layers = ctx.cache.layers
        if len(layers) != self.nl:
            raise ValueError(f"decode plan: the cache has {len(layers)} layers, the model {self.nl}")
        shape = layers[0][0].shape
        if not (len(shape) == 4 and shape[2] == hk and shape[3] == hd and shape[0] and shape[1]):
            raise ValueError(f"decode plan: the KV pools must be [NB, BS, {hk}, {hd}] (NB, BS > 0), got {list(shape)}")
        for i, pair in enumerate(layers):  # step.c indexes every layer's pools with layer 0's sizes
            if len(pair) != 2:
                raise ValueError(f"decode plan: layer {i}'s cache must be (keys, values), got {len(pair)} tensors")
            for t in pair:
                if not (t.dtype is torch.float32 and t.is_cpu and t.is_contiguous() and t.shape == shape):
                    raise ValueError(f"decode plan: layer {i}'s KV pools must be contiguous float32 {list(shape)} "
                                     f"(layer 0's shape) on the CPU, got {native.describe(t)}")
        lib = native.require()
        nb, bs = shape[0], shape[1]
        k = cfg.num_experts_per_tok
        cos, sin, table, pos = native.step_rows(b, hd, ctx.cos, ctx.sin, ctx.table, ctx.write_pos[:, 0])
        w = table.shape[1]
        out = x.reshape(b, d).clone(memory_format=torch.contiguous_format)
        caches = (_P * (2 * self.nl))(*[t.data_ptr() for pair in layers for t in pair])
        idx = torch.empty(self.nl, b, k, dtype=torch.int64)
        wt = torch.empty(self.nl, b, k, dtype=torch.float32)
        scratch = native.scratch_buffer(lib.dsvl2_decode_scratch(b, d, h, hk, hd, w * bs, k, self.emax,
                                                                 self.fmax), torch.float32)
        order = native.scratch_buffer(lib.dsvl2_decode_order(b, k, self.emax), torch.int64)
        failed = ctypes.c_int64(-1)
        rc = lib.dsvl2_decode_layers(out.data_ptr(), b, d, self.table, self.nl, caches, h, hk, hd,
                                     float(cfg.rms_norm_eps), float(cfg.softmax_scale), k,
                                     int(cfg.scoring_func == "sigmoid"), int(bool(cfg.norm_topk_prob)),
                                     float(cfg.routed_scaling_factor), cos.data_ptr(), sin.data_ptr(), nb, bs,
                                     table.data_ptr(), w, pos.data_ptr(), idx.data_ptr(), wt.data_ptr(), self.emax,
                                     scratch.data_ptr(), order.data_ptr(), ctypes.byref(failed))
        if rc != 0:
            raise native.decode_error(rc, nb, bs, table, pos, hd=hd, heads=h, kv_heads=hk, layer=failed.value)
        routing = {i: Routing(idx[i].view(b, 1, k), wt[i].view(b, 1, k)) for i in self.moe_layers}
        return out.view(b, 1, d), routing


class _NotNative(Exception):
    pass


def plan_for(lm, x: torch.Tensor, ctx) -> DecodePlan | None:
    """The plan for this step of ``lm`` (a ``LanguageModel``): a decode step (one token per
    row) whose attention the module path would run natively (``MHA.native_decode``: bf16
    weights, float32 activations and cache, kernels built) and a model whose every block
    has a native version; else None. Built, or rebuilt, when needed (cheap to find out
    again: the config or the first non-bf16 weight ends the search)."""
    if not enabled or x.dim() != 3 or x.shape[1] != 1:
        return None
    att = lm.model.layers[0].self_attn
    if not isinstance(att, MHA) or not att.native_decode(x, ctx):
        return None
    plan = plan_of(lm)
    if plan is None or not plan.current():
        plan = DecodePlan.build(lm)
        lm.__dict__["_decode_plan"] = plan  # not pickled nor copied (LanguageModel.__getstate__)
    return plan


def plan_of(lm) -> DecodePlan | None:
    """The plan kept for ``lm`` (a ``LanguageModel``) by its last eligible step, if any."""
    return lm.__dict__.get("_decode_plan")
