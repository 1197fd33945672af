"""The native MoE router (``native.route``, ``dsvl2_route`` in dsvl2/model/native/layers.c)
against the torch router it replaces in decode steps (``Gate.reference_route`` in
dsvl2/model/moe.py, the reference's MoEGate).

* Every method (greedy, group_limited_greedy, noaux_tc) x scoring (softmax, sigmoid; the
  config refuses noaux_tc with softmax) x groups (1 / 1, 8 / 3, 4 / 2) x normalisation on
  / off, K = 6, batches of 1..16 rows: the same expert sets and weights within 1e-6. Both
  sides get the same float32 logits (the same native gate product), so they differ only
  by the rounding of the scores; the data are checked to hold no near-ties (a near-tie
  could go either way on a one-ulp difference, an exact tie is decided differently by
  design: see below).
* The real base configuration (noaux_tc, sigmoid, 72 experts, routed_scaling_factor from
  the preset) at its real width.
* Exact ties: the native router gives them to the lower expert / group id, the same way
  every call and whatever the batch; torch.topk picks among tied values in an order of
  its own, so only the chosen values are compared with it there.
* ``Gate.forward`` runs the native router only in bf16 decode steps; bad arguments to
  ``native.route`` raise ``ValueError`` naming what is wrong.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dsvl2.checkpoint.random_checkpoint import preset_config
from dsvl2.config import LanguageConfig
from dsvl2.model import native, ops
from dsvl2.model.moe import Gate

needs_native = pytest.mark.skipif(not native.cpu_ok()[0], reason=f"CPU: {native.cpu_ok()[1]}")
pytestmark = needs_native

D, K = 64, 6
NEAR = 1e-6  # the smallest margin the random data may hold at a routing decision


def _rand(*shape, seed, scale=1.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


def _cfg(method, scoring, e, n_group, topk_group, norm, rsf=2.5, d=D, k=K) -> LanguageConfig:
    cfg = LanguageConfig(vocab_size=8, hidden_size=d, intermediate_size=8, num_hidden_layers=1, n_routed_experts=e,
                         moe_intermediate_size=4, num_experts_per_tok=k, topk_method=method, scoring_func=scoring,
                         n_group=n_group, topk_group=topk_group, norm_topk_prob=norm, routed_scaling_factor=rsf)
    cfg.validate()
    return cfg


def _gate(cfg: LanguageConfig, seed: int, scale: float, bias_scale: float = 0.3, wdtype=torch.bfloat16) -> Gate:
    """bf16 (or float32) router weights, a float32 bias (as the checkpoint loader keeps it)."""
    g = Gate(cfg)
    g.weight = nn.Parameter(_rand(*g.weight.shape, seed=seed, scale=scale).to(wdtype), requires_grad=False)
    if cfg.topk_method == "noaux_tc":
        g.e_score_correction_bias = nn.Parameter(_rand(cfg.n_routed_experts, seed=seed + 1, scale=bias_scale),
                                                 requires_grad=False)
    return g


def _margins(g: Gate, x: torch.Tensor) -> torch.Tensor:
    """Each row's smallest gap between the last kept and the first dropped group score and
    between the K-th and the (K+1)-th choice (float64 from the float32 logits, the torch
    path's operations) [T]: where it is tiny, one ulp of score rounding decides."""
    cfg = g.cfg
    with ops.decoding():
        logits = native.linear(x, g.weight) if g.weight.dtype == torch.bfloat16 else x @ g.weight.T
    logits = logits.double()
    scores = logits.softmax(-1) if cfg.scoring_func == "softmax" else logits.sigmoid()
    choice, gaps = scores, []
    k = cfg.num_experts_per_tok
    if cfg.topk_method != "greedy":
        if cfg.topk_method == "noaux_tc":
            choice = scores + g.e_score_correction_bias.double()
        grouped = choice.view(x.shape[0], cfg.n_group, -1)
        gs = grouped.topk(2, -1).values.sum(-1) if cfg.topk_method == "noaux_tc" else grouped.max(-1).values
        if cfg.topk_group < cfg.n_group:
            top = gs.topk(cfg.topk_group + 1, -1).values
            gaps.append(top[:, -2] - top[:, -1])
        keep = gs.topk(cfg.topk_group, -1).indices
        mask = torch.zeros_like(gs, dtype=torch.bool).scatter_(1, keep, True)
        choice = choice.masked_fill(~mask[:, :, None].expand_as(grouped).reshape(x.shape[0], -1), 0.0)
    if k < choice.shape[1]:
        top = choice.topk(k + 1, -1).values
        gaps.append(top[:, -2] - top[:, -1])
    return torch.stack(gaps).min(0).values if gaps else torch.full((x.shape[0],), float("inf"))


def _rows(g: Gate, n: int, seed: int, d: int = D) -> torch.Tensor:
    """n random rows [n, d] (N(0, 1)), redrawing any that holds a near-tie (margin <= NEAR;
    about one row in a thousand)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.empty(0, d)
    while x.shape[0] < n:
        more = torch.randn(n, d, generator=gen)
        x = torch.cat([x, more[_margins(g, more) > NEAR]])
    return x[:n]


def _by_expert(idx: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's expert ids in increasing order, and their weights in that order."""
    order = idx.argsort(-1)
    return idx.gather(1, order), w.gather(1, order)


def _same_routing(g: Gate, x: torch.Tensor) -> None:
    assert bool((_margins(g, x) > NEAR).all())  # no near-ties (see _rows)
    with torch.no_grad(), ops.decoding():
        assert ops.native_block(x, g.weight)  # forward takes the native router
        fast, ref = g(x), g.reference_route(x)
    assert fast.idx.dtype == torch.int64 and fast.weight.dtype == torch.float32
    assert fast.idx.shape == fast.weight.shape == (x.shape[0], g.cfg.num_experts_per_tok)
    fi, fw = _by_expert(fast.idx, fast.weight)
    ri, rw = _by_expert(ref.idx, ref.weight)
    assert torch.equal(fi, ri)
    assert torch.allclose(fw, rw, rtol=0, atol=1e-6)


GROUPS = [(72, 1, 1), (64, 8, 3), (72, 4, 2)]  # experts, n_group, topk_group
GRID = [(m, s) for m in ("greedy", "group_limited_greedy", "noaux_tc") for s in ("softmax", "sigmoid")
        if not (m == "noaux_tc" and s == "softmax")]  # the config refuses noaux_tc without sigmoid


@pytest.mark.parametrize("norm", [False, True], ids=["raw", "norm"])
@pytest.mark.parametrize("e,n_group,topk_group", GROUPS, ids=[f"E{e}-{kept}of{n}" for e, n, kept in GROUPS])
@pytest.mark.parametrize("method,scoring", GRID, ids=[f"{m}-{s}" for m, s in GRID])
def test_native_routes_like_the_torch_path(method, scoring, e, n_group, topk_group, norm):
    seed = 100 * GRID.index((method, scoring)) + 10 * GROUPS.index((e, n_group, topk_group)) + norm
    g = _gate(_cfg(method, scoring, e, n_group, topk_group, norm), seed=seed, scale=0.2)
    for rows in range(1, 17):
        _same_routing(g, _rows(g, rows, seed=seed * 17 + rows))


@pytest.mark.parametrize("method,scoring", GRID, ids=[f"{m}-{s}" for m, s in GRID])
def test_a_row_routes_the_same_in_any_batch(method, scoring):
    """A row's ids and weights are the same bits alone and inside a batch of 16."""
    g = _gate(_cfg(method, scoring, 64, 8, 3, True), seed=7, scale=0.2)
    x = _rand(16, D, seed=8)  # near-ties or not: the same row, the same bits
    with torch.no_grad(), ops.decoding():
        whole = g(x)
        for r in (0, 5, 15):
            one = g(x[r:r + 1])
            assert torch.equal(one.idx[0], whole.idx[r]) and torch.equal(one.weight[0], whole.weight[r])


def test_real_base_config():
    """The released base model's router: noaux_tc, sigmoid, 72 experts in one group, top-6,
    normalised, times the preset's routed_scaling_factor; its real width (2560)."""
    cfg = LanguageConfig.from_hf(preset_config("base")["language_config"])
    assert (cfg.topk_method, cfg.scoring_func, cfg.n_routed_experts, cfg.n_group, cfg.topk_group,
            cfg.num_experts_per_tok, cfg.norm_topk_prob) == ("noaux_tc", "sigmoid", 72, 1, 1, 6, True)
    g = _gate(cfg, seed=3, scale=0.02, bias_scale=0.04)  # the random checkpoint's bias: N(0, 0.04^2)
    for rows in range(1, 17):
        x = _rows(g, rows, seed=50 + rows, d=cfg.hidden_size)
        _same_routing(g, x)
        with torch.no_grad(), ops.decoding():
            w = g(x).weight
        # normalised weights sum to the scaling factor: the preset's, not a default
        assert torch.allclose(w.sum(-1), torch.full((rows,), float(cfg.routed_scaling_factor)), atol=1e-5)


@pytest.mark.parametrize("method,scoring", GRID, ids=[f"{m}-{s}" for m, s in GRID])
def test_float32_gate_weights(method, scoring):
    """A float32 gate: the product is torch's F.linear on both sides, the rest native."""
    cfg = _cfg(method, scoring, 72, 4, 2, True)
    g = _gate(cfg, seed=11, scale=0.2, wdtype=torch.float32)
    x = _rows(g, 16, seed=12)
    with torch.no_grad():
        idx, w = native.route(x, g.weight, K, method, scoring == "sigmoid", True, 2.5,
                              getattr(g, "e_score_correction_bias", None), 4, 2)
        ref = g.reference_route(x)
    fi, fw = _by_expert(idx, w)
    ri, rw = _by_expert(ref.idx, ref.weight)
    assert torch.equal(fi, ri) and torch.allclose(fw, rw, rtol=0, atol=1e-6)


def test_bf16_bias_is_widened_exactly():
    """A bias stored in bf16 (a whole module cast with .to) routes like its float32 value."""
    g = _gate(_cfg("noaux_tc", "sigmoid", 64, 8, 3, True), seed=13, scale=0.2)
    x = _rand(16, D, seed=14)
    with torch.no_grad():
        b16 = g.e_score_correction_bias.to(torch.bfloat16)
        a = native.route(x, g.weight, K, "noaux_tc", True, True, 2.5, b16, 8, 3)
        b = native.route(x, g.weight, K, "noaux_tc", True, True, 2.5, b16.float(), 8, 3)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.parametrize("sigmoid,norm,k,scaling", [(False, False, 6, 1.0), (True, True, 6, 2.5), (False, True, 1, 16.0)])
def test_greedy_is_route_greedy_bit_for_bit(sigmoid, norm, k, scaling):
    gate = _rand(64, 128, seed=5, scale=0.3).to(torch.bfloat16)
    x = _rand(16, 128, seed=6)
    a = native.route(x, gate, k, "greedy", sigmoid, norm, scaling)
    b = native.route_greedy(x, gate, k, sigmoid, norm, scaling)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


# ---- exact ties ---------------------------------------------------------------------------


def _eye_gate(cfg: LanguageConfig, bias: torch.Tensor | None = None) -> Gate:
    """logits = x (an identity gate, exact in bf16): the test writes the logits itself."""
    g = Gate(cfg)
    g.weight = nn.Parameter(torch.eye(cfg.n_routed_experts, dtype=torch.bfloat16), requires_grad=False)
    if bias is not None:
        g.e_score_correction_bias = nn.Parameter(bias, requires_grad=False)
    return g


def test_exact_ties_go_to_the_lower_id_every_time():
    e = 64
    # greedy: equal logits everywhere -> experts 0..5, equal weights
    g = _eye_gate(_cfg("greedy", "softmax", e, None, None, True, rsf=1.0, d=e))
    x = torch.zeros(3, e)
    with torch.no_grad(), ops.decoding():
        r = g(x)
    assert r.idx.tolist() == [list(range(K))] * 3
    assert torch.equal(r.weight, torch.full((3, K), 1 / K))

    # noaux_tc, 8 groups of 8, keep 3: a bias of -1 makes every choice negative (sigmoid - 1),
    # so the 0.0 of the dropped groups' experts outranks all kept ones (the reference's
    # masked_fill(0.0), not -inf) and K of the 40 dropped experts tie at 0.0
    logits = torch.linspace(-2.0, 2.0, e)  # distinct: group g's scores rise with g
    g = _eye_gate(_cfg("noaux_tc", "sigmoid", e, 8, 3, False, rsf=1.0, d=e), bias=torch.full((e,), -1.0))
    x = logits.repeat(4, 1)
    x[2] = logits.flip(0)  # groups 0..2 best: the kept ones now hold the lowest ids
    with torch.no_grad(), ops.decoding():
        fast = g(x)
        again = g(x)
        alone = g(x[1:2])
        ref = g.reference_route(x)
    kept_high = list(range(K))  # groups 5..7 kept: the lowest dropped ids are 0..5
    kept_low = list(range(24, 24 + K))  # groups 0..2 kept: the lowest dropped ids are 24..29
    assert fast.idx.tolist() == [kept_high, kept_high, kept_low, kept_high]
    assert torch.equal(fast.idx, again.idx) and torch.equal(fast.weight, again.weight)
    assert torch.equal(alone.idx[0], fast.idx[1]) and torch.equal(alone.weight[0], fast.weight[1])
    # the weights are the chosen (dropped) experts' unbiased scores
    assert torch.allclose(fast.weight, x.sigmoid().gather(1, fast.idx), rtol=0, atol=1e-6)
    # torch.topk may pick other tied experts; the tie is real: every pick is a dropped expert
    # (choice 0.0) on both sides
    for row in range(4):
        dropped = {i for i in range(e) if (i // 8 >= 3 if row == 2 else i // 8 < 5)}
        assert set(ref.idx[row].tolist()) <= dropped and set(fast.idx[row].tolist()) <= dropped

    # group_limited_greedy: groups 0 and 1 tie for the one kept group -> group 0
    g = _eye_gate(_cfg("group_limited_greedy", "softmax", e, 8, 1, False, rsf=1.0, d=e))
    x = torch.full((1, e), -5.0)
    x[0, 3], x[0, 12] = 1.0, 1.0  # the maxima of groups 0 and 1, equal
    with torch.no_grad(), ops.decoding():
        r = g(x)
    assert set(r.idx[0].tolist()) <= set(range(8)) and r.idx[0, 0] == 3


def test_dropped_experts_score_zero_not_minus_infinity():
    """noaux_tc with negative biased choices: the dropped group's experts (0.0) outrank the
    kept experts whose choice is negative, as in the reference; the set is tie-free (both
    dropped experts are chosen)."""
    cfg = _cfg("noaux_tc", "sigmoid", 8, 4, 3, True, rsf=1.0, d=8, k=4)
    x = torch.linspace(-1.0, 1.0, 8)[None]  # distinct unbiased scores, so distinct weights
    target = torch.tensor([0.3, 0.2, -0.1, -0.2, -0.3, -0.4, -0.5, -0.6])  # groups of 2; group 3 worst
    g = _eye_gate(cfg, bias=target - x[0].sigmoid())
    with torch.no_grad(), ops.decoding():
        fast, ref = g(x), g.reference_route(x)
    assert sorted(fast.idx[0].tolist()) == sorted(ref.idx[0].tolist()) == [0, 1, 6, 7]
    fi, fw = _by_expert(fast.idx, fast.weight)
    assert torch.allclose(fw, _by_expert(ref.idx, ref.weight)[1], rtol=0, atol=1e-6)
    s = x[0].sigmoid()[[0, 1, 6, 7]]
    assert torch.allclose(fw[0], s / s.sum(), rtol=0, atol=1e-6)  # unbiased scores, normalised


# ---- the module and the arguments ---------------------------------------------------------


def test_forward_is_native_only_in_bf16_decode_steps():
    cfg = _cfg("noaux_tc", "sigmoid", 64, 8, 3, True)
    g = _gate(cfg, seed=21, scale=0.2)
    x = _rows(g, 4, seed=22)
    with torch.no_grad():
        outside = g(x)
        assert torch.equal(outside.idx, g.reference_route(x).idx)  # no decode step: torch
        with ops.decoding():
            inside = g(x)
        direct = native.route(x, g.weight, K, "noaux_tc", True, True, 2.5, g.e_score_correction_bias, 8, 3)
    assert torch.equal(inside.idx, direct[0]) and torch.equal(inside.weight, direct[1])
    # the native router lists the experts in descending choice order
    with torch.no_grad():
        scores = native.linear(x, g.weight).sigmoid() + g.e_score_correction_bias
    picked = scores.gather(1, inside.idx)
    assert torch.equal(picked, picked.sort(-1, descending=True).values)


BAD = [
    (dict(method="top2"), "method must be one of greedy, group_limited_greedy, noaux_tc"),
    (dict(k=0), r"experts per token must be in \[1, 64\]"),
    (dict(k=65), r"experts per token must be in \[1, 64\]"),
    (dict(bias=None), r"bias must be a float tensor \[64\]"),
    (dict(bias=torch.zeros(63)), r"bias must be a float tensor \[64\]"),
    (dict(bias=torch.zeros(64, dtype=torch.int64)), r"bias must be a float tensor \[64\]"),
    (dict(method="group_limited_greedy"), "bias is used by noaux_tc only"),
    (dict(n_group=5), "n_group dividing the 64 experts"),
    (dict(n_group=None), "n_group dividing the 64 experts"),
    (dict(topk_group=9), r"topk_group in \[1, n_group\]"),
    (dict(topk_group=0), r"topk_group in \[1, n_group\]"),
    (dict(n_group=64, topk_group=3), "groups need at least 2 experts"),
    (dict(x=torch.zeros(2, D, dtype=torch.bfloat16)), r"x must be float32 \[T, D\]"),
    (dict(x=torch.zeros(1, 2, D)), r"x must be float32 \[T, D\]"),
    (dict(gate=torch.zeros(64, D + 1, dtype=torch.bfloat16)), r"gate must be contiguous bf16 or float32 \[E, 64\]"),
    (dict(gate=torch.zeros(64, D, dtype=torch.float16)), "gate must be contiguous bf16 or float32"),
    (dict(gate=torch.zeros(D, 64, dtype=torch.bfloat16).T), "gate must be contiguous bf16 or float32"),
]


@pytest.mark.parametrize("change,message", BAD, ids=[m for _, m in BAD])
def test_bad_arguments_are_refused(change, message):
    args = dict(x=_rand(2, D, seed=1), gate=_rand(64, D, seed=2).to(torch.bfloat16), k=K, method="noaux_tc",
                sigmoid=True, norm=True, scaling=1.0, bias=torch.zeros(64), n_group=8, topk_group=3)
    native.route(**args)  # valid as it stands: each case changes one thing
    with pytest.raises(ValueError, match=message):
        native.route(**{**args, **change})
