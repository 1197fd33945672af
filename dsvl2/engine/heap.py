"""Freed memory kept for the next step instead of given back to the kernel (glibc malloc).

Every engine step allocates its activations anew (torch's CPU allocator is malloc). glibc
serves an allocation above its mmap threshold (128 KiB, raised as blocks are freed up to
32 MiB) with a fresh mapping that is unmapped when freed, and gives each thread but the
main one an arena whose heaps hold at most 64 MiB, so the big tensors of a prefill or
vision step (a [1431, 6848] float32 is 39 MB) arrive as new pages every step, each zeroed
by the kernel on first touch. Measured on the real tiny model, one 7-tile photo with a
1431-token prompt (c01): 250-330 thousand page faults per request (1.0-1.3 GB), 0.5-3.3 s
of system time in a VM where a page the guest has not touched lately costs 20-40 us.

``one_arena()`` (``api.load`` calls it first: threads that already have an arena keep it,
so before the loading starts OpenMP threads) makes every new thread allocate from the main
arena (M_ARENA_MAX 1), whose heap has no 64 MiB limit; ``keep_freed_memory()`` (``api.load``
calls it after the weights are read, before the engine's thread starts) adds allocations up
to 1 GiB from the heap (M_MMAP_THRESHOLD) and the heap's free top never given back
(M_TRIM_THRESHOLD). A step then reuses the pages the previous one freed: the same c01
requests one after the other faulted 134, 21, then 0 thousand pages. The cost: the process
keeps its largest working set so far (not the weights, read before as mappings of their
own) until it exits. ``DSVL2_MALLOC=system`` keeps glibc's defaults; where the C library
is not glibc nothing changes.

The first request still faults its working set in (the heap starts empty): 129 thousand
pages for the first c01 photo on tiny, ~5 s of system time in this VM, the second photo
26 thousand. ``reserve()`` faults about that much in while the model loads (and
``api.load`` writes the KV blocks a first request gets: ``KVCache.touch``).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -3, -8  # glibc's values for mallopt
MMAP_THRESHOLD = 1 << 30  # larger blocks (a KV pool, a checkpoint-sized buffer) stay mappings
TRIM_THRESHOLD = (1 << 31) - 1  # the largest an int takes: the heap top is never trimmed


@functools.lru_cache(maxsize=1)
def _mallopt():
    """glibc's ``mallopt``, or None (another C library, or none found)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        version = libc.gnu_get_libc_version  # glibc only
        fn = libc.mallopt
    except (OSError, AttributeError):
        return None
    version.restype = ctypes.c_char_p
    fn.argtypes, fn.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return fn


def available() -> bool:
    """Whether this process's C library is glibc (whose malloc these settings tune)."""
    return _mallopt() is not None


def wanted() -> bool:
    """Unless ``DSVL2_MALLOC=system``."""
    return os.environ.get("DSVL2_MALLOC", "").strip().lower() != "system"


def reserve(nbytes: int) -> bool:
    """Fault in ``nbytes`` of heap now: allocated, written, freed. With the settings above the
    pages stay in the heap, and the next steps' tensors are cut from them instead of faulting
    new ones; ``api.load`` reserves about what a first photo's request would fault, so that
    cost moves into the load. False (nothing done) where the settings are not in force."""
    if nbytes <= 0 or not (available() and wanted()):
        return False
    import torch

    block = torch.empty(int(nbytes), dtype=torch.uint8)
    block.fill_(0)
    del block
    return True


def one_arena() -> bool:
    """Threads without an arena yet share the main one. True when glibc took it; False
    where it is not glibc or ``DSVL2_MALLOC=system``."""
    fn = _mallopt()
    return fn is not None and wanted() and fn(M_ARENA_MAX, 1) == 1


def keep_freed_memory() -> bool:
    """``one_arena()`` and the two thresholds above (once is enough; again is harmless). True
    when glibc took all three; False where it is not glibc, ``DSVL2_MALLOC=system``, or a
    setting failed."""
    fn = _mallopt()
    if not one_arena():
        return False
    ok = fn(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
    return fn(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1 and ok
