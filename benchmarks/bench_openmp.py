"""What a second OpenMP team costs the thread that runs the model (prints JSON).

The engine runs the model in its driver thread while the model is loaded, and requests
are processed, in the caller's thread (``dsvl2/engine/openmp.py``). This times, in one
process, a burst of the short element-wise ops a quantised prefill runs per expert
(``index_add_`` of [200, 2048] rows into [1500, 2048], ``.float()``, SiLU: each one
parallel region) in three situations:

* ``main_us``: in the main thread, whose OpenMP team is warm (the only team);
* ``new_thread_while_main_team_us``: in a new thread while the main thread's team is
  alive (two teams: what the driver saw before ``openmp.release``);
* ``new_thread_after_release_us``: in a new thread after ``openmp.release()`` in the main
  thread (one team: what the driver sees now).

Each figure: microseconds per (index_add_ + float + silu), best of ``--repeats`` bursts of
``--ops``. With one torch thread there is no team to release and the three agree.

Usage: ``python benchmarks/bench_openmp.py [--ops 1000] [--repeats 5] [--threads N]``
(a few seconds).
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time

import torch

from dsvl2.engine import openmp


def burst(ops: int, repeats: int) -> float:
    x, out = torch.randn(200, 2048), torch.zeros(1500, 2048)
    sel = torch.randint(0, 1500, (200,))
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(ops):
            out.index_add_(0, sel, x)
            x.float()
            torch.nn.functional.silu(x)
        best = min(best, (time.perf_counter() - t) / ops)
    return round(best * 1e6, 1)


def in_new_thread(fn) -> float:
    result = []
    t = threading.Thread(target=lambda: result.append(fn()))
    t.start()
    t.join()
    return result[0]


def threads() -> int:
    return len(os.listdir("/proc/self/task")) if os.path.isdir("/proc/self/task") else -1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ops", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    run = lambda: burst(args.ops, args.repeats)  # noqa: E731
    report = {"torch_threads": torch.get_num_threads(), "release_available": openmp.available(),
              "load_average": os.getloadavg()[0]}
    report["main_us"] = run()
    report["process_threads_with_main_team"] = threads()
    report["new_thread_while_main_team_us"] = in_new_thread(run)
    report["released"] = openmp.release()
    report["process_threads_after_release"] = threads()
    report["new_thread_after_release_us"] = in_new_thread(run)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
