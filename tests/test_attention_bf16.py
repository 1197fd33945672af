"""The prefill / vision attention with bf16 products (dsvl2/model/native/attention.c, the
wrapper ``native.attention_bf16``), the same numbers on AMX tiles (amx_attention.c,
``native.attention_bf16_amx``: every numeric test below runs on both kernels, ``attend``),
and where the model chooses them (``ops.attention_in_bf16``).

* When: ``attention_usable()`` is the native kernels, the CPU's AVX-512 BF16 flags and a
  build that has the kernel; the model takes it only for bf16 (or quantised) weights
  under the bf16 policy outside decode steps, with ``ops.native_attention`` on.
* Numbers: a float64 formula written out here that rounds where the kernel documents it
  rounds (bf16 inputs, the unnormalised weights exp(s - max) rounded to bf16, divided by
  the sum of the unrounded weights), to float32 accumulation; the plain float64 softmax
  attention to bf16 level. No mask, a causal mask at an offset (a prefill chunk after
  cached keys), padding queries with no visible key, grouped kv heads, odd sizes, the
  vision (72) and MLA (192 / 128) head sizes, float32 and bf16 out, strided inputs.
* Independence: a batch row's bits do not depend on the other rows, nor a query's on the
  other queries of its call; the mask's memo follows in-place changes of the mask.
* The model: MLA and MHA prefill with the kernel against their torch float32 attention.

The numeric tests need a CPU with AVX-512 BF16, and for the AMX kernel AMX (hardware
conditions): elsewhere they skip and the tests of the choice check that the kernel is never
chosen.
"""

from __future__ import annotations

import pytest
import torch

from dsvl2.config import LanguageConfig
from dsvl2.model import native, ops
from dsvl2.model.attention import MHA, MLA
from dsvl2.model.cache import KVCache, StepContext, row_tables
from dsvl2.model.native import amx
from dsvl2.model.native.cpu import cpu_info
from dsvl2.model.rope import RotaryEmbedding

needs_kernel = pytest.mark.skipif(
    not native.attention_usable(),
    reason="hardware: attention_bf16 needs a CPU with AVX-512 BF16 (and the native kernels built with its "
           "intrinsics); this machine has not")

KERNELS = {"native": (lambda: native.attention_bf16, native.attention_usable,
                      "a CPU with AVX-512 BF16 (and the native kernels built with its intrinsics)"),
           "amx": (lambda: native.attention_bf16_amx, lambda: native.attention_usable() and amx.usable(),
                   "a CPU with AMX-TILE / AMX-BF16 that the kernel lets this process use, and a GCC >= 11 build")}


@pytest.fixture(params=list(KERNELS))
def attend(request):
    """The kernel under test: attention.c's, or amx_attention.c's (the same documented numbers)."""
    fn, usable, needs = KERNELS[request.param]
    if not usable():
        pytest.skip(f"hardware: the {request.param} attention kernel needs {needs}; this machine has not")
    return fn()


BF = torch.bfloat16
MIN = torch.finfo(torch.float32).min  # the model's additive mask value for a hidden key


