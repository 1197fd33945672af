"""Freed memory kept for the next step instead of given back to the kernel (glibc malloc).

Every engine step allocates its activations anew (torch's CPU allocator is malloc). glibc
serves an allocation above its mmap threshold (128 KiB, raised as blocks are freed up to
32 MiB) with a fresh mapping that is unmapped when freed, and gives each thread but the
main one an arena whose heaps hold at most 64 MiB, so the big tensors of a prefill or
vision step (a [1431, 6848] float32 is 39 MB) arrive as new pages every step, each zeroed
by the kernel on first touch. Measured on the real tiny model, one 7-tile photo with a
1431-token prompt (c01): 250-330 thousand page faults per request (1.0-1.3 GB), 0.5-3.3 s
of system time in a VM where a page the guest has not touched lately costs 20-40 us.

``one_arena()`` (``import dsvl2`` calls it: threads that already have an arena keep it, so
before the caller's code and the loading start threads) makes every new thread allocate
from the main arena (M_ARENA_MAX 1), whose heap has no 64 MiB limit;
``keep_freed_memory()`` (``api.load`` calls it after the weights are read, before the
engine's thread starts) adds allocations up to 1 GiB from the heap (M_MMAP_THRESHOLD) and
the heap's free top never given back (M_TRIM_THRESHOLD). A step then reuses the pages the
previous one freed: the same c01 requests one after the other faulted 134, 21, then 0
thousand pages. The cost: the process keeps its largest working set so far (not the
weights, read before as mappings of their own) until it exits. ``DSVL2_MALLOC=system``
keeps glibc's defaults; where the C library is not glibc nothing changes.

The first request still faults its working set in (the heap starts empty): 129 thousand
pages for the first c01 photo on tiny, ~5 s of system time in this VM, the second photo
26 thousand. ``reserve()`` faults about that much in while the model loads (and
``api.load`` writes the KV blocks a first request gets: ``KVCache.touch``).

All of this holds for the threads that allocate from the main arena. A thread that malloc'd
before ``M_ARENA_MAX`` was set has an arena of its own, and threads started later are handed
existing arenas in turn (glibc's ``reused_arena``), or the arena of a thread that ended; the
engine's driver starts a new thread for each busy spell, so it lands on such an arena now
and then. Another arena's heaps are 64 MiB mappings each, unmapped once empty, and a block
larger than that is a mapping of its own: the step's big tensors fault anew. Seen on the
real tiny model when a benchmark measured the matmul peak (torch starting its OpenMP
threads) before ``dsvl2.load``: 45-300 thousand page faults and 0.2-1.1 s of system time in
some c01 requests (first or later), vision 2.8 -> 3.8 s in the worst. Hence ``import dsvl2``
calls ``one_arena()`` (before the caller's code starts threads), and the driver checks its
thread (``in_main_arena``) and warns once where it is not on the main arena.
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
def _libc():
    """glibc with the functions used here declared, or None (another C library, or none found)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # glibc only
        fns = libc.mallopt, libc.malloc, libc.free, libc.malloc_info, libc.fdopen, libc.fclose
    except (OSError, AttributeError):
        return None
    libc.gnu_get_libc_version.restype = ctypes.c_char_p
    fns[0].argtypes, fns[0].restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    fns[1].argtypes, fns[1].restype = [ctypes.c_size_t], ctypes.c_void_p
    fns[2].argtypes, fns[2].restype = [ctypes.c_void_p], None
    fns[3].argtypes, fns[3].restype = [ctypes.c_int, ctypes.c_void_p], ctypes.c_int
    fns[4].argtypes, fns[4].restype = [ctypes.c_int, ctypes.c_char_p], ctypes.c_void_p
    fns[5].argtypes, fns[5].restype = [ctypes.c_void_p], ctypes.c_int
    return libc


def _mallopt():
    """glibc's ``mallopt``, or None."""
    libc = _libc()
    return None if libc is None else libc.mallopt


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


def in_main_arena() -> bool | None:
    """Whether the calling thread allocates from glibc's main arena: a small block of its
    malloc lies in the process's brk heap (``[heap]`` in /proc/self/maps), where only the
    main arena allocates (it falls back to mappings only where the brk heap cannot grow).
    None where it is not glibc, the maps cannot be read or show no brk heap."""
    libc = _libc()
    if libc is None:
        return None
    try:
        with open("/proc/self/maps") as f:
            spans = [tuple(int(a, 16) for a in line.split()[0].split("-"))
                     for line in f if line.rstrip().endswith("[heap]")]
    except OSError:
        return None
    if not spans:  # no brk heap (yet): nothing to tell
        return None
    p = libc.malloc(64)
    try:
        return bool(p) and any(lo <= p < hi for lo, hi in spans)
    finally:
        libc.free(p)


def arenas() -> int | None:
    """How many malloc arenas the process has (glibc's ``malloc_info``), or None where it is not
    glibc."""
    libc = _libc()
    if libc is None:
        return None
    import tempfile

    with tempfile.TemporaryFile() as f:
        fp = libc.fdopen(os.dup(f.fileno()), b"w")
        if not fp:
            return None
        libc.malloc_info(0, fp)
        libc.fclose(fp)
        f.seek(0)
        return f.read().count(b"<heap nr=")


def keep_freed_memory() -> bool:
    """``one_arena()`` and the two thresholds above (once is enough; again is harmless). True
    when glibc took all three; False where it is not glibc, ``DSVL2_MALLOC=system``, or a
    setting failed."""
    fn = _mallopt()
    if not one_arena():
        return False
    ok = fn(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
    return fn(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1 and ok
