"""How the KV block size changes the native decode attention (JSON report).

    python benchmarks/bench_kv_blocks.py                  # real tiny attention sizes
    python benchmarks/bench_kv_blocks.py --context 4096 --rows 4

The native MHA decode block (``native.mha_decode``: q / k / v, RoPE, cache write,
attention, o_proj) of the real tiny model's sizes (10 heads of 128, width 1280, bf16
weights) over ``--context`` cached positions per row, with the rows' blocks scattered
over the pool in a random order (what a busy pool looks like) and, for comparison, laid
end to end (one row = one contiguous stretch, the old rectangle's layout). Reported per
block size: milliseconds for ``--layers`` layers' blocks (median of ``--repeats``), the
effective read rate ((keys + values + weights) read / time), and the machine's read bandwidth measured in the same run
(float32 sum of 512 MiB, best of 5).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from dsvl2.model import native
from dsvl2.model.cache import row_tables

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_engine import cpu_name, read_gbps  # noqa: E402


def time_attention(block: int, context: int, rows: int, heads: int, hd: int, layers: int, scattered: bool,
                   repeats: int) -> float:
    """Seconds for the attention blocks of ``layers`` layers (each its own pools and
    weights, so nothing stays in the caches from one layer to the next)."""
    d = heads * hd
    w = -(-(context + 1) // block)
    order = torch.randperm(rows * w, generator=torch.Generator().manual_seed(0)) if scattered else None
    table = row_tables(rows, w * block, block, order=order)
    nb = 1 + rows * w
    g = torch.Generator().manual_seed(1)
    kv = [(torch.randn(nb, block, heads, hd, generator=g), torch.randn(nb, block, heads, hd, generator=g))
          for _ in range(layers)]
    ws = [[(torch.randn(d, d, generator=g) * 0.02).to(torch.bfloat16) for _ in range(4)] for _ in range(layers)]
    x = torch.randn(rows, d)
    cos, sin = torch.ones(rows, hd), torch.zeros(rows, hd)
    pos = torch.full((rows,), context, dtype=torch.int64)
    times = []
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        for (k, v), wl in zip(kv, ws):
            native.mha_decode(x, *wl, (None,) * 4, heads, heads, cos, sin, k, v, table, pos, hd ** -0.5)
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--context", type=int, default=1431, help="cached positions per row (c01's prompt)")
    ap.add_argument("--rows", type=int, default=1)
    ap.add_argument("--blocks", default="8,16,32,64,128")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--layers", type=int, default=12, help="layers timed together (the real tiny has 12)")
    ap.add_argument("--threads", type=int, default=None,
                    help="threads (default: torch's); 1 is steadier on a machine shared with other jobs, where "
                         "the kernels' barriers wait for a core")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if not native.available():
        sys.exit(f"native kernels unavailable: {native.status()['reason']}")
    heads, hd = 10, 128
    kv_bytes = args.layers * args.rows * (args.context + 1) * heads * hd * 4 * 2
    weight_bytes = args.layers * 4 * (heads * hd) ** 2 * 2
    report = {"cpu": cpu_name(), "threads": torch.get_num_threads(), "load_average": os.getloadavg(),
              "context": args.context, "rows": args.rows, "layers": args.layers,
              "kv_bytes": kv_bytes, "weight_bytes": weight_bytes,
              "read_sum_gbps_before": round(read_gbps(), 1), "blocks": {}}
    for bs in map(int, args.blocks.split(",")):
        entry = {}
        for layout in ("scattered", "end_to_end"):
            t = time_attention(bs, args.context, args.rows, heads, hd, args.layers, layout == "scattered",
                               args.repeats)
            entry[layout] = {"ms": round(t * 1e3, 3), "gbps": round((kv_bytes + weight_bytes) / t / 1e9, 1)}
        report["blocks"][bs] = entry
    report["read_sum_gbps_after"] = round(read_gbps(), 1)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
