"""All decoder layers of a decode step in one native call (dsvl2/model/decode_plan.py,
native/step.c) against the module path, which runs the same native blocks one by one.

The plan strings the same kernels together in the same order, so the comparison is bit
for bit: logits, the cache rows written, the routing. Shapes: the tiny family (MHA,
greedy), and MLA models shaped like small (greedy softmax, shared experts, a dense first
layer) and base (noaux_tc sigmoid over groups of experts, q_lora, attention biases), with
bf16, int8 and int4 weights and float32 or bf16 caches. The module path itself is checked
against torch and float64 in test_native_layers.py, test_native.py, test_native_mla.py and
test_quant.py.
"""

from __future__ import annotations

import copy
import pickle

import pytest
import torch

from _paths import GOLDEN
from dsvl2.config import LanguageConfig
from dsvl2.engine.engine import Engine
from dsvl2.engine.sampling import SamplingParams
from dsvl2.checkpoint.load import quant_bits
from dsvl2.model import decode_plan, native, ops, quant
from dsvl2.model.cache import KVCache, row_tables
from dsvl2.model.language import LanguageModel
from dsvl2.model.rope import RotaryEmbedding
from dsvl2.processing import Processor
from dsvl2.checkpoint.load import load_model

needs_native = pytest.mark.skipif(not native.cpu_ok()[0], reason=f"CPU: {native.cpu_ok()[1]}")

# two shapes of the tiny family: GQA + attention biases + sigmoid scores + normalised
# weights, every layer MoE without shared experts; and MHA + softmax + a dense first layer
# + shared experts + scaling (the real tiny's shape)
CONFIGS = {
    "gqa_bias_sigmoid": dict(num_attention_heads=4, num_key_value_heads=2, attention_bias=True, scoring_func="sigmoid",
                             norm_topk_prob=True, first_k_dense_replace=0, n_shared_experts=None,
                             routed_scaling_factor=1.0),
    "dense_first_shared": dict(num_attention_heads=4, num_key_value_heads=4, attention_bias=False,
                               scoring_func="softmax", norm_topk_prob=False, first_k_dense_replace=1,
                               n_shared_experts=2, routed_scaling_factor=2.5),
}


# MLA: small's shape (greedy softmax, shared experts, a dense first layer) and base's
# (noaux_tc sigmoid, here over 4 groups of 4 experts keeping 2; q_lora; attention biases)
MLA_CONFIGS = {
    "small_like": dict(kv_lora_rank=32, q_lora_rank=None, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16,
                       n_routed_experts=8, num_experts_per_tok=3, topk_method="greedy", scoring_func="softmax",
                       norm_topk_prob=False, n_shared_experts=2, first_k_dense_replace=1, routed_scaling_factor=1.0),
    "base_like": dict(kv_lora_rank=32, q_lora_rank=48, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16,
                      attention_bias=True, n_routed_experts=16, num_experts_per_tok=4, topk_method="noaux_tc",
                      n_group=4, topk_group=2, scoring_func="sigmoid", norm_topk_prob=True, n_shared_experts=1,
                      first_k_dense_replace=1, routed_scaling_factor=2.0),
}

# weight formats: as a quantised checkpoint stores them (``quant_bits``: int8 everywhere but
# the gate and kv_b; int4: the routed experts, the rest int8), and int4 in every MLP (dense
# and shared too: the int4 gated MLP)
FORMATS = ("bf16", "int8", "int4", "int4_mlps")


