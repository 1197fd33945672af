"""engine/heap.py: after ``dsvl2.load`` a thread that frees a big block and allocates it again
reuses the pages instead of faulting new ones.

Checked in fresh interpreters (glibc's settings are process-wide): in a new thread (as the
engine's driver is), a 96 MiB tensor is filled, freed, one of 95 MiB made and filled; the minor
page faults of the second fill (``getrusage``) are counted. With the settings (the default)
the second fill reuses the first one's pages; with ``DSVL2_MALLOC=system`` (glibc's own
behaviour: a block that size is a mapping of its own, unmapped when freed) every page
faults again. The time this saves per request is in the module's docstring (measured with
the real tiny model), not here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from dsvl2.engine import heap

SCRIPT = r"""
import json, resource, threading
import torch
import dsvl2
from dsvl2.engine import heap

dsvl2.load("demo")
out = {"applied": heap.keep_freed_memory()}

def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt

def work():
    n = 96 << 20
    a = torch.empty(n, dtype=torch.uint8); a.fill_(1); del a
    before = faults()
    # a little smaller: an aligned allocation of exactly the freed size asks glibc for a
    # few bytes more than the freed block, which another thread's block above it may keep
    # from growing into
    b = torch.empty(n - (1 << 20), dtype=torch.uint8); b.fill_(2)
    out["second_fill_faults"] = faults() - before
    out["pages"] = n // resource.getpagesize()

t = threading.Thread(target=work); t.start(); t.join()
print(json.dumps(out))
"""


def run(env_value: str | None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "DSVL2_MALLOC"}
    if env_value is not None:
        env["DSVL2_MALLOC"] = env_value
    r = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not heap.available(), reason="not glibc: keep_freed_memory() changes nothing there")
def test_freed_blocks_are_reused_after_load_and_not_with_system_malloc():
    tuned = run(None)
    assert tuned["applied"] is True
    assert tuned["second_fill_faults"] < tuned["pages"] // 20  # the pages of the first fill again
    system = run("system")
    assert system["applied"] is False
    assert system["second_fill_faults"] > system["pages"] // 2  # a new mapping: every page faults


def test_system_malloc_is_left_alone(monkeypatch):
    monkeypatch.setenv("DSVL2_MALLOC", "system")
    assert not heap.wanted() and heap.keep_freed_memory() is False
    monkeypatch.setenv("DSVL2_MALLOC", "")
    assert heap.wanted()


def test_load_reserves_about_a_first_requests_heap():
    """``api.first_request_bytes`` grows with the model's widths (a prefill step of up to
    2048 tokens and a 5-tile vision step), and never counts more than 2048 prompt tokens."""
    import dsvl2
    from dsvl2.api import first_request_bytes
    from dsvl2.config import load_config

    configs = os.path.join(os.path.dirname(dsvl2.__file__), "assets", "configs")
    tiny, base = (load_config(os.path.join(configs, f"{n}.json")) for n in ("tiny", "base"))
    assert 300 << 20 < first_request_bytes(tiny, 4096) < first_request_bytes(base, 4096) < 1 << 30
    assert first_request_bytes(tiny, 4096) == first_request_bytes(tiny, 2048) > first_request_bytes(tiny, 512)


@pytest.mark.skipif(not heap.available(), reason="not glibc: keep_freed_memory() changes nothing there")
def test_reserved_pages_serve_the_next_allocations():
    """After ``reserve(n)`` (and the settings), a block of n / 2 faults almost none of its
    pages: they were faulted in by the reserve and kept in the heap."""
    script = r"""
