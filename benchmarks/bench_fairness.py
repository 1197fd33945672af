"""How long a running stream waits while a big image request is admitted (JSON report).

    python benchmarks/bench_fairness.py -m /tmp/dsvl2-tiny      # dsvl2 init-random --preset tiny
    python benchmarks/bench_fairness.py -m demo

One model, two callers (threads) through the public API: caller A streams a text answer;
after A's first tokens, caller B asks about a photo of 7 tiles (golden case c01:
monday.jpg -> 3x2 local tiles + the global view, 1431 prompt tokens). The report gives
A's longest gap between two tokens while B is admitted, for the scheduler's per-step
token budget off (``step_tokens`` None: B's vision and whole prefill run in one step, as
the engine did before the budget) and on (the default, 512), with B's time to first
token in both runs. The gap is read from A's per-token timestamps
(``Handle.req.timings``), which the engine records for every request.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

import torch

import dsvl2
from dsvl2.api import STEP_TOKENS, VLModel

HERE = Path(__file__).resolve().parent
PHOTO = HERE.parent / "tests" / "data" / "images" / "monday.jpg"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("-m", "--model", default="demo")
    ap.add_argument("--a-tokens", type=int, default=4000,
                    help="caller A's max_new_tokens (A is cancelled once B answers; a random model may stop earlier)")
    args = ap.parse_args()
    reports = []
    loaded = dsvl2.load(args.model)
    for budget in (None, STEP_TOKENS):  # the same weights, an engine per budget
        m = VLModel(loaded.model, loaded.processor, loaded.folder, step_tokens=budget, prefix_caching=False)
        reports.append(_one(m, budget, args.a_tokens))
        m.driver.close()
        print(json.dumps(reports[-1]), file=sys.stderr, flush=True)  # partial results as they come
    print(json.dumps({"model": args.model, "machine": {"cpu": platform.processor() or platform.machine(),
                                                       "threads": torch.get_num_threads(),
                                                       "cores": os.cpu_count()},
                      "runs": reports}, indent=2))


def _one(m: VLModel, step_tokens: int | None, a_tokens: int) -> dict:
    m.chat("Hi.", max_new_tokens=2)  # first-call costs out of the way
    (a,) = m.submit("Tell me a long story about a lighthouse keeper.", max_new_tokens=a_tokens)
    ev_a = a.events()
    next(ev_a)
    (b,) = m.submit("Describe this image.", images=[str(PHOTO)], max_new_tokens=4)
    b_out = b.result()
    a.cancel()  # A only had to keep streaming while B was admitted
    a_out = None
    for ev in ev_a:
        if ev.output is not None:
            a_out = ev.output
    bt = b.req.timings
    start, end = bt.submitted, bt.first_token
    times = a.req.timings.token_times
    gaps = [(x, y - x) for x, y in zip(times, times[1:])]
    during = [g for x, g in gaps if x + g >= start and x <= end]
    return {
        "step_tokens": step_tokens,
        "a_completion_tokens": a_out.completion_tokens,
        "a_finish_reason": a_out.finish_reason,
        "b_prompt_tokens": b_out.prompt_tokens,
        "b_tiles": b.req.tiles_done,
        "a_longest_gap_during_b_admission_s": round(max(during), 3) if during else None,
        "a_median_gap_s": round(sorted(g for _, g in gaps)[len(gaps) // 2], 4) if gaps else None,
        "b_time_to_first_token_s": round(end - start, 3),
        "b_vision_s": round(bt.vision_s, 3),
        "b_prefill_s": round(bt.prefill_s, 3),
    }


if __name__ == "__main__":
    main()
