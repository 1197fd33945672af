"""All decoder layers of a decode step in one native call (``native/step.c``).

Legend: B rows, D width, L layers, K experts per token, E experts, F an MLP's width.

When: in a decode step (``ops.decoding()``, one token per row) whose attention the module
path runs natively (``MHA.native_decode`` / ``MLA.native_decode``: float32 activations,
native blocks on, kernels built), for models whose every block has a native version:
* attention: MHA with bf16 weights and a float32 cache (tiny), or MLA as ``native.mla_layer``
  takes it (float32, bf16 or int8 projections, a float32 or bf16 ``kv_b_proj``) with a
  float32 or bf16 cache (small, base);
* RMSNorms and the router's gate: bf16; routing: every ``topk_method`` (greedy,
  group_limited_greedy, noaux_tc with its correction bias);
* routed experts, shared experts and dense MLPs: bf16, int8 or int4 (stored format)
  weights, the three matrices of one MLP in one format.
Elsewhere (float32 norms, gate or MLP weights, int4pack, an MLP of mixed formats, an MLA
layer with ``allow_native`` off, prefill, ``output_hidden_states``) the module path runs.

The call strings together the same native blocks in the module path's order, so its
result equals the module path's bit for bit (``tests/test_decode_plan.py``).
``ops.native_blocks = False`` turns it off with the other blocks; ``enabled = False``
here turns off only this (the per-block native path then runs).

A plan is built on a model's first eligible step and kept (``plan_of``); it holds the
weights it points to (tensors, and a ``QuantWeight``'s values and scales) and checks on
every step that they are still the model's, at the same address (a parameter replaced,
moved or cast makes it rebuild; a bias changed in place too, since the plan may point to
a float32 copy of it). ``runs`` counts the steps run through a plan in this process
(tests and benchmarks read it).
"""

from __future__ import annotations

import ctypes
import operator

import torch

from . import native
from .attention import MHA, MLA
from .moe import MoE, Routing
from .ops import GatedMLP
from .quant import QuantWeight

enabled = True
runs = 0  # decode steps run through a plan in this process

_P, _I64 = ctypes.c_void_p, ctypes.c_int64
_FORMATS = {"bf16": 0, "int8": 1, "int4": 2}  # step.c MLP_BF16, MLP_INT8, MLP_INT4


class _MLP(ctypes.Structure):  # native/step.c dsvl2_mlp
    _fields_ = [(n, _P) for n in ("gate", "up", "down", "gs", "us", "ds")] + [(n, _I64) for n in
                                                                              ("format", "E", "F", "Gd", "Gf")]


class _Layer(ctypes.Structure):  # native/step.c dsvl2_layer
    _fields_ = ([(n, _P) for n in ("ln1", "ln2", "mla", "wq", "wk", "wv", "wo", "bq", "bk", "bv", "bo", "gate",
                                   "bias")] + [("mlp", _MLP), ("shared", _MLP)])


class _Decoder(ctypes.Structure):  # native/step.c dsvl2_decoder
    _fields_ = ([("layers", _P)] + [(n, _I64) for n in ("nl", "D", "H", "Hk", "hd", "k", "method", "G", "topk_group",
                                                        "sigmoid", "norm", "Emax", "Fmax")]
                + [(n, ctypes.c_float) for n in ("eps", "scale", "scaling")])


