"""One OpenMP thread team at work: the driver's.

torch's CPU kernels (and the native kernels, which share torch's OpenMP runtime) run on
the OpenMP team of the thread that calls them, and the runtime keeps each calling
thread's team alive afterwards. The model is loaded, and every request is checked and
tokenised (images resized), in the caller's thread; the engine runs in the driver's
thread (``engine/driver.py``). So a process that has loaded a model holds two teams, and
once the runtime counts more of its threads than the machine has CPUs, GNU OpenMP
(libgomp, what torch's Linux wheels ship) stops letting idle team members spin: each
waits on a futex and is woken by the kernel for the next parallel region. The driver runs
thousands of short parallel regions a second (a prefill's per-expert element-wise ops,
a decode step's ~6 regions a layer), and each then waits for a woken thread.

Measured on 2 Zen 4 threads with the small int8 model loaded: an index_add_ + float() +
silu on [200, 2048] (what the quantised prefill does per expert) took 756 us in a new
thread while the loading thread's team was alive, 179 us once it was released, 168 us in
the loading thread itself; ``benchmarks/bench_openmp.py`` measures the same without a
model (457 / 131 / 130 us there). Through the API, small int8: batch-1 decode 9.2-11.1
-> 10.8-13.9 tok/s, a 1485-token prefill 34.6-39.0 -> 31.3-33.0 s (back-to-back runs).

``release()`` frees the calling thread's team (OpenMP 5.0 ``omp_pause_resource_all``,
soft pause: the threads end; the next parallel region in this thread starts a new team).
``api.load`` calls it when the model is loaded and ``VLModel.process`` after each
request's processing, so between requests only the driver keeps a team. It does nothing
where the runtime lacks the call or is not found (``available()``), and refuses (False)
inside a parallel region. Other code of the application that runs torch in its own
threads keeps its teams; calling ``release()`` there afterwards helps the same way.
"""

from __future__ import annotations

import ctypes
import functools
import os

OMP_PAUSE_SOFT = 1  # omp_pause_resource_t: the team's threads end, state is kept
_RUNTIMES = ("libgomp", "libiomp5", "libomp")  # GNU, Intel, LLVM OpenMP


@functools.lru_cache(maxsize=1)
def _pause():
    """``omp_pause_resource_all`` of the OpenMP runtime loaded in this process (torch's), or None."""
    import torch  # noqa: F401  (loads the runtime torch was built with)

    try:
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if line.rstrip().endswith(".so") or ".so." in line}
    except OSError:  # not Linux
        return None
    for path in sorted(paths):
        if os.path.basename(path).startswith(_RUNTIMES):
            try:
                fn = ctypes.CDLL(path).omp_pause_resource_all
            except (OSError, AttributeError):  # an OpenMP before 5.0
                continue
            fn.argtypes, fn.restype = [ctypes.c_int], ctypes.c_int
            return fn
    return None


def available() -> bool:
    """Whether this process's OpenMP runtime can release a thread's team."""
    return _pause() is not None


def release() -> bool:
    """Free the calling thread's OpenMP team; True when it was freed (or there was none)."""
    fn = _pause()
    return fn is not None and fn(OMP_PAUSE_SOFT) == 0
