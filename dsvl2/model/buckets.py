"""Row counts of bf16 products rounded up to a few buckets, outside decode steps.

oneDNN builds (JIT-compiles) a kernel for each new shape of a bf16 product on the CPU: 2-7
ms the first time a row count is seen (measured on an Intel Xeon with AMX, 2 threads;
float32 products, on MKL, build nothing per shape). A prefill's shapes are new for every
new prompt: its length, and the row count of each routed expert's products. On the real
tiny model a 1,400-token prompt's prefill took 2.8-3.1 s when new and 1.65-2.07 s when the
same prompt came again. So a prefill / vision product in bf16 has its row count rounded up
(``bucket_rows``: at most 1/8 more rows, zero rows appended, their results dropped), and the
kernels of the few buckets are built once per process.

Decode steps are never padded (``pad=False``): there a row's bits must not depend on the
batch's row count. In prefill they already do (oneDNN picks its kernel by the row count, so
the same row in a product of 133 or of 144 rows can differ in the last bf16 bit): padding
moves results within bf16 rounding, as any other row count would.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

BUCKET_FROM = 16  # row counts up to this are their own bucket


def bucket_rows(m: int) -> int:
    """``m`` rounded up to its bucket: itself up to ``BUCKET_FROM``, then multiples of 16 up to
    256, then 8 buckets per doubling (multiples of 32 up to 512, of 64 up to 1024, ...)."""
    if m <= BUCKET_FROM:
        return m
    step = max(16, 1 << (m.bit_length() - 4))
    return -(-m // step) * step


def padded_rows(x: torch.Tensor, pad: bool = True) -> tuple[torch.Tensor, int]:
    """(x as [M', K], M): M' = ``bucket_rows(M)`` with zero rows appended where ``pad`` is set
    and x is bf16 on the CPU, else M' = M (x reshaped, not copied)."""
    k = x.shape[-1]
    m = x.numel() // k if k else 0
    x2 = x.reshape(m, k)
    mp = bucket_rows(m) if pad and x.dtype is torch.bfloat16 and x.is_cpu else m
    if mp == m:
        return x2, m
    xp = torch.empty((mp, k), dtype=x.dtype)
    xp[:m] = x2
    xp[m:].zero_()
    return xp, m


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, pad: bool = True
           ) -> torch.Tensor:
    """``F.linear(x, weight, bias)``, its rows padded as ``padded_rows`` says (the padding's
    results dropped): the same shape and dtype."""
    xp, m = padded_rows(x, pad)
    if xp.shape[0] == m:
        return F.linear(x, weight, bias)
    return F.linear(xp, weight, bias)[:m].view(*x.shape[:-1], weight.shape[0])
