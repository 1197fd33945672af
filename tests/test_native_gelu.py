"""The native tanh GELU (dsvl2/model/native/gelu.c) against float64 and against torch.

The float64 reference is the reference's formula written with the identity
(1 + tanh(u)) / 2 = sigmoid(2u), which float64 keeps accurate where 1 + tanh(u) cancels
(checked here against the tanh form where it does not). The vision tower's MLP takes
the native GELU on float32 results (``ops.Linear.narrow``); its output agrees with the
``F.gelu`` path.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from dsvl2.config import VisionConfig
from dsvl2.model import native
from dsvl2.model.vision import Mlp

needs_native = pytest.mark.skipif(not native.cpu_ok()[0], reason=f"CPU: {native.cpu_ok()[1]}")
EPS = torch.finfo(torch.float32).eps


def _exact(x: torch.Tensor) -> torch.Tensor:
    xd = x.double()
    return xd * torch.sigmoid(2 * math.sqrt(2 / math.pi) * (xd + 0.044715 * xd ** 3))


def _inputs() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.cat([torch.linspace(-12, 12, 1 << 18), torch.randn(1 << 17, generator=g) * 30,
                      torch.randn(1 << 16, generator=g) * 1e-3])


def test_float64_reference_is_the_tanh_formula():
    xd = _inputs().double()
    u = math.sqrt(2 / math.pi) * (xd + 0.044715 * xd ** 3)
    mid = u.abs() < 8  # where 1 + tanh(u) loses under 1e-9 in float64
    tanh_form = 0.5 * xd * (1 + torch.tanh(u))
    torch.testing.assert_close(_exact(xd)[mid], tanh_form[mid], rtol=1e-9, atol=0)


@needs_native
def test_gelu_within_an_ulp_of_x_and_accurate_where_torch_cancels():
    x = _inputs()
    ref = _exact(x)
    ours = native.gelu_tanh_(x.clone()).double()
    theirs = F.gelu(x, approximate="tanh").double()
    scale = EPS * x.double().abs()
    # absolute: within 2 float32 ulps of |x| of the exact value, as torch is
    assert ((theirs - ref).abs() <= 2 * scale).all()
    assert ((ours - ref).abs() <= 2 * scale).all(), ((ours - ref).abs() / scale).max()
    # relative, where the value is not tiny: a few ulps (torch's 1 + tanh(u) loses hundreds near x = -3)
    big = ref.abs() > 1e-3
    assert ((ours - ref).abs() / (EPS * ref.abs()))[big].max() <= 32


@needs_native
def test_gelu_special_values_are_torchs():
    x = torch.tensor([0.0, -0.0, 1e-30, -1e-30, 1e-45, math.inf, -math.inf, math.nan, 50.0, -50.0, 88.0,
                      -88.0, 1e30, -1e30, 3.4e38, -3.4e38])
    ours, theirs = native.gelu_tanh_(x.clone()), F.gelu(x, approximate="tanh")
    torch.testing.assert_close(ours, theirs, equal_nan=True, rtol=0, atol=0)
    assert torch.equal(torch.signbit(ours), torch.signbit(theirs))


@needs_native
@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 16384 * 4 + 3, 16384 * 9 - 1])
def test_gelu_every_length_in_place(n):
    x = torch.randn(n, generator=torch.Generator().manual_seed(n)) * 4
    y = x.clone()
    assert native.gelu_tanh_(y) is y
    torch.testing.assert_close(y, F.gelu(x, approximate="tanh"), rtol=4 * EPS, atol=2 * EPS * 4 * 6)


@needs_native
@pytest.mark.parametrize("fn, bad", [
    ("gelu_tanh_", torch.zeros(4, 6).t()), ("gelu_tanh_", torch.zeros(8, dtype=torch.float64)),
    ("gelu_tanh_", torch.zeros(8, dtype=torch.bfloat16)),
    ("gelu_tanh_bf16_", torch.zeros(4, 6, dtype=torch.bfloat16).t()), ("gelu_tanh_bf16_", torch.zeros(8)),
    ("gelu_tanh_bf16_", torch.zeros(8, dtype=torch.float16))])
def test_gelu_refuses_what_it_cannot_take(fn, bad):
    want = "a contiguous float32 tensor" if fn == "gelu_tanh_" else "a contiguous bf16 tensor"
    with pytest.raises(ValueError, match=f"{fn}: x must be {want}"):
        getattr(native, fn)(bad)


def _mlp() -> Mlp:
    """A vision MLP of width 64 (hidden 200) with random weights and biases."""
    torch.manual_seed(0)
    mlp = Mlp(VisionConfig(width=64, mlp_ratio=3.125, layers=1, heads=4))
    for lin in (mlp.fc1, mlp.fc2):
        lin.weight.data.normal_(0, 0.3)
        lin.bias.data.normal_(0, 0.3)
    return mlp


def _spy(monkeypatch, name: str) -> list:
    """The shapes ``native.<name>`` is called with from now on (it still runs)."""
    calls, real = [], getattr(native, name)
    monkeypatch.setattr(native, name, lambda h: calls.append(h.shape) or real(h))
    return calls


@needs_native
@pytest.mark.parametrize("bf16", [False, True])
def test_vision_mlp_native_gelu_agrees_with_the_torch_path(monkeypatch, bf16):
    """float32 weights: fc1's float32 result through the native GELU, as close as torch's
    float32 GELU gives; bf16 weights under bf16 products: fc1's bf16 result through the
    table, the F.gelu path's output to bf16's precision."""
    from dsvl2.model import ops
    mlp = _mlp().to(torch.bfloat16) if bf16 else _mlp()
    x = torch.randn(2, 29, 64) * 2
    before = ops.big_products_in_weights_dtype()
    ops.set_big_products_in_weights_dtype(bf16)
    try:
        with torch.no_grad():
            calls = _spy(monkeypatch, "gelu_tanh_bf16_" if bf16 else "gelu_tanh_")
            fast = mlp(x)
            assert calls == [torch.Size([2, 29, 200])]
            monkeypatch.setattr(native, "available", lambda: False)
            slow = mlp(x)
    finally:
        ops.set_big_products_in_weights_dtype(before)
    assert fast.dtype is (torch.bfloat16 if bf16 else torch.float32)
    torch.testing.assert_close(fast, slow, **({} if bf16 else {"rtol": 1e-5, "atol": 1e-5}))


def test_vision_mlp_with_gradients_takes_torchs_gelu():
    cfg = VisionConfig(width=16, mlp_ratio=1.5, layers=1, heads=2)
    mlp = Mlp(cfg)
    x = torch.randn(3, 16, requires_grad=True)
    mlp(x).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


# ---- the bf16 GELU by table (gelu.c dsvl2_gelu_tanh_bf16) ----------------------------------


def _every_bf16() -> torch.Tensor:
    """All 65,536 bf16 bit patterns (NaNs and infinities included), in bit order."""
    u = torch.arange(1 << 16, dtype=torch.int32)
    return torch.where(u >= 1 << 15, u - (1 << 16), u).to(torch.int16).view(torch.bfloat16)


def _table_reference(v: torch.Tensor) -> torch.Tensor:
    """What the table holds: the float32 GELU (checked against float64 above), rounded once."""
    return native.gelu_tanh_(v.float()).to(torch.bfloat16)


@needs_native
def test_bf16_gelu_every_bit_pattern_within_half_an_ulp_of_float64():
    """Every pattern, in shuffled order (the gathers index by value, not position): the
    float32 GELU rounded once, so within half a bf16 ulp of the float64 GELU plus the float32
    error; where it differs from F.gelu on bf16 (torch's formula cancels to 0 below x ~ -5),
    it is the closer of the two."""
    v = _every_bf16()[torch.randperm(1 << 16, generator=torch.Generator().manual_seed(3))]
    y = v.clone()
    assert native.gelu_tanh_bf16_(y) is y
    assert torch.equal(y.view(torch.int16), _table_reference(v).view(torch.int16))
    fin = torch.isfinite(v)
    assert torch.isnan(y[torch.isnan(v)]).all()
    x = v[fin].double()
    exact, got = _exact(x), y[fin].double()
    bound = exact.abs() * 2.0 ** -8 + 8 * EPS * x.abs() + 1e-38
    assert ((got - exact).abs() <= bound).all()
    theirs = F.gelu(v[fin], approximate="tanh").double()
    differ = got != theirs
    assert 0 < differ.sum() < 2000
    assert ((got - exact).abs()[differ] < (theirs - exact).abs()[differ]).all()


@needs_native
@pytest.mark.parametrize("n", [0, 1, 15, 16, 17, 16384 * 4 + 3, 16384 * 9 - 1])
def test_bf16_gelu_every_length_and_view(n):
    """Tails shorter than a vector, the parallel chunks' ends; a 2-d tensor (the fc1 result)."""
    x = (torch.randn(n, generator=torch.Generator().manual_seed(n)) * 4).to(torch.bfloat16)
    y = x.clone()
    native.gelu_tanh_bf16_(y)
    assert torch.equal(y.view(torch.int16), _table_reference(x).view(torch.int16))
    if n > 16:
        m = x[: n - n % 16].view(-1, 16).clone()
        assert torch.equal(native.gelu_tanh_bf16_(m.clone()), _table_reference(m))
