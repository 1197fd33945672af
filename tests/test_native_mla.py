"""The native MLA decode block (dsvl2/model/native/mla.c) against the module's torch path
(``MLA.forward`` with ``allow_native = False``) and a float64 attention written out here.

* float32 weights: the torch path to float32 rounding (its products are MKL's, the
  kernel's its own), the cache rows it writes likewise.
* bf16 and int8 weights: the cache rows are the torch path's bits (the products, the
  RMSNorm and RoPE are the same native code and operations); the output is closer to the
  float64 attention than the torch path's, which rounds q and o to bf16 around its bf16
  matmuls.
* paged: rows of different lengths in 16-slot blocks scattered over the pool, lengths of
  one slot, one block and one more, across the kernel's 64-position work units.
* a row's bits do not depend on the other rows of its batch nor on the thread count.
"""

from __future__ import annotations

import pytest
import torch

from dsvl2.config import LanguageConfig
from dsvl2.model import native, ops, quant
from dsvl2.model.attention import MLA
from dsvl2.model.cache import KVCache, StepContext, row_tables, slots_of
from dsvl2.model.rope import RotaryEmbedding

needs_native = pytest.mark.skipif(not native.cpu_ok()[0], reason=f"CPU: {native.cpu_ok()[1]}")

BS, CAP = 16, 512  # block size, tokens each row's table holds
START = torch.tensor([300, 0, 16, 64, 150])  # the new token's position per row

# (heads, kv_lora_rank, rope, nope, v, q_lora_rank, bias): the real shapes' layout, small; the
# second has tails everywhere (r % 16, (r + dr) % 8, heads % 4) and the q_lora path with biases
SHAPES = {"plain": (4, 40, 8, 16, 16, None, False), "lora_tails": (6, 52, 6, 12, 20, 24, True)}


