"""The native bf16 decode kernels (dsvl2/model/native) against independent references.

References: float64 products of the same (bf16-valued) weights and float32 activations;
torch's own SiLU; the grouped / per-token MoE dispatch of ``moe.py`` run in float64.
Where the kernels cannot be built (no AVX2 or no compiler) the model must fall back to
torch's kernels, and that fallback is checked instead.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dsvl2.model import native, ops
from dsvl2.model.moe import Experts, Routing

# Only a CPU without AVX2 / FMA excuses the kernels; on one that has them, a failed
# build is a failure (the tests below then fail on native.available()).
needs_native = pytest.mark.skipif(not native.cpu_ok()[0], reason=f"CPU: {native.cpu_ok()[1]}")


def test_kernels_build_on_this_cpu():
    if native.cpu_ok()[0]:
        assert native.available(), native.status()["reason"]
    else:
        assert not native.available()


def _bf16(*shape, seed=0, scale=0.05):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(torch.bfloat16)


def _x(*shape, seed=1):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _ref_linear(x, w, b=None):
    y = x.double() @ w.double().T
    return y if b is None else y + b.double()


@needs_native
@pytest.mark.parametrize("m,n,k", [(1, 896, 1280), (2, 64, 32), (3, 50, 33), (5, 257, 96), (16, 130, 1408),
                                   (7, 1, 7), (1, 3000, 64)])
def test_linear_matches_float64(m, n, k):
    x, w = _x(m, k), _bf16(n, k)
    b = _x(n, seed=3)
    y = native.linear(x, w, b)
    assert y.dtype == torch.float32 and y.shape == (m, n)
    ref = _ref_linear(x, w, b)
    # float32 accumulation of k terms: error ~ sqrt(k) * eps * |x| |w|
    tol = 1e-5 * (x.abs().max() * w.float().abs().max() * k ** 0.5).item() + 1e-6
    assert (y.double() - ref).abs().max().item() < tol


@needs_native
@pytest.mark.parametrize("n,k", [(333, 1280), (5, 1031), (2, 1031), (1, 64)])  # ranges not a multiple of 3, a K tail
def test_linear_rows_do_not_depend_on_batch(n, k):
    w = _bf16(n, k)
    x = _x(17, k)
    full = native.linear(x, w)
    for rows in ([0], [5], [3, 4], [0, 16], list(range(1, 17, 2)), list(range(17))):
        part = native.linear(x[rows], w)
        assert torch.equal(part, full[rows]), rows


@needs_native
def test_linear_keeps_leading_dims_and_noncontiguous_input():
    w = _bf16(40, 64)
    x = _x(2, 3, 128)[..., ::2]  # a strided view
    y = native.linear(x, w)
    assert y.shape == (2, 3, 40)
    assert torch.allclose(y.double(), _ref_linear(x.reshape(-1, 64), w).view(2, 3, 40), atol=1e-5)


def _ref_experts(x, idx, wt, gate, up, down):
    out = torch.zeros(x.shape, dtype=torch.float64)
    for t in range(x.shape[0]):
        for j in range(idx.shape[1]):
            e = int(idx[t, j])
            h = F.silu(x[t].double() @ gate[e].double().T) * (x[t].double() @ up[e].double().T)
            out[t] += wt[t, j].double() * (h @ down[e].double().T)
    return out


@needs_native
@pytest.mark.parametrize("t,k,e", [(1, 6, 64), (4, 6, 64), (16, 6, 64), (3, 2, 4), (5, 1, 1), (2, 3, 3)])
def test_experts_match_float64_reference(t, k, e):
    d, f = 64, 48
    gate, up, down = _bf16(e, f, d, seed=1), _bf16(e, f, d, seed=2), _bf16(e, d, f, seed=3)
    x = _x(t, d, seed=4)
    g = torch.Generator().manual_seed(5)
    idx = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(t)])
    wt = torch.rand(t, k, generator=g)
    y = native.experts(x, idx, wt, gate, up, down)
    ref = _ref_experts(x, idx, wt, gate, up, down)
    assert (y.double() - ref).abs().max().item() < 1e-5 * max(1.0, ref.abs().max().item())


@needs_native
def test_experts_token_does_not_depend_on_other_tokens():
    e, d, f, k = 16, 64, 32, 4
    gate, up, down = _bf16(e, f, d, seed=1), _bf16(e, f, d, seed=2), _bf16(e, d, f, seed=3)
    x = _x(12, d)
    g = torch.Generator().manual_seed(7)
    idx = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(12)])
    wt = torch.rand(12, k, generator=g)
    full = native.experts(x, idx, wt, gate, up, down)  # 12 tokens x 4 = 48 pairs: split by expert
    for rows in ([0], [11], [2, 3], list(range(0, 12, 3))):  # fewer experts in use: split by rows
        assert torch.equal(native.experts(x[rows], idx[rows], wt[rows], gate, up, down), full[rows]), rows


@needs_native
def test_experts_reject_out_of_range_ids():
    gate, up, down = _bf16(4, 8, 16), _bf16(4, 8, 16), _bf16(4, 16, 8)
    with pytest.raises(ValueError, match="expert ids"):
        native.experts(_x(1, 16), torch.tensor([[4]]), torch.ones(1, 1), gate, up, down)


@needs_native
def test_moe_layer_decode_uses_native_and_matches_reference_dispatch():
    e, d, f = 8, 64, 32
    ex = Experts(e, d, f)
    with torch.no_grad():
        for p, s in zip((ex.gate_proj, ex.up_proj, ex.down_proj), (1, 2, 3)):
            p.copy_(_bf16(*p.shape, seed=s).float())
    ex = ex.to(torch.bfloat16)
    x = _x(3, d)
    g = torch.Generator().manual_seed(9)
    routing = Routing(torch.stack([torch.randperm(e, generator=g)[:2] for _ in range(3)]), torch.rand(3, 2, generator=g))
    with torch.no_grad(), ops.decoding():
        fast = ex(x, routing)
    ref = _ref_experts(x, routing.idx, routing.weight, ex.gate_proj, ex.up_proj, ex.down_proj)
    assert (fast.double() - ref).abs().max().item() < 1e-5
    # the torch bf16 path (activations rounded to bf16) is much further from the reference
    with torch.no_grad():
        slow = ex.reference_dispatch(x.to(torch.bfloat16), routing).double()
    assert (slow - ref).abs().max().item() > (fast.double() - ref).abs().max().item()


def test_fallback_when_disabled(monkeypatch):
    monkeypatch.setenv("DSVL2_NATIVE", "0")
    native.reset()
    try:
        assert not native.available()
        assert "DSVL2_NATIVE=0" in native.status()["reason"]
        w, x = _bf16(16, 32), _x(2, 32)
        with ops.decoding():  # torch's bf16 path: activations rounded to bf16
            y = ops.linear(x, w)
        assert torch.equal(y, F.linear(x.to(torch.bfloat16), w).float())
    finally:
        monkeypatch.delenv("DSVL2_NATIVE")
        native.reset()


@needs_native
def test_ops_decode_products_go_native_and_prefill_does_not():
    w, x = _bf16(16, 32), _x(2, 32)
    with ops.decoding():
        y = ops.linear(x, w)
    assert torch.equal(y, native.linear(x, w))
    prefill = ops.linear(x, w)  # outside decode: upcast weights, torch's float32 GEMM
    assert torch.equal(prefill, F.linear(x, w.float()))


@pytest.fixture(params=native.QUANT_VARIANTS)
def variant(request):
    """Each variant of the quantised products in turn (``native.quant_variant``: int8 and
    int4 on AVX2 or AVX-512); where the CPU lacks AVX-512, both runs are AVX2."""
    before = native.quant_variant()
    native.quant_variant(request.param)
    yield native.quant_variant()
    native.quant_variant(before)


@needs_native
@pytest.mark.parametrize("m,n,k", [(1, 896, 1280), (4, 333, 96), (16, 50, 33), (3, 1, 7), (2, 9, 2048 + 47),
                                   (3, 17, 59)])
def test_int8_linear_matches_dequantised_float64(variant, m, n, k):
    from dsvl2.model import quant

    q, s = quant.quantize_int8(_x(n, k, seed=2) * 0.05)
    x = _x(m, k)
    y = native.linear_int8(x, q, s)
    ref = x.double() @ quant.dequantize(q, s, 8).double().T
    assert (y.double() - ref).abs().max().item() < 1e-5 * max(1.0, ref.abs().max().item())
    rows = torch.cat([native.linear_int8(x[i:i + 1], q, s) for i in range(m)])
    assert torch.equal(rows, y)  # a row's bits do not depend on the others


@needs_native
def test_int8_quantweight_decode_goes_native():
    from dsvl2.model import quant

    qw = quant.QuantWeight.quantize(_x(64, 96, seed=3) * 0.05, 8)
    x = _x(2, 96)
    with ops.decoding():
        y = ops.linear(x, qw)
    assert torch.equal(y, native.linear_int8(x, qw.data, qw.scale))


def _qstack(e, n, k, seed):
    from dsvl2.model import quant

    qw = quant.QuantWeight.empty(8, (e, n, k))
    for i in range(e):
        qw.quantize_slot((i,), _x(n, k, seed=seed * 100 + i) * 0.05)
    return qw


@needs_native
def test_int8_variants_agree_to_float32_rounding():
    """AVX2 and AVX-512 sum a row's products in different orders (8 / 16 lanes): both
    within float32 rounding of the exact sum, so of each other."""
    from dsvl2.model import quant

    q, s = quant.quantize_int8(_x(200, 1280, seed=2) * 0.05)
    x = _x(3, 1280)
    before = native.quant_variant()
    try:
        ys = {v: native.linear_int8(x, q, s) for v in native.QUANT_VARIANTS if native.quant_variant(v) == v}
    finally:
        native.quant_variant(before)
    ref = x.double() @ quant.dequantize(q, s, 8).double().T
    bound = 2 * 1280 * 2.0 ** -24 * (x.double().abs() @ quant.dequantize(q, s, 8).double().abs().T)
    for y in ys.values():
        assert ((y.double() - ref).abs() <= bound).all()


@needs_native
@pytest.mark.parametrize("t,k,e", [(1, 6, 16), (16, 6, 16), (3, 1, 1)])
def test_int8_experts_match_dequantised_reference(variant, t, k, e):
    d, f = 64, 48
    gate, up, down = _qstack(e, f, d, 1), _qstack(e, f, d, 2), _qstack(e, d, f, 3)
    x = _x(t, d, seed=4)
    g = torch.Generator().manual_seed(5)
    idx = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(t)])
    wt = torch.rand(t, k, generator=g)
    y = native.experts_int8(x, idx, wt, gate, up, down)
    deq = [torch.stack([w[i].dequantize() for i in range(e)]) for w in (gate, up, down)]
    ref = _ref_experts(x, idx, wt, *deq)
    assert (y.double() - ref).abs().max().item() < 1e-5 * max(1.0, ref.abs().max().item())
    for rows in ([0], list(range(0, t, 2))):  # a token does not depend on the others
        assert torch.equal(native.experts_int8(x[rows], idx[rows], wt[rows], gate, up, down), y[rows])
    if e == 1:  # the dense form agrees with one expert of weight 1
        dense = native.gated_mlp_int8(x, gate[0], up[0], down[0])
        assert torch.equal(dense, native.experts_int8(x, torch.zeros(t, 1, dtype=torch.long),
                                                      torch.ones(t, 1), gate, up, down))


@needs_native
@pytest.mark.parametrize("n", [1, 23, 24, 49, 384, 1000, 6200])  # around the chunk sizes (24-384 rows)
def test_products_do_not_depend_on_the_thread_count(n):
    """The team shares rows out in chunks to whichever thread is free (products.h
    team_chunk): a row's bits must not depend on which thread, nor how many, computed it,
    for bf16, int8 and int4 weights."""
    from dsvl2.model import quant

    k = 256
    x = _x(3, k)
    w = _bf16(n, k)
    q8, s8 = quant.quantize_int8(_x(n, k, seed=2) * 0.05)
    q4, s4 = quant.quantize_int4(_x(n, k, seed=4) * 0.05, 128)

    def run():
        return native.linear(x, w), native.linear_int8(x, q8, s8), native.linear_int4(x, q4, s4)

    threads = torch.get_num_threads()
    outs = []
    try:
        for t in (1, 2, 3):
            torch.set_num_threads(t)
            outs.append(run())
    finally:
        torch.set_num_threads(threads)
    for other in outs[1:]:
        for a, b in zip(outs[0], other):
            assert torch.equal(a, b)


def _vendor() -> str:
    for line in open("/proc/cpuinfo"):
        if line.startswith("vendor_id"):
            return line.split(":", 1)[1].strip()
    return ""


@needs_native
def test_the_prefetch_distance_is_chosen_per_cpu_and_changes_no_bits(variant):
    """``native.prefetch``: 2,048 bytes ahead on Intel CPUs, 512 elsewhere (by the vendor
    /proc/cpuinfo names); the bf16, int8 and int4 products and a MoE layer of int4 experts
    give the same bits at any distance, rows near a weight's end included (the prefetch
    reaches past it: only a hint); bad distances are refused and change nothing."""
    from dsvl2.model import quant

    default = native.prefetch()
    assert default == (2048 if _vendor() == "GenuineIntel" else 512)
    n, k = 37, 1280 + 256  # K past a group of 128, rows not a multiple of the streams
    x = _x(3, k)
    w = _bf16(n, k)
    q8, s8 = quant.quantize_int8(_x(n, k, seed=2) * 0.05)
    q4, s4 = quant.quantize_int4(_x(n, k, seed=4) * 0.05, 128)
    e, f = 4, 256
    gate = quant.QuantWeight.quantize(_x(e, f, k, seed=6) * 0.05, 4)
    up = quant.QuantWeight.quantize(_x(e, f, k, seed=7) * 0.05, 4)
    down = quant.QuantWeight.quantize(_x(e, k, f, seed=8) * 0.05, 4)
    idx, wt = torch.tensor([[0, 2], [3, 1], [2, 3]]), torch.rand(3, 2, generator=torch.Generator().manual_seed(9))

    def run():
        return (native.linear(x, w), native.linear_int8(x, q8, s8), native.linear_int4(x, q4, s4),
                native.experts_int4(x, idx, wt, gate, up, down))

    want = run()
    try:
        for nbytes in (0, 64, 16384):
            assert native.prefetch(nbytes) == nbytes
            for a, b in zip(want, run()):
                assert torch.equal(a, b), nbytes
        for bad in (-64, 100, 16384 + 64, 1.5, True):
            with pytest.raises(ValueError, match="multiple of 64"):
                native.prefetch(bad)
        assert native.prefetch() == 16384
    finally:
        native.prefetch(default)


def test_the_weight_streams_are_chosen_per_cpu_and_change_no_bits():
    """``native.streams``: the AVX-512 int8 and int4 (digits) products read 4 weight
    streams a thread on Intel CPUs and 3 elsewhere (by the vendor /proc/cpuinfo names);
    the int8 and int4 products at 1-6 rows (tiles of every height, row counts that are not
    a multiple of either stream count, a K tail) and a MoE layer of int4 experts give the
    same bits at 3 and 4; other counts are refused and change nothing. On a CPU without
    AVX-512 the count is read but the AVX2 products do not use it (the bits are then
    trivially equal)."""
    from dsvl2.model import quant

    default = native.streams()
    assert default == (4 if _vendor() == "GenuineIntel" else 3)
    n, k = 103, 1280 + 256 + 8  # rows past 3 x 34 and 4 x 25; int8 K with a tail of 8
    q8, s8 = quant.quantize_int8(_x(n, k, seed=12) * 0.05)
    q4, s4 = quant.quantize_int4(_x(n, k - 8, seed=14) * 0.05, 128)
    e, f = 4, 256
    gate = quant.QuantWeight.quantize(_x(e, f, k - 8, seed=16) * 0.05, 4)
    up = quant.QuantWeight.quantize(_x(e, f, k - 8, seed=17) * 0.05, 4)
    down = quant.QuantWeight.quantize(_x(e, k - 8, f, seed=18) * 0.05, 4)
    idx, wt = torch.tensor([[0, 2], [3, 1], [2, 3]]), torch.rand(3, 2, generator=torch.Generator().manual_seed(19))

    def run():
        out = []
        for m in range(1, 7):
            x = _x(m, k, seed=20 + m)
            out += [native.linear_int8(x, q8, s8), native.linear_int4(x[:, :k - 8].contiguous(), q4, s4)]
        return out + [native.experts_int4(_x(3, k - 8, seed=30), idx, wt, gate, up, down)]

    try:
        assert native.streams(3) == 3
        three = run()
        assert native.streams(4) == 4
        four = run()
        for a, b in zip(three, four):
            assert torch.equal(a, b)
        for bad in (2, 5, 0, -1, True, 3.0):
            with pytest.raises(ValueError, match="count must be 3, 4 or None"):
                native.streams(bad)
        assert native.streams() == 4
    finally:
        native.streams(default)
    assert native.streams() == default
