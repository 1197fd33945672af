"""bf16 weights reordered once into oneDNN's blocked layout, for the vision tower's products.

``F.linear`` on bf16 hands oneDNN the plain [N, K] weight, and oneDNN reorders it into its
blocked layout inside every call. ``torch.ops.mkldnn._reorder_linear_weight`` does that
once, and ``torch.ops.mkldnn._linear_pointwise`` multiplies with the result: the same bits
as ``F.linear`` (a test checks), and on the AVX-512 BF16 development machine (Zen 4,
2 threads) 1.0-1.12x as fast on the tower's shapes ([5103, 1152] x [1152, 4304]: 340 -> 380
GFLOP/s; benchmarks/bench_prepack.py).

The same call can apply the tanh GELU to the float32 accumulator before the one rounding to
bf16 (the vision MLP's fc1): the plain chain rounds fc1's result to bf16 and the GELU's
result again. So fused, fc1 + GELU is one pass instead of two over a [N, P, 4304] tensor
(255-318 -> 332-386 GFLOP/s for the pair) and closer to float32 (one rounding fewer); its
bits are not the unfused chain's, which is why only a prepacked Linear asked for it uses it
(tests/test_prepack.py holds it to float64 and to the unfused error).

The reordered copy is extra memory (the vision tower: 0.82 GB in bf16 for every
DeepSeek-VL2 size); ``api.load`` makes it only where vision products run in bf16 and this
probe passes.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

_BF16 = torch.bfloat16


@functools.cache
def usable() -> bool:
    """This torch has the oneDNN ops, multiplies bf16 on this CPU, and a probe of the
    reordered product gives ``F.linear``'s bits (a 3-D input, a bias, an odd row count)."""
    try:  # a torch without these ops raises AttributeError / RuntimeError on the lookup
        if not (torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()):
            return False
        g = torch.Generator().manual_seed(0)
        w = torch.randn(48, 64, generator=g).to(_BF16)
        b = torch.randn(48, generator=g).to(_BF16)
        x = torch.randn(2, 7, 64, generator=g).to(_BF16)
        return torch.equal(product(x, pack(w), b), F.linear(x, w, b))
    except (RuntimeError, AttributeError, NotImplementedError):
        return False


def pack(weight: torch.Tensor, rows: int = 729) -> torch.Tensor:
    """bf16 weight [N, K] -> oneDNN's reordered copy (an opaque mkldnn tensor). ``rows``:
    the row count the layout is tuned for (any row count multiplies correctly)."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), rows)


def product(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x bf16 [..., K] @ W.T + bias (bf16 [N] or None), W packed by ``pack``: bf16 [..., N]."""
    if not x.is_contiguous():  # the oneDNN call reads strided inputs wrong
        x = x.contiguous()
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
