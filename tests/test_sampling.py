"""SamplingParams validation, the logits processors one by one, and the batched sampler."""

import math

import pytest
import torch

from dsvl2.engine.sampling import (
    SamplingParams,
    apply_repetition_penalty,
    apply_temperature,
    apply_top_k,
    apply_top_p,
    draw,
    make_generator,
    mark_seen,
    sample_next,
    seen_mask,
)
from dsvl2.errors import GenerationError

NEG = float("-inf")


def kept(logits: torch.Tensor) -> list[list[int]]:
    return [(row > NEG).nonzero().squeeze(1).tolist() for row in logits]


def log_probs(*probs):
    return torch.tensor([[math.log(p) for p in probs]], dtype=torch.float32)


# --------------------------------------------------------------------------- params


def test_defaults():
    sp = SamplingParams()
    assert (sp.temperature, sp.top_p, sp.top_k, sp.repetition_penalty, sp.max_new_tokens) == (0.0, 1.0, 0, 1.0, 512)
    assert sp.seed is None and sp.stop == () and sp.stop_token_ids == ()
    assert sp.is_greedy and not SamplingParams(temperature=0.7).is_greedy


def test_lists_become_tuples():
    sp = SamplingParams(stop=["a", "b"], stop_token_ids=[1, 2])
    assert sp.stop == ("a", "b") and sp.stop_token_ids == (1, 2)
    assert SamplingParams(stop="User:").stop == ("User:",)
    hash(sp)


@pytest.mark.parametrize("kwargs, words", [
    ({"temperature": -0.1}, ["temperature", "-0.1", ">= 0"]),
    ({"temperature": float("nan")}, ["temperature", "nan"]),
    ({"top_p": 0.0}, ["top_p", "0 < top_p <= 1"]),
    ({"top_p": 1.5}, ["top_p", "1.5"]),
    ({"top_k": -1}, ["top_k", "-1", ">= 0"]),
    ({"top_k": 2.5}, ["top_k", "2.5"]),
    ({"repetition_penalty": 0.0}, ["repetition_penalty", "> 0"]),
    ({"max_new_tokens": 0}, ["max_new_tokens", ">= 1"]),
    ({"max_new_tokens": True}, ["max_new_tokens"]),
    ({"seed": 1.5}, ["seed", "integer or None"]),
    ({"stop": ("ok", "")}, ["stop", "non-empty"]),
    ({"stop_token_ids": (1, -2)}, ["stop_token_ids", ">= 0"]),
])
def test_validation_errors(kwargs, words):
    with pytest.raises(GenerationError) as info:
        SamplingParams(**kwargs)
    assert isinstance(info.value, ValueError)
    for w in words:
        assert w in str(info.value)


def test_make_generator():
    a, b = make_generator(7), make_generator(7)
    assert torch.equal(torch.rand(5, generator=a), torch.rand(5, generator=b))
    assert not torch.equal(torch.rand(5, generator=make_generator(None)),
                           torch.rand(5, generator=make_generator(None)))
    make_generator(-1), make_generator(2**70)  # any Python int is accepted


# --------------------------------------------------------------------------- processors


def test_repetition_penalty_hand_made():
    logits = torch.tensor([[2.0, -2.0, 0.0, 4.0, -1.0]])
    seen = torch.tensor([[True, True, True, False, False]])
    out = apply_repetition_penalty(logits, seen, torch.tensor([2.0]))
    # positive seen logits divided, negative multiplied, unseen untouched
    assert out.tolist() == [[1.0, -4.0, 0.0, 4.0, -1.0]]
    assert torch.equal(apply_repetition_penalty(logits, seen, torch.tensor([1.0])), logits)
    # a penalty < 1 favours seen tokens
    assert apply_repetition_penalty(logits, seen, torch.tensor([0.5])).tolist() == [[4.0, -1.0, 0.0, 4.0, -1.0]]


def test_repetition_penalty_per_row():
    logits = torch.tensor([[3.0, -3.0], [3.0, -3.0]])
    seen = torch.ones(2, 2, dtype=torch.bool)
    out = apply_repetition_penalty(logits, seen, torch.tensor([1.5, 1.0]))
    assert out.tolist() == [[2.0, -4.5], [3.0, -3.0]]


