"""The native decode-step blocks (dsvl2/model/native/layers.c) against independent
references and against the model's own torch path.

* RMSNorm and the greedy router: float64 formulas written out here.
* The MHA block: the module's torch path on the same weights, cache and positions (the
  cache rows it writes must be the same bits: the products are the same native kernel
  and RoPE is the same operations), and a float64 attention written out here.
* A whole model: greedy ids of the engine with the blocks equal those with the torch
  path (bf16 weights of the golden tiny checkpoint, MHA + MoE).
"""

from __future__ import annotations

import pytest
import torch

from _paths import GOLDEN
from dsvl2.config import LanguageConfig
from dsvl2.engine.engine import Engine
from dsvl2.engine.sampling import SamplingParams
from dsvl2.model import decode_plan, native, ops
from dsvl2.model.attention import MHA
from dsvl2.model.cache import KVCache, StepContext, row_tables, slots_of
from dsvl2.model.moe import Gate
from dsvl2.model.ops import RMSNorm
from dsvl2.model.rope import RotaryEmbedding
from dsvl2.processing import Processor
from dsvl2.checkpoint.load import load_model

needs_native = pytest.mark.skipif(not native.cpu_ok()[0], reason=f"CPU: {native.cpu_ok()[1]}")


def _rand(*shape, seed=0, scale=1.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


@needs_native
@pytest.mark.parametrize("wdtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("m,d", [(1, 1280), (3, 64), (16, 37)])
def test_rmsnorm_matches_float64(wdtype, m, d):
    x, w = _rand(m, d, seed=1), _rand(d, seed=2).to(wdtype)
    ref = w.double() * (x.double() / torch.sqrt((x.double() ** 2).mean(-1, keepdim=True) + 1e-6))
    y = native.rmsnorm(x, w, 1e-6)
    assert y.dtype == torch.float32 and y.shape == x.shape
    assert torch.allclose(y.double(), ref, rtol=2e-6, atol=1e-6)


@needs_native
def test_rmsnorm_module_goes_native_only_in_bf16_decode():
    norm = RMSNorm(64, 1e-6)
    with torch.no_grad():
        norm.weight.copy_(_rand(64, seed=3))
    x = _rand(2, 1, 64, seed=4)
    torch_path = norm(x)  # float32 weights: never native
    with ops.decoding():
        assert torch.equal(norm(x), torch_path)
    norm = norm.to(torch.bfloat16)
    with ops.decoding():
        fast = norm(x)
    assert torch.equal(fast, native.rmsnorm(x, norm.weight, 1e-6))
    assert torch.allclose(fast, norm(x), rtol=1e-6, atol=1e-6)  # the torch path outside decode


def _ref_route(x, gate, k, sigmoid, norm, scaling):
    logits = x.double() @ gate.double().T
    scores = logits.sigmoid() if sigmoid else logits.softmax(-1)
    w, idx = scores.topk(k, dim=-1)
    if norm and k > 1:
        w = w / (w.sum(-1, keepdim=True) + 1e-20)
    return idx, w * scaling


@needs_native
@pytest.mark.parametrize("sigmoid,norm,k,scaling", [(False, False, 6, 1.0), (True, True, 6, 2.5),
                                                    (False, True, 2, 16.0), (True, False, 1, 1.0)])
def test_route_greedy_matches_float64(sigmoid, norm, k, scaling):
    e, d, t = 64, 128, 16
    gate = _rand(e, d, seed=5, scale=0.3).to(torch.bfloat16)
    x = _rand(t, d, seed=6)
    idx, wt = native.route_greedy(x, gate, k, sigmoid, norm, scaling)
    ref_idx, ref_w = _ref_route(x, gate, k, sigmoid, norm, scaling)
    assert torch.equal(idx, ref_idx)  # descending score order, like topk(sorted=True)
    assert torch.allclose(wt.double(), ref_w, rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="experts per token"):
        native.route_greedy(x, gate, e + 1, sigmoid, norm, scaling)


@needs_native
def test_gate_module_decode_routes_like_the_torch_path():
    cfg = LanguageConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=32,
                         n_routed_experts=16, num_experts_per_tok=4, moe_intermediate_size=32,
                         first_k_dense_replace=1, norm_topk_prob=True, routed_scaling_factor=2.0)
    g = Gate(cfg)
    with torch.no_grad():
        g.weight.copy_(_rand(16, 64, seed=7, scale=0.5))
    g = g.to(torch.bfloat16)
    x = _rand(5, 64, seed=8)
    slow = g(x)
    with ops.decoding():
        fast = g(x)
    assert torch.equal(fast.idx.sort(-1).values, slow.idx.sort(-1).values)
    order_f, order_s = fast.idx.argsort(-1), slow.idx.argsort(-1)
    assert torch.allclose(fast.weight.gather(1, order_f), slow.weight.gather(1, order_s), rtol=1e-5, atol=1e-7)


def _mha(heads, kv_heads, bias, seed=0):
    cfg = LanguageConfig(hidden_size=64, num_hidden_layers=1, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         vocab_size=32, attention_bias=bias, use_mla=False)
    m = MHA(cfg, 0)
    with torch.no_grad():
        for i, p in enumerate(m.parameters()):
            p.copy_(_rand(*p.shape, seed=seed + i, scale=0.2))
    return cfg, m.to(torch.bfloat16)


def _ref_attention(m, x, cache_k, cache_v, rows, pos):
    """float64, from the cache the block wrote: softmax(q . k * scale) . v over 0..pos."""
    b = x.shape[0]
    out = []
    for i in range(b):
        hd = m.hd
        k = cache_k[rows[i], : pos[i] + 1].double()  # [n, Hk, hd]
        v = cache_v[rows[i], : pos[i] + 1].double()
        q = m.q_proj.weight.double() @ x[i].double()
        if m.q_proj.bias is not None:
            q = q + m.q_proj.bias.double()
        q = q.view(m.h, hd)
        ang = pos[i] * (1.0 / (10000.0 ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd)))
        cos, sin = torch.cat([ang.cos(), ang.cos()]), torch.cat([ang.sin(), ang.sin()])
        q = q * cos + torch.cat([-q[:, hd // 2:], q[:, : hd // 2]], -1) * sin
        heads = []
        for h in range(m.h):
            kh, vh = k[:, h // (m.h // m.hk)], v[:, h // (m.h // m.hk)]
            p = torch.softmax(kh @ q[h] * m.scale, 0)
            heads.append(p @ vh)
        o = m.o_proj.weight.double() @ torch.cat(heads)
        if m.o_proj.bias is not None:
            o = o + m.o_proj.bias.double()
        out.append(o)
    return torch.stack(out)


@needs_native
@pytest.mark.parametrize("heads,kv_heads,bias", [(4, 4, False), (4, 2, True), (8, 1, False)])
def test_mha_decode_block_matches_torch_path_and_float64(heads, kv_heads, bias, monkeypatch):
    cfg, m = _mha(heads, kv_heads, bias)
    # scattered rows, different lengths: one slot, one unit of 128 slots and a bit, several units
    rows, start = torch.tensor([2, 0, 3]), torch.tensor([300, 0, 129])
    rotary = RotaryEmbedding(cfg)

    # each of 4 rows owns 512 tokens in 16-token blocks scattered over the pool
    tables = row_tables(4, 512, 16, order=torch.randperm(4 * 32, generator=torch.Generator().manual_seed(7)))

    def run(native_block: bool):
        cache = KVCache(cfg, 1 + 4 * 32, block_size=16)
        for t in cache.layers[0]:  # earlier tokens: any values
            t.copy_(_rand(*t.shape, seed=40))
        x = _rand(3, 1, 64, seed=41)
        positions = start[:, None]
        cos, sin = rotary(positions)
        s = torch.arange(int(start.max()) + 1)
        mask = torch.zeros(3, 1, 1, len(s)).masked_fill_(~(s[None, None, None] <= positions[:, None, :, None]),
                                                          torch.finfo(torch.float32).min)
        ctx = StepContext(cos, sin, mask, cache=cache, table=tables[rows], write_pos=positions, kv_len=len(s))
        calls = []
        real = native.mha_decode
        monkeypatch.setattr(native, "mha_decode", lambda *a: calls.append(1) or real(*a))
        if not native_block:  # the module's torch path (its products stay the native kernel)
            monkeypatch.setattr(ops, "native_blocks", False)
        with torch.no_grad(), ops.decoding():
            out = m(x, ctx)
        monkeypatch.undo()
        assert len(calls) == int(native_block)
        return x, out, cache

    x, fast, cache_f = run(True)
    _, slow, cache_s = run(False)
    for a, b in zip(cache_f.layers[0], cache_s.layers[0]):
        assert torch.equal(a, b)  # the same k / v written at the same slots
    assert torch.allclose(fast, slow, rtol=1e-5, atol=1e-6)
    slots = slots_of(tables, torch.arange(512).expand(4, -1), 16)  # [4, 512]: the rows as rectangles
    rect = [t.view(-1, *t.shape[2:])[slots] for t in cache_f.layers[0]]
    ref = _ref_attention(m, x[:, 0], *rect, rows.tolist(), start.tolist())
    assert torch.allclose(fast[:, 0].double(), ref, rtol=1e-5, atol=1e-5)


@needs_native
@pytest.mark.parametrize("table,pos", [([[1, 2]], 8), ([[1, 2]], -1), ([[1, 5]], 4), ([[-1, 2]], 0)])
def test_mha_decode_rejects_positions_outside_the_table(table, pos):
    """A position past the row's table, or a block id outside the pool: an error, nothing written."""
    cfg, m = _mha(4, 4, False)
    cache = KVCache(cfg, 4, block_size=4)
    k, v = cache.layers[0]
    k.zero_(), v.zero_()
    before = [t.clone() for t in (k, v)]
    cos = sin = torch.ones(1, 16)
    with pytest.raises(ValueError, match="block table"):
        native.mha_decode(_rand(1, 64), m.q_proj.weight, m.k_proj.weight, m.v_proj.weight, m.o_proj.weight,
                          (None,) * 4, 4, 4, cos, sin, k, v, torch.tensor(table), torch.tensor([pos]), 0.25)
    assert all(torch.equal(a, b) for a, b in zip(before, (k, v)))


@needs_native
def test_engine_greedy_ids_equal_with_and_without_native_blocks(monkeypatch):
    """The golden tiny checkpoint (MHA + greedy MoE) in bf16: three rows of different
    lengths, 12 greedy tokens each, native blocks vs the torch path of every block."""
    model = load_model(GOLDEN / "tiny", torch.bfloat16)
    proc = Processor.from_pretrained(GOLDEN / "tiny")
    convs = [[{"role": "<|User|>", "content": text}, {"role": "<|Assistant|>", "content": ""}]
             for text in ("Hello there.", "Count to ten, slowly, please: one", "Why is the sky blue?")]
    params = SamplingParams(max_new_tokens=12, temperature=0.0)
    monkeypatch.setattr(decode_plan, "enabled", False)  # the blocks one by one (the plan: test_decode_plan.py)
    calls = []
    for name in ("mha_decode", "rmsnorm", "route"):
        real = getattr(native, name)
        monkeypatch.setattr(native, name, lambda *a, _real=real, _name=name: calls.append(_name) or _real(*a))

    def ids():
        return [o.ids for o in Engine(model, proc.tokenizer).generate(proc(convs), params)]

    fast = ids()
    assert set(calls) == {"mha_decode", "rmsnorm", "route"}  # the blocks really ran
    calls.clear()
    monkeypatch.setattr(ops, "native_blocks", False)
    assert ids() == fast
    assert not calls


@needs_native
def test_rmsnorm_of_a_bf16_prefill_goes_native_under_bf16_products(bf16_policy, monkeypatch):
    """Outside decode, under bf16 products, a bf16-weight norm takes the native RMSNorm (rows
    split among the threads from 32 rows on: the same bits as one row at a time), within
    float32 rounding of the torch path; float32 weights (the oracle), float32 products and
    autograd keep torch's."""
    norm = RMSNorm(2048, 1e-6)
    with torch.no_grad():
        norm.weight.copy_(_rand(2048, seed=5))
    norm = norm.to(torch.bfloat16)
    x = _rand(1, 300, 2048, seed=6)
    calls = []
    real = native.rmsnorm
    monkeypatch.setattr(native, "rmsnorm", lambda *a: calls.append(a[0].shape) or real(*a))
    with torch.no_grad():
        fast = norm(x)
        assert calls == [x.shape]
        assert torch.equal(fast[:, 40:41], norm(x[:, 40:41]))  # one row alone: the same bits
        ops.set_big_products_in_weights_dtype(False)
        slow = norm(x)
        ops.set_big_products_in_weights_dtype(True)
    assert len(calls) == 2
    assert torch.allclose(fast, slow, rtol=1e-6, atol=1e-6)
    ref = norm.weight.double() * (x.double() / torch.sqrt((x.double() ** 2).mean(-1, keepdim=True) + 1e-6))
    assert torch.allclose(fast.double(), ref, rtol=2e-6, atol=1e-6)
    norm(x.requires_grad_()).sum().backward()  # autograd: torch's ops, gradients flow
    assert len(calls) == 2 and x.grad is not None
