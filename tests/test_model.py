"""Model pieces against independent references: MoE dispatch and routing, MLA paths, RoPE,
projector block order, image-token assembly, left padding and the KV cache."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

from dsvl2.config import (
    LanguageConfig,
    ModelConfig,
    ProjectorConfig,
    VisionConfig,
    load_config,
    yarn_mscale,
)
from dsvl2.model.cache import KVCache, row_tables
from dsvl2.model.moe import Experts, Gate, Routing
from dsvl2.model.rope import RotaryEmbedding, apply_rope, yarn_inv_freq
from dsvl2.model.vision import Projector
from dsvl2.model.vl import DeepseekVL2
from dsvl2.checkpoint.load import load_model
from _paths import GOLDEN

_MODELS: dict[str, DeepseekVL2] = {}


pytestmark = pytest.mark.usefixtures("one_thread")


def golden_model(variant: str) -> DeepseekVL2:
    """float32 golden model, loaded once per test session (tests never modify it)."""
    if variant not in _MODELS:
        _MODELS[variant] = load_model(GOLDEN / variant, dtype=torch.float32)
    return _MODELS[variant]


def golden_tensors(path: Path, *keys: str) -> list[torch.Tensor]:
    with safe_open(str(path), framework="pt") as h:
        return [h.get_tensor(k) for k in keys]


# ---- MoE dispatch -----------------------------------------------------------------------------

def _random_experts(n: int = 7, d: int = 12, f: int = 10, seed: int = 0) -> Experts:
    g = torch.Generator().manual_seed(seed)
    ex = Experts(n, d, f).double()
    with torch.no_grad():
        for p in ex.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.3)
    return ex


def _random_routing(n_tokens: int, k: int, allowed: list[int], seed: int = 1) -> Routing:
    g = torch.Generator().manual_seed(seed)
    allowed_t = torch.tensor(allowed)
    idx = torch.stack([allowed_t[torch.randperm(len(allowed), generator=g)[:k]] for _ in range(n_tokens)])
    return Routing(idx, torch.rand(n_tokens, k, generator=g, dtype=torch.float64))


@pytest.mark.parametrize("k", [1, 3])
def test_grouped_dispatch_equals_reference(k):
    ex = _random_experts()
    x = torch.randn(25, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    routing = _random_routing(25, k, allowed=[0, 1, 2, 4, 5])  # experts 3 and 6 get nothing
    with torch.no_grad():
        fast, ref = ex(x, routing), ex.reference_dispatch(x, routing)
    assert torch.allclose(fast, ref, atol=1e-12, rtol=0)
    # and the reference itself is the textbook formula sum_j w_j * down(silu(gate x) * up x)
    t, j = 7, k - 1
    e = int(routing.idx[t, j])
    one = (F.silu(x[t] @ ex.gate_proj[e].T) * (x[t] @ ex.up_proj[e].T)) @ ex.down_proj[e].T
    others = sum(routing.weight[t, i] * ex.expert(int(routing.idx[t, i]), x[t:t + 1])[0] for i in range(k - 1))
    assert torch.allclose(ref[t], routing.weight[t, j] * one + others, atol=1e-12)


def test_experts_without_tokens_are_never_called():
    calls: list[tuple[int, int]] = []

    class Counting(Experts):  # the dispatch under test, with each expert call recorded
        def expert(self, e, xs):
            calls.append((e, xs.shape[0]))
            return super().expert(e, xs)

    ex = Counting(7, 12, 10).double()
    ex.load_state_dict(_random_experts().state_dict())
    x = torch.randn(9, 12, dtype=torch.float64)
    routing = _random_routing(9, 2, allowed=[1, 4, 5])
    with torch.no_grad():
        ex(x, routing)
    assert sorted(e for e, _ in calls) == [1, 4, 5]  # one call per used expert, none for the others
    counts = torch.bincount(routing.idx.reshape(-1), minlength=7)
    assert all(n == counts[e] for e, n in calls)  # each call got all of its expert's tokens at once


def test_float32_dispatch_matches_reference_closely():
    ex = _random_experts().float()
    x = torch.randn(30, 12, generator=torch.Generator().manual_seed(2))
    routing = _random_routing(30, 4, allowed=list(range(7)))
    routing = Routing(routing.idx, routing.weight.float())
    with torch.no_grad():
        # float32 rounding differs between a 1-row and a k-row product; a wrong expert,
        # weight or token would differ by ~0.1
        assert torch.allclose(ex(x, routing), ex.reference_dispatch(x, routing), atol=1e-5, rtol=0)


# ---- Gate routing -----------------------------------------------------------------------------

def _gate(e: int, k: int, method: str = "greedy", scoring: str = "softmax", n_group=None, topk_group=None,
          norm: bool = False, rsf: float = 1.0, bias: list[float] | None = None) -> Gate:
    cfg = LanguageConfig(vocab_size=8, hidden_size=e, intermediate_size=8, num_hidden_layers=1, n_routed_experts=e,
                         moe_intermediate_size=4, num_experts_per_tok=k, topk_method=method,
                         scoring_func=scoring, n_group=n_group, topk_group=topk_group,
                         norm_topk_prob=norm, routed_scaling_factor=rsf)
    cfg.validate()
    gate = Gate(cfg)
    with torch.no_grad():
        gate.weight.copy_(torch.eye(e))  # logits = x: the test chooses the logits directly
        if bias is not None:
            gate.e_score_correction_bias.copy_(torch.tensor(bias, dtype=torch.float32))
    return gate


def _route(gate: Gate, logits: list[float]) -> list[tuple[int, float]]:
    r = gate(torch.tensor([logits], dtype=torch.float32))
    return sorted(zip(r.idx[0].tolist(), r.weight[0].tolist()))


def _reference_route(logits, k, method="greedy", scoring="softmax", n_group=1, topk_group=1, norm=False,
                     rsf=1.0, bias=None):
    """The reference's MoEGate in plain Python floats (masked experts filled with 0.0)."""
    if scoring == "softmax":
        m = max(logits)
        ex = [math.exp(v - m) for v in logits]
        scores = [v / sum(ex) for v in ex]
    else:
        scores = [1 / (1 + math.exp(-v)) for v in logits]
    choice = scores if bias is None else [s + b for s, b in zip(scores, bias)]
    if method != "greedy":
        size = len(scores) // n_group
        groups = [choice[g * size:(g + 1) * size] for g in range(n_group)]
        if method == "noaux_tc":
            gscore = [sum(sorted(grp, reverse=True)[:2]) for grp in groups]
        else:
            gscore = [max(grp) for grp in groups]
        kept = sorted(range(n_group), key=lambda g: -gscore[g])[:topk_group]
        choice = [c if i // size in kept else 0.0 for i, c in enumerate(choice)]
    idx = sorted(range(len(choice)), key=lambda i: -choice[i])[:k]
    w = [scores[i] for i in idx]
    if k > 1 and norm:
        w = [v / (sum(w) + 1e-20) for v in w]
    return sorted(zip(idx, [v * rsf for v in w]))


def _assert_routes(got, want, rel=1e-5):
    assert [i for i, _ in got] == [i for i, _ in want]
    for (_, a), (_, b) in zip(got, want):
        assert a == pytest.approx(b, rel=rel, abs=1e-30)


def test_greedy_picks_top_k():
    logits = [0.1, 2.0, -1.0, 1.5, 0.0, 0.3]
    got = _route(_gate(6, 2), logits)
    p = torch.tensor(logits, dtype=torch.float64).softmax(-1)
    assert [i for i, _ in got] == [1, 3]
    _assert_routes(got, [(1, p[1].item()), (3, p[3].item())])
    _assert_routes(got, _reference_route(logits, 2))


def test_group_limited_greedy_keeps_groups_with_best_max():
    # groups of 2: max picks g0 (.20) and g2 (.15); sum would pick g3 (.27) and g1 (.24);
    # the global top-3 (.20, .15, .14) would take expert 6 from a dropped group
    p = [0.20, 0.02, 0.12, 0.12, 0.15, 0.01, 0.14, 0.13]
    logits = [math.log(v) for v in p]
    gate = _gate(8, 3, "group_limited_greedy", n_group=4, topk_group=2, rsf=1.5)
    got = _route(gate, logits)
    assert [i for i, _ in got] == [0, 1, 4]
    total = sum(p)
    _assert_routes(got, [(0, 1.5 * 0.20 / total), (1, 1.5 * 0.02 / total), (4, 1.5 * 0.15 / total)])
    _assert_routes(got, _reference_route(logits, 3, "group_limited_greedy", n_group=4, topk_group=2, rsf=1.5))
    # keeping every group is plain greedy
    all_groups = _route(_gate(8, 3, "group_limited_greedy", n_group=4, topk_group=4, rsf=1.5), logits)
    assert [i for i, _ in all_groups] == [0, 4, 6]


def _logits_and_bias(unbiased: list[float], biased: list[float]) -> tuple[list[float], list[float]]:
    logits = [math.log(s / (1 - s)) for s in unbiased]
    actual = torch.tensor(logits, dtype=torch.float32).sigmoid().tolist()
    return logits, [b - s for b, s in zip(biased, actual)]


def test_noaux_tc_group_score_is_top2_sum_and_weights_are_unbiased():
    # biased scores, groups of 4: max -> g0 (.9); top-2 sum -> g1 (1.2); full sum -> g2 (1.95)
    biased = [0.9, 0.1, 0.1, 0.1, 0.6, 0.05, 0.6, 0.05, 0.5, 0.5, 0.5, 0.45]
    unbiased = [0.5, 0.3, 0.6, 0.2, 0.7, 0.4, 0.25, 0.55, 0.35, 0.45, 0.65, 0.15]
    logits, bias = _logits_and_bias(unbiased, biased)
    gate = _gate(12, 2, "noaux_tc", "sigmoid", n_group=3, topk_group=1, norm=True, rsf=2.0, bias=bias)
    got = _route(gate, logits)
    assert [i for i, _ in got] == [4, 6]
    s4, s6 = unbiased[4], unbiased[6]
    _assert_routes(got, [(4, 2.0 * s4 / (s4 + s6)), (6, 2.0 * s6 / (s4 + s6))])
    _assert_routes(got, _reference_route(logits, 2, "noaux_tc", "sigmoid", 3, 1, True, 2.0, bias))


def test_noaux_tc_masked_experts_are_zero_not_minus_inf():
    """All biased scores negative: the 0.0 fill of dropped groups outranks every kept expert."""
    biased = [-0.1, -0.2, -0.5, -0.6, -0.15, -0.05, -0.9, -0.8]  # group top-2 sums -.3 -1.1 -.2 -1.7
    unbiased = [0.6, 0.3, 0.45, 0.7, 0.2, 0.5, 0.35, 0.55]
    logits, bias = _logits_and_bias(unbiased, biased)
    assert all(b < 0 for b in bias)
    gate = _gate(8, 4, "noaux_tc", "sigmoid", n_group=4, topk_group=2, norm=True, rsf=2.0, bias=bias)
    got = _route(gate, logits)
    # kept groups g0, g2 (experts 0, 1, 4, 5) score below the zeros of g1, g3 (experts 2, 3, 6, 7)
    assert [i for i, _ in got] == [2, 3, 6, 7]
    tot = sum(unbiased[i] for i in (2, 3, 6, 7))
    _assert_routes(got, [(i, 2.0 * unbiased[i] / tot) for i in (2, 3, 6, 7)])
    _assert_routes(got, _reference_route(logits, 4, "noaux_tc", "sigmoid", 4, 2, True, 2.0, bias))


def test_norm_topk_prob_epsilon_and_scaling():
    # tiny sigmoid scores: w / (sum + 1e-20) keeps them tiny instead of renormalising to 1/k
    logits = [-60.0, -61.0, -80.0, -62.0]
    got = _route(_gate(4, 2, scoring="sigmoid", norm=True, rsf=3.0), logits)
    s = torch.tensor(logits, dtype=torch.float32).sigmoid().double()
    denom = s[0] + s[1] + 1e-20
    _assert_routes(got, [(0, 3.0 * (s[0] / denom).item()), (1, 3.0 * (s[1] / denom).item())], rel=1e-4)
    assert all(w < 1e-5 for _, w in got)
    # scores that underflow to exactly 0 give weights 0, not NaN
    zeros = _route(_gate(4, 2, scoring="sigmoid", norm=True, rsf=3.0), [-200.0, -201.0, -202.0, -203.0])
    assert [w for _, w in zeros] == [0.0, 0.0]
    # ordinary scores: normalised weights sum to routed_scaling_factor
    logits = [0.3, -0.2, 1.1, 0.4, -1.0]
    got = _route(_gate(5, 3, scoring="sigmoid", norm=True, rsf=2.0), logits)
    assert sum(w for _, w in got) == pytest.approx(2.0, rel=1e-6)
    _assert_routes(got, _reference_route(logits, 3, scoring="sigmoid", norm=True, rsf=2.0))


def test_routed_scaling_factor_without_normalisation():
    logits = [0.3, -0.2, 1.1, 0.4, -1.0]
    p = torch.tensor(logits, dtype=torch.float64).softmax(-1)
    got = _route(_gate(5, 2, norm=False, rsf=2.5), logits)
    _assert_routes(got, [(2, 2.5 * p[2].item()), (3, 2.5 * p[3].item())])
    # k = 1: norm_topk_prob has no effect, the scaling still applies
    got = _route(_gate(5, 1, norm=True, rsf=2.5), logits)
    _assert_routes(got, [(2, 2.5 * p[2].item())])


# ---- MLA: absorbed vs expanded ----------------------------------------------------------------

@pytest.mark.parametrize("variant", ["small", "base", "dsv2x"])
def test_mla_absorbed_equals_expanded(variant):
    lm = golden_model(variant).language
    d = lm.cfg.hidden_size
    am = torch.ones(2, 9, dtype=torch.bool)
    am[1, :3] = False  # left padding
    _, ctx = lm.padded_context(am)
    x = torch.randn(2, 9, d, generator=torch.Generator().manual_seed(0))
    for layer in (0, lm.cfg.num_hidden_layers - 1):
        attn = lm.model.layers[layer].self_attn
        with torch.no_grad():
            a = attn(x, ctx, absorbed=True)
            e = attn(x, ctx, absorbed=False)
        assert torch.isfinite(a).all() and a.abs().max() > 0.1
        assert torch.allclose(a, e, atol=1e-5, rtol=0), (a - e).abs().max()
    if variant == "dsv2x":
        assert hasattr(lm.model.layers[0].self_attn, "q_a_proj")


@pytest.mark.parametrize("variant", ["small", "dsv2x"])
def test_mla_expanded_runs_fused_attention_and_matches_float64(variant):
    """The expanded (prefill) MLA pads v to q's head size so that torch's fused CPU attention
    takes it (with only the fused kernel allowed, an ineligible call raises); the result
    matches the attention formula computed in float64 from the same q, k and v."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    lm = golden_model(variant).language
    attn = lm.model.layers[0].self_attn
    g = torch.Generator().manual_seed(1)
    b, t, s, h = 2, 5, 9, attn.h
    q_nope, q_pe = torch.randn(b, h, t, attn.dn, generator=g), torch.randn(b, h, t, attn.dr, generator=g)
    ckv = torch.randn(b, s, attn.r + attn.dr, generator=g)
    visible = torch.ones(t, s, dtype=torch.bool).tril(s - t)[None].repeat(b, 1, 1)
    visible[1, :, :2] = False  # a padded row's first keys
    mask = torch.zeros(b, 1, t, s).masked_fill_(~visible[:, None], torch.finfo(torch.float32).min)
    with torch.no_grad(), sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        got = attn._expanded(q_nope, q_pe, ckv, mask)
    with torch.no_grad():
        kv = attn.kv_b_proj(ckv[..., : attn.r]).double().view(b, s, h, attn.dn + attn.dv).transpose(1, 2)
    k = torch.cat([kv[..., : attn.dn], ckv[:, None, :, attn.r:].double().expand(b, h, s, attn.dr)], dim=-1)
    q = torch.cat([q_nope, q_pe], dim=-1).double()
    p = (q @ k.transpose(-1, -2) * attn.scale).masked_fill(~visible[:, None], float("-inf")).softmax(-1)
    want = p @ kv[..., attn.dn:]
    assert got.shape == want.shape == (b, h, t, attn.dv)
    assert torch.allclose(got.double(), want, atol=1e-5, rtol=1e-5), (got.double() - want).abs().max()


# ---- RoPE ---------------------------------------------------------------------------------------

def _complex_rotate(x: torch.Tensor, positions: torch.Tensor, base: float, pairs: str) -> torch.Tensor:
    """Independent rotation as complex numbers; output halves = (real parts, imaginary parts)."""
    d = x.shape[-1]
    xd = x.double()
    if pairs == "half":
        z = torch.complex(xd[..., : d // 2], xd[..., d // 2:])  # pairs (i, i + d/2)
    else:
        z = torch.complex(xd[..., 0::2], xd[..., 1::2])  # pairs (2i, 2i + 1)
    freqs = base ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    angle = positions.double()[:, None, :, None] * freqs  # [B, 1, T, d/2]
    z = z * torch.polar(torch.ones_like(angle), angle)
    return torch.cat([z.real, z.imag], dim=-1)


def test_mha_rope_is_half_split_rotation():
    cfg = load_config(GOLDEN / "tiny").language  # head_dim 16
    rot = RotaryEmbedding(cfg)
    positions = torch.tensor([[0, 1, 2, 7, 31, 64], [5, 3, 60, 0, 11, 2]])
    x = torch.randn(2, 4, 6, cfg.head_dim)
    cos, sin = rot(positions)
    got = apply_rope(x, cos, sin, interleaved=False)
    want = _complex_rotate(x, positions, cfg.rope_theta, "half")
    # the half-split output layout is the input layout: (re, im) = (x[:d/2], x[d/2:])
    assert torch.allclose(got.double(), want, atol=1e-5)
    assert not torch.allclose(got.double(), _complex_rotate(x, positions, cfg.rope_theta, "interleaved"), atol=1e-2)


def test_mla_rope_is_interleaved_then_evens_first():
    cfg = load_config(GOLDEN / "small").language  # qk_rope_head_dim 8
    rot = RotaryEmbedding(cfg)
    positions = torch.tensor([[0, 1, 4, 9, 50, 64]])
    x = torch.randn(1, 3, 6, cfg.qk_rope_head_dim)
    cos, sin = rot(positions)
    got = apply_rope(x, cos, sin, interleaved=True)
    # GPT-J convention: rotate (x[2i], x[2i+1]); the reference stores real parts (evens) first
    want = _complex_rotate(x, positions, cfg.rope_theta, "interleaved")
    assert torch.allclose(got.double(), want, atol=1e-5)
    # position 0 is the pure de-interleave permutation
    assert torch.equal(got[0, :, 0], torch.cat([x[0, :, 0, 0::2], x[0, :, 0, 1::2]], dim=-1))


@pytest.mark.parametrize("interleaved", [False, True])
def test_rope_scores_depend_on_relative_position_only(interleaved):
    cfg = load_config(GOLDEN / ("small" if interleaved else "tiny")).language
    rot = RotaryEmbedding(cfg)
    q, k = torch.randn(1, 1, 1, cfg.rope_dim).double(), torch.randn(1, 1, 1, cfg.rope_dim).double()

    def score(m, n):
        cm, sm = rot(torch.tensor([[m]]))
        cn, sn = rot(torch.tensor([[n]]))
        return (apply_rope(q, cm.double(), sm.double(), interleaved)
                * apply_rope(k, cn.double(), sn.double(), interleaved)).sum().item()

    assert score(7, 3) == pytest.approx(score(24, 20), abs=1e-5)
    assert score(7, 3) != pytest.approx(score(8, 3), abs=1e-3)


@pytest.mark.parametrize("dim, base, factor, orig", [(64, 10000.0, 40.0, 4096), (8, 10000.0, 4.0, 512)])
def test_yarn_inv_freq_extremes(dim, base, factor, orig):
    beta_fast, beta_slow = 32, 1
    got = yarn_inv_freq(dim, base, factor, orig, beta_fast, beta_slow).double()
    plain = base ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    kinds = []
    for i, f in enumerate(plain.tolist()):
        rotations = orig * f / (2 * math.pi)  # turns over the original context
        if rotations >= beta_fast:  # fast dims keep their frequency (extrapolation)
            assert got[i].item() == pytest.approx(f, rel=1e-6)
            kinds.append("plain")
        elif rotations <= beta_slow:  # slow dims are interpolated by the factor
            assert got[i].item() == pytest.approx(f / factor, rel=1e-6)
            kinds.append("interp")
        else:  # a blend in between
            assert f / factor < got[i].item() < f
            kinds.append("blend")
    assert {"plain", "interp", "blend"} <= set(kinds)
    assert kinds == sorted(kinds, key=["plain", "blend", "interp"].index)


def test_yarn_rotary_of_dsv2x_and_mscale():
    cfg = load_config(GOLDEN / "dsv2x").language
    rot = RotaryEmbedding(cfg)
    assert torch.allclose(rot.inv_freq, yarn_inv_freq(8, 10000.0, 4.0, 512, 32, 1))
    cos, sin = rot(torch.tensor([[0, 3, 1000]]))
    assert torch.allclose(cos ** 2 + sin ** 2, torch.ones_like(cos), atol=1e-6)  # mscale == mscale_all_dim
    # mscale 1, mscale_all_dim 0: cos / sin carry 0.1 * ln(4) + 1
    rs = dict(cfg.rope_scaling, mscale=1.0, mscale_all_dim=0)
    other = RotaryEmbedding(LanguageConfig(**{**_fields(cfg), "rope_scaling": rs}))
    cos, sin = other(torch.tensor([[0, 3, 1000]]))
    m = 0.1 * math.log(4.0) + 1
    assert m == pytest.approx(yarn_mscale(4.0, 1.0))
    assert torch.allclose(cos ** 2 + sin ** 2, torch.full_like(cos, m * m), atol=1e-5)
    # the same without the keys (reference defaults mscale=1, mscale_all_dim=0)
    rs = {k: v for k, v in cfg.rope_scaling.items() if k not in ("mscale", "mscale_all_dim")}
    assert RotaryEmbedding(LanguageConfig(**{**_fields(cfg), "rope_scaling": rs})).mscale == pytest.approx(m)
    # an explicit mscale 0 is 0.1 * 0 * ln(4) + 1 = 1, not the default
    rs = dict(cfg.rope_scaling, mscale=0, mscale_all_dim=0)
    assert RotaryEmbedding(LanguageConfig(**{**_fields(cfg), "rope_scaling": rs})).mscale == 1.0


def _fields(cfg) -> dict:
    return {f: getattr(cfg, f) for f in cfg.__dataclass_fields__ if f != "extra"}


# ---- projector -----------------------------------------------------------------------------------

def _vision_block_cast_per_product(block, x):
    """One SigLIP block as before ``ops.linear_narrow``: every product's result cast back to
    x's dtype (under bf16 products torch's bf16 GEMM, whose rounded result the chain keeps;
    else ``ops.linear``), the GELU in float32 (the tower's native one where built: the bf16
    chain's table holds its values rounded once; torch's elsewhere): the bits the chain must
    keep. The attention: torch's float32 one, or where the policy gives it bf16 products
    (``ops.attention_in_bf16``) the kernel the policy chose (``ops.attention_bf16``) on
    contiguous copies of q, k, v."""
    from dsvl2.model import native
    from dsvl2.model.ops import attention_bf16, attention_in_bf16, big_products_in_weights_dtype, linear

    bf = torch.bfloat16

    def product(h, weight, bias):
        if big_products_in_weights_dtype():
            return F.linear(h.to(bf), weight, bias.to(bf)).float()
        return linear(h, weight, bias)

    n, p, w = x.shape
    att = block.attn
    h = block.norm1(x)
    qkv = product(h, att.qkv.weight, att.qkv.bias).view(n, p, 3, att.heads, w // att.heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    if attention_in_bf16(h, att.qkv.weight):
        o = attention_bf16(q.to(bf).contiguous(), k.to(bf).contiguous(), v.to(bf).contiguous(),
                           (w // att.heads) ** -0.5)
    else:
        o = F.scaled_dot_product_attention(q, k, v)
    o = o.transpose(1, 2).reshape(n, p, w)
    x = x + product(o, att.proj.weight, att.proj.bias)
    mlp = block.mlp
    h = product(block.norm2(x), mlp.fc1.weight, mlp.fc1.bias)
    h = native.gelu_tanh_(h.contiguous()) if native.available() else F.gelu(h, approximate="tanh")
    return x + product(h, mlp.fc2.weight, mlp.fc2.bias)


@pytest.mark.parametrize("bf16_products", [True, False])
def test_vision_block_bf16_chain_equals_cast_per_product(bf16_products):
    """With bf16 weights the tower keeps a block's intermediates in bf16 where the policy runs
    big products in bf16 (``ops.linear_narrow``); its output must be the bits of casting
    every product's result to float32 and back, and plain ``linear`` under the other policy."""
    from dsvl2.model import ops
    from dsvl2.model.vision import Block

    cfg = VisionConfig(width=64, layers=1, heads=4, mlp_ratio=3.7362, image_size=56, patch_size=14)
    torch.manual_seed(0)
    block = Block(cfg)
    with torch.no_grad():
        for prm in block.parameters():
            prm.normal_(0, 0.3)
    block = block.to(torch.bfloat16)
    x = torch.randn(3, 16, 64)
    before = ops.big_products_in_weights_dtype()
    ops.set_big_products_in_weights_dtype(bf16_products)
    try:
        with torch.inference_mode():
            got, want = block(x), _vision_block_cast_per_product(block, x)
    finally:
        ops.set_big_products_in_weights_dtype(before)
    assert got.dtype is torch.float32
    assert torch.equal(got, want)