def test_seen_mask_and_mark_seen():
    mask = seen_mask([[1, 3, 3], torch.tensor([0]), []], vocab_size=5)
    assert mask.tolist() == [[False, True, False, True, False],
                             [True, False, False, False, False],
                             [False] * 5]
    mark_seen(mask, torch.tensor([4, 0, 2]))
    assert mask[:, 4].tolist() == [True, False, False] and mask[2, 2]
    with pytest.raises(GenerationError, match="row 0"):
        seen_mask([[5]], vocab_size=5)


def test_temperature():
    logits = torch.tensor([[1.0, 2.0], [1.0, 2.0], [1.0, 2.0]])
    out = apply_temperature(logits, torch.tensor([0.5, 2.0, 0.0]))
    assert out.tolist() == [[2.0, 4.0], [0.5, 1.0], [1.0, 2.0]]


def test_top_k():
    logits = torch.tensor([[1.0, 5.0, 3.0, 4.0, 2.0],
                           [1.0, 5.0, 3.0, 4.0, 2.0],
                           [1.0, 5.0, 3.0, 4.0, 2.0],
                           [1.0, 3.0, 3.0, 0.0, 2.0]])
    out = apply_top_k(logits, torch.tensor([2, 0, 9, 1]))
    assert kept(out) == [[1, 3], [0, 1, 2, 3, 4], [0, 1, 2, 3, 4], [1, 2]]  # ties with the k-th are kept
    assert out[0, 1] == 5.0 and out[0, 3] == 4.0  # kept logits unchanged


def test_top_p_hand_made():
    # probabilities 0.5, 0.3, 0.15, 0.05 (shuffled positions): by the definition, the
    # smallest set of most likely tokens whose mass reaches top_p.
    probs = [0.15, 0.5, 0.05, 0.3]
    order = sorted(range(4), key=lambda i: -probs[i])

    def expected(top_p):
        mass, keep = 0.0, []
        for i in order:
            if keep and mass >= top_p - 1e-9:  # at least one token is kept
                break
            keep.append(i)
            mass += probs[i]
        return sorted(keep)

    logits = log_probs(*probs)
    for top_p, by_hand in [(0.8, [1, 3]), (0.81, [0, 1, 3]), (0.5, [1]), (0.49, [1]),
                           (0.95, [0, 1, 3]), (0.951, [0, 1, 2, 3]), (1e-9, [1]), (1.0, [0, 1, 2, 3])]:
        assert expected(top_p) == by_hand
        assert kept(apply_top_p(logits, torch.tensor([top_p], dtype=torch.float64))) == [by_hand], top_p


def test_top_p_per_row_and_after_top_k():
    logits = torch.cat([log_probs(0.5, 0.3, 0.15, 0.05)] * 3)
    out = apply_top_p(logits, torch.tensor([0.8, 1.0, 0.9], dtype=torch.float64))
    assert kept(out) == [[0, 1], [0, 1, 2, 3], [0, 1, 2]]
    # after top-k the mass is renormalised over the survivors: 0.5/0.8 = 0.625 >= 0.6
    out = apply_top_p(apply_top_k(logits[:1], torch.tensor([2])), torch.tensor([0.6], dtype=torch.float64))
    assert kept(out) == [[0]]


def test_top_p_wide_vocabulary_matches_full_sort():
    # Flat rows need more candidates than the first topk holds: compare with a direct sort.
    g = make_generator(0)
    V = 20000
    logits = torch.randn(3, V, generator=g) * torch.tensor([[0.1], [3.0], [8.0]])
    top_p = torch.tensor([0.9, 0.9, 0.5], dtype=torch.float64)
    out = apply_top_p(logits, top_p)
    for row in range(3):
        probs = logits[row].double().softmax(0)
        sorted_p, idx = probs.sort(descending=True)
        before = sorted_p.cumsum(0) - sorted_p
        n = int((before < top_p[row] - 1e-6).sum())
        assert sorted(kept(out[row:row + 1])[0]) == sorted(idx[:n].tolist())


