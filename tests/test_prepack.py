"""oneDNN-reordered bf16 weights (dsvl2/model/prepack.py, ops.Linear.prepack / narrow):
the reordered product against torch's plain one (bits), the fused tanh GELU against float64
and against the unfused chain, when ``narrow`` must ignore the reordered copy, and the vision
tower prepacked against itself unpacked."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dsvl2.config import VisionConfig
from dsvl2.model import native, ops, prepack
from dsvl2.model.ops import Linear, linear_narrow

BF = torch.bfloat16
needs_onednn_bf16 = pytest.mark.skipif(not prepack.usable(),
                                       reason="hardware: no oneDNN bf16 products on this CPU / torch")


def _gelu32(h: torch.Tensor) -> torch.Tensor:
    """The GELU ``Linear.narrow`` applies to a float32 result: the native one where the kernels
    are built (checked against float64 in tests/test_native_gelu.py) and no gradient is
    recorded, else torch's."""
    if native.available() and not h.requires_grad:
        return native.gelu_tanh_(h.detach().clone())
    return F.gelu(h, approximate="tanh")


def _gelu_bf16(h: torch.Tensor) -> torch.Tensor:
    """The GELU ``Linear.narrow`` applies to a bf16 result: the native table (the float32 GELU
    rounded once, tests/test_native_gelu.py) where the kernels are built and no gradient is
    recorded, else torch's."""
    if native.available() and not h.requires_grad:
        return native.gelu_tanh_(h.float()).to(BF)
    return F.gelu(h, approximate="tanh")


def _bf16_linear(n: int, k: int, bias: bool = True, seed: int = 0) -> Linear:
    torch.manual_seed(seed)
    lin = Linear(k, n, bias=bias)
    with torch.no_grad():
        lin.weight.normal_(0, k ** -0.5)
        if bias:
            lin.bias.normal_(0, 0.5)
    return lin.to(BF)


@needs_onednn_bf16
@pytest.mark.parametrize("shape", [(1, 1, 64), (3, 29, 64), (1, 300, 64), (17, 64)])
@pytest.mark.parametrize("bias", [True, False])
def test_reordered_product_has_plain_bits(shape, bias):
    lin = _bf16_linear(40, 64, bias)
    x = torch.randn(*shape).to(BF)
    got = prepack.product(x, prepack.pack(lin.weight), lin.bias)
    assert got.dtype is BF and got.shape == (*shape[:-1], 40)
    assert torch.equal(got, F.linear(x, lin.weight, lin.bias))


@needs_onednn_bf16
def test_reordered_product_reads_strided_input():
    """oneDNN's op misreads a transposed input; ``product`` hands it a contiguous one."""
    lin = _bf16_linear(24, 32)
    x = torch.randn(32, 50).to(BF).t()  # [50, 32], not contiguous
    assert torch.equal(prepack.product(x, prepack.pack(lin.weight), lin.bias), F.linear(x, lin.weight, lin.bias))


@needs_onednn_bf16
def test_rows_hint_does_not_change_bits():
    lin = _bf16_linear(96, 128)
    x = torch.randn(2, 37, 128).to(BF)
    outs = [prepack.product(x, prepack.pack(lin.weight, rows), lin.bias) for rows in (1, 37, 729, 5000)]
    assert all(torch.equal(outs[0], o) for o in outs[1:])


@needs_onednn_bf16
def test_narrow_uses_the_reordered_weight_with_the_same_bits(bf16_policy):
    lin = _bf16_linear(72, 48)
    x = torch.randn(2, 9, 48)
    want = linear_narrow(x, lin.weight, lin.bias)
    assert lin.prepack(9) and lin.packed is not None
    got = lin.narrow(x)
    assert got.dtype is BF and torch.equal(got, want)
    # fc1's GELU on the bf16 result (by table where the kernels are built)
    assert torch.equal(lin.narrow(x, gelu_tanh=True), _gelu_bf16(want))
    with torch.no_grad():
        assert torch.equal(lin.narrow(x, gelu_tanh=True), _gelu_bf16(want.detach()))


