"""Row counts of bf16 prefill products rounded up to buckets (dsvl2/model/buckets.py).

* ``bucket_rows``: never fewer rows, at most 1/8 more above 128 (fewer than 16 more below),
  a bucket is its own bucket, and few buckets: 16 + 8 per doubling.
* ``linear``: the product of the rows given (float64 reference, bf16 rounding), the shape
  and dtype of ``F.linear``'s; float32 products and ``pad=False`` are ``F.linear`` itself.
* Where the model pads: prefill products with bf16 weights (the dense path, a gated MLP,
  quantised weights' block products and experts), never a decode step's.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dsvl2.model import buckets, ops
from dsvl2.model.native import amx
from dsvl2.model.quant import QuantWeight

BF = torch.bfloat16


def test_buckets_hold_every_row_waste_at_most_an_eighth_and_are_few():
    seen = set()
    for m in range(0, 5000):
        b = buckets.bucket_rows(m)
        assert b >= m and buckets.bucket_rows(b) == b
        if m <= buckets.BUCKET_FROM:
            assert b == m
        elif m <= 128:
            assert b - m < 16 and b % 16 == 0
        else:
            assert b - m <= m / 8
        seen.add(b)
    # 0..16, then multiples of 16 to 256 (15 more), then 8 per doubling to 8192 (5 x 8)
    assert len(seen) <= 17 + 15 + 5 * 8


def _operands(m, k=96, n=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, k, generator=g).to(BF), torch.randn(n, k, generator=g).to(BF), torch.randn(n, generator=g)


@pytest.mark.parametrize("m", [1, 16, 17, 37, 130, 300])
def test_padded_product_is_the_product_of_the_rows_given(m):
    x, w, b = _operands(m)
    got = buckets.linear(x, w, b.to(BF))
    assert got.shape == (m, 40) and got.dtype is BF
    want = x.double() @ w.double().T + b.to(BF).double()
    # bf16 result: half an ulp (at most 2^-8 of each value), + the float32 sums' order (tiny)
    assert ((got.double() - want).abs() <= 2 ** -8 * want.abs() + 1e-5 * want.abs().max()).all()


def test_three_dimensional_input_keeps_its_leading_shape():
    x, w, _ = _operands(2 * 19)
    got = buckets.linear(x.view(2, 19, 96), w)
    assert got.shape == (2, 19, 40)
    assert ((got.view(38, 40).double() - x.double() @ w.double().T).abs() <= 2 ** -8 * 40).all()


def test_padding_really_appends_zero_rows_and_drops_their_results(monkeypatch):
    shapes = []
    real = F.linear

    def spy(x, w, b=None):
        shapes.append(tuple(x.shape))
        if x.shape[0] > 37:
            assert not x[37:].float().any()  # the appended rows are zeros
        return real(x, w, b)

    monkeypatch.setattr(buckets.F, "linear", spy)
    x, w, _ = _operands(37)
    buckets.linear(x, w)
    buckets.linear(x, w, pad=False)
    buckets.linear(x.float(), w.float())
    assert shapes == [(48, 96), (37, 96), (37, 96)]


def test_unpadded_products_are_f_linear_bit_for_bit():
    x, w, b = _operands(37)
    assert torch.equal(buckets.linear(x, w, b.to(BF), pad=False), F.linear(x, w, b.to(BF)))
    assert torch.equal(buckets.linear(x.float(), w.float(), b), F.linear(x.float(), w.float(), b))


def _rows_seen(monkeypatch) -> list[int]:
    rows = []
    real = F.linear
    monkeypatch.setattr(buckets.F, "linear", lambda x, w, b=None: rows.append(x.shape[0]) or real(x, w, b))
    monkeypatch.setattr(ops.F, "linear", lambda x, w, b=None: rows.append(x.shape[0]) or real(x, w, b))
    return rows


def test_prefill_products_with_bf16_weights_pad_and_decode_steps_do_not(monkeypatch, bf16_policy):
    x = torch.randn(37, 96)
    w = torch.randn(40, 96).to(BF)
    gate, up, down = torch.randn(24, 96).to(BF), torch.randn(24, 96).to(BF), torch.randn(96, 24).to(BF)
    monkeypatch.setattr(ops.native, "usable", lambda *a: False)  # decode on torch's kernels here
    rows = _rows_seen(monkeypatch)
    y = ops.linear(x, w)
    assert y.shape == (37, 40) and y.dtype is torch.float32
    z = ops.gated_mlp(x, gate, up, down)
    assert z.shape == (37, 96)
    assert rows == [48, 48, 48, 48]
    rows.clear()
    with ops.decoding():
        assert torch.equal(ops.linear(x, w), F.linear(x.to(BF), w).float())
        ops.gated_mlp(x, gate, up, down)
    assert rows == [37, 37, 37, 37, 37]  # the spy saw the decode products (and the check's own) unpadded


def test_quantised_prefill_products_pad_to_the_same_numbers(monkeypatch, bf16_policy):
    """A prefill product of int8 weights (dequantised, then a bf16 GEMM; on a CPU with AMX
    that path is switched off here, see tests/test_amx.py): padded rows, and within bf16
    rounding of the float64 product of the dequantised weight."""
    monkeypatch.setattr(amx, "enabled", False)
    wq = QuantWeight.quantize(torch.randn(40, 96), 8)
    x = torch.randn(37, 96)
    rows = _rows_seen(monkeypatch)
    got = ops.linear(x, wq)
    assert rows == [48]
    want = x.to(BF).double() @ wq.dequantize(torch.float32).to(BF).double().T
    assert ((got.double() - want).abs() <= 2 ** -8 * want.abs() + 1e-5 * want.abs().max()).all()
