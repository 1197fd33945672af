"""All decoder layers of a decode step in one native call (dsvl2/model/decode_plan.py,
native/step.c) against the module path, which runs the same native blocks one by one.

The plan strings the same kernels together in the same order, so the comparison is bit
for bit: logits, the cache rows written, the routing. The module path itself is checked
against torch and float64 in test_native_layers.py and test_native.py.
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
from dsvl2.model import decode_plan, native, ops
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


def _model(name: str, seed: int = 0) -> LanguageModel:
    cfg = LanguageConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=3, vocab_size=80,
                         n_routed_experts=8, num_experts_per_tok=3, moe_intermediate_size=32, topk_method="greedy",
                         use_mla=False, **CONFIGS[name])
    lm = LanguageModel(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lm.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    lm = lm.to(torch.bfloat16)
    lm.rotary = RotaryEmbedding(cfg)  # float32 tables, as the weights loader builds them
    return lm


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


def _cache(lm: LanguageModel, seed: int) -> KVCache:
    cache = KVCache(lm.cfg, 1 + 4 * 32, block_size=16)
    g = torch.Generator().manual_seed(seed)
    for pair in cache.layers:  # earlier tokens: any values
        for t in pair:
            t.copy_(torch.randn(t.shape, generator=g))
    return cache


@needs_native
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_plan_equals_the_module_path_bit_for_bit(name, monkeypatch):
    lm = _model(name)
    # scattered cache rows, lengths of one slot, one attention unit and a bit, several units
    rows, start, ids = [2, 0, 3], [300, 0, 129], [5, 17, 63]
    cache_f, cache_m = _cache(lm, 1), _cache(lm, 1)
    fused, r_f, ran = _step(lm, cache_f, rows, start, ids, True)
    assert ran
    blocks, r_m, ran = _step(lm, cache_m, rows, start, ids, False)
    assert not ran
    assert torch.equal(fused, blocks)
    for a, b in zip(cache_f.layers, cache_m.layers):
        assert all(torch.equal(x, y) for x, y in zip(a, b))  # the same k / v written
    assert sorted(r_f) == sorted(r_m) == [i for i, layer in enumerate(lm.model.layers) if layer.is_moe]
    for i in r_f:
        assert torch.equal(r_f[i][0], r_m[i][0]) and torch.equal(r_f[i][1], r_m[i][1])
    # and the module path is not the plan in disguise: the torch path agrees to rounding
    monkeypatch.setattr(ops, "native_blocks", False)
    torch_path, r_t, _ = _step(lm, _cache(lm, 1), rows, start, ids, True)
    assert torch.allclose(fused, torch_path, rtol=0.02, atol=0.02 * float(torch_path.abs().max()))


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


def test_no_plan_where_a_block_has_no_native_version():
    mla = LanguageModel(LanguageConfig(hidden_size=64, num_hidden_layers=1, num_attention_heads=4, vocab_size=32,
                                       kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=8, qk_nope_head_dim=8,
                                       v_head_dim=16, num_key_value_heads=4, use_mla=True)).to(torch.bfloat16)
    assert decode_plan.DecodePlan.build(mla) is None
    group = LanguageModel(LanguageConfig(hidden_size=64, num_hidden_layers=1, num_attention_heads=4, vocab_size=32,
                                         n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=16,
                                         topk_method="group_limited_greedy", n_group=2, topk_group=1,
                                         num_key_value_heads=4, use_mla=False)).to(torch.bfloat16)
    assert decode_plan.DecodePlan.build(group) is None


@needs_native
def test_engine_greedy_ids_equal_with_and_without_the_plan(monkeypatch):
    """The golden tiny checkpoint in bf16 through the engine: three rows of different
    lengths, 12 greedy tokens each, with the plan vs the blocks one by one vs torch."""
    model = load_model(GOLDEN / "tiny", torch.bfloat16)
    proc = Processor.from_pretrained(GOLDEN / "tiny")
    convs = [[{"role": "<|User|>", "content": text}, {"role": "<|Assistant|>", "content": ""}]
             for text in ("Hello there.", "Count to ten, slowly, please: one", "Why is the sky blue?")]
    params = SamplingParams(max_new_tokens=12, temperature=0.0)

    def ids():
        return [o.ids for o in Engine(model, proc.tokenizer).generate(proc(convs), params)]

    runs = decode_plan.runs
    fused = ids()
    assert decode_plan.runs - runs >= 11  # every decode step went through the plan
    runs = decode_plan.runs
    monkeypatch.setattr(decode_plan, "enabled", False)
    assert ids() == fused and decode_plan.runs == runs
    monkeypatch.setattr(ops, "native_blocks", False)
    assert ids() == fused
