"""The bf16 attention on torch's kernel (``native.attention_bf16_torch``), the choice between
it and the native kernel (``ops.attention_bf16``), and the model's prefill on it.

* Numbers: against the plain float64 softmax attention (``test_attention_bf16.plain``): the
  weights rounded to bf16 move the result by at most 2^-9 x max|v| (as for the native
  kernel), the result's own rounding to bf16 (documented) by half an ulp of it (at most
  2^-8 of it); the result is bf16-representable.
  Rows with no visible key: a uniform average of all keys, as the reference's float32
  softmax over equal scores gives. Against the native kernel where the CPU has it.
* Calls as the model makes them: strided views of a fused qkv, a bf16 out written through
  a transposed view, grouped kv heads, dv < dk (MLA) and dv > dk; a batch row's bits do not
  depend on the other rows of the call.
* The choice: torch's kernel, when the policy chose it, for the vision tower's attention only;
  a prefill's on the native kernel (the AMX one, when chosen), whose rows keep their bits
  beside longer (padded) prompts, which torch's do not; MLA and MHA prefill chunks under that
  choice against torch's float32 attention.

torch's kernel runs on every CPU, so these tests run everywhere (slowly where there are no
bf16 units); the comparisons with the native kernel need AVX-512 BF16 (a hardware condition).
"""

from __future__ import annotations

import pytest
import torch

from dsvl2.config import LanguageConfig
from dsvl2.model import native, ops
from dsvl2.model.attention import MHA, MLA
from dsvl2.model.native import amx
from test_attention_bf16 import (BASE_TOL, BF, CASES, MIN, causal_mask, filled, needs_kernel, padding_case, plain,
                                 prefill_chunk, random_qkv)

WEIGHTS = 2 ** -9  # the weights' bf16 rounding moves the average by at most this x max|v| (PLAIN_TOL)
HALF_ULP = 2 ** -8  # bf16 keeps 8 significant bits: a rounding moves a value by at most 2^-8 of it


