"""Weights in 2 MiB pages (Linux transparent huge pages, asked for with ``madvise``).

A decode step streams every weight it uses from memory once; at one row it is a read, and
its rate is what the memory and the address translation give. With 4 KiB pages a
streaming read takes a TLB miss every 4 KiB, and in a virtual machine each miss walks
two sets of page tables. Measured on the 2-core Intel Xeon VM this project is developed
on (where transparent huge pages are ``madvise`` only): a float32 sum
over 512 MiB read 20.7-22.4 GB/s from ordinary pages and 29.1-29.4 GB/s from 2 MiB pages;
dsvl2's int8 matrix-vector product over 1 GiB of weights 27.2-27.8 -> 31.4-32.3 GB/s (on
the model's smaller matrices, 2-4 MB each, 1.02-1.14x; a whole decode step of the real
tiny model 43.4-44.9 -> 42.8-43.9 ms, of base int4 within its noise). What they change
most is the load, where every page of the weights faults in once (a 2 MiB page is one
fault instead of 512). Loading the real tiny model, three alternating pairs of fresh processes:
14.7-23.6 s with ordinary pages (2.2 million faults, 14-22 s of system time) against
11.1-12.9 s (0.68 million, 7.4-9.3 s); peak RSS the same (8.50-8.57 GiB).

``empty`` makes a CPU tensor of at least ``MIN_BYTES`` as an anonymous mapping of its own,
2 MiB aligned, and asks for huge pages over the whole 2 MiB pages inside it *before*
anything is written (the kernel then hands out 2 MiB pages as the loader writes the
weights; asking after the pages exist would need ``MADV_COLLAPSE``, which took 3 s per
GiB here). The tail past the last whole 2 MiB page keeps 4 KiB pages, so a tensor never
costs more resident memory than its bytes. Where the system says no (not Linux, huge
pages ``never``, no ``madvise``) or ``DSVL2_HUGEPAGES=0`` is set, it is ``torch.empty``;
the values never depend on the pages.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import math
import mmap
import os
import sys
from pathlib import Path

import torch

HUGE = 2 << 20  # bytes in a huge page on x86-64 and (4 KiB base pages) arm64
MIN_BYTES = 2 * HUGE  # smaller tensors gain at most one whole huge page: left to malloc
MADV_HUGEPAGE = 14  # Linux's value on every architecture
THP_SETTING = Path("/sys/kernel/mm/transparent_hugepage/enabled")


@functools.cache
def _madvise():
    """libc's ``madvise``, declared, or None where there is none."""
    try:
        fn = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int], ctypes.c_int
    return fn


def thp_setting() -> str | None:
    """The system's transparent-huge-page mode ("always", "madvise", "never"), or None
    where it cannot be read (not Linux, no such file)."""
    try:
        text = THP_SETTING.read_text()
    except OSError:
        return None
    start, end = text.find("["), text.find("]")
    return text[start + 1:end] if 0 <= start < end else None


@functools.cache
def usable() -> bool:
    """Whether ``empty`` asks for huge pages in this process (see the module docstring)."""
    if os.environ.get("DSVL2_HUGEPAGES", "1").strip() == "0":
        return False
    if not sys.platform.startswith("linux") or not hasattr(mmap, "MAP_ANONYMOUS"):
        return False
    return thp_setting() in ("always", "madvise") and _madvise() is not None


def empty(shape: tuple[int, ...] | torch.Size, dtype: torch.dtype, device: torch.device | str = "cpu"
          ) -> torch.Tensor:
    """An uninitialised tensor like ``torch.empty(shape, dtype=dtype, device=device)``,
    in 2 MiB pages where it is a CPU tensor of at least ``MIN_BYTES`` and ``usable()``."""
    shape = tuple(shape)
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    if torch.device(device).type != "cpu" or nbytes < MIN_BYTES or not usable():
        return torch.empty(shape, dtype=dtype, device=device)
    buf = mmap.mmap(-1, nbytes + HUGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    raw = torch.frombuffer(buf, dtype=torch.uint8)  # the tensor keeps the mapping alive
    start = raw.data_ptr()
    off = -start % HUGE
    whole = nbytes // HUGE * HUGE
    # a refusal (EINVAL where the kernel lacks THP) leaves ordinary pages: nothing else changes
    _madvise()(start + off, whole, MADV_HUGEPAGE)
    return raw[off:off + nbytes].view(dtype).view(shape)


def huge_bytes() -> int:
    """Bytes of this process's anonymous memory in huge pages now (``AnonHugePages`` of
    /proc/self/smaps_rollup), or -1 where that cannot be read."""
    try:
        for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
            if line.startswith("AnonHugePages:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return -1