def _rand(*shape, seed=0, scale=1.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


def random_qkv(b, h, hk, t, s, dk, dv, seed=0):
    """bf16 q [B, H, T, dk], k [B, Hk, S, dk], v [B, Hk, S, dv]. q is scaled up so that the
    softmax is peaked (a few keys carry most of the weight), not a near-uniform average."""
    return (_rand(b, h, t, dk, seed=seed, scale=2.0).to(BF), _rand(b, hk, s, dk, seed=seed + 1).to(BF),
            _rand(b, hk, s, dv, seed=seed + 2).to(BF))


def causal_mask(b, t, s):
    """[B, 1, T, S]: query i (at position S - T + i) sees keys 0 .. S - T + i."""
    visible = torch.ones(t, s, dtype=torch.bool).tril(s - t)
    return torch.zeros(b, 1, t, s).masked_fill_(~visible, MIN)


def _scores(q, k, scale, mask):
    """float64 scale q k^T + mask [B, H, T, S]; query head h reads kv head h // (H / Hk)."""
    q, k = q.double(), k.double().repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    s = q @ k.transpose(-1, -2) * scale
    return s if mask is None else s + mask.double()


def v_per_head(v, h):
    """float64 v with its kv heads repeated for the H query heads [B, H, S, dv]."""
    return v.double().repeat_interleave(h // v.shape[1], dim=1)


def modelled(q, k, v, scale, mask=None, delta=0.0):
    """The kernel's documented rounding in float64: bf16 inputs (q, k, v already are), the
    unnormalised weights exp(s - max) rounded to bf16 (nearest even, torch's cast) for the
    product with v, divided by the sum of the unrounded weights. With ``delta``: also how
    far the result may move where a weight known only to a relative ``delta`` (the
    kernel's are float32) rounds to the other bf16 neighbour: sum_j |up_j - down_j| |v_j|
    / sum, up / down the roundings of the weight x (1 +- delta)."""
    s = _scores(q, k, scale, mask)
    e = (s - s.amax(-1, keepdim=True)).exp()
    vv, total = v_per_head(v, q.shape[1]), e.sum(-1, keepdim=True)
    out = (e.to(BF).double() @ vv) / total
    if not delta:
        return out
    either = ((e * (1 + delta)).to(BF).double() - (e * (1 - delta)).to(BF).double()).abs()
    return out, (either @ vv.abs()) / total


def plain(q, k, v, scale, mask=None):
    """softmax(scale q k^T + mask) v in float64, nothing rounded."""
    return _scores(q, k, scale, mask).softmax(-1) @ v_per_head(v, q.shape[1])


def _err(got, want, v):
    """max |got - want| relative to max |v| (the output is a convex combination of v's rows)."""
    return ((got.double() - want).abs().max() / v.double().abs().max()).item()


# The kernel against ``modelled``: its scores, exp and sums are float32 (exp to a few ulps),
# so its weights differ from the float64 ones by ~1e-6 relative. The sums move the result by
# about that (measured <= 4.1e-7 x max|v| over 60 seeds of the cases below: BASE_TOL 2e-6).
# A weight that close to the midpoint of two bf16 values rounds to the other one, moving the
# result by up to its share x 2^-8 x |v| (measured 1.6e-4 x max|v| in one case, a weight with
# a ~4% share; a flat 1e-4 fails there): allowed element by element where the weight
# x (1 +- DELTA) rounds both ways, nowhere else (DELTA 2e-6 sufficed over those 60 seeds).
BASE_TOL, DELTA = 2e-6, 5e-6
# Against ``plain``: each weight rounded to bf16 is off by at most 2^-9 relative, so the
# weighted average of v (divided by the unrounded sum) is off by at most 2^-9 x max|v|.
PLAIN_TOL = 2 ** -9 + BASE_TOL


def assert_like_the_kernel(got, q, k, v, scale, mask=None):
    """``got`` is the modelled rounding's result to float32, and not the unrounded one's."""
    want, flips = modelled(q, k, v, scale, mask, DELTA)
    room = flips + BASE_TOL * v.double().abs().max()
    err = (got.double() - want).abs()
    assert (err <= room).all(), ((err - room).max().item(), _err(got, want, v))
    assert _err(got, plain(q, k, v, scale, mask), v) < PLAIN_TOL
    # the rounding modelled is the kernel's: the unrounded formula misses the same bound
    assert ((got.double() - plain(q, k, v, scale, mask)).abs() > room).any()


# (B, H, Hk, T, S, dk, dv, mask): head sizes of the vision tower (72) and MLA (192 / 128),
# grouped kv heads (2 and 1 for 4), T and S across the kernels' tiles (attention.c: 8
# queries, 32 keys; amx_attention.c: 32 queries, 32 keys, 32 dims, 16 / 32 value columns)
# and not multiples of them, a causal prefill chunk after S - T cached keys
CASES = {
    "vision": (2, 3, 3, 37, 37, 72, 72, None),
    "mla_chunk": (1, 4, 4, 21, 53, 192, 128, "causal"),
    "gqa2_causal": (2, 4, 2, 11, 35, 64, 64, "causal"),
    "mqa_dv_tail": (1, 4, 1, 17, 17, 32, 48, "causal"),
    "one_query": (1, 2, 1, 1, 33, 8, 6, None),  # S = 32 + 1: a last key block of one key
    "query_blocks": (1, 2, 2, 70, 101, 192, 128, "causal"),
}


@pytest.mark.parametrize("case", CASES)
def test_matches_the_modelled_rounding_and_plain_float64(attend, case):
    b, h, hk, t, s, dk, dv, kind = CASES[case]
    q, k, v = random_qkv(b, h, hk, t, s, dk, dv)
    mask = causal_mask(b, t, s) if kind == "causal" else None
    scale = dk ** -0.5
    got = attend(q, k, v, scale, mask)
    assert got.dtype == torch.float32 and got.shape == (b, h, t, dv)
    assert_like_the_kernel(got, q, k, v, scale, mask)


def padding_case():
    """Row 1 of a batch: its first 3 queries see keys causally up to its length 5, its other
    queries are padding and see no key (every mask value MIN). (q, k, v, mask, the uniform
    average of all S keys' v that each padding query of row 1 should get [H, T - 3, dv])."""
    b, h, hk, t, s, dk, dv = 2, 4, 2, 10, 41, 64, 40
    q, k, v = random_qkv(b, h, hk, t, s, dk, dv, seed=3)
    mask = causal_mask(b, t, s)
    mask[1] = MIN
    mask[1, 0, :3, :5] = causal_mask(1, 3, 5)[0, 0]
    return q, k, v, mask, v_per_head(v, h)[1].mean(1, keepdim=True).expand(h, t - 3, dv)


def test_padding_queries_without_visible_keys_average_all_keys(attend):
    """``padding_case``: torch's softmax over equal scores, a uniform average of all S keys'
    v, finite."""
    q, k, v, mask, uniform = padding_case()
    got = attend(q, k, v, 0.125, mask)
    assert torch.isfinite(got).all()
    assert _err(got[1, :, 3:], uniform, v) < BASE_TOL  # weights all exp(0) = 1: exact in bf16
    assert_like_the_kernel(got, q, k, v, 0.125, mask)


@pytest.mark.parametrize("case", ["vision", "mla_chunk"])
def test_bf16_out_is_the_float32_out_rounded(attend, case):
    b, h, hk, t, s, dk, dv, kind = CASES[case]
    q, k, v = random_qkv(b, h, hk, t, s, dk, dv, seed=5)
    mask = causal_mask(b, t, s) if kind == "causal" else None
    f32 = attend(q, k, v, dk ** -0.5, mask)
    out = torch.full((b, h, t, dv), float("nan"), dtype=BF)
    assert attend(q, k, v, dk ** -0.5, mask, out=out) is out
    assert torch.equal(out, f32.to(BF))


def test_strided_views_of_a_fused_qkv_give_the_bits_of_contiguous_copies(attend):
    """As the vision tower calls it: q, k, v views of one [N, P, 3, H, hd] tensor, the output
    written through a [N, H, P, hd] view of [N, P, H, hd]; a mask through a broadcast batch."""
    n, p, heads, hd = 2, 29, 3, 72
    qkv = _rand(n, p, 3, heads, hd, seed=7).to(BF)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # [N, H, P, hd]
    assert not q.is_contiguous()
    heads_out = torch.empty(n, p, heads, hd)
    attend(q, k, v, hd ** -0.5, out=heads_out.transpose(1, 2))
    want = attend(q.contiguous(), k.contiguous(), v.contiguous(), hd ** -0.5)
    assert torch.equal(heads_out.transpose(1, 2), want)
    mask = causal_mask(1, p, p)
    got = attend(q, k, v, hd ** -0.5, mask.expand(n, 1, p, p))
    want = attend(q.contiguous(), k.contiguous(), v.contiguous(), hd ** -0.5,
                                 mask.repeat(n, 1, 1, 1))
    assert torch.equal(got, want)
    assert_like_the_kernel(got, q, k, v, hd ** -0.5, mask)


def test_a_rows_bits_do_not_depend_on_the_other_rows(attend):
    b, h, hk, t, s, dk, dv = 3, 4, 2, 13, 40, 192, 128
    q, k, v = random_qkv(b, h, hk, t, s, dk, dv, seed=11)
    mask = causal_mask(b, t, s)
    mask[2, :, :, 30:] = MIN  # a shorter row
    both = attend(q, k, v, 0.1, mask)
    for i in range(b):
        alone = attend(q[i:i + 1], k[i:i + 1], v[i:i + 1], 0.1, mask[i:i + 1])
        assert torch.equal(both[i:i + 1], alone), i


@pytest.mark.parametrize("split", [5, 8, 20, 32])
def test_queries_in_two_calls_give_the_bits_of_one_call(attend, split):
    """The first queries of a prefill, then the rest (the same keys, their mask rows): the
    bits of all of them at once; splits inside and at the kernels' 8- and 32-query tiles."""
    b, h, hk, t, s, dk, dv = 2, 4, 1, 45, 71, 72, 72
    q, k, v = random_qkv(b, h, hk, t, s, dk, dv, seed=13)
    mask = causal_mask(b, t, s)
    whole = attend(q, k, v, 0.2, mask)
    first = attend(q[:, :, :split], k, v, 0.2, mask[:, :, :split])
    rest = attend(q[:, :, split:], k, v, 0.2, mask[:, :, split:])
    assert torch.equal(torch.cat([first, rest], dim=2), whole)


def test_a_mask_changed_in_place_changes_the_result(attend):
    """The wrapper remembers the keys each query row sees per mask; writing into the mask
    (its version changes) must be seen, both hiding keys and showing them again."""
    b, h, hk, t, s, dk, dv = 1, 2, 2, 9, 40, 32, 32
    q, k, v = random_qkv(b, h, hk, t, s, dk, dv, seed=17)
    mask = causal_mask(b, t, s)
    causal = attend(q, k, v, 0.3, mask)
    mask.zero_()  # every key visible: keys the memo's limits would skip now count
    everything = attend(q, k, v, 0.3, mask)
    assert torch.equal(everything, attend(q, k, v, 0.3, None))
    assert not torch.equal(everything, causal)
    mask[..., 20:] = MIN  # hide keys again
    got = attend(q, k, v, 0.3, mask)
    assert torch.equal(got, attend(q, k, v, 0.3, mask.clone()))
    assert_like_the_kernel(got, q, k, v, 0.3, mask)


def test_no_mask_gives_a_zero_masks_bits_across_a_wide_score_range(attend):
    """Without a mask the kernel takes the row's max on the raw scores (scaled once after)
    and its exponential without the clamp at -150 (products.h softmax_row): the bits of a
    mask of zeros (the scaled max, the clamped exponential) where scores spread over
    hundreds, so that many weights fall below 2^-150 (underflow either way); a negative
    scale (the max of scaled scores, not of raw ones) is the modelled rounding too."""
    b, h, hk, t, s, dk, dv = 1, 2, 2, 19, 70, 64, 40
    q, k, v = random_qkv(b, h, hk, t, s, dk, dv, seed=23)
    q = (q.float() * 8).to(BF)  # scores in the hundreds
    zeros = torch.zeros(b, 1, t, s)
    for scale in (0.7, 2.5):
        got = attend(q, k, v, scale, None)
        assert torch.equal(got, attend(q, k, v, scale, zeros)), scale
    assert _scores(q, k, 2.5, None).amax(-1, keepdim=True).sub(_scores(q, k, 2.5, None)).max() > 300
    q, k, v = random_qkv(b, h, hk, t, s, dk, dv, seed=29)
    got = attend(q, k, v, -0.2, None)
    assert torch.equal(got, attend(q, k, v, -0.2, zeros))
    assert_like_the_kernel(got, q, k, v, -0.2)


def test_one_mask_broadcast_over_batches_of_different_sizes(attend):
    """A [1, 1, T, S] mask used with B = 1, then with B = 3 (the memo of its limits is per B):
    every row of the second call equals a call with a fresh copy of the mask."""
    t, s, dk, dv = 11, 37, 16, 16
    mask = causal_mask(1, t, s)
    q1, k1, v1 = random_qkv(1, 2, 2, t, s, dk, dv, seed=21)
    attend(q1, k1, v1, 0.25, mask)
    q, k, v = random_qkv(3, 2, 2, t, s, dk, dv, seed=22)
    got = attend(q, k, v, 0.25, mask)
    assert torch.equal(got, attend(q, k, v, 0.25, mask.clone()))
    assert_like_the_kernel(got, q, k, v, 0.25, mask.expand(3, 1, t, s))


# ---- when the kernel is chosen ----------------------------------------------------------------

class _Lib:
    """The loaded library with ``dsvl2_attention_built`` answering ``built``: a new object,
    so ``attention_usable`` decides again for it."""

    def __init__(self, lib, built: int):
        self._lib, self._built = lib, built

    def dsvl2_attention_built(self):
        return self._built

    def __getattr__(self, name):
        return getattr(self._lib, name)


def _usable_by_the_facts() -> bool:
    flags = cpu_info()[1]
    return (native.available() and all(f in flags for f in native.ATTENTION_FLAGS)
            and bool(native.require().dsvl2_attention_built()))


def test_attention_usable_is_kernels_cpu_flags_and_build():
    assert {"avx512f", "avx512_bf16"} <= set(native.ATTENTION_FLAGS)
    assert native.attention_usable() == _usable_by_the_facts()


@pytest.mark.skipif(not native.available(), reason=f"native kernels unavailable: {native.status()['reason']}")
@pytest.mark.parametrize("drop_flag,built", [("avx512_bf16", 1), ("avx512bw", 1), (None, 0), (None, 1)])
def test_never_chosen_without_avx512_bf16_or_the_built_kernel(drop_flag, built, monkeypatch):
    """This machine's library as seen on a CPU without one of the flags, or built by a
    compiler without the intrinsics: not usable, and the model never chooses the kernel
    (the last case, every flag and the kernel built, shows the seam itself says yes)."""
    proxy = _Lib(native.require(), built)
    name, flags = cpu_info()
    flags = (flags | set(native.ATTENTION_FLAGS)) - {drop_flag}
    monkeypatch.setattr(native, "cpu_info", lambda: (name, flags))
    monkeypatch.setattr(native, "require", lambda: proxy)
    usable = drop_flag is None and built == 1
    assert native.attention_usable() is usable
    before = ops.big_products_in_weights_dtype()
    ops.set_big_products_in_weights_dtype(True)
    try:
        assert ops.attention_in_bf16(torch.zeros(2, 8), torch.zeros(8, 8, dtype=BF)) is usable
    finally:
        ops.set_big_products_in_weights_dtype(before)
    monkeypatch.undo()
    assert native.attention_usable() == _usable_by_the_facts()  # decided again for the real library


def test_attention_in_bf16_only_for_bf16_prefill_under_the_bf16_policy(monkeypatch):
    from dsvl2.model import quant

    x = _rand(3, 16)
    bf16, f32 = _rand(8, 16, seed=1).to(BF), _rand(8, 16, seed=1)
    int8 = quant.QuantWeight.quantize(f32, 8)
    before = ops.big_products_in_weights_dtype()
    ops.set_big_products_in_weights_dtype(True)
    try:
        usable = native.attention_usable()
        assert ops.attention_in_bf16(x, bf16) == usable  # the one case that may take it
        assert ops.attention_in_bf16(x, int8) == usable
        assert not ops.attention_in_bf16(x, f32)  # float32 weights: the oracle
        assert not ops.attention_in_bf16(x.to(BF), bf16)  # activations not float32
        with ops.decoding():
            assert not ops.attention_in_bf16(x, bf16)
        monkeypatch.setattr(ops, "native_attention", False)
        assert not ops.attention_in_bf16(x, bf16)
        monkeypatch.undo()
        ops.set_big_products_in_weights_dtype(False)
        assert not ops.attention_in_bf16(x, bf16)
    finally:
        ops.set_big_products_in_weights_dtype(before)


# ---- the model's prefill ----------------------------------------------------------------------

def filled(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    with torch.no_grad():
        for i, (name, p) in enumerate(module.named_parameters()):
            p.copy_(_rand(*p.shape, seed=seed + i, scale=0.3) + (1.0 if "layernorm" in name else 0.0))
    return module.to(BF)


def prefill_chunk(cfg: LanguageConfig, module, native_on: bool, monkeypatch,
                  kernel: str = "native") -> tuple[torch.Tensor, int]:
    """A prefill chunk of T = 13 tokens after 20 cached ones per row (row 1 padded: its last
    4 queries are pads, its keys from 29 on hidden), under the bf16 policy with ``kernel``
    ("native", "torch" or "amx") chosen: the output and the number of calls of its wrapper."""
    b, t, cached, bs = 2, 13, 20, 16
    s = cached + t
    cache = KVCache(cfg, 1 + b * 3, block_size=bs)
    for pool in cache.layers[0]:  # earlier tokens: any values
        pool.copy_(_rand(*pool.shape, seed=40, scale=0.5))
    positions = torch.arange(cached, s).expand(b, t)
    cos, sin = RotaryEmbedding(cfg)(positions)
    mask = causal_mask(b, t, s)
    mask[1, :, :, cached + t - 4:] = MIN
    ctx = StepContext(cos, sin, mask, cache=cache, table=row_tables(b, 48, bs), write_pos=positions, kv_len=s)
    calls = []
    name = {"native": "attention_bf16", "torch": "attention_bf16_torch", "amx": "attention_bf16_amx"}[kernel]
    real = getattr(native, name)
    monkeypatch.setattr(native, name, lambda *a, **kw: calls.append(1) or real(*a, **kw))
    monkeypatch.setattr(ops, "native_attention", native_on)
    monkeypatch.setattr(ops, "attention_kernel", kernel)
    before = ops.big_products_in_weights_dtype()
    ops.set_big_products_in_weights_dtype(True)
    try:
        with torch.no_grad():
            out = module(_rand(b, t, cfg.hidden_size, seed=41), ctx)
    finally:
        ops.set_big_products_in_weights_dtype(before)
        monkeypatch.undo()
    return out, len(calls)


def _check_model(cfg, module, monkeypatch, kernel):
    fast, calls = prefill_chunk(cfg, module, True, monkeypatch, kernel)
    slow, none = prefill_chunk(cfg, module, False, monkeypatch, kernel)
    assert (calls, none) == (1, 0)
    assert torch.isfinite(fast).all()
    # o_proj's result is bf16 under the policy (one ulp at the max: 2^-8 ~ 4e-3 of it); the
    # kernel also rounds q and the weights to bf16: measured ~5e-3 (1-2 ulps), allowed 4 ulps
    err = ((fast - slow).abs().max() / slow.abs().max()).item()
    assert err < 4 * 2 ** -8, err
    assert not torch.equal(fast, slow)  # the kernel ran, not torch's float32 attention


def test_mla_prefill_chunk_with_the_kernel_matches_torch_attention(attend, monkeypatch):
    cfg = LanguageConfig(hidden_size=64, num_hidden_layers=1, num_attention_heads=4, vocab_size=32, use_mla=True,
                         kv_lora_rank=40, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=24,
                         q_lora_rank=24)
    _check_model(cfg, filled(MLA(cfg, 0), seed=0), monkeypatch, _kernel_name(attend))


def test_mha_prefill_chunk_with_grouped_kv_heads_and_the_kernel_matches_torch_attention(attend, monkeypatch):
    cfg = LanguageConfig(hidden_size=64, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                         vocab_size=32, use_mla=False)
    _check_model(cfg, filled(MHA(cfg, 0), seed=10), monkeypatch, _kernel_name(attend))


def _kernel_name(fn) -> str:
    return "amx" if fn is native.attention_bf16_amx else "native"


@pytest.mark.skipif(not (native.attention_usable() and amx.usable()),
                    reason="hardware: needs AMX-TILE / AMX-BF16 and AVX-512 BF16")
def test_mla_prefill_expands_kv_on_amx_where_it_takes_the_shape(monkeypatch):
    """kv_b_proj [H (dn + dv), r] with r and H (dn + dv) multiples of 32: its prefill product
    runs on AMX (float32 sums rounded to bf16 once) and the block still matches torch's
    float32 attention as above; with AMX off it is oneDNN's."""
    cfg = LanguageConfig(hidden_size=64, num_hidden_layers=1, num_attention_heads=4, vocab_size=32, use_mla=True,
                         kv_lora_rank=64, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16, q_lora_rank=24)
    seen = []
    real = amx.linear
    monkeypatch.setattr(amx, "linear", lambda x, w, *a, **kw: seen.append(tuple(w.shape)) or real(x, w, *a, **kw))
    _check_model(cfg, filled(MLA(cfg, 0), seed=0), monkeypatch, "amx")
    assert (128, 64) in seen
