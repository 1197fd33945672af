"""Quantised weights (int8 per channel, int4 group-wise): formats, kernels, checkpoints, loading.

The reference for every quantised path is the simple one: dequantise the stored tensors
to float32 (``quant.dequantize``) and run the float model. The native decode kernels keep
float32 activations and dequantise exactly, so they agree to float32 rounding; prefill is
one GEMM of the dequantised weight (bit-exact against it); torch's int8pack / int4pack
kernels compute with bf16 activations, so there agreement is to bf16 precision.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from _paths import GOLDEN
from dsvl2.commands.main import main as cli_main
from dsvl2.errors import CheckpointError
from dsvl2.model import native, ops, quant
from dsvl2.model.moe import Experts, Routing
from dsvl2.checkpoint.quantised import quantize_checkpoint
from dsvl2.checkpoint.load import SCALE_SUFFIX, load_model

VARIANTS = ["tiny", "small", "base", "dsv2x"]


def _text_logits(model, decoding: bool = False) -> torch.Tensor:
    ids = torch.tensor([[0, 5, 17, 300, 2687, 44, 91]])
    ones = torch.ones_like(ids, dtype=torch.bool)
    with torch.no_grad():
        if decoding:
            with ops.decoding():
                return model(ids, ones, ~ones).logits
        return model(ids, ones, ~ones).logits


def _dequantised_folder(qdir, out):
    """A float32 checkpoint holding the dequantised values of a quantised one (the reference)."""
    stored = load_file(str(qdir / "model.safetensors"))
    bits = json.loads((qdir / "config.json").read_text())["quantization"]["bits"]
    floats = {}
    for k, v in stored.items():
        if k.endswith(SCALE_SUFFIX):
            continue
        scale = stored.get(k + SCALE_SUFFIX)
        if scale is None:
            floats[k] = v
        else:
            floats[k] = quant.dequantize(v, scale, 8 if v.dtype == torch.int8 else 4)
            assert bits == 8 or v.dtype in (torch.int8, torch.uint8)
    out.mkdir()
    save_file(floats, str(out / "model.safetensors"))
    cfg = json.loads((qdir / "config.json").read_text())
    del cfg["quantization"]
    (out / "config.json").write_text(json.dumps(cfg))
    return out


# ---- formats ------------------------------------------------------------------------------

def test_int8_round_trip_error_is_at_most_half_a_step():
    w = torch.randn(40, 96) * torch.rand(40, 1) * 3
    q, s = quant.quantize_int8(w)
    assert q.dtype == torch.int8 and s.shape == (40,) and s.dtype == torch.bfloat16
    err = (quant.dequantize(q, s, 8) - w).abs()
    assert (err <= s.float()[:, None] / 2 + 1e-6).all()
    assert q.abs().max() == 127  # the row maximum uses the full range (up to bf16 rounding of the scale)


def test_int4_pack_unpack_and_group_error():
    u = torch.randint(0, 16, (8, 64), dtype=torch.uint8)
    assert torch.equal(quant.unpack_int4(quant.pack_int4(u)), u.to(torch.int8) - 8)
    w = torch.randn(16, 128)
    q, s = quant.quantize_int4(w, 32)
    assert q.shape == (16, 64) and s.shape == (16, 4)
    err = (quant.dequantize(q, s, 4) - w).abs().view(16, 4, 32)
    assert (err <= s.float()[..., None] / 2 + 1e-6).all()


def test_int4_group_choice():
    assert quant.int4_group(1280) == 128 and quant.int4_group(96) == 32 and quant.int4_group(64) == 64
    assert quant.int4_group(40) is None


# ---- kernels --------------------------------------------------------------------------------

needs_native = pytest.mark.skipif(not native.available(), reason="native kernels not built here")


@pytest.fixture
def no_native(monkeypatch):
    """The native kernels switched off (DSVL2_NATIVE=0) for one test: torch's kernels run."""
    monkeypatch.setenv("DSVL2_NATIVE", "0")
    native.reset()
    assert not native.available()
    yield
    native.reset()


@pytest.fixture(params=native.QUANT_VARIANTS)
def variant(request):
    """Each variant of the quantised products (``native.quant_variant``) in turn (AVX2, the fallback, is run on
    AVX-512 machines too); where the CPU lacks AVX-512, both runs are AVX2."""
    before = native.quant_variant()
    native.quant_variant(request.param)
    yield native.quant_variant()
    native.quant_variant(before)


