"""Giving freed memory back to the operating system while the server runs (glibc).

Why: a request's big transient buffers (image tiles, vision and prefill activations,
attention masks: 1-30 MB each, freed within the request) come from glibc's malloc. Its
mmap threshold starts at 128 KiB but rises to the size of the largest buffer freed so
far (up to 32 MiB), so after the first requests these buffers are carved from the heap
arenas instead of getting their own mappings; small long-lived allocations made in
between pin the arenas' free space, which stays resident. The server's RSS then grows
under load and stays after it although nothing is alive. Measured on the demo model
(float32, 32 clients): 120-135 MiB of live heap before and after the load, but 170-360 MiB
of free heap still resident; no Python object or tensor accumulates, and
``malloc_trim(0)`` brought the RSS from 570-730 MiB back to 380-460 MiB in 1-50 ms.
``MALLOC_ARENA_MAX=1`` does not help (one arena fragments the same way).

What: every ``interval_s`` seconds while requests arrive or run, and three more times once
they stop (cancelled rows are freed at the driver's next step, the driver thread's
buffers when it exits after its idle time), ``malloc_trim(0)`` runs in a worker thread
(ctypes releases the GIL): it hands every free page of every arena back to the OS. An
idle server does nothing. Cost: no CPU difference measurable on the demo (A/B, CPU
seconds per answered request); each call takes 1-50 ms. Where the C library has no
``malloc_trim`` (musl, macOS, Windows) nothing runs.

The alternative, a fixed mmap threshold (``GLIBC_TUNABLES=glibc.malloc.mmap_threshold=1048576``
in the server's environment, i.e. ``mallopt(M_MMAP_THRESHOLD, 1 MiB)``), returns every
buffer of 1 MiB or more at its ``free`` and keeps the RSS under load a little lower, but
then every such buffer is page-faulted afresh: on the demo model it more than doubled
the system CPU time (+8-17 % CPU per image request), so it is left to the operator.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import sys
from typing import Callable

try:
    from resource import getpagesize

    _PAGE = getpagesize()
except ImportError:  # pragma: no cover - Windows
    _PAGE = 4096

log = logging.getLogger("dsvl2.server")

# Seconds between two trims while the server has work (0 / None: never trim).
DEFAULT_TRIM_INTERVAL_S = 2.0
# Trims after the work stops: memory is still freed then (cancelled rows at the driver's
# next step, the driver thread's buffers when it exits after its idle time).
_TAIL_TRIMS = 3

_trim_fn: Callable[[int], int] | None | bool = False  # False: not looked up yet


def _malloc_trim() -> Callable[[int], int] | None:
    global _trim_fn
    if _trim_fn is False:
        fn = None
        if sys.platform.startswith("linux"):
            try:
                fn = getattr(ctypes.CDLL(None), "malloc_trim", None)  # glibc only
            except (OSError, AttributeError):
                fn = None
            if fn is not None:
                fn.argtypes = [ctypes.c_size_t]
                fn.restype = ctypes.c_int
        _trim_fn = fn
    return _trim_fn


def can_trim() -> bool:
    return _malloc_trim() is not None


def rss_bytes() -> int | None:
    """This process's resident set size (Linux), else None."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return None


def trim() -> bool:
    """Return the allocator's free memory to the OS; False where that is not possible."""
    fn = _malloc_trim()
    if fn is None:
        return False
    fn(0)
    return True


async def trim_while_busy(interval_s: float, activity: Callable[[], tuple[int, bool]]) -> None:
    """Run until cancelled: trim every ``interval_s`` seconds when ``activity()`` (requests
    received so far, any request in flight?) shows work since the last look, and
    ``_TAIL_TRIMS`` more times after it stops."""
    if not interval_s or interval_s <= 0 or not can_trim():
        return
    loop = asyncio.get_running_loop()
    seen, tail = activity()[0], 0
    while True:
        await asyncio.sleep(interval_s)
        received, busy = activity()
        if received != seen or busy:
            seen, tail = received, _TAIL_TRIMS
        elif tail > 0:
            tail -= 1
        else:
            continue
        before = rss_bytes() if log.isEnabledFor(logging.DEBUG) else None
        await loop.run_in_executor(None, trim)
        after = rss_bytes() if before is not None else None
        if before is not None and after is not None:
            log.debug("malloc_trim: RSS %.0f -> %.0f MiB", before / 2**20, after / 2**20)
