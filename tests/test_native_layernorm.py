"""The residual add + LayerNorm in one pass (dsvl2/model/native/layernorm.c, the wrapper
``native.add_layernorm_``) and the vision tower's fused path that uses it
(``VisionTransformer.forward``, ``Block.fused``).

* The add: torch's float32 ``x + y`` bit for bit (one IEEE rounding), in place.
* The LayerNorm: against the float64 LayerNorm of the summed rows, within a bound of a few
  float32 roundings of the row's scale (the moments are float32 sums; a row far from zero
  loses to cancellation in proportion to |mean| / std, as torch's does: the same bound
  holds for torch's, checked too); the bf16 result is the float32 one rounded to nearest
  even (torch's cast); a row's bits do not depend on the other rows.
* The tower: under the bf16 policy the fused path runs (one native pass per add), agrees
  with the unfused bf16 path within bf16 rounding and is as close to the float32 tower.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dsvl2.model import native, ops, vision
from test_prepack import small_towers

needs_native = pytest.mark.skipif(not native.cpu_ok()[0], reason=f"CPU: {native.cpu_ok()[1]}")
BF = torch.bfloat16
U = 2.0 ** -24  # float32 unit roundoff
K = 32  # roundings allowed in the bound (measured: ~2-4 of the row's scale)


def _case(n: int, w: int, seed: int = 0, offset: float = 0.5):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, w, generator=g) * 3 + offset
    x[0] = x[0] * 0.01 + 100.0  # a row far from zero: |mean| / std ~ 3000
    y = torch.randn(n, w, generator=g).to(BF)
    weight = (torch.randn(w, generator=g) * 0.3 + 1).to(BF)
    bias = (torch.randn(w, generator=g) * 0.2).to(BF)
    return x, y, weight, bias


def _bound(s: torch.Tensor, weight, bias, eps: float) -> torch.Tensor:
    """K roundings of each output's scale: (|s - mean| + |mean|) / std x |w| + |b|, in float64."""
    sd = s.double()
    mean = sd.mean(-1, keepdim=True)
    std = (sd.var(-1, unbiased=False, keepdim=True) + eps).sqrt()
    w = torch.ones(s.shape[-1], dtype=torch.float64) if weight is None else weight.double()
    b = torch.zeros(s.shape[-1], dtype=torch.float64) if bias is None else bias.double()
    return K * U * (((sd - mean).abs() + mean.abs()) / std * w.abs() + b.abs())


def _float64(s, weight, bias, eps):
    w = None if weight is None else weight.double()
    b = None if bias is None else bias.double()
    return F.layer_norm(s.double(), (s.shape[-1],), w, b, eps)


@needs_native
@pytest.mark.parametrize("w", [8, 72, 1152])
@pytest.mark.parametrize("add, params", [(True, True), (False, True), (True, False)])
def test_add_then_layernorm_against_float64(w, add, params):
    x, y, weight, bias = _case(37, w)
    if not params:
        weight = bias = None
    x0 = x.clone()
    got = native.add_layernorm_(x, y if add else None, weight, bias, 1e-6, torch.float32)
    s = x0 + y.float() if add else x0
    assert torch.equal(x, s)  # the stream updated in place: torch's float32 add, bit for bit
    want, room = _float64(s, weight, bias, 1e-6), _bound(s, weight, bias, 1e-6)
    assert got.dtype is torch.float32 and got.shape == x.shape
    assert ((got.double() - want).abs() <= room).all()
    wf = None if weight is None else weight.float()
    bf = None if bias is None else bias.float()
    theirs = F.layer_norm(s, (w,), wf, bf, 1e-6)  # the bound is not ours alone: torch's meets it too
    assert ((theirs.double() - want).abs() <= room).all()
    # not trivially loose: a mean off by one float32 rounding of |mean| per value misses it
    assert ((got.double() - (want + 64 * K * U)).abs() > room).any()


@needs_native
def test_bf16_result_is_the_float32_result_rounded():
    # 345,600 values: ties and near-ties of the rounding (~1 in 32,768 each) occur
    x, y, weight, bias = _case(300, 1152, seed=1)
    f32 = native.add_layernorm_(x.clone(), y, weight, bias, 1e-6, torch.float32)
    b16 = native.add_layernorm_(x.clone(), y, weight, bias, 1e-6)
    assert b16.dtype is BF and torch.equal(b16, f32.to(BF))


