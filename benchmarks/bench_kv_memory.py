"""KV-cache memory under many long conversations at once (JSON report).

    python benchmarks/bench_kv_memory.py -m /tmp/dsvl2-tiny --kv-cache-bytes 2GiB
    python benchmarks/bench_kv_memory.py -m demo --conversations 16 --prompt-tokens 1500

``--conversations`` distinct text conversations of about ``--prompt-tokens`` tokens each
are submitted at once through the public API (``model.submit``) and each generates
``--new-tokens`` tokens. Sampled every 50 ms in a thread while they run: the process's
resident memory (VmRSS) and the KV cache's bytes (the pool's blocks in use:
``engine.kv_stats()``; with an engine from before the block pool, the cache tensors'
size, which it grew and copied as rows arrived). Reported: peak KV bytes, RSS after
loading, peak RSS (VmHWM), RSS at the end, the pool's preemptions, wall time. Works with
either engine, so the same command measures before and after a change
(``PYTHONPATH=<old checkout> python benchmarks/bench_kv_memory.py ...``).
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import sys
import threading
import time
from pathlib import Path

import torch

import dsvl2

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_engine import cpu_name, prompt_conversation  # noqa: E402


def status_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def kv_bytes(engine) -> int:
    if hasattr(engine, "kv_stats"):
        return engine.kv_stats()["kv_cache_bytes_used"]
    cache = engine.cache  # the former rectangle [rows, capacity, ...] per layer
    return 0 if cache is None else cache.nbytes()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-m", "--model", default="demo")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--conversations", type=int, default=16)
    ap.add_argument("--prompt-tokens", type=int, default=1000)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--kv-cache-bytes", default=None, help="the KV budget (an engine with a block pool only)")
    args = ap.parse_args()

    kw = {"max_batch_size": args.conversations}
    from dsvl2 import api

    if "kv_cache_bytes" in inspect.signature(api.load).parameters:
        kw["kv_cache_bytes"] = args.kv_cache_bytes
    else:
        kw["prefix_cache_bytes"] = 0
    t0 = time.perf_counter()
    model = dsvl2.load(args.model, dtype=args.dtype, **kw)
    load_s = time.perf_counter() - t0
    tok = model.processor.tokenizer
    convs = [prompt_conversation(tok, args.prompt_tokens, r) for r in range(args.conversations)]
    rss_loaded = status_kib("VmRSS")

    samples: list[tuple[float, int, int]] = []
    done = threading.Event()

    def watch():
        start = time.perf_counter()
        while not done.is_set():
            samples.append((time.perf_counter() - start, status_kib("VmRSS"), kv_bytes(model.engine)))
            time.sleep(0.05)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    t0 = time.perf_counter()
    handles = [h for c in convs for h in model.submit(c, max_new_tokens=args.new_tokens)]
    outs = [h.result() for h in handles]
    run_s = time.perf_counter() - t0
    done.set()
    watcher.join()
    eng = model.engine
    report = {
        "model": args.model, "dtype": args.dtype, "cpu": cpu_name(), "threads": torch.get_num_threads(),
        "load_average": os.getloadavg(), "engine": "blocks" if hasattr(eng, "kv_stats") else "rectangle",
        "conversations": args.conversations, "prompt_tokens": [o.prompt_tokens for o in outs][:3] + ["..."],
        "new_tokens": args.new_tokens, "load_s": round(load_s, 1), "run_s": round(run_s, 1),
        "kv_cache_bytes_peak": max(s[2] for s in samples),
        "rss_after_load_mib": rss_loaded // 1024, "rss_peak_mib": status_kib("VmHWM") // 1024,
        "rss_peak_during_run_mib": max(s[1] for s in samples) // 1024, "rss_end_mib": status_kib("VmRSS") // 1024,
        "tokens_held_at_peak_estimate": None,
    }
    if hasattr(eng, "kv_stats"):
        st = eng.kv_stats()
        report.update(kv_cache_bytes_capacity=st["kv_cache_bytes_capacity"], preemptions=st["preemptions"],
                      kv_cache_bytes_peak=st["kv_cache_bytes_peak"])
        report["tokens_held_at_peak_estimate"] = st["kv_cache_bytes_peak"] // (eng.pool.block_bytes // eng.block_size)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