def _room(want: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """How far the kernel's result may be from the float64 ``want``: the bf16 weights
    (``WEIGHTS`` x max|v|, + the float32 sums), then the result rounded to bf16."""
    vmax = v.double().abs().max()
    return (WEIGHTS + BASE_TOL) * vmax + HALF_ULP * (want.abs() + WEIGHTS * vmax)


def _assert_near(got, want, v):
    err, room = (got.double() - want).abs(), _room(want, v)
    assert (err <= room).all(), (err - room).max().item()


@pytest.mark.parametrize("case", CASES)
def test_matches_plain_float64_to_bf16_level(case):
    b, h, hk, t, s, dk, dv, kind = CASES[case]
    q, k, v = random_qkv(b, h, hk, t, s, dk, dv)
    mask = causal_mask(b, t, s) if kind == "causal" else None
    got = native.attention_bf16_torch(q, k, v, dk ** -0.5, mask)
    assert got.dtype == torch.float32 and got.shape == (b, h, t, dv)
    assert torch.equal(got, got.to(BF).float())  # rounded to bf16, as documented
    _assert_near(got, plain(q, k, v, dk ** -0.5, mask), v)


def test_a_wrong_scale_or_a_dropped_mask_is_seen():
    """The bound above is tight enough to tell: the same call with another scale, or
    without its mask, misses it."""
    b, h, hk, t, s, dk, dv, _ = CASES["mla_chunk"]
    q, k, v = random_qkv(b, h, hk, t, s, dk, dv)
    mask = causal_mask(b, t, s)
    want = plain(q, k, v, dk ** -0.5, mask)
    for got in (native.attention_bf16_torch(q, k, v, 1.1 * dk ** -0.5, mask),
                native.attention_bf16_torch(q, k, v, dk ** -0.5, None)):
        assert ((got.double() - want).abs() > _room(want, v)).any()


def test_rows_without_visible_keys_average_all_keys():
    """``test_attention_bf16.padding_case``: row 1's last queries are padding (every mask
    value MIN): the uniform average of all S keys' v (equal scores), finite, as the native
    kernel and the reference give."""
    q, k, v, mask, uniform = padding_case()
    got = native.attention_bf16_torch(q, k, v, 0.125, mask)
    assert torch.isfinite(got).all()
    _assert_near(got[1, :, 3:], uniform, v)
    _assert_near(got[:, :, :3], plain(q, k, v, 0.125, mask)[:, :, :3], v)


@needs_kernel
@pytest.mark.parametrize("case", CASES)
def test_agrees_with_the_native_kernel(case):
    """Both within bf16 level of float64, so of each other: the weights' roundings (2^-9 x
    max|v| each) and torch's rounding of the result."""
    b, h, hk, t, s, dk, dv, kind = CASES[case]
    q, k, v = random_qkv(b, h, hk, t, s, dk, dv, seed=9)
    mask = causal_mask(b, t, s) if kind == "causal" else None
    mine = native.attention_bf16(q, k, v, dk ** -0.5, mask).double()
    theirs = native.attention_bf16_torch(q, k, v, dk ** -0.5, mask).double()
    assert ((theirs - mine).abs() <= _room(mine, v) + WEIGHTS * v.double().abs().max()).all()


def test_the_vision_towers_call_gives_the_bits_of_contiguous_copies():
    """q, k, v views of one [N, P, 3, H, hd] tensor, the result written as bf16 through a
    [N, H, P, hd] view of [N, P, H, hd]: the bits of the call on contiguous copies."""
    n, p, heads, hd = 2, 29, 3, 72
    qkv = (torch.randn(n, p, 3, heads, hd, generator=torch.Generator().manual_seed(7))).to(BF)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    assert not q.is_contiguous()
    heads_out = torch.full((n, p, heads, hd), float("nan"), dtype=BF)
    got = native.attention_bf16_torch(q, k, v, hd ** -0.5, out=heads_out.transpose(1, 2))
    assert got.data_ptr() == heads_out.data_ptr()
    want = native.attention_bf16_torch(q.contiguous(), k.contiguous(), v.contiguous(), hd ** -0.5)
    assert torch.equal(heads_out.transpose(1, 2), want.to(BF))


def test_a_rows_bits_do_not_depend_on_the_other_rows_of_the_call():
    b, h, hk, t, s, dk, dv = 3, 4, 2, 13, 40, 192, 128
    q, k, v = random_qkv(b, h, hk, t, s, dk, dv, seed=11)
    mask = causal_mask(b, t, s)
    mask[2, :, :, 30:] = MIN
    both = native.attention_bf16_torch(q, k, v, 0.1, mask)
    for i in range(b):
        alone = native.attention_bf16_torch(q[i:i + 1], k[i:i + 1], v[i:i + 1], 0.1, mask[i:i + 1])
        assert torch.equal(both[i:i + 1], alone), i


@pytest.mark.parametrize("name", ["attention_bf16", "attention_bf16_torch", "attention_bf16_amx"])
def test_bad_arguments_raise_value_errors_naming_them(name):
    """The three kernels' wrappers share their checks, which run before any C does (so this
    runs on every CPU for the native and AMX ones too)."""
    fn = getattr(native, name)
    q, k, v = random_qkv(1, 4, 2, 5, 7, 16, 16)
    with pytest.raises(ValueError, match=rf"{name}: q must be"):
        fn(q.float(), k, v, 0.25)
    with pytest.raises(ValueError, match=rf"{name}: k must be"):
        fn(q, k[..., :14], v, 0.25)
    with pytest.raises(ValueError, match=rf"{name}: k must be"):
        fn(q, random_qkv(1, 3, 3, 5, 7, 16, 16)[1], v, 0.25)  # 3 kv heads for 4
    with pytest.raises(ValueError, match=rf"{name}: out must be"):
        fn(q, k, v, 0.25, out=torch.empty(1, 4, 5, 8))
    with pytest.raises(ValueError, match=rf"{name}: mask must be"):
        fn(q, k, v, 0.25, torch.zeros(1, 1, 5, 6))


# ---- the choice ------------------------------------------------------------------------------

def _counting(monkeypatch) -> dict:
    calls = {"native": 0, "torch": 0, "amx": 0}

    def fake(kind):
        def run(q, k, v, scale, mask=None, out=None):
            calls[kind] += 1
            return out
        return run

    monkeypatch.setattr(native, "attention_bf16", fake("native"))
    monkeypatch.setattr(native, "attention_bf16_torch", fake("torch"))
    monkeypatch.setattr(native, "attention_bf16_amx", fake("amx"))
    return calls


def test_torchs_kernel_runs_the_towers_attention_and_never_a_prefills(monkeypatch):
    """``ops.tower_attention_bf16`` on the policy's kernel, torch's included; a prefill's
    (``ops.attention_bf16``) on the AMX kernel where chosen, else the native one; calls of
    any number of queries alike (the kernel follows the step kind, never the batch)."""
    calls = _counting(monkeypatch)
    few, many = random_qkv(1, 2, 2, 1, 9, 8, 8), random_qkv(1, 2, 2, 729, 9, 8, 8)
    for kernel, tower, prefill in (("native", "native", "native"), ("torch", "torch", "native"),
                                   ("amx", "amx", "amx")):
        monkeypatch.setattr(ops, "attention_kernel", kernel)
        for qkv in (few, many):
            before = dict(calls)
            ops.tower_attention_bf16(*qkv, 0.1)
            assert calls[tower] == before[tower] + 1, (kernel, "tower")
            ops.attention_bf16(*qkv, 0.1)
            assert calls[prefill] == before[prefill] + 1 + (tower == prefill), (kernel, "prefill")
            assert sum(calls.values()) == sum(before.values()) + 2


@needs_kernel
@pytest.mark.parametrize("kernel", ["torch", "native"] + (["amx"] if amx.usable() else []))
def test_under_every_choice_a_prefill_row_has_its_bits_alone_beside_a_longer_prompt(kernel, monkeypatch):
    """A batched prefill pads its prompts to the longest (the longer prompt's keys hidden from
    the shorter one's queries): a row's result must be its result alone. torch's flash kernel
    splits the keys by their padded count, so it would fail this (checked: its bits move);
    the prefill's kernel under each choice passes it, for 13 queries (enough for torch's
    kernel, which the old choice gave calls of at least 8) and for 1."""
    monkeypatch.setattr(ops, "attention_kernel", kernel)
    for t in (13, 1):
        s, longer = 40, 300
        q, k, v = random_qkv(1, 4, 2, t, s, 64, 64, seed=21)
        mask = causal_mask(1, t, s)
        _, kp, vp = random_qkv(1, 4, 2, t, longer, 64, 64, seed=22)
        kp[:, :, :s], vp[:, :, :s] = k, v
        padded = torch.full((1, 1, t, longer), MIN)
        padded[..., :s] = mask
        alone = ops.attention_bf16(q, k, v, 0.125, mask)
        assert torch.equal(ops.attention_bf16(q, kp, vp, 0.125, padded), alone), t
        if t == 13:  # torch's own kernel does not keep them
            theirs = native.attention_bf16_torch(q, k, v, 0.125, mask)
            assert not torch.equal(native.attention_bf16_torch(q, kp, vp, 0.125, padded), theirs)


def test_with_torchs_kernel_chosen_the_native_one_is_not_required_by_the_tower(monkeypatch):
    x, w = torch.randn(3, 16), torch.randn(8, 16).to(BF)
    monkeypatch.setattr(native, "attention_usable", lambda: False)
    monkeypatch.setattr(ops, "attention_kernel", "native")
    before = ops.big_products_in_weights_dtype()
    ops.set_big_products_in_weights_dtype(True)
    try:
        assert not ops.attention_in_bf16(x, w) and not ops.attention_in_bf16(x, w, tower=True)
        monkeypatch.setattr(ops, "attention_kernel", "torch")
        assert ops.attention_in_bf16(x, w, tower=True)
        assert not ops.attention_in_bf16(x, w)  # a prefill: torch's float32 attention then
        with ops.decoding():
            assert not ops.attention_in_bf16(x, w, tower=True)
    finally:
        ops.set_big_products_in_weights_dtype(before)


def _check_model_on_torchs_choice(cfg, module, monkeypatch):
    """A prefill chunk (``test_attention_bf16.prefill_chunk``: 13 queries after 20 cached
    keys, a padded row) with torch's kernel chosen: torch's kernel never runs; the native one
    does where the CPU has it (else torch's float32 attention), within bf16 level of torch's
    float32 attention."""
    calls = []
    real = native.attention_bf16
    monkeypatch.setattr(native, "attention_bf16", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    fast, torch_calls = prefill_chunk(cfg, module, True, monkeypatch, "torch")  # undoes the patch
    slow, _ = prefill_chunk(cfg, module, False, monkeypatch, "torch")
    assert torch_calls == 0
    assert len(calls) == (1 if native.attention_usable() else 0)
    assert torch.isfinite(fast).all()
    err = ((fast - slow).abs().max() / slow.abs().max()).item()
    assert err < 4 * 2 ** -8, err


def test_mla_prefill_chunk_under_torchs_choice_stays_native(monkeypatch):
    cfg = LanguageConfig(hidden_size=64, num_hidden_layers=1, num_attention_heads=4, vocab_size=32, use_mla=True,
                         kv_lora_rank=40, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=24,
                         q_lora_rank=24)
    _check_model_on_torchs_choice(cfg, filled(MLA(cfg, 0), seed=0), monkeypatch)


def test_mha_prefill_chunk_with_grouped_kv_heads_under_torchs_choice_stays_native(monkeypatch):
    cfg = LanguageConfig(hidden_size=64, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                         vocab_size=32, use_mla=False)
    _check_model_on_torchs_choice(cfg, filled(MHA(cfg, 0), seed=10), monkeypatch)