def _qweight(bits: int, n: int, k: int, seed: int = 0) -> tuple[quant.QuantWeight, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * k ** -0.5
    group = quant.int4_group(k) or 0
    q, s = quant.quantize_int8(w) if bits == 8 else quant.quantize_int4(w, group)
    qw = quant.QuantWeight.empty(bits, (n, k), group)
    qw.set_data((), q)
    qw.set_scale((), s)
    return qw, quant.dequantize(q, s, bits)


def _x(m: int, k: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(m, k, generator=torch.Generator().manual_seed(seed))


def _fp32_bound(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """How far two float32 evaluations of x @ w.T can be apart: each is within
    gamma_K * sum_k |x_k w_k| of the exact value, whatever the order of the sum
    (gamma_K = K u / (1 - K u), u = 2^-24), so twice that."""
    k = x.shape[-1]
    u = 2.0 ** -24
    return 2 * (k * u / (1 - k * u)) * (x.double().abs() @ w.double().abs().T)


def _digits(variant: str, group: int) -> bool:
    """Whether int4 products of this group size take the integer digits (int4.c: "avx512-vnni", "avx2-digits")."""
    return variant in ("avx512-vnni", "avx2-digits") and group % 128 == 0


def _digits_error(x: torch.Tensor) -> torch.Tensor:
    """How far the value the digits stand for can be from each x (int4.c): half a unit of
    the last digit, (max |x| of its block of 128) / 127 / 2^15, plus 4 roundings of x."""
    blocks = x.double().abs().unflatten(-1, (-1, 128)).amax(-1, keepdim=True)
    unit = (blocks / 127 * 2.0 ** -15).expand(*blocks.shape[:-1], 128).flatten(-2)
    return unit + 4 * 2.0 ** -24 * x.double().abs()


def _digits_reference(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """int4.c's digits products written out in torch, for x without zero or non-finite blocks:
    per block of 128 values of a row, sx = max |x| / 127 and three digits (d0 = round(x / sx),
    then the rounded remainders times 128, each step in float32); per lane (8 columns) the
    exact integer sum of (u - 8) (d0 2^14 + d1 2^7 + d2), then in float32: the sum times the
    weight's group scale, fused-multiply-added with sx 2^-14 into the lane's accumulator
    (block after block; a float32 product is exact in float64, so only a tie of the float64
    sum rounds differently: not in these data), the 16 lanes added as hsum16 adds them."""
    m_rows, k = x.shape
    blocks = k // 128
    per = k // scale.shape[1] // 128
    xb = x.view(m_rows, blocks, 128)
    big = xb.abs().amax(-1, keepdim=True)
    v = xb * (torch.tensor(127.0) / big)
    d0 = torch.round(v)
    r1 = (v - d0) * 128
    d1 = torch.round(r1)
    d2 = torch.round((r1 - d1) * 128)
    dig = (d0.long() * 2 ** 14 + d1.long() * 2 ** 7 + d2.long()).view(m_rows, 1, blocks, 16, 8)
    u = torch.stack([q & 15, q >> 4], -1).flatten(-2).long() - 8  # [N, K], column order
    lane = (u.view(1, -1, blocks, 16, 8) * dig).sum(-1).float()  # [M, N, blocks, 16], exact integers
    s = scale.float().repeat_interleave(per, -1)[None, :, :, None]  # [1, N, blocks, 1]
    sx = (big / 127 * 2.0 ** -14).view(m_rows, 1, blocks, 1)
    acc = torch.zeros(m_rows, q.shape[0], 16)
    for b in range(blocks):
        acc = ((lane[:, :, b] * s[:, :, b]).double() * sx[:, :, b].double() + acc.double()).float()
    a = acc[..., :8] + acc[..., 8:]
    a = a[..., :4] + a[..., 4:]
    return (a[..., 0] + a[..., 2]) + (a[..., 1] + a[..., 3])


@needs_native
@pytest.mark.parametrize("k, group", [(512, 128), (768, 256)])
def test_int4_digits_paths_give_the_documented_bits(k, group):
    """Each digits path this CPU has ("avx2-digits" on every x86-64 CPU the kernels run on,
    "avx512-vnni" where it has VNNI) gives, bit for bit, what _digits_reference writes out:
    so the two paths give the same bits, and a row's bits depend on that row alone."""
    g = torch.Generator().manual_seed(5)
    w = torch.randn(40, k, generator=g) * k ** -0.5
    q, s = quant.quantize_int4(w, group)
    x = _x(3, k) * torch.logspace(-3, 3, k)
    want = _digits_reference(x, q, s)
    before = native.quant_variant()
    ran = []
    try:
        for v in native.QUANT_VARIANTS:
            if _digits(v, group) and native.quant_variant(v) == v:
                ran.append(v)
                assert torch.equal(native.linear_int4(x, q, s), want), v
                assert torch.equal(native.linear_int4(x[1:2], q, s), want[1:2]), v
    finally:
        native.quant_variant(before)
    assert "avx2-digits" in ran


@needs_native
def test_int4_digits_edge_values():
    """The digits paths (AVX-512 VNNI, AVX2) on what a block can hold: a value 1e6
    times its neighbours (they keep 2^-22 of the block's largest, as _digits_error says), an
    all-zero block (its sum exactly 0), values below 2^-100 (scaled, not lost), and a NaN or
    an infinity (the output is not finite, as in the float product)."""
    qw, ref_w = _qweight(4, 64, 512)
    before = native.quant_variant()
    try:
        for v in native.QUANT_VARIANTS:
            if native.quant_variant(v) != v:
                continue
            x = _x(4, 512)
            x[0, 5] = 1e6
            x[1, :128] = 0
            x[2] = x[2] * 1e-35
            y = native.linear_int4(x, qw.data, qw.scale)
            ref = F.linear(x.double(), ref_w.double())
            bound = _fp32_bound(x, ref_w) + (_digits_error(x) @ ref_w.double().abs().T if _digits(v, 128) else 0)
            assert ((y.double() - ref).abs() <= bound).all(), v
            assert (y[2] != 0).all()
            for bad in (float("nan"), float("inf")):
                x[3, 300] = bad
                assert not native.linear_int4(x, qw.data, qw.scale)[3].isfinite().any(), (v, bad)
    finally:
        native.quant_variant(before)


@pytest.mark.parametrize("bits, n, k, kind", [(8, 48, 96, "int8"), (4, 48, 128, "int4pack"), (4, 40, 64, "int4")])
@pytest.mark.parametrize("decoding", [False, True])
def test_torch_kernels_match_dequantised_reference(no_native, bits, n, k, kind, decoding):
    """Without the native kernels: int8pack / int4pack mm (bf16 activations) in decode,
    int4pack in every step kind (its layout cannot be dequantised by rows), and the stored
    int4 format where int4pack cannot take the shape (N = 40); agreement to bf16 precision."""
    qw, ref_w = _qweight(bits, n, k)
    assert qw.kind == kind
    x = _x(5, k)
    out = qw.linear(x, decoding)
    assert out.dtype == torch.float32 and out.shape == (5, n)
    torch.testing.assert_close(out, F.linear(x, ref_w), atol=3e-2, rtol=2e-2)
    torch.testing.assert_close(qw.dequantize(), ref_w, atol=1e-2, rtol=1e-2)


@needs_native
@pytest.mark.parametrize("m, n, k", [(1, 896, 1280), (7, 40, 96), (4, 33, 64), (16, 50, 384), (3, 1, 32)])
def test_native_int4_linear_matches_float32_reference(variant, m, n, k):
    """Groups 128 (K = 384, 1280), 64 (K = 64) and 32 (K = 96, 32); N not a multiple of 16.
    The weight is dequantised exactly, so the kernel and torch's float32 product of the
    dequantised weight differ by float32 rounding of the sums only (``_fp32_bound``), and
    on the digits paths (groups of 128) by the digits' rounding of x
    (``_digits_error``)."""
    qw, ref_w = _qweight(4, n, k)
    assert qw.kind == "int4" and qw.group == quant.int4_group(k)
    x = _x(m, k)
    y = native.linear_int4(x, qw.data, qw.scale)
    ref = F.linear(x, ref_w)
    bound = _fp32_bound(x, ref_w) + (_digits_error(x) @ ref_w.double().abs().T if _digits(variant, qw.group) else 0)
    assert ((y.double() - ref.double()).abs() <= bound).all()
    with ops.decoding():
        assert torch.equal(ops.linear(x, qw), y)  # a decode step's int4 product is this kernel
    out = torch.empty(n, k)
    assert torch.equal(native.dequantize_int4(qw.data, qw.scale, out), ref_w)
    out16 = torch.empty(n, k, dtype=torch.bfloat16)
    assert torch.equal(native.dequantize_int4(qw.data, qw.scale, out16), ref_w.to(torch.bfloat16))


@needs_native
@pytest.mark.parametrize("bits, n, k", [(4, 896, 1280), (4, 40, 96), (8, 64, 96)])
def test_native_row_alone_equals_the_row_in_a_batch_of_7(variant, bits, n, k):
    qw, _ = _qweight(bits, n, k)
    x = _x(7, k)
    with ops.decoding():
        full = ops.linear(x, qw)
        for i in range(7):
            assert torch.equal(ops.linear(x[i:i + 1], qw)[0], full[i])


@pytest.mark.parametrize("bits, n, k", [(8, 896, 1280), (4, 896, 1280), (4, 40, 64), (8, 64, 96)])
def test_decode_rows_do_not_depend_on_the_batch(bits, n, k):
    """A row's numbers are the same alone and in a batch of any size (the ops rule)."""
    qw, _ = _qweight(bits, n, k)
    x = _x(9, k)
    full = qw.linear(x, decoding=True)
    for m in (1, 2, 4, 9):
        assert torch.equal(qw.linear(x[:m], decoding=True), full[:m])
    for i in range(9):
        assert torch.equal(qw.linear(x[i:i + 1], decoding=True)[0], full[i])


@pytest.mark.parametrize("bits, n, k", [(8, 48, 96), (4, 48, 128), (4, 40, 64), (4, 33, 96)])
def test_prefill_is_one_gemm_of_the_dequantised_weight(bits, n, k):
    """Outside decode: the dequantised weight (float32 exact, or its bf16 rounding when the
    kernel policy picks bf16 products) and one F.linear, as the float weights' path does."""
    qw, ref_w = _qweight(bits, n, k)
    x = _x(6, k)
    assert torch.equal(qw.linear(x, decoding=False), F.linear(x, ref_w))
    want16 = F.linear(x.to(torch.bfloat16), ref_w.to(torch.bfloat16)).float()
    assert torch.equal(qw.linear(x, decoding=False, bf16_products=True), want16)
    assert torch.equal(ops.linear(x, qw), F.linear(x, ref_w))  # the conftest's policy: float32 products
    ops.set_big_products_in_weights_dtype(True)
    try:
        assert torch.equal(ops.linear(x, qw), want16)
    finally:
        ops.set_big_products_in_weights_dtype(False)


@pytest.mark.parametrize("bits", [8, 4])
def test_prefill_blocks_of_rows(monkeypatch, bits):
    """A weight larger than one block is dequantised block by block (each into the same
    buffer) and the GEMMs' columns joined: the same numbers as one GEMM."""
    qw, ref_w = _qweight(bits, 100, 128)
    monkeypatch.setattr(quant, "BLOCK_ELEMS", 32 * 128)  # 32 rows a block: 4 blocks, the last of 4 rows
    x = _x(5, 128)
    torch.testing.assert_close(qw.linear(x, decoding=False), F.linear(x, ref_w), rtol=0, atol=1e-5)
    for dtype in (torch.float32, torch.bfloat16):
        assert torch.equal(qw.dequantized_rows(96, 100, dtype), ref_w[96:].to(dtype))


def _expert_stacks(bits: int, e: int, d: int, f: int):
    """gate / up / down QuantWeight stacks and their dequantised float32 values."""
    out = []
    for seed, (n, k) in enumerate(((f, d), (f, d), (d, f))):
        group = quant.int4_group(k) or 0
        qw = quant.QuantWeight.empty(bits, (e, n, k), group)
        for i in range(e):
            w = torch.randn(n, k, generator=torch.Generator().manual_seed(100 * seed + i)) * k ** -0.5
            q, s = quant.quantize_int8(w) if bits == 8 else quant.quantize_int4(w, group)
            qw.set_data((i,), q)
            qw.set_scale((i,), s)
        out.append((qw, torch.stack([qw[i].dequantize() for i in range(e)])))
    return out


def _routing(t: int, k: int, e: int, seed: int = 3) -> Routing:
    g = torch.Generator().manual_seed(seed)
    return Routing(torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(t)]), torch.rand(t, k, generator=g))


def _experts_module(stacks, e: int, d: int, f: int, quantised: bool) -> Experts:
    """An ``Experts`` holding the QuantWeight stacks (as the loader places them), or their
    dequantised float32 values."""
    mod = Experts(e, d, f)
    for name, (qw, w) in zip(("gate_proj", "up_proj", "down_proj"), stacks):
        if quantised:
            del mod._parameters[name]
            setattr(mod, name, qw)
        else:
            getattr(mod, name).data.copy_(w)
    return mod


@needs_native
@pytest.mark.parametrize("t, k, e, d, f", [(1, 6, 16, 128, 96), (16, 6, 16, 96, 64), (7, 2, 3, 64, 160)])
def test_native_int4_experts_match_float32_reference(variant, t, k, e, d, f):
    """The whole layer in one call (groups 128 / 64 / 32 among the shapes) equals the float
    layer of the dequantised weights to float32 rounding (three products and a SiLU: within
    1e-5 of the largest output), each token alone equals it in the batch bit for bit, and
    Experts.forward runs it in decode steps."""
    stacks = _expert_stacks(4, e, d, f)
    (gate, _), (up, _), (down, _) = stacks
    assert gate.kind == "int4"
    x = _x(t, d, seed=4)
    r = _routing(t, k, e)
    y = native.experts_int4(x, r.idx, r.weight, gate, up, down)
    with torch.no_grad():
        ref = _experts_module(stacks, e, d, f, quantised=False).reference_dispatch(x, r)
    assert (y - ref).abs().max().item() <= 1e-5 * max(1.0, ref.abs().max().item())
    for i in range(t):
        alone = native.experts_int4(x[i:i + 1], r.idx[i:i + 1], r.weight[i:i + 1], gate, up, down)
        assert torch.equal(alone[0], y[i])
    mod = _experts_module(stacks, e, d, f, quantised=True)
    with torch.no_grad(), ops.decoding():
        assert torch.equal(mod(x, r), y)


@needs_native
@pytest.mark.parametrize("t, d, f", [(1, 128, 96), (7, 64, 160), (16, 96, 64)])
def test_native_int4_gated_mlp_matches_float64_reference(variant, t, d, f):
    """One MLP of int4 weights in one call (``dsvl2_moe_i4`` with one expert; groups 128 /
    64 / 32 among the shapes): the float64 MLP of the dequantised weights to float32
    rounding (within 1e-5 of the largest output), each row alone equals it in the batch
    bit for bit, and ``ops.gated_mlp`` runs it in decode steps."""
    (gate, wg), (up, wu), (down, wd) = (_qweight(4, n, k, seed=seed)
                                        for seed, (n, k) in enumerate(((f, d), (f, d), (d, f))))
    x = _x(t, d, seed=6)
    y = native.gated_mlp_int4(x, gate, up, down)
    x64 = x.double()
    ref = F.linear(F.silu(F.linear(x64, wg.double())) * F.linear(x64, wu.double()), wd.double())
    assert y.dtype == torch.float32 and y.shape == (t, d)
    assert (y.double() - ref).abs().max().item() <= 1e-5 * max(1.0, ref.abs().max().item())
    for i in range(t):
        assert torch.equal(native.gated_mlp_int4(x[i:i + 1], gate, up, down)[0], y[i])
    with ops.decoding():
        assert torch.equal(ops.gated_mlp(x, gate, up, down), y)


@pytest.mark.parametrize("bits, e, d, f, t", [(8, 8, 64, 96, 11), (4, 8, 64, 96, 11), (8, 5, 96, 160, 23),
                                              (4, 5, 128, 64, 23)])
@pytest.mark.parametrize("bf16", [False, True])
def test_experts_prefill_matches_the_dequantised_float64_layer(bits, e, d, f, t, bf16):
    """Outside decode, Experts.forward dequantises each chosen expert (gate and up side by
    side, one GEMM for both, then down): the float64 layer of the dequantised weights
    (``reference_dispatch``) to float32 rounding (within 1e-5 of the largest output), or
    with bf16 products (the kernel policy on bf16 machines) to bf16 rounding."""
    stacks = _expert_stacks(bits, e, d, f)
    x = _x(t, d, seed=5)
    r = _routing(t, 3, e)
    mod = _experts_module(stacks, e, d, f, quantised=True)
    assert mod.dequantisable()
    ops.set_big_products_in_weights_dtype(bf16)
    try:
        with torch.no_grad():
            got = mod(x, r)
    finally:
        ops.set_big_products_in_weights_dtype(False)
    with torch.no_grad():
        ref = _experts_module(stacks, e, d, f, quantised=False).double().reference_dispatch(x.double(), r)
    assert got.dtype == torch.float32 and got.shape == (t, d)
    tol = (2e-2 if bf16 else 1e-5) * ref.abs().max().item()
    assert (got.double() - ref).abs().max().item() <= tol


def test_experts_prefill_without_native_kernels(no_native):
    """int8 experts without the native kernels: torch dequantises (same bits), same loop."""
    e, d, f = 4, 64, 96
    stacks = _expert_stacks(8, e, d, f)
    x = _x(9, d, seed=7)
    r = _routing(9, 2, e)
    with torch.no_grad():
        got = _experts_module(stacks, e, d, f, quantised=True)(x, r)
        ref = _experts_module(stacks, e, d, f, quantised=False).double().reference_dispatch(x.double(), r)
    assert (got.double() - ref).abs().max().item() <= 1e-5 * ref.abs().max().item()


def _scales(n: int, seed: int) -> torch.Tensor:
    """bf16 scales of every magnitude bf16 has (subnormal to ~1e30), both signs."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, generator=g) * 10.0 ** torch.randint(-42, 30, (n,), generator=g).float()).to(torch.bfloat16)


@needs_native
@pytest.mark.parametrize("n, k", [(1, 1), (7, 37), (33, 16), (5, 100), (64, 513), (300, 2048)])
@pytest.mark.parametrize("variant8", [None, "avx2", "avx512"])
def test_native_int8_dequantiser_equals_torch_bit_for_bit(n, k, variant8):
    """``native.dequantize_int8`` (one pass, AVX-512 or the AVX2 fallback, odd widths with a
    scalar tail): float32 equals ``quant.dequantize`` (exact), bf16 equals torch's
    ``q.to(bf16) * scale`` (the float32 product rounded to nearest even), bit for bit."""
    q = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=torch.Generator().manual_seed(n * k))
    s = _scales(n, k)
    bits = {torch.float32: torch.int32, torch.bfloat16: torch.int16}
    for dtype in (torch.float32, torch.bfloat16):
        out = torch.full((n, k), float("nan"), dtype=dtype)
        assert native.dequantize_int8(q, s, out, variant8) is out
        assert torch.equal(out.view(bits[dtype]), quant.dequantize(q, s, 8, dtype).view(bits[dtype]))
        assert torch.equal(out.view(bits[dtype]), (q.to(dtype) * s.to(dtype)[:, None]).view(bits[dtype]))
    qw = quant.QuantWeight("int8", (2, n, k), torch.stack([q, -q.clamp(-127)]), torch.stack([s, s]))
    assert torch.equal(qw.dequantize_into(torch.empty(n, k), 1), quant.dequantize(-q.clamp(-127), s, 8))


class _NoC:
    """A stand-in library whose every C function fails the test: the checks run before C."""

    def __getattr__(self, name):
        raise AssertionError(f"{name} was called with arguments the wrapper should have refused")


def test_native_int8_dequantiser_refuses_bad_inputs():
    with native.stand_in(_NoC()):
        _int8_dequantiser_refusals()


def _int8_dequantiser_refusals():
    q = torch.randint(-127, 128, (6, 32), dtype=torch.int8)
    s = torch.ones(6, dtype=torch.bfloat16)
    out = torch.empty(6, 32)
    with pytest.raises(ValueError, match=r"dequantize_int8: q must be contiguous int8 \[6, 32\].*got uint8"):
        native.dequantize_int8(q.view(torch.uint8), s, out)
    with pytest.raises(ValueError, match=r"q must be contiguous int8 \[6, 32\] \(out's shape\).*got int8 \[6, 31\]"):
        native.dequantize_int8(q[:, :31].contiguous(), s, out)
    with pytest.raises(ValueError, match="q must be .*not contiguous"):
        native.dequantize_int8(torch.randint(-9, 9, (32, 6), dtype=torch.int8).t(), s, out)
    with pytest.raises(ValueError, match=r"scale must be contiguous bf16 \[6\].*got float32"):
        native.dequantize_int8(q, s.float(), out)
    with pytest.raises(ValueError, match=r"scale must be .*got bfloat16 \[5\]"):
        native.dequantize_int8(q, s[:5], out)
    with pytest.raises(ValueError, match="out must be a contiguous float32 or bf16.*got float16"):
        native.dequantize_int8(q, s, out.half())
    with pytest.raises(ValueError, match="out must be .*not contiguous"):
        native.dequantize_int8(q, s, torch.empty(32, 6).t())
    with pytest.raises(ValueError, match="variant must be one of avx2, avx512 or None, got 'sse2'"):
        native.dequantize_int8(q, s, out, "sse2")
    with pytest.raises(ValueError, match="int4pack weights cannot be dequantised by rows"):
        quant.QuantWeight("int4pack", (6, 32), q, s, 32).dequantize_into(out)


@needs_native
def test_native_int4_refuses_bad_arguments():
    qw, _ = _qweight(4, 32, 128)
    x = _x(2, 128)
    with pytest.raises(ValueError, match="q values must be"):
        native.linear_int4(x, qw.data.view(torch.int8), qw.scale)
    with pytest.raises(ValueError, match="q values must be"):
        native.linear_int4(_x(2, 96), qw.data, qw.scale)  # K = 96: the values are 64 bytes wide, not 48
    with pytest.raises(ValueError, match="q scales must be"):
        native.linear_int4(x, qw.data, qw.scale.float())
    with pytest.raises(ValueError, match="q scales must be .* multiple of 32"):
        native.linear_int4(x, qw.data, torch.ones(32, 8, dtype=torch.bfloat16))  # groups of 16
    with pytest.raises(ValueError, match="x must be"):
        native.linear_int4(x.double(), qw.data, qw.scale)
    with pytest.raises(ValueError, match="out must be"):
        native.dequantize_int4(qw.data, qw.scale, torch.empty(32, 128, dtype=torch.float16))
    (gate, _), (up, _), (down, _) = _expert_stacks(4, 4, 64, 32)
    (g8, _), _, _ = _expert_stacks(8, 4, 64, 32)
    r = _routing(2, 2, 4)
    with pytest.raises(ValueError, match="gate must be an int4 QuantWeight"):
        native.experts_int4(_x(2, 64), r.idx, r.weight, g8, up, down)
    with pytest.raises(ValueError, match="down values must be"):
        native.experts_int4(_x(2, 64), r.idx, r.weight, gate, up, gate)
    with pytest.raises(ValueError, match=r"expert ids must be in \[0, 4\)"):
        native.experts_int4(_x(2, 64), r.idx + 3, r.weight, gate, up, down)
    with pytest.raises(ValueError, match="wt must be"):
        native.experts_int4(_x(2, 64), r.idx, r.weight[:, :1], gate, up, down)
    with pytest.raises(ValueError, match=r"gated_mlp_int4: gate values must be contiguous uint8 \[F, 32\]"):
        native.gated_mlp_int4(_x(2, 64), gate, up, down)  # expert stacks where one MLP's weights go
    with pytest.raises(ValueError, match="gated_mlp_int4: up must be an int4 QuantWeight"):
        native.gated_mlp_int4(_x(2, 64), gate[0], g8[0], down[0])
    with pytest.raises(ValueError, match="name must be one of avx2, avx2-digits, avx512, avx512-vnni"):
        native.quant_variant("sse2")


def test_int4_layout_follows_the_kernels(no_native):
    """Without the native kernels int4 weights use torch's int4pack where it takes the shape
    (N a multiple of 16, K of 32), else the stored format; with them, always the stored format."""
    assert quant.QuantWeight.empty(4, (3, 48, 128), 128).kind == "int4pack"
    assert quant.QuantWeight.empty(4, (40, 64), 64).kind == "int4"
    qw, ref_w = _qweight(4, 40, 96)
    x = _x(3, 96)
    with ops.decoding():  # the stored format without the kernels: a bf16 product of the bf16-rounded weight
        want = F.linear(x.to(torch.bfloat16), ref_w.to(torch.bfloat16)).float()
        assert torch.equal(ops.linear(x, qw), want)


@needs_native
def test_int4_layout_with_native_kernels():
    for shape in ((3, 48, 128), (40, 64), (2, 33, 96)):
        assert quant.QuantWeight.empty(4, shape, quant.int4_group(shape[-1])).kind == "int4"


def test_stacked_slot_equals_unstacked():
    qw = quant.QuantWeight.empty(4, (3, 32, 64), 64)
    ws = [torch.randn(32, 64) for _ in range(3)]
    for e, w in enumerate(ws):
        q, s = quant.quantize_int4(w, 64)
        qw.set_data((e,), q)
        qw.set_scale((e,), s)
    for e, w in enumerate(ws):
        q, s = quant.quantize_int4(w, 64)
        torch.testing.assert_close(qw[e].dequantize(), quant.dequantize(q, s, 4), atol=1e-2, rtol=1e-2)


# ---- checkpoints and loading ------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("bits", [8, 4])
def test_quantised_checkpoint_matches_dequantised_reference(tmp_path, variant, bits):
    qdir = quantize_checkpoint(GOLDEN / variant, tmp_path / "q", bits)
    cfg = json.loads((qdir / "config.json").read_text())
    assert cfg["quantization"]["scheme"] == f"int{bits}"
    model = load_model(qdir)
    assert model.quantization == f"int{bits}"
    moe = next(layer.mlp for layer in reversed(model.language.model.layers) if layer.is_moe)  # dsv2x ends dense
    experts = moe.experts.gate_proj
    assert isinstance(experts, quant.QuantWeight) and experts.bits == bits
    assert isinstance(model.language.lm_head.weight, quant.QuantWeight)
    assert not isinstance(moe.gate.weight, quant.QuantWeight)  # router stays float
    ref = load_model(_dequantised_folder(qdir, tmp_path / "ref"))
    want = _text_logits(ref)
    for decoding in (False, True):
        torch.testing.assert_close(_text_logits(model, decoding), want, atol=6e-2, rtol=3e-2)
    # quantising while loading gives the very same model as the written checkpoint
    onfly = load_model(GOLDEN / variant, quantize=f"int{bits}")
    assert torch.equal(_text_logits(onfly), _text_logits(model))


def test_quantised_files_are_smaller(tmp_path):
    src = sum(f.stat().st_size for f in (GOLDEN / "base").glob("*.safetensors"))
    q8 = quantize_checkpoint(GOLDEN / "base", tmp_path / "q8", 8)
    q4 = quantize_checkpoint(GOLDEN / "base", tmp_path / "q4", 4)
    s8, s4 = ((d / "model.safetensors").stat().st_size for d in (q8, q4))
    assert s4 < s8 < src


def test_load_errors(tmp_path):
    with pytest.raises(CheckpointError, match="int8"):
        load_model(GOLDEN / "tiny", quantize="int3")
    q4 = quantize_checkpoint(GOLDEN / "tiny", tmp_path / "q4", 4)
    with pytest.raises(CheckpointError, match="already quantised"):
        load_model(q4, quantize="int8")
    with pytest.raises(CheckpointError, match="already quantised"):
        quantize_checkpoint(q4, tmp_path / "again", 8)
    # a missing scale is named
    tensors = load_file(str(q4 / "model.safetensors"))
    key = "language.model.layers.1.mlp.experts.3.up_proj.weight" + SCALE_SUFFIX
    del tensors[key]
    save_file(tensors, str(q4 / "model.safetensors"))
    with pytest.raises(CheckpointError, match="missing") as e:
        load_model(q4)
    assert key in str(e.value)


def test_cli_quantize_then_chat(tmp_path, capsys):
    assert cli_main(["quantize", str(GOLDEN / "small"), str(tmp_path / "q"), "--bits", "8"]) == 0
    assert "int8" in capsys.readouterr().out
    assert cli_main(["chat", "-m", str(tmp_path / "q"), "hello", "--max-new-tokens", "3", "--json"]) == 0
    a = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert a["usage"]["completion_tokens"] == 3 if "usage" in a else a["completion_tokens"] == 3
    assert cli_main(["quantize", str(GOLDEN / "small"), str(tmp_path / "q"), "--bits", "4"]) == 1  # not empty


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_init_random_quantised_equals_quantising_the_bf16_one(tmp_path, scheme):
    """init-random --quantize writes exactly what `dsvl2 quantize` makes of the bf16 random checkpoint."""
    assert cli_main(["init-random", "--preset", "golden-small", "--quantize", scheme, str(tmp_path / "direct")]) == 0
    assert cli_main(["init-random", "--preset", "golden-small", str(tmp_path / "bf16")]) == 0
    quantize_checkpoint(tmp_path / "bf16", tmp_path / "via", 8 if scheme == "int8" else 4)
    a, b = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("direct", "via"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert load_model(tmp_path / "direct").quantization == scheme


# ---- --quantize on `dsvl2 info` and `dsvl2 serve` ---------------------------------------------

def _tensor_bytes(folder) -> int:
    from dsvl2.checkpoint.load import read_header, weight_files

    return sum(t.nbytes for f in weight_files(folder) for t in read_header(f))


@pytest.mark.parametrize("bits", [8, 4])
def test_info_quantize_predicts_the_written_bytes(tmp_path, capsys, bits):
    """info --quantize on a float folder gives the bytes `dsvl2 quantize` then writes;
    on the written folder it reports the scheme from config.json and those bytes."""
    scheme = f"int{bits}"
    assert cli_main(["info", str(GOLDEN / "base"), "--quantize", scheme, "--json"]) == 0
    q = json.loads(capsys.readouterr().out)["quantization"]
    qdir = quantize_checkpoint(GOLDEN / "base", tmp_path / "q", bits)
    written = _tensor_bytes(qdir)
    assert q == {"scheme": scheme, "source": "--quantize", "bytes": written, "float_bytes": _tensor_bytes(GOLDEN / "base")}
    assert written < q["float_bytes"]
    assert cli_main(["info", str(qdir), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["quantization"] == {"scheme": scheme, "source": "checkpoint", "bytes": written, "float_bytes": None}
    assert cli_main(["info", str(qdir)]) == 0
    line = next(l for l in capsys.readouterr().out.splitlines() if l.startswith("quantised"))
    assert scheme in line and "config.json" in line
    assert cli_main(["info", str(GOLDEN / "base"), "--json"]) == 0  # no scheme: no section
    assert json.loads(capsys.readouterr().out)["quantization"] is None
    other = "int4" if bits == 8 else "int8"
    assert cli_main(["info", str(qdir), "--quantize", other]) == 1
    assert "already quantised" in capsys.readouterr().err


def test_info_quantize_of_a_real_config_without_weights():
    """A config alone (no weight files): the bytes of the official bf16 tensors, quantised."""
    from dsvl2.checkpoint.random_checkpoint import official_tensor_specs, preset_config
    from dsvl2.config import ModelConfig
    from dsvl2.commands.info import describe
    from dsvl2.checkpoint.quantised import entries_for

    cfg = ModelConfig.from_hf(preset_config("tiny"))
    d8, d4 = describe(cfg, quantize="int8"), describe(cfg, quantize="int4")
    specs = official_tensor_specs(cfg, torch.bfloat16)
    lm_head = next(s for s in specs if s.key == "language.lm_head.weight")
    assert [e[1] for e in entries_for(lm_head.key, lm_head.shape, lm_head.dtype, "int8")] == [torch.int8, torch.bfloat16]
    assert d8["quantization"]["float_bytes"] == d8["checkpoint_bytes_bf16"]
    # int8 saves one byte per quantised weight, less the bf16 scales: more than a third of tiny
    assert 0.5 < d8["quantization"]["bytes"] / d8["checkpoint_bytes_bf16"] < 0.65
    assert d4["quantization"]["bytes"] < 0.45 * d8["checkpoint_bytes_bf16"]


def test_serve_quantize_reaches_the_loader(monkeypatch, capsys):
    """`dsvl2 serve --quantize int8` loads the model quantised (uvicorn's run replaced by a
    call of the app's own loader, so no port is served)."""
    import uvicorn

    loaded = []

    def run(self, sockets=None):
        state = self.config.app.state.dsvl2
        state.model = state.loader()
        loaded.append(state.model)
        for s in sockets or ():
            s.close()

    monkeypatch.setattr(uvicorn.Server, "run", run)
    assert cli_main(["serve", "-m", str(GOLDEN / "tiny"), "--port", "0", "--quantize", "int8"]) == 0
    (model,) = loaded
    assert model.model.quantization == "int8"
    assert isinstance(model.model.language.lm_head.weight, quant.QuantWeight)
