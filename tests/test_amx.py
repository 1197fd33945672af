"""The routed experts' prefill products on AMX tiles (``dsvl2/model/native/amx.c``, ``amx.py``).

Against independent facts: the float64 product of the same bf16 activations and the
weight's values (int8: q * scale exactly; int4 and bf16: the bf16 values torch's own
rounding gives), within the error bound of a float32 sum of K exact products
(K * 2^-24 * sum |x w|, any summation order); a row's bits do not depend on the other rows
(nor on the chunk of 256 rows it falls in); only y's [M, N] is written; strided rows equal
contiguous ones; the model's routed experts take this path where it is usable and agree
with the dequantise-then-GEMM path and with the float64 layer. The attention on AMX tiles
(``amx_attention.c``) shares the native kernel's tests (tests/test_attention_bf16.py); here,
where it runs and what its C side refuses.

The kernel needs a CPU with AMX (and Linux granting the tile state): those tests are
skipped elsewhere. The argument checks and the "is it usable here" answer run on every CPU.
"""

from __future__ import annotations

import re

import pytest
import torch

from dsvl2.model import native, ops, quant
from dsvl2.model.moe import Experts, Routing
from dsvl2.model.native import amx
from dsvl2.model.native.cpu import cpu_info

needs_amx = pytest.mark.skipif(not amx.usable(), reason="hardware: needs a CPU with AMX-TILE and AMX-BF16 "
                                                        "(and the kernels built by GCC >= 11); this machine has not")
