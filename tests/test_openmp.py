"""engine/openmp.py: between requests only the driver's thread keeps an OpenMP team.

Checked by the threads the process holds (``/proc/self/task``), in a fresh interpreter
(the test process has teams of its own): a parallel torch op in a thread starts its team
(torch.set_num_threads(2): one extra thread), ``openmp.release()`` ends it, and the API
releases the caller's team after loading a model and after processing a request. A released
team's threads end just after the call returns, so each count after a release is taken once it
has stood still for 0.2 s (5 s at most). The speed this buys is measured by
``benchmarks/bench_openmp.py``, not here.
"""

from __future__ import annotations

import json
import subprocess
import sys

from dsvl2.engine import openmp

SCRIPT = r"""
import json, os, threading, time
import torch
torch.set_num_threads(2)
import dsvl2
from dsvl2.engine import openmp

def n():
    return len(os.listdir("/proc/self/task"))

def n_settled():  # released threads leave after the call returns: the count once 0.2 s unchanged (5 s at most)
    end, last, same = time.monotonic() + 5, n(), 0
    while same < 20 and time.monotonic() < end:
        time.sleep(0.01)
        now = n()
        same, last = (same + 1 if now == last else 0), now
    return last

def team():  # a parallel region in this thread
    torch.ones(1 << 22).sin_()

out = {"start": n()}
team(); out["with_team"] = n()
out["released"] = openmp.release(); out["after_release"] = n_settled()
out["again"] = openmp.release()  # nothing to release: still fine
m = dsvl2.load("demo")
out["after_load"] = n_settled()
team(); out["before_process"] = n()
m.process("Describe the image.", images=[dsvl2.api.Image.new("RGB", (64, 48), "white")])
out["after_process"] = n_settled()
seen = {}
def other():  # another thread's team, released there
    team(); seen["with"] = n(); openmp.release(); seen["without"] = n_settled()
t = threading.Thread(target=other); t.start(); t.join()
out["other_thread"] = seen
print(json.dumps(out))
"""


def run_script() -> dict:
    r = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_openmp_runtime_found():
    # torch's Linux wheels ship GNU OpenMP 4.5+ with the 5.0 pause call
    assert openmp.available()


def test_release_ends_the_callers_team_and_the_api_releases_after_load_and_process():
    out = run_script()
    assert out["with_team"] == out["start"] + 1, out  # the main thread's team: one worker thread
    assert out["released"] and out["after_release"] == out["start"], out
    assert out["again"], out
    # load() leaves no team in the loading thread; process() ends the one its caller had
    assert out["before_process"] == out["after_load"] + 1, out
    assert out["after_process"] == out["after_load"], out
    assert out["other_thread"]["without"] == out["other_thread"]["with"] - 1, out
