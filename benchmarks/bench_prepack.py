"""The vision tower's bf16 products with plain and with oneDNN-reordered weights
(dsvl2/model/prepack.py), on the real tower's shapes (SigLIP so400m: width 1152, MLP 4304,
729 patches a tile). Prints ONE JSON object; never asserted by a test.

    python benchmarks/bench_prepack.py --tiles 7

Per product: GFLOP/s of ``F.linear`` on the plain weight, of the reordered product, and for
fc1 of the plain product + torch's tanh GELU against the reordered product + the native
GELU by table (what ``Linear.narrow`` runs; ``native/gelu.c``); the bits of the plain and the
reordered products compared; the machine's bf16 matmul peak (``policy.matmul_gflops``)
measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
import torch.nn.functional as F

from dsvl2.model import native, prepack
from dsvl2.model.native import policy

SHAPES = {"qkv": (1152, 3456), "proj": (1152, 1152), "fc1": (1152, 4304), "fc2": (4304, 1152)}  # (K, N)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiles", type=int, default=7, help="tiles in one vision call (rows = 729 x tiles)")
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    if not prepack.usable():
        print(json.dumps({"usable": False, "reason": "no oneDNN bf16 products on this CPU / torch"}))
        sys.exit(0)
    m = 729 * args.tiles
    g = torch.Generator().manual_seed(0)
    report = {"usable": True, "rows": m, "threads": torch.get_num_threads(),
              "bf16_matmul_peak_gflops": round(policy.matmul_gflops(torch.bfloat16), 1), "products": {}}
    for name, (k, n) in SHAPES.items():
        x = torch.randn(m, k, generator=g).to(torch.bfloat16)
        w = (torch.randn(n, k, generator=g) * k ** -0.5).to(torch.bfloat16)
        b = torch.randn(n, generator=g).to(torch.bfloat16)
        packed = prepack.pack(w, 729)
        flop = 2 * m * k * n
        best = policy.best_seconds
        row = {"plain_gflops": round(flop / best(lambda: F.linear(x, w, b), args.reps) / 1e9, 1),
               "reordered_gflops": round(flop / best(lambda: prepack.product(x, packed, b), args.reps) / 1e9, 1),
               "same_bits": torch.equal(prepack.product(x, packed, b), F.linear(x, w, b))}
        if name == "fc1":
            row["plain_then_gelu_gflops"] = round(flop / best(
                lambda: F.gelu(F.linear(x, w, b), approximate="tanh"), args.reps) / 1e9, 1)
            row["reordered_then_table_gelu_gflops"] = round(flop / best(
                lambda: native.gelu_tanh_bf16_(prepack.product(x, packed, b)), args.reps) / 1e9, 1)
        report["products"][name] = row
        print(name, row, file=sys.stderr, flush=True)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
