"""A short, bounded run of benchmarks/load_test.py (8 clients x 30 s on the demo model):
the real ``dsvl2 serve`` process under mixed load, a disconnect storm, a burst beyond
``--max-queue`` and slow readers. The 5-minute, 32-client run is the script's default;
its figures are the README's "Reliability" table.

The run's own verdict (exit status, ``ok``) is checked, and the figures behind it one by
one so that a failure names which. Memory: the script's 10 % bound is for the long run;
a 30-s run's end RSS moves a few % either way with the allocator, so here it is a leak
guard (end < 1.25 x start), not the acceptance figure.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "load_test.py"


@pytest.mark.slow
def test_short_load_run_loses_nothing_and_frees_every_slot():
    p = subprocess.run([sys.executable, str(SCRIPT), "--clients", "8", "--duration", "30", "--max-batch-size", "8",
                        "--max-tokens", "16", "--warm-up", "48"],
                       capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
    assert p.stdout, p.stderr[-3000:]
    r = json.loads(p.stdout)
    assert p.returncode == (0 if r["ok"] else 1), r
    assert r["alone_reproducible"], r
    assert r["lost"] == 0 and r["warm_up"]["lost"] == 0, r["lost_examples"]
    assert r["mixed"] == 0 and r["warm_up"]["mixed"] == 0, r["mixed_examples"]
    assert r["status_5xx"] == 0 and r["server_outcomes"]["error"] == 0, r
    assert r["completed"] > 0 and set(r["by_phase"]) == {"main", "storm", "burst", "slow"}, r
    assert r["errors"].get("429", 0) > 0 and r["retry_after_missing"] == 0, r  # the burst met --max-queue
    assert set(r["errors"]) <= {"429"}, r
    assert r["disconnects"] > 0 and r["server_outcomes"]["cancelled"] >= r["disconnects"], r
    assert not r["stuck_slots"] and all(v == 0 for v in r["after"].values()), r["after"]
    assert r["rss_mib"]["end"] < 1.25 * r["rss_mib"]["start"], r["rss_mib"]
    assert r["server_exit_status"] == 0, r