def test_draw_respects_the_kept_set_and_frequencies():
    logits = torch.tensor([math.log(0.2), NEG, math.log(0.8), NEG])
    g = make_generator(3)
    ids = [draw(logits, g) for _ in range(2000)]
    assert set(ids) == {0, 2}
    assert abs(ids.count(2) / 2000 - 0.8) < 0.04
    with pytest.raises(GenerationError, match="-inf"):
        draw(torch.full((3,), NEG), g)


# --------------------------------------------------------------------------- sampler


def flat_logits(B=4, V=64, seed=0):
    return torch.randn(B, V, generator=make_generator(seed)) * 0.3


def sample_many(logits, params, seeds, steps=50):
    gens = [make_generator(s) for s in seeds]
    return torch.stack([sample_next(logits, params, gens) for _ in range(steps)], dim=1)  # [B, steps]


def test_greedy_is_argmax():
    logits = torch.randn(5, 1000, generator=make_generator(1))
    logits[2, 10] = logits[2, 20] = logits[2].max() + 1  # a tie: first index wins
    out = sample_next(logits, [SamplingParams()] * 5, [None] * 5)
    assert torch.equal(out, logits.argmax(-1)) and out[2] == 10
    assert out.dtype == torch.long and out.shape == (5,)


def test_greedy_takes_nan_as_lowest_and_inf_as_highest():
    """Independent expectation per row, written out: NaN never wins, +inf wins (first of
    several), a row of only NaN / -inf gives index 0; alone or beside a sampled row."""
    nan, inf = float("nan"), float("inf")
    logits = torch.tensor([[0.0, nan, 3.0, 1.0],
                           [nan, 2.0, inf, inf],
                           [nan, nan, -inf, nan],
                           [1.0, 5.0, 2.0, 0.0]])
    want = [2, 2, 0, 1]
    assert sample_next(logits, [SamplingParams()] * 4, [None] * 4).tolist() == want
    mixed = [SamplingParams()] * 3 + [SamplingParams(temperature=1.0, seed=3)]
    assert sample_next(logits, mixed, [None] * 3 + [make_generator(3)]).tolist()[:3] == want[:3]


def test_same_seed_same_ids_other_seed_differs():
    logits = flat_logits()
    params = [SamplingParams(temperature=1.0, seed=1)] * 4
    a = sample_many(logits, params, [11, 12, 13, 14])
    b = sample_many(logits, params, [11, 12, 13, 14])
    c = sample_many(logits, params, [21, 22, 23, 24])
    assert torch.equal(a, b)
    assert all(not torch.equal(a[r], c[r]) for r in range(4))
    assert len(set(a[0].tolist())) > 10  # flat-ish: really random


def test_row_does_not_depend_on_the_batch():
    V = 300
    row = torch.randn(1, V, generator=make_generator(5))
    sp = SamplingParams(temperature=0.8, top_p=0.9, top_k=50, repetition_penalty=1.3, seed=42)
    seen_row = torch.zeros(1, V, dtype=torch.bool)
    seen_row[0, :20] = True
    alone = sample_many_seen(row, [sp], [42], seen_row)

    others = torch.randn(3, V, generator=make_generator(6))
    batch = torch.cat([others[:2], row, others[2:]])
    params = [SamplingParams(temperature=1.5, seed=1), SamplingParams(),
              sp, SamplingParams(temperature=0.3, top_k=3, repetition_penalty=0.8)]
    seen = torch.zeros(4, V, dtype=torch.bool)
    seen[2] = seen_row[0]
    seen[3, 100:] = True
    together = sample_many_seen(batch, params, [1, 2, 42, 4], seen)
    assert torch.equal(alone[0], together[2])


def sample_many_seen(logits, params, seeds, seen, steps=40):
    gens = [make_generator(s) for s in seeds]
    return torch.stack([sample_next(logits, params, gens, seen) for _ in range(steps)], dim=1)


def test_top_k_1_and_tiny_top_p_are_greedy():
    logits = torch.randn(4, 500, generator=make_generator(2))
    greedy = logits.argmax(-1)
    for sp in (SamplingParams(temperature=1.5, top_k=1), SamplingParams(temperature=2.0, top_p=1e-6)):
        out = sample_many(logits, [sp] * 4, [1, 2, 3, 4], steps=20)
        assert torch.equal(out, greedy.unsqueeze(1).expand(4, 20))