def _model(name: str, seed: int = 0, fmt: str = "bf16") -> LanguageModel:
    if name in MLA_CONFIGS:
        cfg = LanguageConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=3, vocab_size=80,
                             num_attention_heads=4, num_key_value_heads=4, moe_intermediate_size=32, use_mla=True,
                             **MLA_CONFIGS[name])
    else:
        cfg = LanguageConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=3, vocab_size=80,
                             n_routed_experts=8, num_experts_per_tok=3, moe_intermediate_size=32,
                             topk_method="greedy", use_mla=False, **CONFIGS[name])
    lm = LanguageModel(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lm.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    lm = lm.to(torch.bfloat16)
    lm.rotary = RotaryEmbedding(cfg)  # float32 tables, as the weights loader builds them
    if fmt != "bf16":
        _quantise(lm, fmt)
    return lm


def _quantise(lm: LanguageModel, fmt: str) -> None:
    """Replace the weights a checkpoint quantised in ``fmt`` stores quantised by
    ``QuantWeight`` s, as the loader places them."""
    for name, p in list(lm.named_parameters()):
        bits = quant_bits("language." + name, tuple(p.shape), "int8" if fmt == "int8" else "int4")
        if fmt == "int4_mlps" and ".mlp." in name and "_proj" in name:  # not the router's gate
            bits = 4
        if bits is None:
            continue
        owner, attr = lm.get_submodule(name.rpartition(".")[0]), name.rpartition(".")[2]
        quant.hold(owner, attr, quant.QuantWeight.quantize(p.detach().float(), bits))


def _step(lm: LanguageModel, cache: KVCache, rows, start, ids, fused: bool) -> tuple:
    """One decode step of rows ``rows`` (cache rows) at positions ``start``: logits [B, V],
    routing {layer: (idx, weight)} seen by an observer, and whether the plan ran."""
    seen = {}
    runs = decode_plan.runs
    lm.routing_observers.append(lambda i, r: seen.__setitem__(i, (r.idx.clone(), r.weight.clone())))
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(decode_plan, "enabled", fused)
            start = torch.tensor(start)
            _, ctx = lm.step_context(cache, start, torch.ones_like(start), 1, TABLES[torch.tensor(rows)])
            with torch.no_grad(), ops.decoding():
                out = lm(lm.embed(torch.tensor(ids)[:, None]), ctx, logits="last", output_routing=True)
    finally:
        lm.routing_observers.clear()
    assert set(seen) == set(out.routing)  # the observer saw what output_routing returned
    for i, r in out.routing.items():
        assert torch.equal(r.idx, seen[i][0]) and torch.equal(r.weight, seen[i][1])
    return out.logits[:, 0], seen, decode_plan.runs > runs


# 4 rows of 512 tokens each in 16-token blocks scattered over the pool
TABLES = row_tables(4, 512, 16, order=torch.randperm(4 * 32, generator=torch.Generator().manual_seed(3)))


def _cache(lm: LanguageModel, seed: int, dtype: torch.dtype = torch.float32) -> KVCache:
    cache = KVCache(lm.cfg, 1 + 4 * 32, block_size=16, dtype=dtype)
    g = torch.Generator().manual_seed(seed)
    for pair in cache.layers:  # earlier tokens: any values
        for t in pair:
            t.copy_(torch.randn(t.shape, generator=g))
    return cache


def _same_bits(lm: LanguageModel, rows, start, ids, cdtype: torch.dtype = torch.float32) -> torch.Tensor:
    """One decode step through the plan and one through the blocks, from equal caches: the
    same logits, cache and routing, bit for bit. The plan's logits [B, V]."""
    cache_f, cache_m = _cache(lm, 1, cdtype), _cache(lm, 1, cdtype)
    fused, r_f, ran = _step(lm, cache_f, rows, start, ids, True)
    assert ran
    blocks, r_m, ran = _step(lm, cache_m, rows, start, ids, False)
    assert not ran
    assert torch.equal(fused, blocks)
    for a, b in zip(cache_f.layers, cache_m.layers):
        assert all(torch.equal(x, y) for x, y in zip(a, b))  # the same k / v (MLA: latent + k_pe) written
    assert sorted(r_f) == sorted(r_m) == [i for i, layer in enumerate(lm.model.layers) if layer.is_moe]
    for i in r_f:
        assert torch.equal(r_f[i][0], r_m[i][0]) and torch.equal(r_f[i][1], r_m[i][1])
    return fused


# scattered cache rows, lengths of one slot, one attention unit and a bit, several units
ROWS, START, IDS = [2, 0, 3], [300, 0, 129], [5, 17, 63]


@needs_native
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_plan_equals_the_module_path_bit_for_bit(name, monkeypatch):
    lm = _model(name)
    fused = _same_bits(lm, ROWS, START, IDS)
    # and the module path is not the plan in disguise: the torch path agrees to rounding
    monkeypatch.setattr(ops, "native_blocks", False)
    torch_path, r_t, _ = _step(lm, _cache(lm, 1), ROWS, START, IDS, True)
    assert torch.allclose(fused, torch_path, rtol=0.02, atol=0.02 * float(torch_path.abs().max()))


@needs_native
@pytest.mark.parametrize("cdtype", [torch.float32, torch.bfloat16], ids=["f32_cache", "bf16_cache"])
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("name", sorted(MLA_CONFIGS))
def test_mla_plan_equals_the_module_path_bit_for_bit(name, fmt, cdtype, monkeypatch):
    lm = _model(name, fmt=fmt)
    dense, moe = lm.model.layers[0].mlp, lm.model.layers[1].mlp  # the weights are in the format asked for
    kinds = {"bf16": ("bf16", "bf16"), "int8": ("int8", "int8"), "int4": ("int8", "int4"),
             "int4_mlps": ("int4", "int4")}[fmt]
    assert (getattr(dense.gate_proj.weight, "kind", "bf16"), getattr(moe.experts.gate_proj, "kind", "bf16")) == kinds
    fused = _same_bits(lm, ROWS, START, IDS, cdtype)
    _same_bits(lm, [1], [40], [7], cdtype)  # batch 1
    if fmt == "bf16":  # the torch path agrees to rounding (it rounds q and o to bf16 around its matmuls)
        monkeypatch.setattr(ops, "native_blocks", False)
        torch_path, _, _ = _step(lm, _cache(lm, 1, cdtype), ROWS, START, IDS, True)
        assert torch.allclose(fused, torch_path, rtol=0.05, atol=0.05 * float(torch_path.abs().max()))


@needs_native
def test_plan_follows_the_model_when_its_weights_change():
    lm = _model("dense_first_shared")
    args = ([1], [40], [7])
    before, _, ran = _step(lm, _cache(lm, 2), *args, True)
    assert ran
    plan = decode_plan.plan_of(lm)
    # a parameter replaced by another: the plan notices and is rebuilt
    down = lm.model.layers[1].mlp.shared_experts.down_proj
    down.register_parameter("weight", torch.nn.Parameter(down.weight.detach() * 2))
    assert not plan.current()
    after, _, ran = _step(lm, _cache(lm, 2), *args, True)
    assert ran and decode_plan.plan_of(lm) is not plan
    blocks, _, _ = _step(lm, _cache(lm, 2), *args, False)
    assert torch.equal(after, blocks) and not torch.equal(after, before)
    # a bias changed in place: the plan's float32 copy would be stale, so it is rebuilt too
    lm2 = _model("gqa_bias_sigmoid")
    _step(lm2, _cache(lm2, 3), *args, True)
    plan = decode_plan.plan_of(lm2)
    with torch.no_grad():
        lm2.model.layers[0].self_attn.v_proj.bias.add_(1.0)
    assert not plan.current()
    fused, _, _ = _step(lm2, _cache(lm2, 3), *args, True)
    blocks, _, _ = _step(lm2, _cache(lm2, 3), *args, False)
    assert torch.equal(fused, blocks)
    # cast to float32: no block is native any more, so no plan
    lm.float()
    _, _, ran = _step(lm, _cache(lm, 2), *args, True)
    assert not ran and decode_plan.DecodePlan.build(lm) is None


@needs_native
def test_a_model_with_a_plan_pickles_and_copies():
    lm = _model("dense_first_shared")
    args = ([1], [40], [7])
    before, _, ran = _step(lm, _cache(lm, 2), *args, True)
    assert ran and decode_plan.plan_of(lm) is not None
    for other in (pickle.loads(pickle.dumps(lm)), copy.deepcopy(lm)):
        assert decode_plan.plan_of(other) is None
        again, _, ran = _step(other, _cache(other, 2), *args, True)
        assert ran and torch.equal(again, before)


@needs_native
def test_plan_rejects_positions_outside_the_table():
    lm = _model("dense_first_shared")
    cache = KVCache(lm.cfg, 3, block_size=4)
    start = torch.tensor([3])
    _, ctx = lm.step_context(cache, start, torch.ones_like(start), 1, torch.tensor([[1, 2]]))
    ctx.write_pos = torch.tensor([[8]])  # one position past the row's two blocks
    expected = r"layer 0: each row's positions must lie in its block table \(2 blocks of 4\)"
    with torch.no_grad(), ops.decoding(), pytest.raises(ValueError, match=expected):
        lm(lm.embed(torch.tensor([[3]])), ctx, logits="last")


@needs_native
def test_plan_follows_quantised_weights_the_router_bias_and_allow_native():
    lm = _model("base_like", fmt="int4")
    args = ([1], [40], [7])
    _, _, ran = _step(lm, _cache(lm, 2), *args, True)
    assert ran
    plan = decode_plan.plan_of(lm)
    down = lm.model.layers[1].mlp.experts.down_proj  # a QuantWeight's scales replaced
    down.scale = down.scale * 2
    assert not plan.current()
    fused, _, ran = _step(lm, _cache(lm, 2), *args, True)
    blocks, _, _ = _step(lm, _cache(lm, 2), *args, False)
    assert ran and torch.equal(fused, blocks)
    plan = decode_plan.plan_of(lm)  # the noaux_tc bias changed in place (the plan holds a float32 copy)
    with torch.no_grad():
        lm.model.layers[2].mlp.gate.e_score_correction_bias.add_(0.5)
    assert not plan.current()
    fused, _, ran = _step(lm, _cache(lm, 2), *args, True)
    blocks, _, _ = _step(lm, _cache(lm, 2), *args, False)
    assert ran and torch.equal(fused, blocks)
    attention = lm.model.layers[2].self_attn
    attention.allow_native = False  # one MLA block kept on its torch path: no plan
    assert not decode_plan.plan_of(lm).current()
    _, _, ran = _step(lm, _cache(lm, 2), *args, True)
    assert not ran and decode_plan.plan_of(lm) is None


@needs_native
def test_plan_names_the_mla_block_when_the_kernel_refuses_its_sizes():
    """-2 from an MLA model's step (sizes the MLA block refuses: checked when the plan is
    built, so only a kernel fault could return it) is reported as the MLA block's, not with
    the MHA head sizes ``decode_error`` describes."""
    lm = _model("small_like")
    args = ([1], [40], [7])
    _, _, ran = _step(lm, _cache(lm, 2), *args, True)  # the plan built with the real kernels
    assert ran
    real = native.require()

    class Refuses:  # the real library, but for the step's return code
        def __getattr__(self, name):
            return getattr(real, name)

        def dsvl2_decode_layers(self, *a):
            return -2

    with native.stand_in(Refuses()), pytest.raises(ValueError, match="the MLA block refused its sizes"):
        _step(lm, _cache(lm, 2), *args, True)


@needs_native
def test_no_plan_where_a_block_has_no_native_version():
    assert decode_plan.DecodePlan.build(_model("small_like")) is not None
    assert decode_plan.DecodePlan.build(_model("small_like").float()) is None  # float32 weights: torch's blocks
    lm = _model("base_like")
    lm.model.layers[1].mlp.gate.float()  # a float32 router gate: the torch router
    assert decode_plan.DecodePlan.build(lm) is None
    lm = _model("small_like", fmt="int8")  # one MLP of two formats: no native kernel takes it
    up = lm.model.layers[0].mlp.up_proj
    up.weight = torch.nn.Parameter(up.weight.dequantize(torch.bfloat16), requires_grad=False)
    assert decode_plan.DecodePlan.build(lm) is None
    lm = _model("small_like", fmt="int8")  # an int8 kv_b_proj: the native MLA block cannot take it
    kv_b = lm.model.layers[1].self_attn.kv_b_proj
    quant.hold(kv_b, "weight", quant.QuantWeight.quantize(kv_b.weight.detach().float(), 8))
    assert decode_plan.DecodePlan.build(lm) is None
    lm = _model("small_like")
    attention = lm.model.layers[1].self_attn  # one MLA block kept on its torch path
    attention.allow_native = False
    assert decode_plan.DecodePlan.build(lm) is None


@needs_native
@pytest.mark.parametrize("variant, quantize, cache_dtype", [("tiny", None, None), ("small", "int8", None),
                                                            ("base", "int4", torch.bfloat16)])
def test_engine_greedy_ids_equal_with_and_without_the_plan(variant, quantize, cache_dtype, monkeypatch):
    """A golden checkpoint in bf16 (small: int8, base: int4 with a bf16 cache) through the
    engine: three rows of different lengths, 12 greedy tokens each, with the plan vs the
    blocks one by one (tiny: vs torch too)."""
    model = load_model(GOLDEN / variant, torch.bfloat16, quantize=quantize)
    proc = Processor.from_pretrained(GOLDEN / variant)
    convs = [[{"role": "<|User|>", "content": text}, {"role": "<|Assistant|>", "content": ""}]
             for text in ("Hello there.", "Count to ten, slowly, please: one", "Why is the sky blue?")]
    params = SamplingParams(max_new_tokens=12, temperature=0.0)

    def ids():
        engine = Engine(model, proc.tokenizer, cache_dtype=cache_dtype)
        return [o.ids for o in engine.generate(proc(convs), params)]

    runs = decode_plan.runs
    fused = ids()
    assert decode_plan.runs - runs >= 11  # every decode step went through the plan
    runs = decode_plan.runs
    monkeypatch.setattr(decode_plan, "enabled", False)
    assert ids() == fused and decode_plan.runs == runs
    if variant == "tiny":
        monkeypatch.setattr(ops, "native_blocks", False)
        assert ids() == fused