BF = torch.bfloat16
U = 2.0 ** -24  # float32 unit roundoff


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _x(m: int, k: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(m, k, generator=_gen(seed)).to(BF)


def _bound(x: torch.Tensor, w64: torch.Tensor) -> torch.Tensor:
    """K * u * sum_k |x w|: the error bound of a float32 sum of K exact products."""
    return x.shape[1] * U * (x.double().abs() @ w64.abs().T)


def _int8(n: int, k: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    return quant.quantize_int8(torch.randn(n, k, generator=_gen(seed)) * k ** -0.5)


def _int4(n: int, k: int, group: int, seed: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    return quant.quantize_int4(torch.randn(n, k, generator=_gen(seed)) * k ** -0.5, group)


def test_usable_only_where_the_cpu_has_amx():
    """The answer follows the CPU's flags (and the library built): never True without AMX."""
    flags = cpu_info()[1]
    if amx.usable():
        assert native.available() and "amx_tile" in flags and "amx_bf16" in flags
    elif native.available() and {"amx_tile", "amx_bf16", "avx512f", "avx512bw"} <= set(flags):
        # a CPU with AMX whose kernel refused the tile state, or a build without the AMX code
        assert native.require().dsvl2_amx_usable() == 0


@needs_amx
@pytest.mark.parametrize("m", [1, 15, 16, 17, 33, 300])
@pytest.mark.parametrize("n, k", [(32, 32), (64, 96), (96, 2048), (2048, 160)])
def test_bf16_weight_within_a_float32_sum_of_the_float64_product(m, n, k):
    x = _x(m, k)
    w = (torch.randn(n, k, generator=_gen(1)) * k ** -0.5).to(BF)
    got = amx.linear(x, w)
    ref = x.double() @ w.double().T
    assert got.dtype is torch.float32 and got.shape == (m, n)
    assert ((got.double() - ref).abs() <= _bound(x, w.double()) + 1e-30).all()


@needs_amx
@pytest.mark.parametrize("m", [1, 17, 134, 300])
@pytest.mark.parametrize("n, k", [(64, 96), (1408, 2048), (2048, 1408)])
def test_int8_weight_is_exact_q_times_scale(m, n, k):
    """The int8 weight is not rounded: each row's sum of x q, times its scale in float32."""
    x = _x(m, k, seed=3)
    q, s = _int8(n, k)
    got = amx.linear(x, q, s)
    w = q.double() * s.double()[:, None]  # exact
    ref = x.double() @ w.T
    assert ((got.double() - ref).abs() <= _bound(x, w) + U * ref.abs() + 1e-30).all()
    # rounding the weight to bf16 first (the dequantise-then-GEMM path) is a different, larger error
    assert (got.double() - ref).abs().max() < (x.double() @ w.to(BF).double().T - ref).abs().max()


@needs_amx
@pytest.mark.parametrize("m", [1, 17, 134, 300])
@pytest.mark.parametrize("n, k, group", [(64, 128, 32), (1536, 2560, 128), (2560, 1536, 128)])
def test_int4_weight_is_its_bf16_dequantisation(m, n, k, group):
    x = _x(m, k, seed=4)
    q, s = _int4(n, k, group)
    got = amx.linear(x, q, s, group)
    w = quant.dequantize(q, s, 4).to(BF).double()  # torch's rounding of the float32 value
    ref = x.double() @ w.T
    assert ((got.double() - ref).abs() <= _bound(x, w) + 1e-30).all()


@needs_amx
@pytest.mark.parametrize("group", [32, 128])
def test_int4_panels_are_the_bf16_dequantisation_bit_for_bit(group):
    """The int4 panels (a table of each group's 16 values, then a permute) hold exactly the
    bf16 values torch's rounding of the float32 weight gives: the product equals, bit for
    bit, the same kernel on that bf16 weight (same tiles, same order). At most 32 rows the
    quantised panels are made and multiplied 256 columns at a time (``few_block``): K = 768
    is three such slices, and the bits are still the bf16 weight's whole-panel ones."""
    for m, k in ((70, 256), (5, 768), (20, 768), (32, 768)):
        x = _x(m, k, seed=6)
        q, s = _int4(96, k, group, seed=7)
        w = quant.dequantize(q, s, 4).to(BF).contiguous()
        assert torch.equal(amx.linear(x, q, s, group), amx.linear(x, w)), (m, k)


@needs_amx
@pytest.mark.parametrize("fmt", ["bf16", "int8", "int4"])
def test_a_row_does_not_depend_on_the_other_rows(fmt):
    """Row i of a 300-row product (two chunks of 256) has the bits of row i alone."""
    n, k = 64, 256
    x = _x(300, k, seed=5)
    if fmt == "bf16":
        args = ((torch.randn(n, k, generator=_gen(6)) * 0.1).to(BF),)
    elif fmt == "int8":
        args = _int8(n, k)
    else:
        args = (*_int4(n, k, 128), 128)
    y = amx.linear(x, *args)
    for i in (0, 15, 16, 255, 256, 299):
        assert torch.equal(amx.linear(x[i:i + 1], *args)[0], y[i])
    assert torch.equal(amx.linear(x[250:270], *args), y[250:270])
    # at most 32 rows (one or two token tiles) the quantised panels go 256 columns at a time:
    # K = 768, three slices, against the whole panels of a 40-row call
    x = _x(40, 768, seed=8)
    if fmt == "int8":
        args = _int8(n, 768)
    elif fmt == "int4":
        args = (*_int4(n, 768, 128), 128)
    else:
        args = ((torch.randn(n, 768, generator=_gen(6)) * 0.1).to(BF),)
    y = amx.linear(x, *args)
    for lo, hi in ((0, 1), (3, 19), (8, 40)):  # 1, 16 and 32 rows
        assert torch.equal(amx.linear(x[lo:hi], *args), y[lo:hi])


@needs_amx
def test_writes_only_the_product_and_takes_strided_rows():
    n, k = 64, 96
    w = (torch.randn(n, k, generator=_gen(7)) * 0.1).to(BF)
    big = _x(40, 2 * k, seed=8)
    x = big[:, 32:32 + k]  # rows 2K apart
    wide = torch.full((40, n + 5), float("nan"))
    out = wide[:, :n]
    assert amx.linear(x, w, out=out) is out
    assert torch.equal(out, amx.linear(x.contiguous(), w))
    assert torch.isnan(wide[:, n:]).all()


@pytest.mark.parametrize("case, message", [
    ("x_float32", "x must be bf16"),
    ("x_1d", "x must be bf16"),
    ("x_cols_strided", "x must be bf16"),
    ("n_not_32", "values must be a weight with N and K multiples of 32 (K = 96), got bfloat16 [48, 96]"),
    ("k_not_32", "values must be a weight with N and K multiples of 32 (K = 80)"),
    ("k_mismatch", "values must be [N, 96]"),
    ("bf16_with_scale", "scale must be None"),
    ("int8_no_scale", "scale must be contiguous bf16 [64]"),
    ("int8_scale_shape", "scale must be contiguous bf16 [64]"),
    ("int4_no_group", "group must be a multiple of 32 dividing K = 96"),
    ("int4_scale_shape", "scale must be contiguous bf16 [64, 3]"),
    ("float_values", "values must be bf16, int8 or uint8"),
    ("out_shape", "out must be float32 [4, 64]"),
])
def test_refusals_name_the_argument(case, message):
    """Checked before any C runs (so on every CPU): a ValueError naming what is wrong."""
    x = _x(4, 96)
    w = torch.zeros(64, 96, dtype=BF)
    q8, s8 = _int8(64, 96)
    q4, s4 = _int4(64, 96, 32)
    args = {"x_float32": (x.float(), w), "x_1d": (x[0], w), "x_cols_strided": (_x(4, 192)[:, ::2], w),
            "n_not_32": (x, w[:48]), "k_not_32": (_x(4, 80), torch.zeros(64, 80, dtype=BF)),
            "k_mismatch": (x, torch.zeros(64, 64, dtype=BF)), "bf16_with_scale": (x, w, s8),
            "int8_no_scale": (x, q8), "int8_scale_shape": (x, q8, s8[:32]), "int4_no_group": (x, q4, s4, 0),
            "int4_scale_shape": (x, q4, s4[:, :2].contiguous(), 32), "float_values": (x, w.float()),
            }.get(case)
    with pytest.raises(ValueError, match=re.escape(message)) as err:
        if case == "out_shape":
            amx.linear(x, w, out=torch.empty(4, 32))
        else:
            amx.linear(*args)
    assert str(err.value).startswith("native.amx: ")


@needs_amx
def test_the_c_side_refuses_shapes_it_does_not_take():
    """The C entry point's own checks (-2, nothing written) behind the wrapper's."""
    lib = native.require()
    x, w = _x(4, 96), torch.zeros(48, 96, dtype=BF)
    y = torch.full((4, 48), 7.0)
    assert lib.dsvl2_amx_linear(x.data_ptr(), 96, 4, 96, 0, w.data_ptr(), None, 0, 48, y.data_ptr(), 48) == -2
    assert lib.dsvl2_amx_linear(x.data_ptr(), 96, 4, 96, 3, w.data_ptr(), None, 0, 48, y.data_ptr(), 48) == -2
    assert (y == 7.0).all()


@needs_amx
@pytest.mark.parametrize("fmt", ["bf16", "int8", "int4"])
def test_expert_on_rows_adds_into_out_with_index_adds_bits(fmt):
    """``rows`` / ``out``: the expert on x's rows ``rows`` (any order, 1-300 of them, across
    256-row chunks), its results added into ``out``'s rows: the bits of the gathered call
    followed by ``out.index_add_``; rows not listed keep their values."""
    slots = [_weight_args(fmt, 96, 128, 40)[0], _weight_args(fmt, 96, 128, 41)[0], _weight_args(fmt, 128, 96, 42)[0]]
    g = _gen(31)
    x = torch.randn(400, 128, generator=g).to(BF)
    for m in (1, 17, 300):
        rows = torch.randperm(400, generator=g)[:m]
        wt = torch.rand(m, generator=g)
        start = torch.randn(400, 128, generator=g)
        want = start.clone().index_add_(0, rows, amx.expert(x.index_select(0, rows), *slots, wt))
        out = start.clone()
        assert amx.expert(x, *slots, wt, rows=rows, out=out) is out
        assert torch.equal(out, want)


@pytest.mark.parametrize("case, message", [
    ("rows_alone", "rows and out go together"), ("rows_range", r"rows must be in \[0, 8\)"),
    ("rows_dtype", "rows must be"), ("out_shape", "out must be")])
def test_expert_rows_refusals(case, message):
    """Checked before any C runs (so on every CPU)."""
    x = torch.zeros(8, 32, dtype=BF)
    w = (torch.zeros(32, 32, dtype=BF), None, 0)
    rows, out = torch.tensor([0, 3]), torch.zeros(8, 32)
    if case == "rows_alone":
        out = None
    elif case == "rows_range":
        rows = torch.tensor([0, 8])
    elif case == "rows_dtype":
        rows = rows.int()
    elif case == "out_shape":
        out = torch.zeros(2, 32)
    with pytest.raises(ValueError, match=message):
        amx.expert(x, w, w, w, torch.ones(2), rows=rows, out=out)


@needs_amx
@pytest.mark.parametrize("fmt", ["bf16", "int8", "int4"])
def test_a_prefill_gated_mlp_is_one_amx_call(monkeypatch, bf16_policy, fmt):
    """Shared experts and dense layers (``ops.gated_mlp``) outside decode: one ``amx.expert``
    call with routing weights 1, against the float64 MLP of the same weight values (the
    activations rounded to bf16 once) to bf16 rounding, and against the path it replaces
    (AMX off); in decode, with AMX off, or with float32 products: not called."""
    f, d = 96, 128
    (ga, g64), (ua, u64), (da, d64) = (_weight_args(fmt, f, d, 50), _weight_args(fmt, f, d, 51),
                                       _weight_args(fmt, d, f, 52))

    def weight(args):
        if fmt == "bf16":
            return args[0]
        qw = quant.QuantWeight.empty(8 if fmt == "int8" else 4, tuple(args[0].shape if fmt == "int8" else
                                                                       (args[0].shape[0], 2 * args[0].shape[1])),
                                     args[2] or 0)
        qw.set_data((), args[0])
        qw.set_scale((), args[1])
        return qw

    gate, up, down = weight(ga), weight(ua), weight(da)
    x = torch.randn(3, 37, d, generator=_gen(53))
    calls = []
    real = amx.expert
    monkeypatch.setattr(amx, "expert", lambda *a, **kw: calls.append(a[0].shape[0]) or real(*a, **kw))
    got = ops.gated_mlp(x, gate, up, down)
    assert calls == [3 * 37] and got.shape == (3, 37, d) and got.dtype is torch.float32
    xb = x.to(BF).double()
    h = xb @ g64.T
    want = ((h * torch.sigmoid(h)) * (xb @ u64.T)) @ d64.T
    scale = want.abs().max().item()
    assert (got.double() - want).abs().max().item() <= 2e-2 * scale
    monkeypatch.setattr(amx, "enabled", False)
    other = ops.gated_mlp(x, gate, up, down)
    assert calls == [3 * 37]
    assert (got.double() - other.double()).abs().max().item() <= 2e-2 * scale
    monkeypatch.setattr(amx, "enabled", True)
    with ops.decoding():
        ops.gated_mlp(x[:, :1], gate, up, down)
    ops.set_big_products_in_weights_dtype(False)
    ops.gated_mlp(x, gate, up, down)
    assert calls == [3 * 37]


@pytest.mark.skipif(not native.available(), reason=f"native kernels unavailable: {native.status()['reason']}")
def test_the_attention_runs_exactly_where_amx_is_usable():
    """``native.attention_bf16_amx`` (its numbers: tests/test_attention_bf16.py) answers where
    ``amx.usable()``, and elsewhere raises a RuntimeError that says AMX is missing (the C
    entry point's -1), never a wrong result."""
    g = _gen(30)
    q, k, v = (torch.randn(1, 2, 5, 16, generator=g).to(BF) for _ in range(3))
    if amx.usable():
        out = native.attention_bf16_amx(q, k, v, 0.25)
        want = torch.softmax((q.double() @ k.double().transpose(-1, -2)) * 0.25, -1) @ v.double()
        assert (out.double() - want).abs().max() < 2 ** -8 * v.double().abs().max()
    else:
        with pytest.raises(RuntimeError, match="AMX is not usable"):
            native.attention_bf16_amx(q, k, v, 0.25)


@needs_amx
def test_the_c_side_of_the_attention_refuses_shapes_it_does_not_take():
    """``dsvl2_amx_attention``'s own checks (-2, nothing written): odd head sizes, kv heads
    that do not divide the query heads, an empty call."""
    lib = native.require()
    q = torch.zeros(1, 2, 4, 16, dtype=BF)
    out = torch.full((1, 2, 4, 16), 7.0)
    st = torch.tensor([*q.stride()[:3]] * 3 + [*out.stride()[:3], 0, 0], dtype=torch.int64)
    p = q.data_ptr()
    for h, hk, t, dk, dv in ((2, 2, 4, 15, 16), (2, 2, 4, 16, 15), (2, 3, 4, 16, 16), (2, 2, 0, 16, 16)):
        assert lib.dsvl2_amx_attention(p, p, p, out.data_ptr(), 0, 1, h, hk, t, 4, dk, dv, 0.25, None, None,
                                       st.data_ptr()) == -2
    assert (out == 7.0).all()


def _experts(fmt: str, e: int = 6, d: int = 128, f: int = 96) -> Experts:
    mod = Experts(e, d, f)
    for seed, name in enumerate(("gate_proj", "up_proj", "down_proj")):
        p = getattr(mod, name)
        w = torch.randn(p.shape, generator=_gen(20 + seed)) * p.shape[-1] ** -0.5
        if fmt == "bf16":
            p.data = w.to(BF)
            continue
        group = (quant.int4_group(p.shape[-1]) or 0) if fmt == "int4" else 0
        qw = quant.QuantWeight.empty(8 if fmt == "int8" else 4, tuple(p.shape), group)
        for i in range(e):
            qv, sv = quant.quantize_int8(w[i]) if fmt == "int8" else quant.quantize_int4(w[i], group)
            qw.set_data((i,), qv)
            qw.set_scale((i,), sv)
        del mod._parameters[name]
        setattr(mod, name, qw)
    return mod


def _float64_layer(mod: Experts, x: torch.Tensor, r: Routing) -> torch.Tensor:
    """The layer with every weight's float value (quantised: dequantised exactly) in float64."""
    ref = Experts(*mod.gate_proj.shape[:1], mod.gate_proj.shape[2], mod.gate_proj.shape[1]).double()
    for name in ("gate_proj", "up_proj", "down_proj"):
        w = getattr(mod, name)
        val = torch.stack([w[i].dequantize() for i in range(w.shape[0])]) if isinstance(w, quant.QuantWeight) else w
        getattr(ref, name).data.copy_(val.double())
    return ref.reference_dispatch(x.double(), r)


@needs_amx
@pytest.mark.parametrize("fmt", ["bf16", "int8", "int4"])
def test_the_routed_experts_run_their_prefill_on_amx(monkeypatch, bf16_policy, fmt):
    """With bf16 products chosen, Experts.forward outside decode calls amx.expert (one call
    per used expert, on its rows), and agrees with the dequantise-then-GEMM path (amx off) and
    with the float64 layer to bf16 rounding of the activations; in decode it does not."""
    mod = _experts(fmt)
    g = _gen(9)
    x = torch.randn(37, 128, generator=g)
    r = Routing(torch.stack([torch.randperm(6, generator=g)[:2] for _ in range(37)]), torch.rand(37, 2, generator=g))
    assert mod.amx_ready()
    calls = []
    real = amx.expert
    monkeypatch.setattr(amx, "expert", lambda *a, **kw: calls.append(kw["rows"].numel()) or real(*a, **kw))
    with torch.no_grad():
        got = mod(x, r)
        used = int((torch.bincount(r.idx.reshape(-1), minlength=6) > 0).sum())
        assert len(calls) == used and sum(calls) == 37 * 2
        monkeypatch.setattr(amx, "enabled", False)
        assert not mod.amx_ready()
        other = mod(x, r)
    ref = _float64_layer(mod, x, r)
    scale = ref.abs().max().item()
    assert got.dtype is torch.float32 and got.shape == (37, 128)
    assert (got.double() - ref).abs().max().item() <= 2e-2 * scale
    assert (got.double() - other.double()).abs().max().item() <= 2e-2 * scale
    if fmt == "int8":  # the weight exact, the activations rounded once: closer than the bf16 GEMM path
        assert (got.double() - ref).abs().max() < (other.double() - ref).abs().max()


@needs_amx
@pytest.mark.parametrize("fmt", ["bf16", "int8", "int4"])
def test_a_prefill_rows_experts_give_it_the_same_bits_in_any_batch(bf16_policy, fmt):
    """A row's routed-expert output outside decode does not depend on the other rows: alone,
    its two experts have one row each; beside 29 rows choosing the same experts, 30. Any
    kernel chosen by an expert's row count (the native decode kernel for <= 4 rows, once)
    would give the row other bits in the two cases."""
    mod = _experts(fmt)
    g = _gen(11)
    x = torch.randn(30, 128, generator=g)
    r = Routing(torch.tensor([[0, 3]] * 30), torch.rand(30, 2, generator=g))
    with torch.no_grad():
        together = mod(x, r)
        for i in (0, 17):
            alone = mod(x[i:i + 1], Routing(r.idx[i:i + 1], r.weight[i:i + 1]))
            assert torch.equal(alone, together[i:i + 1])


@needs_amx
def test_decode_and_float32_products_do_not_use_amx(monkeypatch):
    mod = _experts("int8")
    ops.set_big_products_in_weights_dtype(False)
    assert not mod.amx_ready()  # float32 products (CPUs without bf16 units): the float32 GEMM path
    monkeypatch.setattr(amx, "linear", lambda *a, **kw: pytest.fail("amx.linear called"))
    monkeypatch.setattr(amx, "expert", lambda *a, **kw: pytest.fail("amx.expert called"))
    x = torch.randn(3, 128)
    r = Routing(torch.tensor([[0, 1], [2, 3], [4, 5]]), torch.rand(3, 2))
    with torch.no_grad():
        mod(x, r)
        ops.set_big_products_in_weights_dtype(True)
        try:
            with ops.decoding():
                mod(x, r)
        finally:
            ops.set_big_products_in_weights_dtype(False)


def test_shapes_it_takes():
    assert amx.takes(1408, 2048) and amx.takes(2560, 1536, 128) and amx.takes(64, 96, 32)
    assert not amx.takes(48, 96) and not amx.takes(64, 80) and not amx.takes(64, 96, 64) and not amx.takes(64, 96, 48)
    assert not amx.takes(0, 32)


@needs_amx
@pytest.mark.parametrize("bits", [8, 4])
def test_dense_quantised_prefill_products_run_on_amx_unpadded(monkeypatch, bf16_policy, bits):
    """An unstacked int8 / int4 weight's product outside decode (``ops.linear``: attention
    projections, dense and shared MLPs) goes to amx.linear on the rows as they are (no
    bucket padding), within a float32 sum of the float64 product of its values; switched
    off, the dequantise-then-GEMM path (padded) gives the same to bf16 rounding."""
    w = torch.randn(96, 128, generator=_gen(30)) * 128 ** -0.5
    wq = quant.QuantWeight.quantize(w, bits)
    x = torch.randn(37, 128, generator=_gen(31))
    seen = []
    real = amx.linear
    monkeypatch.setattr(amx, "linear", lambda xx, *a, **kw: seen.append(xx.shape[0]) or real(xx, *a, **kw))
    assert wq.amx_ready()
    got = ops.linear(x, wq)
    assert seen == [37] and got.dtype is torch.float32 and got.shape == (37, 96)
    val = wq.dequantize(torch.float32).double()
    if bits == 4:
        val = val.to(BF).double()  # int4: the bf16 rounding of each value (amx.c)
    xb = x.to(BF)
    ref = xb.double() @ val.T
    assert ((got.double() - ref).abs() <= _bound(xb, val) + U * ref.abs() + 1e-30).all()
    monkeypatch.setattr(amx, "enabled", False)
    assert not wq.amx_ready()
    other = ops.linear(x, wq)
    assert seen == [37]
    assert ((other.double() - got.double()).abs() <= 2 ** -7 * (xb.double().abs() @ val.abs().T)).all()
    with ops.decoding():  # decode steps keep their own kernels
        monkeypatch.setattr(amx, "enabled", True)
        ops.linear(x[:2], wq)
    assert seen == [37]


@needs_amx
def test_dense_bf16_prefill_products_run_on_amx(monkeypatch, bf16_policy):
    """A bf16 weight's product outside decode (``ops.linear``: the attention projections of a
    bf16 model's prefill) goes to amx.linear on the rows as they are: the float32 sums of
    the bf16-rounded activations (within a float32 sum of the float64 product), bias added
    in float32, no bf16 rounding of the result; within bf16 rounding of the path it replaces
    (AMX off: torch's bf16 GEMM); a row's bits do not depend on the other rows. Not in
    decode, not with autograd, not for a shape the kernel does not take."""
    w = (torch.randn(96, 128, generator=_gen(32)) * 128 ** -0.5).to(BF)
    b = torch.randn(96, generator=_gen(33)).to(BF)
    x = torch.randn(2, 37, 128, generator=_gen(34))
    seen = []
    real = amx.linear
    monkeypatch.setattr(amx, "linear", lambda xx, *a, **kw: seen.append(xx.shape[0]) or real(xx, *a, **kw))
    got = ops.linear(x, w, b)
    assert seen == [74] and got.dtype is torch.float32 and got.shape == (2, 37, 96)
    xb, w64 = x.reshape(-1, 128).to(BF), w.double()
    ref = (xb.double() @ w64.T).view(2, 37, 96)
    assert ((got.double() - b.double() - ref).abs() <= _bound(xb, w64).view(2, 37, 96) + U * ref.abs()
            + U * b.double().abs() + 1e-30).all()
    assert torch.equal(ops.linear(x[1, 5:9], w, b), got[1, 5:9])  # rows independent of the others
    monkeypatch.setattr(amx, "enabled", False)
    other = ops.linear(x, w, b)
    assert seen == [74, 4]
    assert ((other.double() - got.double()).abs() <= 2 ** -7 * (xb.double().abs() @ w64.abs().T).view(2, 37, 96)
            + 2 ** -8 * b.double().abs()).all()
    monkeypatch.setattr(amx, "enabled", True)
    with ops.decoding():
        ops.linear(x[:, :1], w, b)
    ops.linear(x.requires_grad_(), w, b)
    ops.linear(x[..., :96].detach(), w[:, :96].contiguous()[:48].contiguous())  # N = 48: not a multiple of 32
    assert seen == [74, 4]


def _weight_args(fmt: str, n: int, k: int, seed: int) -> tuple:
    """(values, scale, group) of an [n, k] weight in ``fmt``, and its values as float64 (int4:
    the bf16 rounding amx.c uses)."""
    w = torch.randn(n, k, generator=_gen(seed)) * k ** -0.5
    if fmt == "bf16":
        return (w.to(BF), None, 0), w.to(BF).double()
    if fmt == "int8":
        q, s = quant.quantize_int8(w)
        return (q, s, 0), q.double() * s.double()[:, None]
    group = quant.int4_group(k)
    q, s = quant.quantize_int4(w, group)
    return (q, s, group), quant.dequantize(q, s, 4).to(BF).double()


@needs_amx
@pytest.mark.parametrize("fmt", ["bf16", "int8", "int4"])
@pytest.mark.parametrize("m", [1, 17, 300])
@pytest.mark.parametrize("d, f", [(128, 96), (320, 288)])
def test_expert_is_down_of_the_bf16_rounded_gated_product(fmt, m, d, f):
    """amx.expert = down(bf16(silu(gate x) * up x * wt)): against the float64 value of that
    composition from the kernel's own gate / up products (amx.linear, checked above), within
    the float32 sum bound plus one bf16 rounding step of the gated product (where float32
    and float64 round it differently); and a row's bits do not depend on the other rows.
    320 / 288 values of k: a panel's blocks of 256 and a part block (amx.c KBLOCK), gate /
    up kept by weight row over 9 slices of down's tiles."""
    (ga, _), (ua, _), (da, dv) = (_weight_args(fmt, f, d, 40), _weight_args(fmt, f, d, 41),
                                  _weight_args(fmt, d, f, 42))
    x = _x(m, d, seed=43)
    wt = torch.rand(m, generator=_gen(44))
    y = amx.expert(x, ga, ua, da, wt)
    g, u = amx.linear(x, *ga).double(), amx.linear(x, *ua).double()
    a = g / (1 + torch.exp(-g)) * u * wt.double()[:, None]
    ab = a.to(BF).double()
    ref = ab @ dv.T
    assert y.dtype is torch.float32 and y.shape == (m, d)
    bound = _bound(ab.to(BF), dv) + 2 ** -8 * (a.abs() @ dv.abs().T) + 1e-30
    assert ((y.double() - ref).abs() <= bound).all()
    assert ((y.double() - ref).abs() / bound).median() < 0.05  # rounding flips are rare, not the rule
    for i in {0, m // 2, m - 1}:
        assert torch.equal(amx.expert(x[i:i + 1].contiguous(), ga, ua, da, wt[i:i + 1].contiguous())[0], y[i])


@pytest.mark.parametrize("case, message", [
    ("formats_differ", "gate / up must be [F, 128] and down [128, F] in one format"),
    ("down_shape", "gate / up must be [F, 128] and down [128, F] in one format"),
    ("wt_shape", "wt must be contiguous float32 [4]"),
    ("wt_dtype", "wt must be contiguous float32 [4]"),
    ("x_strided", "x must be contiguous bf16 [M, D]"),
    ("gate_k", "gate must be [N, 128] for K = 128"),
])
def test_expert_refusals_name_the_argument(case, message):
    d, f = 128, 96
    x = _x(4, d)
    gb = (torch.zeros(f, d, dtype=BF), None, 0)
    db = (torch.zeros(d, f, dtype=BF), None, 0)
    q, s = _int8(d, f)
    wt = torch.rand(4)
    args = {"formats_differ": (x, gb, gb, (q, s, 0), wt), "down_shape": (x, gb, gb, (torch.zeros(96, 96, dtype=BF), None, 0), wt),
            "wt_shape": (x, gb, gb, db, wt[:3]), "wt_dtype": (x, gb, gb, db, wt.double()),
            "x_strided": (_x(4, 2 * d)[:, :d], gb, gb, db, wt),
            "gate_k": (x, (torch.zeros(f, 64, dtype=BF), None, 0), gb, db, wt)}[case]
    with pytest.raises(ValueError, match=re.escape(message)):
        amx.expert(*args)