class DecodePlan:
    """The pointers of every decoder layer's weights, in ``native/step.c``'s layout."""

    def __init__(self, lm):
        cfg = lm.cfg
        self.cfg = cfg
        self.mla = bool(cfg.use_mla)
        d, k = cfg.hidden_size, cfg.num_experts_per_tok or 0  # None: no MoE layer
        self.d, self.k = d, k
        method = native.ROUTE_METHODS.get(cfg.topk_method)
        if method is None:
            raise _NotNative(f"routing {cfg.topk_method!r} has no native version")
        g, tg = (cfg.n_group, cfg.topk_group) if method else (1, 1)
        # what must not change: owners[i].<names[i]> is held[i]; tensors' addresses; biases' versions
        self.owners: list[object] = []
        self.names: list[str] = []
        self.held: list[object] = []
        self.tensors: list[torch.Tensor] = []
        self.ptrs: list[int] = []
        self.biases: list[torch.Tensor] = []
        self.versions: list[int] = []
        self.keep: list[object] = []  # float32 bias copies and MLA layers the pointers refer to
        layers = lm.model.layers
        self.table = (_Layer * len(layers))()
        self.moe_layers = []
        self.attention = [layer.self_attn for layer in layers]
        emax = fmax = 1
        if self.mla:
            h = hk = hd = 0  # each MLA layer carries its own sizes
        else:
            h, hk, hd = cfg.num_attention_heads, cfg.kv_heads, cfg.head_dim
            if not (d > 0 and hk > 0 and h > 0 and h % hk == 0 and 0 < hd <= 1024):
                raise _NotNative(f"heads {h} / kv heads {hk} / head size {hd} have no native version")
        self.h, self.hk, self.hd = h, hk, hd
        # cos / sin sizes, the MLA pools' last size: every MLA layer's (att.dr, att.r) is the config's
        self.rope = cfg.qk_rope_head_dim if self.mla else hd
        self.lk = cfg.kv_lora_rank + cfg.qk_rope_head_dim if self.mla else 0
        for i, layer in enumerate(layers):
            e = self.table[i]
            e.ln1 = self._bf16(layer.input_layernorm, "weight", (d,))
            e.ln2 = self._bf16(layer.post_attention_layernorm, "weight", (d,))
            if self.mla:
                e.mla = self._mla(layer.self_attn)
            else:
                self._mha(layer.self_attn, e)
            mlp = layer.mlp
            if isinstance(mlp, MoE):
                ex = mlp.experts
                ne, f = ex.gate_proj.shape[0], ex.gate_proj.shape[1]
                if not (ne > 0 and f > 0 and 0 < k <= ne):
                    raise _NotNative(f"{k} of {ne} experts of width {f} has no native version")
                if method and not (isinstance(g, int) and isinstance(tg, int) and 0 < tg <= g and ne % g == 0
                                   and (method == 1 or ne // g >= 2)):
                    raise _NotNative(f"{ne} experts in {g} groups, {tg} kept, have no native {cfg.topk_method}")
                e.gate = self._bf16(mlp.gate, "weight", (ne, d))
                if method == 2:
                    e.bias = self._bias(mlp.gate, "e_score_correction_bias", ne)
                self._mlp(e.mlp, ((ex, "gate_proj"), (ex, "up_proj"), (ex, "down_proj")), (ne,), f)
                if mlp.shared_experts is not None:
                    s = mlp.shared_experts
                    self._mlp(e.shared, ((s.gate_proj, "weight"), (s.up_proj, "weight"), (s.down_proj, "weight")),
                              (), s.gate_proj.weight.shape[0])
                self.moe_layers.append(i)
            else:
                self._mlp(e.mlp, ((mlp.gate_proj, "weight"), (mlp.up_proj, "weight"), (mlp.down_proj, "weight")),
                          (), mlp.gate_proj.weight.shape[0])
            emax, fmax = max(emax, e.mlp.E), max(fmax, e.mlp.F, e.shared.F)
        self.emax, self.nl = emax, len(layers)
        self.decoder = _Decoder(layers=ctypes.addressof(self.table), nl=self.nl, D=d, H=h, Hk=hk, hd=hd, k=k,
                                method=method, G=g or 0, topk_group=tg or 0, sigmoid=int(cfg.scoring_func == "sigmoid"),
                                norm=int(bool(cfg.norm_topk_prob)), Emax=emax, Fmax=fmax,
                                eps=float(cfg.rms_norm_eps), scale=float(cfg.softmax_scale),
                                scaling=float(cfg.routed_scaling_factor))

    # ---- the weights, checked and watched

    def _watch(self, owner, name: str, t, version: bool = False) -> None:
        self.owners.append(owner)
        self.names.append(name)
        self.held.append(t)
        if isinstance(t, QuantWeight):  # the object, then its values and scales
            self._watch(t, "data", t.data)
            self._watch(t, "scale", t.scale)
            return
        self.tensors.append(t)
        self.ptrs.append(t.data_ptr())
        if version:
            self.biases.append(t)
            self.versions.append(t._version)

    def _bf16(self, module, name: str, shape: tuple[int, ...]) -> int:
        t = getattr(module, name, None)
        if not native.bf16_weight(t):
            raise _NotNative(f"{type(module).__name__}.{name} is not a contiguous bf16 CPU tensor")
        if t.shape != shape or not all(shape):
            raise _NotNative(f"{type(module).__name__}.{name} is {list(t.shape)}, not {list(shape)}")
        self._watch(module, name, t)
        return t.data_ptr()

    def _bias(self, module, name: str, n: int) -> int:
        """A float32 copy of a bias [n] (kept; a change in place makes the plan stale)."""
        t = getattr(module, name, None)
        if not (isinstance(t, torch.Tensor) and t.is_cpu and t.dtype.is_floating_point and t.shape == (n,)):
            raise _NotNative(f"{type(module).__name__}.{name} is not a float CPU tensor [{n}]")
        self._watch(module, name, t, version=True)
        self.keep.append(t.detach().float().contiguous().clone())
        return self.keep[-1].data_ptr()

    def _mha(self, att, e: _Layer) -> None:
        if not isinstance(att, MHA):
            raise _NotNative(f"{type(att).__name__} attention in an MHA model")
        d, h, hk, hd = self.d, self.h, self.hk, self.hd
        for name, shape in (("q", (h * hd, d)), ("k", (hk * hd, d)), ("v", (hk * hd, d)), ("o", (d, h * hd))):
            proj = getattr(att, f"{name}_proj")
            setattr(e, f"w{name}", self._bf16(proj, "weight", shape))
            if getattr(proj, "bias", None) is not None:
                setattr(e, f"b{name}", self._bias(proj, "bias", shape[0]))

    def _mla(self, att) -> int:
        """The MLA block's ``native.MLALayer`` (kept), every weight and bias of it watched."""
        if not (isinstance(att, MLA) and att.allow_native):
            raise _NotNative(f"{type(att).__name__} attention without a native block in an MLA model")
        try:
            layer = att.native_layer()
        except ValueError as err:
            raise _NotNative(str(err)) from None
        if (layer.r, layer.dr) != (self.lk - self.rope, self.rope):
            raise _NotNative(f"an MLA layer of rank {layer.r} / rope {layer.dr}, not the config's")
        for m in att.modules():
            for name in ("weight", "bias"):
                t = getattr(m, name, None)
                if t is not None:
                    self._watch(m, name, t, version=name == "bias")  # biases: the layer may hold a float32 copy
        self.keep.append(layer)
        return ctypes.addressof(layer)

    def _mlp(self, into: _MLP, owners, lead: tuple[int, ...], f: int) -> None:
        """Point ``into`` at one MLP's gate / up / down (``owners``: (module, attribute) each),
        [*lead, F, D] / [*lead, D, F]: three bf16 tensors, or three int8 / int4 ``QuantWeight`` s
        that the module path's native kernels take (``native.usable`` / ``usable_int8`` /
        ``usable_int4``)."""
        d = self.d
        shapes = ((*lead, f, d), (*lead, f, d), (*lead, d, f))
        ws = [getattr(m, n, None) for m, n in owners]
        kind = getattr(ws[0], "kind", "bf16")
        into.E, into.F, into.format = lead[0] if lead else 1, f, _FORMATS.get(kind, -1)
        if into.format < 0 or f <= 0 or any(getattr(w, "kind", "bf16") != kind for w in ws):
            raise _NotNative(f"MLP weights {[getattr(w, 'kind', None) or type(w).__name__ for w in ws]} have no "
                             "native version")
        if kind == "bf16":
            into.gate, into.up, into.down = (self._bf16(m, n, shape) for (m, n), shape in zip(owners, shapes))
            return
        groups = []
        for (m, n), w, shape in zip(owners, ws, shapes):
            q, sc = w.data, w.scale
            if kind == "int8":
                ok = (q.dtype is torch.int8 and q.shape == shape and sc.shape == shape[:-1])
                groups.append(0)
            else:
                ng = sc.shape[-1] if sc.ndim == len(shape) else 0
                ok = (w.group % 32 == 0 and q.dtype is torch.uint8 and q.shape == (*shape[:-1], shape[-1] // 2)
                      and ng and sc.shape[:-1] == shape[:-1] and shape[-1] % ng == 0 and (shape[-1] // ng) % 32 == 0)
                groups.append(shape[-1] // ng if ok else 0)
            if not (ok and tuple(w.shape) == shape and q.is_cpu and q.is_contiguous() and sc.dtype is torch.bfloat16
                    and sc.is_cpu and sc.is_contiguous()):
                raise _NotNative(f"{type(m).__name__}.{n} ({kind}) is not the native kernels' layout {list(shape)}")
            self._watch(m, n, w)
        if groups[0] != groups[1]:
            raise _NotNative(f"int4 gate and up in groups of {groups[0]} and {groups[1]}")
        into.gate, into.up, into.down = (w.data.data_ptr() for w in ws)
        into.gs, into.us, into.ds = (w.scale.data_ptr() for w in ws)
        into.Gd, into.Gf = groups[0], groups[2]

    # ----

    def _pools(self, layers) -> list[torch.Tensor]:
        """Every layer's block pools, checked: step.c indexes them all with layer 0's sizes."""
        if len(layers) != self.nl:
            raise ValueError(f"decode plan: the cache has {len(layers)} layers, the model {self.nl}")
        if self.mla:
            per, what, dtypes = 1, f"(pool,), the pool [NB, BS, {self.lk}]", (torch.float32, torch.bfloat16)
        else:
            per, what, dtypes = 2, f"(keys, values), each [NB, BS, {self.hk}, {self.hd}]", (torch.float32,)
        first = layers[0][0] if len(layers[0]) == per else None
        if not (isinstance(first, torch.Tensor) and first.dtype in dtypes and first.ndim == (3 if self.mla else 4)
                and first.shape[0] and first.shape[1] and first.shape[2:] == ((self.lk,) if self.mla else
                                                                               (self.hk, self.hd))):
            raise ValueError(f"decode plan: layer 0's cache must be {what} (NB, BS > 0), "
                             f"{' or '.join(str(t).replace('torch.', '') for t in dtypes)}, got "
                             f"{[native.describe(t) for t in layers[0]]}")
        pools = []
        for i, layer in enumerate(layers):
            if len(layer) != per:
                raise ValueError(f"decode plan: layer {i}'s cache must be {what}, got {len(layer)} tensors")
            for t in layer:
                if not (t.dtype is first.dtype and t.is_cpu and t.is_contiguous() and t.shape == first.shape):
                    raise ValueError(f"decode plan: layer {i}'s block pools must be contiguous {native.describe(first)}"
                                     f" (layer 0's) on the CPU, got {native.describe(t)}")
                pools.append(t)
        return pools

    @classmethod
    def build(cls, lm) -> DecodePlan | None:
        """A plan for ``lm`` (a ``LanguageModel``), or None where some block is not native."""
        if not native.available():
            return None
        if not all(isinstance(layer.mlp, (MoE, GatedMLP)) for layer in lm.model.layers):
            return None
        try:
            return cls(lm)
        except _NotNative:
            return None

    def current(self) -> bool:
        """Every weight the plan points to is still the model's, where it was (biases:
        unchanged), and every MLA block still allows its native version."""
        # a thousand weights in base: a few passes in C (map) rather than a Python loop
        try:
            now = list(map(getattr, self.owners, self.names))
        except AttributeError:
            return False
        if not (all(map(operator.is_, now, self.held)) and list(map(torch.Tensor.data_ptr, self.tensors)) == self.ptrs
                and [t._version for t in self.biases] == self.versions):
            return False
        if self.mla:
            for att in self.attention:
                if not att.allow_native:
                    return False
        return True

    def run(self, x: torch.Tensor, ctx) -> tuple[torch.Tensor, dict[int, Routing]]:
        """x float32 [B, 1, D] embeddings -> (last layer's output [B, 1, D], routing per MoE layer)."""
        global runs
        runs += 1
        d, k = self.d, self.k
        if not (x.dtype is torch.float32 and x.is_cpu and x.ndim == 3 and x.shape[1] == 1 and x.shape[2] == d):
            raise ValueError(f"decode plan: x must be float32 [B, 1, {d}] on the CPU, got {native.describe(x)}")
        b = x.shape[0]
        pools = self._pools(ctx.cache.layers)
        nb, bs = pools[0].shape[:2]
        lib = native.require()
        cos, sin, table, pos = native.step_rows(b, self.rope, ctx.cos, ctx.sin, ctx.table, ctx.write_pos[:, 0])
        w = table.shape[1]
        out = x.reshape(b, d).clone(memory_format=torch.contiguous_format)
        caches = (_P * len(pools))(*[t.data_ptr() for t in pools])
        idx = torch.empty(self.nl, b, k, dtype=torch.int64)
        wt = torch.empty(self.nl, b, k, dtype=torch.float32)
        dec = ctypes.byref(self.decoder)
        scratch = native.scratch_buffer(lib.dsvl2_decode_scratch(dec, b, w * bs), torch.float32)
        order = native.scratch_buffer(lib.dsvl2_decode_order(b, k, self.emax), torch.int64)
        failed = ctypes.c_int64(-1)
        rc = lib.dsvl2_decode_layers(dec, out.data_ptr(), b, caches, int(pools[0].dtype is torch.bfloat16),
                                     cos.data_ptr(), sin.data_ptr(), nb, bs, table.data_ptr(), w, pos.data_ptr(),
                                     idx.data_ptr(), wt.data_ptr(), scratch.data_ptr(), order.data_ptr(),
                                     ctypes.byref(failed))
        if rc == -3:  # the plan checked the routing parameters: only a kernel fault gets here
            raise ValueError(f"decode plan: layer {failed.value}: the router refused its parameters or chose an "
                             "expert out of range")
        if rc == -2 and self.mla:  # mla_layer checked the sizes at build: only a kernel fault gets here
            raise ValueError(f"decode plan: layer {failed.value}: the MLA block refused its sizes (rope size even "
                             "and > 0, every other size > 0, kv_b not int8)")
        if rc != 0:
            raise native.decode_error(rc, nb, bs, table, pos, hd=self.hd, heads=self.h, kv_heads=self.hk,
                                      layer=failed.value)
        routing = {i: Routing(idx[i].view(b, 1, k), wt[i].view(b, 1, k)) for i in self.moe_layers}
        return out.view(b, 1, d), routing


class _NotNative(Exception):
    pass


def plan_for(lm, x: torch.Tensor, ctx) -> DecodePlan | None:
    """The plan for this step of ``lm`` (a ``LanguageModel``): a decode step (one token per
    row) whose attention the module path would run natively (``MHA.native_decode`` /
    ``MLA.native_decode``) and a model whose every block has a native version; else None.
    Built, or rebuilt, when needed (cheap to find out again: the config or the first
    weight without a native version ends the search)."""
    if not enabled or x.dim() != 3 or x.shape[1] != 1:
        return None
    att = lm.model.layers[0].self_attn
    if not isinstance(att, (MHA, MLA)) or not att.native_decode(x, ctx):
        return None
    plan = plan_of(lm)
    if plan is None or not plan.current():
        plan = DecodePlan.build(lm)
        lm.__dict__["_decode_plan"] = plan  # not pickled nor copied (LanguageModel.__getstate__)
    return plan


def plan_of(lm) -> DecodePlan | None:
    """The plan kept for ``lm`` (a ``LanguageModel``) by its last eligible step, if any."""
    return lm.__dict__.get("_decode_plan")