def test_the_towers_residual_stream_is_contiguous_from_the_patch_embedding_on():
    """The patch embedding's [N, W, P] -> [N, P, W] transpose is made contiguous once: an add
    keeps its input's strides, so a transposed layout would carry through every block and
    each LayerNorm would copy it again (13 % of the real tower's time on an AMX Xeon)."""
    from dsvl2.model.vision import VisionTransformer

    cfg = VisionConfig(width=32, layers=2, heads=2, mlp_ratio=2.0, image_size=56, patch_size=14)
    tower = VisionTransformer(cfg)
    seen = []
    for block in tower.blocks:
        block.norm1.register_forward_pre_hook(lambda mod, args: seen.append(args[0].is_contiguous()))
        block.register_forward_pre_hook(lambda mod, args: seen.append(args[0].is_contiguous()))
    with torch.no_grad():
        out = tower(torch.randn(3, 3, 56, 56))
    assert out.shape == (3, 16, 32) and seen == [True] * 4


def test_gelu_on_bf16_rounds_the_float32_result_once():
    """The fact the vision MLP's bf16 chain relies on, over every finite bf16 value: the tanh
    GELU (the tower's) of a bf16 tensor is the float32 GELU rounded once. (Not so for the
    erf GELU in this torch build: the projector keeps that one in float32.)"""
    v = torch.arange(1 << 16, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    v = v[torch.isfinite(v.float())]
    assert torch.equal(F.gelu(v, approximate="tanh").view(torch.int16),
                       F.gelu(v.float(), approximate="tanh").to(torch.bfloat16).view(torch.int16))


def test_projector_block_order_is_unfold_order():
    proj = Projector(ProjectorConfig(input_dim=3, n_embed=5))
    proj.layers = nn.Identity()  # look at the rearrangement only
    x = torch.randn(2, 729, 3)
    got = proj(x)  # [2, 196, 12]
    grid = x.transpose(1, 2).reshape(2, 3, 27, 27)  # [N, C, 27, 27]
    want = F.unfold(F.pad(grid, (0, 1, 0, 1)), kernel_size=2, stride=2).transpose(1, 2)
    assert got.shape == (2, 196, 12) and torch.equal(got, want)
    # hand check: feature c * 4 + dy * 2 + dx of block (by, bx) is patch (2by + dy, 2bx + dx)
    for by, bx, c, dy, dx in [(0, 0, 0, 0, 0), (0, 0, 2, 1, 0), (3, 5, 1, 0, 1), (12, 12, 2, 1, 1)]:
        patch = (2 * by + dy) * 27 + (2 * bx + dx)
        assert got[1, by * 14 + bx, c * 4 + dy * 2 + dx] == x[1, patch, c]
    # the 28th row / column is zero padding
    last = got[:, 13 * 14 + 13].view(2, 3, 2, 2)  # block (13, 13): only (dy, dx) = (0, 0) is real
    assert torch.equal(last[:, :, 0, 0], x[:, 26 * 27 + 26])
    assert (last[:, :, 1, :] == 0).all() and (last[:, :, :, 1] == 0).all()


def test_projector_matches_oracle():
    model = golden_model("small")
    vis, proj = golden_tensors(GOLDEN / "small" / "outputs" / "c01_single_image.safetensors",
                               "vision_out_tile0", "projector_out_tile0")
    with torch.no_grad():
        got = model.projector(vis[None])[0]
    assert got.shape == (196, 96) and torch.allclose(got, proj, atol=1e-5)


# ---- image-token assembly ------------------------------------------------------------------------

def _assembly_model(global_view_pos: str, coded: bool = False) -> DeepseekVL2:
    cfg = ModelConfig(
        vision=VisionConfig(image_size=28, patch_size=14, width=8, layers=1, heads=2),
        projector=ProjectorConfig(input_dim=8, n_embed=4),
        language=LanguageConfig(vocab_size=32, hidden_size=4, intermediate_size=8, num_hidden_layers=1,
                                num_attention_heads=1, num_key_value_heads=1, use_mla=False),
        global_view_pos=global_view_pos)
    cfg.validate()
    model = (_CodedTowers if coded else DeepseekVL2)(cfg)
    with torch.no_grad():
        model.image_newline.fill_(-1.0)
        model.view_seperator.fill_(-2.0)
    return model


class _CodeVision(nn.Module):
    """Stands in for the vision tower: a tile -> its code (pixel [0, 0, 0])."""

    def forward(self, px):
        return px[:, 0, 0, 0][:, None, None]


class _CodeProjector(nn.Module):
    """Stands in for the projector: token (code, row, col, 1) for each of a tile's 196."""

    def forward(self, v):
        n = v.shape[0]
        p = torch.arange(196)
        return torch.stack([v[:, 0, 0, None].expand(n, 196), (p // 14).float().expand(n, 196),
                            (p % 14).float().expand(n, 196), torch.ones(n, 196)], dim=-1)  # [N, 196, 4]


class _CodedTowers(DeepseekVL2):
    """The model with both towers replaced by ``_CodeVision`` / ``_CodeProjector``, so that
    every image token says which tile, row and column it came from."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.vision, self.projector = _CodeVision(), _CodeProjector()


def _expected_image(codes: list[float], tw: int, th: int, pos: str) -> list[tuple]:
    """The README's layout, written out token by token."""
    nl, sep = (-1.0,) * 4, (-2.0,) * 4
    glob = []
    for r in range(14):
        glob += [(codes[0], r, c, 1) for c in range(14)] + [nl]
    loc = []
    for r in range(th * 14):  # grid row r = row r % 14 of tiles (r // 14, 0..tw-1)
        for j in range(tw):
            code = codes[1 + (r // 14) * tw + j]
            loc += [(code, r % 14, c, 1) for c in range(14)]
        loc.append(nl)
    return glob + [sep] + loc if pos == "head" else loc + [sep] + glob


@pytest.mark.parametrize("pos", ["head", "tail"])
def test_encode_images_layout(pos):
    model = _assembly_model(pos, coded=True)
    crop = torch.tensor([[[2, 3], [1, 1]], [[3, 1], [0, 0]]])  # row 0: 2x3 + 1x1; row 1: 3x1
    pixels = torch.full((2, 9, 3, 2, 2), -999.0)  # unused tiles keep -999
    for b, n_tiles in ((0, 9), (1, 4)):
        for n in range(n_tiles):
            pixels[b, n] = 100 * b + n + 1
    with torch.no_grad():
        feats = model.encode_images(pixels, crop, tile_batch=4)  # chunks cross image boundaries
    assert feats.projected.shape == (13, 196, 4)
    row0 = _expected_image([1, 2, 3, 4, 5, 6, 7], 2, 3, pos) + _expected_image([8, 9], 1, 1, pos)
    row1 = _expected_image([101, 102, 103, 104], 3, 1, pos)
    for got, want, counts in ((feats.per_row[0], row0, [(2, 3), (1, 1)]), (feats.per_row[1], row1, [(3, 1)])):
        assert got.shape[0] == sum(210 + 1 + (th * 14) * (tw * 14 + 1) for tw, th in counts)
        assert got.tolist() == [list(map(float, t)) for t in want]
    assert feats.per_row[0].shape[0] == 1429 + 421


def test_prepare_inputs_embeds_scatters_in_order():
    model = _assembly_model("head", coded=True)
    with torch.no_grad():
        model.language.model.embed_tokens.weight.copy_(torch.arange(32 * 4, dtype=torch.float32).view(32, 4))
    n_img = 421
    ids = torch.randint(0, 32, (1, n_img + 10), generator=torch.Generator().manual_seed(0))
    mask = torch.zeros(1, n_img + 10, dtype=torch.bool)
    mask[0, 3:3 + n_img] = True
    pixels = torch.full((1, 2, 3, 2, 2), 5.0)
    with torch.no_grad():
        emb = model.prepare_inputs_embeds(ids, mask, pixels, torch.tensor([[[1, 1]]]))
    want_img = torch.tensor(_expected_image([5, 5], 1, 1, "head"), dtype=torch.float32)
    assert torch.equal(emb[0, mask[0]], want_img)
    assert torch.equal(emb[0, ~mask[0]], model.language.model.embed_tokens.weight[ids[0, ~mask[0]]])


# ---- left padding --------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", ["tiny", "small"])
def test_left_padded_row_equals_row_alone(variant):
    lm = golden_model(variant).language
    out_file = GOLDEN / variant / "outputs" / "c08_batch_mixed.safetensors"
    embeds, logits_last = golden_tensors(out_file, "inputs_embeds", "logits_last")
    (am,) = golden_tensors(GOLDEN / "processor/official/c08_batch_mixed/processor.safetensors", "attention_mask")
    am = am.bool()
    n1 = int(am[1].sum())
    assert n1 < am.shape[1] and am[1, -n1:].all()  # row 1 is a short left-padded row
    embeds = embeds.clone()
    embeds[1, :-n1] = 1e3 * torch.randn(am.shape[1] - n1, embeds.shape[-1])  # pad content must not matter
    with torch.no_grad():
        _, ctx = lm.padded_context(am)
        batch = lm(embeds, ctx).logits
        _, ctx1 = lm.padded_context(torch.ones(1, n1, dtype=torch.bool))
        alone = lm(embeds[1:, -n1:], ctx1).logits
    assert not torch.isnan(batch).any() and torch.isfinite(batch).all()
    assert torch.allclose(batch[1, -n1:], alone[0], atol=1e-5, rtol=0)
    assert torch.allclose(batch[:, -1], logits_last, atol=1e-4, rtol=1e-4)  # oracle


def test_padded_context_positions_and_mask():
    lm = golden_model("tiny").language
    am = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]], dtype=torch.bool)
    positions, ctx = lm.padded_context(am)
    assert positions.tolist() == [[1, 1, 0, 1, 2], [0, 1, 2, 3, 4]]  # pad positions 1, like the reference
    lo = torch.finfo(torch.float32).min
    assert ctx.mask.shape == (2, 1, 5, 5)
    assert ctx.mask[0, 0, 4].tolist() == [lo, lo, 0, 0, 0]
    assert ctx.mask[0, 0, 0].tolist() == [lo] * 5  # fully masked, but finite
    assert ctx.mask[1, 0].eq(0).sum() == 15  # causal


# ---- KV cache ------------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", ["tiny", "small", "dsv2x"])
def test_chunked_cache_equals_padded_forward(variant):
    lm = golden_model(variant).language
    (a,) = golden_tensors(GOLDEN / variant / "outputs" / "c06_text_only.safetensors", "inputs_embeds")
    (b,) = golden_tensors(GOLDEN / variant / "outputs" / "c08_batch_mixed.safetensors", "inputs_embeds")
    rows = [a[0], b[1, -17:]]  # 20 and 17 tokens
    lens = [r.shape[0] for r in rows]
    with torch.no_grad():
        want = [lm(r[None], lm.padded_context(torch.ones(1, len(r), dtype=torch.bool))[1]).logits[0] for r in rows]
        for chunk in (1, 5, 20):
            cache = KVCache(lm.cfg, 1 + 2 * 2, block_size=16)  # two rows of 32 tokens
            table = row_tables(2, 32, 16, order=torch.tensor([3, 0, 2, 1]))
            start = torch.zeros(2, dtype=torch.long)
            got: list[list[torch.Tensor]] = [[], []]
            while any(int(start[i]) < lens[i] for i in range(2)):
                n = torch.tensor([max(0, min(chunk, lens[i] - int(start[i]))) for i in range(2)])
                x = torch.zeros(2, chunk, rows[0].shape[-1])
                for i in range(2):
                    x[i, : n[i]] = rows[i][start[i]: start[i] + n[i]]
                _, ctx = lm.step_context(cache, start, n, chunk, table)
                logits = lm(x, ctx).logits  # [2, chunk, V]
                for i in range(2):
                    got[i].append(logits[i, : n[i]])
                start = start + n
            for i in range(2):
                g = torch.cat(got[i])
                assert g.shape == want[i].shape
                assert torch.allclose(g, want[i], atol=1e-5, rtol=0), (variant, chunk, i, (g - want[i]).abs().max())
    if lm.cfg.use_mla:  # the cache holds latent + k_pe only
        assert cache.layers[0][0].shape[-1] == lm.cfg.kv_lora_rank + lm.cfg.qk_rope_head_dim


@pytest.mark.parametrize("variant", ["tiny", "small"])
def test_cache_pool_sizes(variant):
    cfg = golden_model(variant).language.cfg
    cache = KVCache(cfg, 10, block_size=8)
    per_token = cache.values_per_token_per_layer
    assert per_token == cfg.kv_cache_values_per_token_per_layer
    assert cache.nbytes() == 10 * 8 * per_token * cfg.num_hidden_layers * 4
    assert KVCache.bytes_per_token(cfg, torch.float32) * 8 == cache.block_bytes
    assert all(not t[0].any() for layer in cache.layers for t in layer)  # the null block is zero


def test_scratch_buffers_made_under_inference_mode_are_writable_outside_it():
    """The per-thread buffers (``scratch.buffer``, ``native.scratch_buffer``) are made on first
    use; made under torch.inference_mode they must still take writes outside it (a product
    after a ``torch.inference_mode`` block used to fail with "Inplace update to inference
    tensor"). A fresh thread, so the buffers are new."""
    import threading

    from dsvl2.model import native, scratch

    w = torch.randn(37, 53).to(torch.bfloat16)
    got, errors = [], []

    def run():
        try:
            with torch.inference_mode():
                scratch.upcast(w, torch.float32)
                native.scratch_buffer(100, torch.float32)
            got.append(scratch.upcast(w * 2, torch.float32).clone())
            native.scratch_buffer(100, torch.float32).fill_(1.0)
        except RuntimeError as e:
            errors.append(e)

    t = threading.Thread(target=run)
    t.start()
    t.join()
    assert not errors, errors
    assert torch.equal(got[0], (w * 2).float())
