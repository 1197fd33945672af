"""The fuzz targets of tests/test_fuzz.py at scale: 10^5 hypothesis examples per target.

    python benchmarks/fuzz.py                          # every target, 100000 examples each
    python benchmarks/fuzz.py --examples 2000 --only grounding --only tiling

Prints ONE JSON object on stdout (progress on stderr): per target the examples run, the
failures (0, or the distinct bugs hypothesis reports after shrinking, with their
falsifying message), the seconds, the rate and the 1-minute load average (min / mean /
max of samples every 10000 examples: the machine is shared). Exit status 0 only with 0
failures.

The targets (strategies and properties) are imported from tests/test_fuzz.py, so they are
written once; here only the example count differs (the suite runs a few hundred).
Settings: max_examples = --examples, deadline=None, database=None (nothing is stored
between runs), every health check off (a slow example is not a failure here), a fixed
--seed per run so that a failure can be reproduced.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import traceback
from pathlib import Path

TESTS = Path(__file__).resolve().parent.parent / "tests"
sys.path.insert(0, str(TESTS))  # test_fuzz and its _paths helper

import hypothesis  # noqa: E402
import torch  # noqa: E402
from hypothesis import HealthCheck  # noqa: E402

import test_fuzz  # noqa: E402


def _failures(exc: BaseException) -> list[str]:
    """One line per distinct bug: hypothesis raises an ExceptionGroup when it found several."""
    group = exc.exceptions if isinstance(exc, BaseExceptionGroup) else [exc]
    lines = []
    for e in group:
        notes = " ".join(getattr(e, "__notes__", []))  # hypothesis puts the falsifying example here
        where = traceback.extract_tb(e.__traceback__)[-1] if e.__traceback__ else None
        at = f" at {Path(where.filename).name}:{where.lineno}" if where else ""
        lines.append(f"{type(e).__name__}: {str(e)[:300]}{at} | {notes[:1000]}")
    return lines


class _Counter(list):
    """``run_target``'s example counter, reporting every 10000 examples on stderr and
    sampling the 1-minute load average there (the machine is shared: a rate means little
    without it)."""

    def __init__(self, name: str):
        super().__init__([0])
        self.name, self.t0 = name, time.perf_counter()
        self.loads = [os.getloadavg()[0]]

    def __setitem__(self, i, value):
        super().__setitem__(i, value)
        if value % 10_000 == 0:
            self.loads.append(os.getloadavg()[0])
            print(f"fuzz: {self.name}: {value} examples, {time.perf_counter() - self.t0:.0f} s, "
                  f"load {self.loads[-1]:.1f}", file=sys.stderr, flush=True)


def run_one(name: str, examples: int, seed: int) -> dict:
    target = test_fuzz.TARGETS[name]
    counter = _Counter(name)
    t0 = time.perf_counter()
    failures: list[str] = []
    try:
        test_fuzz.run_target(target, examples, counter, seed=seed, suppress_health_check=list(HealthCheck))
    except BaseException as e:  # noqa: BLE001 - every failure of the property is a finding
        if isinstance(e, KeyboardInterrupt):
            raise
        failures = _failures(e)
    seconds = time.perf_counter() - t0
    loads = counter.loads + [os.getloadavg()[0]]
    return {"examples": counter[0], "failures": len(failures), "errors": failures,
            "seconds": round(seconds, 1), "ms_per_example": round(1000 * seconds / max(counter[0], 1), 3),
            "load_1min": {"min": round(min(loads), 2), "mean": round(sum(loads) / len(loads), 2),
                          "max": round(max(loads), 2)}}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--examples", type=int, default=100_000, help="examples per target (default 100000)")
    ap.add_argument("--only", action="append", choices=list(test_fuzz.TARGETS), help="run only this target")
    ap.add_argument("--seed", type=int, default=0, help="hypothesis seed (default 0)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)  # the properties are small; one thread leaves the other core free
    names = args.only or list(test_fuzz.TARGETS)
    report = {"examples_per_target": args.examples, "seed": args.seed, "hypothesis": hypothesis.__version__,
              "python": platform.python_version(), "targets": {}}
    for name in names:
        print(f"fuzz: {name}: {args.examples} examples ...", file=sys.stderr, flush=True)
        r = run_one(name, args.examples, args.seed)
        report["targets"][name] = r
        print(f"fuzz: {name}: {json.dumps(r)}", file=sys.stderr, flush=True)  # survives a later kill
    report["failures"] = sum(r["failures"] for r in report["targets"].values())
    report["examples"] = sum(r["examples"] for r in report["targets"].values())
    print(json.dumps(report, indent=2))
    return 0 if report["failures"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