def test_sampled_ids_stay_in_the_nucleus():
    logits = torch.cat([log_probs(0.5, 0.3, 0.15, 0.05)] * 2)
    out = sample_many(logits, [SamplingParams(temperature=1.0, top_p=0.8)] * 2, [1, 2], steps=200)
    assert set(out.flatten().tolist()) == {0, 1}


def test_repetition_penalty_in_greedy_and_sampling():
    logits = torch.tensor([[3.0, 2.0, -1.0], [3.0, 2.0, -1.0]])
    seen = seen_mask([[0], []], vocab_size=3)
    sp = SamplingParams(repetition_penalty=2.0)
    # row 0: 3.0 / 2 = 1.5 < 2.0 -> id 1; row 1 saw nothing -> id 0
    assert sample_next(logits, [sp, sp], [None, None], seen).tolist() == [1, 0]
    # the list-of-ids form gives the same
    assert sample_next(logits, [sp, sp], [None, None], [[0], []]).tolist() == [1, 0]
    with pytest.raises(GenerationError, match="seen"):
        sample_next(logits, [sp, sp], [None, None])


def test_sampler_checks_its_inputs():
    with pytest.raises(GenerationError, match="one SamplingParams"):
        sample_next(torch.zeros(2, 4), [SamplingParams()], [None])
    with pytest.raises(GenerationError, match=r"\[B, V\]"):
        sample_next(torch.zeros(4), [SamplingParams()], [None])


def test_bfloat16_logits_and_large_vocab():
    V = 129280
    logits = torch.randn(2, V, generator=make_generator(9)).bfloat16()
    sp = SamplingParams(temperature=0.7, top_p=0.9, top_k=40, seed=3)
    out = sample_next(logits, [sp, SamplingParams()], [make_generator(3), None])
    assert 0 <= int(out[0]) < V and int(out[1]) == int(logits[1].float().argmax())


def test_row_does_not_depend_on_the_batch_full_vocab():
    V = 129280
    g = make_generator(8)
    # peaked rows (like a real LM's), so that top-p settles on topk candidates, no full sort
    batch = torch.randn(6, V, generator=g) * torch.tensor([[6.0], [8.0], [5.0], [10.0], [7.0], [9.0]])
    params = [SamplingParams(temperature=0.7, top_p=0.95, seed=i) for i in range(6)]
    together = sample_many(batch, params, list(range(6)), steps=3)
    for r in (0, 3, 5):
        alone = sample_many(batch[r:r + 1], params[r:r + 1], [r], steps=3)
        assert torch.equal(alone[0], together[r])


def test_top_p_on_peaked_and_masked_rows_matches_full_sort():
    """A row's total mass (a logsumexp that flushes denormals) on rows where most exp()
    terms underflow or are -inf: top_p just above the mass of n tokens and just below that
    of n + 1 must both keep exactly the n + 1 tokens a direct sort of torch's softmax keeps.
    The margin, 1e-4, is above float32 rounding of a total near 660 (3e-5) and apply_top_p's
    tolerance (1e-6); a total off by 1e-3 moves a boundary past it."""
    margin = 1e-4
    x = torch.randn(4, 1000, generator=make_generator(4)) * torch.tensor([[1.0], [30.0], [200.0], [1.0]])
    x[0, :500] = NEG  # half the row masked
    for row in (1, 2):  # peaked: five tokens hold nearly all the mass, most exp() terms underflow
        x[row, 500:504] = x[row].max() + torch.tensor([2.0, 1.6, 1.0, 0.3])
    x[3, 3:] = NEG  # three tokens left
    for row in range(4):
        sorted_p, idx = x[row].double().softmax(0).sort(descending=True)
        cum = sorted_p.cumsum(0)
        cuts = [n for n in range(1, 40) if cum[n] - cum[n - 1] > 4 * margin][:3]
        assert len(cuts) >= 2, row
        for n in cuts:
            for top_p in (float(cum[n - 1]) + margin, float(cum[n]) - margin):
                out = apply_top_p(x[row:row + 1], torch.tensor([top_p], dtype=torch.float64))
                assert sorted(kept(out)[0]) == sorted(idx[:n + 1].tolist()), (row, n, top_p)
