"""The native rotary embedding of prefill rows (dsvl2/model/native/rope.c, ``native.rope``)
against torch's ``apply_rope`` (dsvl2/model/rope.py with ``native_rope`` off): the same
bits, for both conventions (MHA's half split, MLA's de-interleave first), strided views as
the attention blocks pass them, per-row and shared cos / sin; an MLA block's whole output
equal either way. The argument checks run on every CPU.
"""

from __future__ import annotations

import pytest
import torch

from dsvl2.config import LanguageConfig
from dsvl2.model import native, rope
from dsvl2.model.attention import MLA
from dsvl2.model.cache import StepContext
from dsvl2.model.rope import RotaryEmbedding, apply_rope

needs_native = pytest.mark.skipif(not native.cpu_ok()[0], reason=f"CPU: {native.cpu_ok()[1]}")


def _torch_rope(monkeypatch, *args):
    monkeypatch.setattr(rope, "native_rope", False)
    try:
        return apply_rope(*args)
    finally:
        monkeypatch.setattr(rope, "native_rope", True)


@needs_native
@pytest.mark.parametrize("interleaved", [True, False])
@pytest.mark.parametrize("b, h, t, d, shared", [(1, 32, 37, 64, False), (3, 4, 9, 8, False), (2, 5, 11, 128, True)])
def test_same_bits_as_torchs_apply_rope(monkeypatch, interleaved, b, h, t, d, shared):
    g = torch.Generator().manual_seed(b * 100 + d)
    fused = torch.randn(b, t, h, d + 40, generator=g) * 3  # q as the blocks view it: [B, T, H, ...] transposed
    x = fused.transpose(1, 2)[..., 40:]
    assert not x.is_contiguous()
    positions = torch.randint(0, 5000, (1 if shared else b, t), generator=g)
    cos, sin = _cos_sin(positions, d)
    got = native.rope(x, cos, sin, interleaved)
    assert got.is_contiguous() and got.shape == (b, h, t, d)
    want = _torch_rope(monkeypatch, x, cos, sin, interleaved)
    assert torch.equal(got, want)
    # and apply_rope takes it for these prefill rows
    calls = []
    real = native.rope
    monkeypatch.setattr(native, "rope", lambda *a: calls.append(1) or real(*a))
    assert torch.equal(apply_rope(x, cos, sin, interleaved), want) and calls == [1]


def _cos_sin(positions: torch.Tensor, d: int) -> tuple[torch.Tensor, torch.Tensor]:
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))
    f = positions.float()[..., None] * inv
    emb = torch.cat((f, f), dim=-1)
    return emb.cos(), emb.sin()


@needs_native
def test_one_token_rows_and_autograd_stay_on_torch(monkeypatch):
    monkeypatch.setattr(native, "rope", lambda *a: pytest.fail("native.rope called"))
    x = torch.randn(2, 4, 1, 16)
    cos, sin = _cos_sin(torch.tensor([[5], [9]]), 16)
    apply_rope(x, cos, sin, True)  # a decode row
    x = torch.randn(2, 4, 3, 16, requires_grad=True)
    cos, sin = _cos_sin(torch.arange(3).expand(2, 3), 16)
    apply_rope(x, cos, sin, True).sum().backward()  # tracked by autograd: torch's ops, gradients kept
    assert x.grad is not None


@needs_native
def test_an_mla_prefill_is_bit_for_bit_the_same(monkeypatch):
    """A whole MLA block (no cache) with the native pass and without it."""
    cfg = LanguageConfig(hidden_size=64, num_hidden_layers=1, num_attention_heads=4, vocab_size=32, use_mla=True,
                         kv_lora_rank=40, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=24, q_lora_rank=24)
    torch.manual_seed(0)
    block = MLA(cfg, 0)
    x = torch.randn(2, 13, 64)
    cos, sin = RotaryEmbedding(cfg)(torch.arange(13).expand(2, 13))
    mask = torch.zeros(2, 1, 13, 13).masked_fill_(~torch.ones(13, 13, dtype=torch.bool).tril(), -1e30)
    ctx = StepContext(cos, sin, mask)
    calls = []
    real = native.rope
    monkeypatch.setattr(native, "rope", lambda *a: calls.append(1) or real(*a))
    with torch.no_grad():
        fast = block(x, ctx, absorbed=False)
        assert len(calls) == 2  # q's and k's rope parts
        monkeypatch.setattr(rope, "native_rope", False)
        slow = block(x, ctx, absorbed=False)
    assert torch.equal(fast, slow)


@pytest.mark.parametrize("bad", ["x_dtype", "x_odd", "x_3d", "cos_shape", "sin_dtype"])
def test_refusals_name_the_argument(bad):
    x = torch.randn(2, 3, 5, 8)
    cos, sin = _cos_sin(torch.arange(5).expand(2, 5), 8)
    name = bad.split("_")[0]
    if bad == "x_dtype":
        x = x.double()
    elif bad == "x_odd":
        x = torch.randn(2, 3, 5, 7)
    elif bad == "x_3d":
        x = x[0]
    elif bad == "cos_shape":
        cos = cos[:, :4]
    elif bad == "sin_dtype":
        sin = sin.double()
    with pytest.raises(ValueError, match=rf"native.rope: {name} must be"):
        native.rope(x, cos, sin, True)