@needs_native
def test_a_rows_bits_do_not_depend_on_the_other_rows():
    x, y, weight, bias = _case(50, 72, seed=2)
    whole = native.add_layernorm_(x.clone(), y, weight, bias, 1e-5)
    for i in (0, 17, 49):
        alone = native.add_layernorm_(x[i:i + 1].clone(), y[i:i + 1], weight, bias, 1e-5)
        assert torch.equal(alone, whole[i:i + 1])


@needs_native
def test_any_leading_shape():
    x, y, weight, bias = _case(12, 16, seed=3)
    flat = native.add_layernorm_(x.clone(), y, weight, bias, 1e-6)
    shaped = native.add_layernorm_(x.clone().view(3, 4, 16), y.view(3, 4, 16), weight, bias, 1e-6)
    assert shaped.shape == (3, 4, 16) and torch.equal(shaped.view(12, 16), flat)


@pytest.mark.parametrize("bad", ["x_dtype", "x_width", "x_strided", "y_dtype", "y_shape", "weight", "out"])
def test_refusals_name_the_argument(bad):
    """Checked before any C runs (so on every CPU)."""
    x, y, weight, bias = _case(4, 16)
    kwargs = {"x": x, "y": y, "weight": weight, "bias": bias, "eps": 1e-6}
    name = bad.split("_")[0]
    if bad == "x_dtype":
        kwargs["x"] = x.double()
    elif bad == "x_width":
        kwargs["x"], kwargs["y"] = x[:, :12].contiguous(), y[:, :12].contiguous()
    elif bad == "x_strided":
        kwargs["x"] = torch.randn(16, 4).t()
    elif bad == "y_dtype":
        kwargs["y"] = y.float()
    elif bad == "y_shape":
        kwargs["y"] = y[:3]
    elif bad == "weight":
        kwargs["weight"] = weight[:8]
    if bad == "out":
        with pytest.raises(ValueError, match="out_dtype must be"):
            native.add_layernorm_(**kwargs, out_dtype=torch.float16)
        return
    with pytest.raises(ValueError, match=rf"native.add_layernorm_: {name} must be"):
        native.add_layernorm_(**kwargs)


# ---- the vision tower's fused path -------------------------------------------------------------

@needs_native
def test_the_tower_takes_the_fused_path_under_the_bf16_policy(bf16_policy, monkeypatch):
    """bf16 weights, bf16 products, the attention on torch's kernel (it runs on every CPU):
    one native pass before the first block and two per block; the output close to the
    unfused bf16 path's (the LayerNorms' float32 bits differ, then bf16 rounding) and as
    close to the float32 tower."""
    monkeypatch.setattr(ops, "attention_kernel", "torch")
    tower, exact = small_towers(3)
    pixels = torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(1))
    calls = []
    real = native.add_layernorm_
    monkeypatch.setattr(native, "add_layernorm_", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    with torch.inference_mode():
        fused = tower(pixels)
        assert len(calls) == 1 + 2 * len(tower.blocks)
        monkeypatch.setattr(vision, "fused_norms", False)
        plain = tower(pixels)
        assert len(calls) == 1 + 2 * len(tower.blocks)  # the switch is honoured
        truth = exact(pixels)
    assert fused.dtype is torch.float32 and fused.shape == plain.shape
    rel = lambda a, b: float((a - b).norm() / b.norm())  # noqa: E731
    assert rel(fused, plain) < 0.02
    assert rel(fused, truth) <= rel(plain, truth) * 1.25


def test_the_fused_path_only_under_the_bf16_policy(monkeypatch):
    """float32 products (the oracle's weights, or the fp32 policy) and the switch off: the
    plain blocks."""
    tower, exact = small_towers(3)
    x = torch.randn(2, 16, 64)
    assert not exact.fused_here(x)  # float32 weights
    before = ops.big_products_in_weights_dtype()
    try:
        ops.set_big_products_in_weights_dtype(False)
        assert not tower.fused_here(x)
        ops.set_big_products_in_weights_dtype(True)
        monkeypatch.setattr(ops, "attention_kernel", "torch")
        assert tower.fused_here(x) == native.available()
        assert not tower.fused_here(x.clone().requires_grad_())  # updated in place: not under autograd
        monkeypatch.setattr(vision, "fused_norms", False)
        assert not tower.fused_here(x)
    finally:
        ops.set_big_products_in_weights_dtype(before)