import json, resource, torch
from dsvl2.engine import heap
assert heap.keep_freed_memory()
heap.reserve(64 << 20)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
b = torch.empty(32 << 20, dtype=torch.uint8); b.fill_(1)
print(json.dumps({"faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before,
                  "pages": (32 << 20) // resource.getpagesize()}))
"""
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["faults"] < out["pages"] // 20


def test_touched_kv_blocks_are_committed_and_zero():
    """``KVCache.touch(n)``: blocks 1..n of every pool hold zeros (the null block too), the
    blocks after them are left alone, and writing the touched blocks later faults almost
    none of their pages (``api.load`` touches a first request's blocks this way)."""
    import resource

    import torch

    from dsvl2.config import LanguageConfig
    from dsvl2.model.cache import KVCache

    cfg = LanguageConfig(hidden_size=256, num_attention_heads=4, num_key_value_heads=4, num_hidden_layers=2,
                         intermediate_size=64, vocab_size=32, use_mla=False)
    kv = KVCache(cfg, num_blocks=600, block_size=64)  # 2 layers x (k, v) x 600 x 64 x 4 x 64 float32: 38 MiB each
    assert kv.touch(400) == 400 and kv.touch(10_000) == 599
    fresh = KVCache(cfg, num_blocks=600, block_size=64)
    fresh.touch(400)
    k, v = fresh.layers[0]
    assert torch.count_nonzero(k[:401]) == 0 and torch.count_nonzero(v[:401]) == 0

    def fault_writes(cache):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for layer in cache.layers:
            for t in layer:
                t[1:401].fill_(1.0)
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

    untouched = KVCache(cfg, num_blocks=600, block_size=64)
    pages = 4 * 400 * 64 * 4 * 64 * 4 // resource.getpagesize()
    assert fault_writes(untouched) > pages // 2  # the pool is committed only when written
    assert fault_writes(fresh) < pages // 20


ARENA_SCRIPT = r"""
import json, threading
import torch
import dsvl2
from dsvl2.engine import heap

torch.ones(512, 512) @ torch.ones(512, 512)  # torch's OpenMP threads start and allocate
seen = []
t = threading.Thread(target=lambda: seen.append(heap.in_main_arena()))
t.start(); t.join()
print(json.dumps({"arenas": heap.arenas(), "thread": seen[0], "main": heap.in_main_arena()}))
"""


@pytest.mark.skipif(not heap.available(), reason="not glibc: no arenas to share")
def test_threads_started_after_import_share_the_main_arena():
    """``import dsvl2`` sets glibc's arena limit, so threads started after it (torch's OpenMP
    workers, a thread like the engine's driver) allocate from the main arena, whose freed
    pages the steps reuse; with ``DSVL2_MALLOC=system`` the same threads get arenas of their
    own (what made a benchmark's requests fault their memory anew, engine/heap.py)."""
    def run_script(system: bool) -> dict:
        env = {k: v for k, v in os.environ.items() if k != "DSVL2_MALLOC"}
        if system:
            env["DSVL2_MALLOC"] = "system"
        r = subprocess.run([sys.executable, "-c", ARENA_SCRIPT], capture_output=True, text=True, timeout=120, env=env)
        assert r.returncode == 0, r.stderr[-2000:]
        return json.loads(r.stdout.strip().splitlines()[-1])

    shared = run_script(False)
    assert shared == {"arenas": 1, "thread": True, "main": True}
    own = run_script(True)
    assert own["arenas"] >= 2 and own["thread"] is False and own["main"] is True


WARN_SCRIPT = r"""
import json, logging, threading
started, go, done = threading.Event(), threading.Event(), threading.Event()
out = {}

def early():
    buf = bytearray(1 << 16)  # this thread's first allocations: before the limit, an arena of its own
    started.set(); go.wait()
    from dsvl2.engine import driver, heap
    out["in_main"] = heap.in_main_arena()
    driver._check_arena(); driver._check_arena()  # the second call says nothing more
    done.set()

records = []
handler = logging.Handler(); handler.emit = records.append
logging.getLogger("dsvl2.driver").addHandler(handler)
t = threading.Thread(target=early); t.start(); started.wait()
import dsvl2  # the limit, after that thread's arena exists
from dsvl2.engine import driver
driver._check_arena()  # the main thread: the main arena, no warning
go.set(); done.wait(); t.join()
out["warnings"] = [r.getMessage() for r in records if r.levelno == logging.WARNING]
print(json.dumps(out))
"""


@pytest.mark.skipif(not heap.available(), reason="not glibc: no arenas to share")
def test_a_driver_thread_on_another_arena_is_told_once():
    r = subprocess.run([sys.executable, "-c", WARN_SCRIPT], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["in_main"] is False
    (warning,) = out["warnings"]
    assert "arena other than glibc's main one" in warning and "import dsvl2 before" in warning
