"""Per-thread scratch buffers reused across calls (CPU), for weights upcast block by block."""

from __future__ import annotations

import threading

import torch

_scratch = threading.local()


def upcast(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``weight.to(dtype)`` written into a reused per-thread buffer (CPU).

    A fresh multi-MB tensor per call costs page faults on first touch: upcasting a
    4096 x 4096 bf16 matrix takes 32 ms into a new tensor and 4.5 ms into a reused one
    on this machine. The result is only valid until the next ``upcast`` on this thread,
    so callers use it immediately (every caller below does).
    """
    if weight.device.type != "cpu":
        return weight.to(dtype)
    out = buffer(weight.numel(), dtype).view(weight.shape)
    out.copy_(weight)
    return out


def buffer(n: int, dtype: torch.dtype) -> torch.Tensor:
    """The first ``n`` elements of this thread's reused CPU buffer of ``dtype`` (the one
    ``upcast`` writes into: valid until the next ``upcast`` / ``buffer`` of that dtype here)."""
    bufs = getattr(_scratch, "bufs", None)
    if bufs is None:
        bufs = _scratch.bufs = {}
    buf = bufs.get(dtype)
    if buf is None or buf.numel() < n:
        # a normal tensor even when first made under torch.inference_mode (an inference
        # tensor could not be written outside it: the next product outside would fail)
        with torch.inference_mode(False):
            buf = bufs[dtype] = torch.empty(n, dtype=dtype)
    return buf[:n]