def _rand(*shape, seed=0, scale=1.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


def _cfg(shape: str) -> LanguageConfig:
    h, r, dr, dn, dv, qr, bias = SHAPES[shape]
    return LanguageConfig(hidden_size=64, num_hidden_layers=1, num_attention_heads=h, vocab_size=32, use_mla=True,
                          kv_lora_rank=r, qk_rope_head_dim=dr, qk_nope_head_dim=dn, v_head_dim=dv, q_lora_rank=qr,
                          attention_bias=bias)


def _quantise(module: torch.nn.Module) -> None:
    """The module's weight as an int8 QuantWeight, as a quantised checkpoint loads it."""
    quant.hold(module, "weight", quant.QuantWeight.quantize(module.weight.detach().float(), 8))


def _mla(shape: str, wdtype: str, seed: int = 0) -> tuple[LanguageConfig, MLA]:
    cfg = _cfg(shape)
    m = MLA(cfg, 0)
    with torch.no_grad():
        for i, (name, p) in enumerate(m.named_parameters()):
            p.copy_(_rand(*p.shape, seed=seed + i, scale=0.2) + (1.0 if "layernorm" in name else 0.0))
    m = m.to(torch.float32 if wdtype == "float32" else torch.bfloat16)
    if wdtype == "int8":  # the projections a quantised checkpoint stores in int8; kv_b_proj stays float
        for proj in ("q_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "o_proj"):
            if hasattr(m, proj):
                _quantise(getattr(m, proj))
    return cfg, m


def _tables(rows: int) -> torch.Tensor:
    order = torch.randperm(rows * (CAP // BS), generator=torch.Generator().manual_seed(7))
    return row_tables(rows, CAP, BS, order=order)


def _ctx(cfg: LanguageConfig, cache, tables, start) -> StepContext:
    """A decode step's context as ``LanguageModel.step_context`` builds it: one new token per
    row at ``start``, positions from there on read from the null block."""
    positions = start[:, None]
    cos, sin = RotaryEmbedding(cfg)(positions)
    s = torch.arange(int(start.max()) + 1)
    mask = torch.zeros(len(start), 1, 1, len(s)).masked_fill_(
        ~(s[None, None, None] <= positions[:, None, :, None]), torch.finfo(torch.float32).min)
    return StepContext(cos, sin, mask, cache=cache, table=tables, write_pos=positions,
                       real=torch.ones_like(positions, dtype=torch.bool), kv_len=len(s), valid=start + 1)


def _step(cfg: LanguageConfig, m: MLA, x, cache, tables, start, native_on: bool):
    """One decode step of the module over ``cache`` (changed in place); its output [B, 1, D]."""
    ctx = _ctx(cfg, cache, tables, start)
    m.allow_native = native_on
    with torch.no_grad(), ops.decoding():
        assert m.native_decode(x, ctx) == native_on
        return m(x, ctx)


def _cache(cfg: LanguageConfig, cdtype: torch.dtype, rows: int) -> KVCache:
    cache = KVCache(cfg, 1 + rows * (CAP // BS), block_size=BS, dtype=cdtype)
    (pool,) = cache.layers[0]
    pool.copy_(_rand(*pool.shape, seed=40))  # earlier tokens: any values
    return cache


def _rms64(v, w, eps):
    return w.double() * (v / torch.sqrt((v * v).mean() + eps))


def _rope64(v, cos, sin):
    v = torch.cat([v[0::2], v[1::2]])  # de-interleaved, as apply_rope(interleaved=True)
    h = v.shape[-1] // 2
    return v * cos + torch.cat([-v[..., h:], v[..., :h]], -1) * sin


def _w64(w):
    return (w.dequantize() if isinstance(w, quant.QuantWeight) else w).double()


def _lin64(proj, v):
    y = _w64(proj.weight) @ v
    return y if proj.bias is None else y + proj.bias.double()


def _reference(cfg: LanguageConfig, m: MLA, x, pool, tables, start):
    """float64 from the cache as the block wrote it: q from x and the weights, absorbed
    attention over positions 0 .. start of each row; and each row's new cache row."""
    cos, sin = RotaryEmbedding(cfg)(start[:, None])
    h, dn, dr, dv, r = m.h, m.dn, m.dr, m.dv, m.r
    w = _w64(m.kv_b_proj.weight).view(h, dn + dv, r)
    w_uk, w_uv = w[:, :dn], w[:, dn:]
    flat = pool.view(-1, r + dr)
    outs, rows_new = [], []
    for i in range(len(start)):
        xi = x[i, 0].double()
        c, s_ = cos[i, 0].double(), sin[i, 0].double()
        if hasattr(m, "q_proj"):
            q = _lin64(m.q_proj, xi)
        else:
            q = _lin64(m.q_b_proj, _rms64(_lin64(m.q_a_proj, xi), m.q_a_layernorm.weight, m.q_a_layernorm.eps))
        q = q.view(h, dn + dr)
        q_nope = q[:, :dn]
        q_pe = torch.stack([_rope64(q[j, dn:], c, s_) for j in range(h)])
        kv = _lin64(m.kv_a_proj_with_mqa, xi)
        rows_new.append(torch.cat([_rms64(kv[:r], m.kv_a_layernorm.weight, m.kv_a_layernorm.eps),
                                   _rope64(kv[r:], c, s_)]))
        n = int(start[i]) + 1
        kvs = flat[slots_of(tables[i:i + 1], torch.arange(n)[None], BS)[0]].double()  # [n, r + dr]
        q_lat = torch.einsum("hd,hdr->hr", q_nope, w_uk)
        scores = (q_lat @ kvs[:, :r].T + q_pe @ kvs[:, r:].T) * m.scale  # [H, n]
        o = torch.einsum("hs,sr->hr", torch.softmax(scores, -1), kvs[:, :r])
        outs.append(_lin64(m.o_proj, torch.einsum("hr,hvr->hv", o, w_uv).reshape(-1)))
    return torch.stack(outs), torch.stack(rows_new)


def _new_rows(pool, tables, start):
    return pool.view(-1, pool.shape[-1])[slots_of(tables, start[:, None], BS)[:, 0]]


@needs_native
@pytest.mark.parametrize("cdtype", [torch.float32, torch.bfloat16], ids=["f32_cache", "bf16_cache"])
@pytest.mark.parametrize("wdtype", ["float32", "bfloat16", "int8"])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_mla_decode_matches_torch_path_and_float64(shape, wdtype, cdtype):
    cfg, m = _mla(shape, wdtype)
    b = len(START)
    tables = _tables(b)
    x = _rand(b, 1, 64, seed=41)
    runs = {}
    for native_on in (True, False):
        cache = _cache(cfg, cdtype, b)
        runs[native_on] = (_step(cfg, m, x, cache, tables, START, native_on), cache.layers[0][0])
    (fast, pool_f), (slow, pool_s) = runs[True], runs[False]
    assert fast.dtype == torch.float32 and fast.shape == (b, 1, 64)

    # the cache: only the new rows changed, and as the torch path wrote them
    changed = (pool_f != _cache(cfg, cdtype, b).layers[0][0]).any(-1).nonzero()
    written = set(slots_of(tables, START[:, None], BS)[:, 0].tolist())
    assert {int(i) * BS + int(j) for i, j in changed} <= written
    if wdtype == "float32":  # MKL's products vs the kernel's: float32 rounding apart (a bf16 ulp in a bf16 cache)
        rtol = 1e-5 if cdtype == torch.float32 else 2 ** -7
        assert torch.allclose(pool_f.float(), pool_s.float(), rtol=rtol, atol=1e-6)
    else:
        assert torch.equal(pool_f, pool_s)

    ref, ref_rows = _reference(cfg, m, x, pool_f, tables, START)
    new_rows = _new_rows(pool_f, tables, START).double()
    rows_tol = 1e-5 if cdtype == torch.float32 else 2 ** -8  # a bf16 cache rounds to 8 bits
    assert torch.allclose(new_rows, ref_rows, rtol=rows_tol, atol=1e-5)
    scale = ref.abs().max().item()
    err_fast = (fast[:, 0].double() - ref).abs().max().item()
    err_slow = (slow[:, 0].double() - ref).abs().max().item()
    assert err_fast <= 1e-5 * scale
    if wdtype == "float32":
        assert torch.allclose(fast, slow, rtol=1e-5, atol=1e-5 * scale)
    else:  # the torch path rounds q_nope, q_lat, o_lat and o to bf16
        assert err_fast <= err_slow and err_slow <= 3e-2 * scale


@needs_native
@pytest.mark.parametrize("wdtype", ["float32", "bfloat16"])
def test_a_row_alone_equals_the_row_in_a_batch(wdtype):
    cfg, m = _mla("lora_tails", wdtype, seed=3)
    b = len(START)
    tables = _tables(b)
    x = _rand(b, 1, 64, seed=42)
    cache = _cache(cfg, torch.float32, b)
    batch = _step(cfg, m, x, cache, tables, START, True)
    rows = _new_rows(cache.layers[0][0], tables, START)
    for i in range(b):
        alone = _cache(cfg, torch.float32, b)
        out = _step(cfg, m, x[i:i + 1], alone, tables[i:i + 1], START[i:i + 1], True)
        assert torch.equal(out[0], batch[i])
        assert torch.equal(_new_rows(alone.layers[0][0], tables[i:i + 1], START[i:i + 1])[0], rows[i])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _step(cfg, m, x, _cache(cfg, torch.float32, b), tables, START, True)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, batch)


@needs_native
def test_the_module_takes_the_native_block_only_where_it_can():
    cfg, m = _mla("plain", "bfloat16")
    cache = _cache(cfg, torch.float32, 1)
    tables = _tables(1)
    x = _rand(1, 1, 64, seed=43)
    ctx = StepContext(*RotaryEmbedding(cfg)(START[:1, None]), None, cache=cache, table=tables,
                      write_pos=START[:1, None], kv_len=int(START[0]) + 1)
    assert not m.native_decode(x, ctx)  # not a decode step
    with ops.decoding():
        assert m.native_decode(x, ctx)
        assert not m.native_decode(x.double(), ctx)
        half = KVCache(cfg, 4, block_size=BS, dtype=torch.float16)
        assert not m.native_decode(x, StepContext(ctx.cos, ctx.sin, None, cache=half, table=tables,
                                                  write_pos=ctx.write_pos, kv_len=ctx.kv_len))
        before = ops.native_blocks
        ops.native_blocks = False
        try:
            assert not m.native_decode(x, ctx)
        finally:
            ops.native_blocks = before
        # an int4 projection (no native version here): the torch path
        w = m.o_proj.weight.detach().float()
        int4 = quant.QuantWeight.empty(4, tuple(w.shape), quant.int4_group(w.shape[-1]))
        del m.o_proj._parameters["weight"]
        m.o_proj.weight = int4
        assert not m.native_decode(x, ctx)


@needs_native
def test_absorbed_false_runs_the_torch_path():
    cfg, m = _mla("plain", "float32")
    b = len(START)
    tables, x = _tables(b), _rand(b, 1, 64, seed=44)
    slow = _step(cfg, m, x, _cache(cfg, torch.float32, b), tables, START, False)
    fast = _step(cfg, m, x, _cache(cfg, torch.float32, b), tables, START, True)
    ctx = _ctx(cfg, _cache(cfg, torch.float32, b), tables, START)
    with torch.no_grad(), ops.decoding():
        expanded = m(x, ctx, absorbed=False)  # the expanded form asked for: not the native block
    assert torch.allclose(expanded, slow, rtol=1e-5, atol=1e-5) and not torch.equal(expanded, fast)


def _args(m: MLA, cache, table, pos):
    cos = sin = torch.ones(len(pos), m.dr)
    return dict(heads=m.h, dn=m.dn, dr=m.dr, dv=m.dv, eps=1e-6, cos=cos, sin=sin, cache=cache,
                table=torch.tensor(table), pos=torch.tensor(pos), scale=m.scale)


@needs_native
@pytest.mark.parametrize("table,pos", [([[1, 2]], 2 * BS), ([[1, 2]], -1), ([[1, 5]], BS), ([[-1, 2]], 0)])
def test_positions_outside_the_table_are_refused_and_nothing_is_written(table, pos):
    _, m = _mla("plain", "bfloat16")
    pool = torch.zeros(4, BS, m.r + m.dr)
    with pytest.raises(ValueError, match="block table"):
        native.mla_decode(_rand(1, 64), m.q_proj.weight, m.kv_a_proj_with_mqa.weight, m.kv_a_layernorm.weight,
                          m.kv_b_proj.weight, m.o_proj.weight, **_args(m, pool, table, [pos]))
    assert not pool.any()


@needs_native
def test_bad_arguments_name_the_argument():
    _, m = _mla("plain", "bfloat16")
    pool = torch.zeros(4, BS, m.r + m.dr)
    w = (m.q_proj.weight, m.kv_a_proj_with_mqa.weight, m.kv_a_layernorm.weight, m.kv_b_proj.weight, m.o_proj.weight)
    args = _args(m, pool, [[1]], [0])
    with pytest.raises(ValueError, match="wq must be"):
        native.mla_decode(_rand(1, 64), w[0][:-1], *w[1:], **args)
    with pytest.raises(ValueError, match="kv_b must be contiguous float32 or bf16"):
        _, m2 = _mla("plain", "int8")
        kv_b = m2.kv_a_proj_with_mqa.weight  # an int8 QuantWeight where kv_b goes
        native.mla_decode(_rand(1, 64), w[0], w[1], w[2], kv_b, w[4], **args)
    with pytest.raises(ValueError, match="cache must be"):
        native.mla_decode(_rand(1, 64), *w, **{**args, "cache": pool.half()})
    with pytest.raises(ValueError, match="dr positive and even"):
        native.mla_decode(_rand(1, 64), *w, **{**args, "dr": 7})
    with pytest.raises(ValueError, match="x must be"):
        native.mla_decode(_rand(1, 64).double(), *w, **args)