@needs_onednn_bf16
def test_narrow_of_a_bf16_input_uses_the_reordered_weight_too(bf16_policy, monkeypatch):
    """fc2 after fc1, proj after the attention: their input is already bf16. Under the bf16
    policy they take the reordered weight as well (F.linear's bits; it used to reorder the
    plain weight inside every call), never in a decode step."""
    lin = _bf16_linear(72, 48)
    assert lin.prepack(9)
    calls = []
    real = prepack.product
    monkeypatch.setattr(prepack, "product", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    x = torch.randn(2, 9, 48).to(BF)
    got = lin.narrow(x)
    assert calls == [1] and got.dtype is BF and torch.equal(got, F.linear(x, lin.weight, lin.bias))
    with ops.decoding():
        assert torch.equal(lin.narrow(x), F.linear(x, lin.weight, lin.bias))
    assert calls == [1]


@needs_onednn_bf16
def test_narrow_ignores_a_stale_reordered_weight(bf16_policy):
    """A weight changed in place after ``prepack`` (a reload into the same module): ``narrow``
    computes with the new values, not the reordered copy of the old ones."""
    lin = _bf16_linear(32, 16)
    assert lin.prepack()
    with torch.no_grad():
        lin.weight.mul_(-2)
    x = torch.randn(5, 16)
    assert torch.equal(lin.narrow(x), linear_narrow(x, lin.weight, lin.bias))
    assert torch.equal(lin.narrow(x, gelu_tanh=True), F.gelu(linear_narrow(x, lin.weight, lin.bias),
                                                             approximate="tanh"))


@needs_onednn_bf16
def test_narrow_ignores_the_reordered_weight_outside_bf16_products():
    """float32 products (the other policy) and decode steps never take the oneDNN path."""
    lin = _bf16_linear(32, 16)
    assert lin.prepack()
    x = torch.randn(4, 16)
    before = ops.big_products_in_weights_dtype()
    ops.set_big_products_in_weights_dtype(False)
    try:
        got = lin.narrow(x, gelu_tanh=True)
        assert got.dtype is torch.float32
        assert torch.equal(got, _gelu32(ops.linear(x, lin.weight, lin.bias)))
    finally:
        ops.set_big_products_in_weights_dtype(before)
    with ops.decoding():
        assert torch.equal(lin.narrow(x), linear_narrow(x, lin.weight, lin.bias))


def test_prepack_refuses_what_it_cannot_reorder():
    """float32 weights (the oracle's) are never reordered; ``narrow`` is then ``linear_narrow``."""
    lin = Linear(16, 8)
    assert lin.prepack() is False and lin.packed is None
    x = torch.randn(3, 16)
    assert torch.equal(lin.narrow(x), linear_narrow(x, lin.weight, lin.bias))
    assert torch.equal(lin.narrow(x, gelu_tanh=True), _gelu32(lin(x)))


def small_towers(layers: int):
    """A small vision tower with random weights: (its bf16 copy, the float32 tower itself)."""
    from dsvl2.model.vision import VisionTransformer

    cfg = VisionConfig(width=64, layers=layers, heads=4, mlp_ratio=3.7362, image_size=56, patch_size=14)
    torch.manual_seed(0)
    tower = VisionTransformer(cfg)
    with torch.no_grad():
        for prm in tower.parameters():
            prm.normal_(0, 0.2)
    exact = VisionTransformer(cfg)
    exact.load_state_dict(tower.state_dict())  # float32 weights: the float32 tower
    return tower.to(BF), exact


@needs_onednn_bf16
def test_vision_tower_prepacked_matches_unpacked(bf16_policy):
    """A whole (small) tower: prepacked, every product has the unpacked bits and the GELU is
    the same in both, so the output is the unpacked tower's bit for bit, and near float32."""
    tower, exact = small_towers(2)
    pixels = torch.randn(2, 3, 56, 56)
    with torch.inference_mode():
        plain = tower(pixels)
        assert tower.prepack()
        packed = tower(pixels)
        truth = exact(pixels)
    assert packed.dtype is torch.float32
    assert torch.equal(packed, plain)
    assert torch.allclose(packed, truth, rtol=0.05, atol=0.05)


def test_load_prepacks_the_vision_tower_where_vision_runs_in_bf16():
    import dsvl2

    m = dsvl2.load("demo")
    lins = [lin for b in m.model.vision.blocks for lin in (b.attn.qkv, b.attn.proj, b.mlp.fc1, b.mlp.fc2)]
    want = m.kernels.big_products == "bf16" and prepack.usable()
    assert all((lin.packed is not None) == want for lin in lins)
