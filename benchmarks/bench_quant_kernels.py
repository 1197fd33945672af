"""Micro-benchmark of the candidate kernels for quantised weights on this CPU (prints JSON).

Shapes are those of the real tiny model: a routed expert's gate/up ([896, 1280]) and down
([1280, 896]) projections, an attention projection ([1280, 1280]) and the lm_head
([129280, 1280]). For each: decode (M = 1, 4 and 16 rows) and prefill (M = 512 rows).

Candidates:
* ``bf16``: the bf16 weight, torch's decode path (bf16 GEMV, ``F.linear``);
* ``native_bf16`` / ``native_int8``: dsvl2's native decode kernels (``dsvl2/model/native``),
  float32 activations, where they are built;
* ``int8pack``: ``torch._weight_int8pack_mm`` (int8 weight, per-row scale), bf16 and fp32 activations;
* ``int8_deq_bf16``: dequantise the int8 weight to bf16, then the bf16 GEMV;
* ``int4pack_gG``: ``torch._weight_int4pack_mm_for_cpu`` with group size G;
* prefill: ``fp32_upcast`` (bf16 -> fp32 then fp32 GEMM, today's prefill), ``int8_deq_fp32``
  (int8 * scale -> fp32 then fp32 GEMM), ``int8pack`` and ``int4pack`` directly.

Usage: ``python benchmarks/bench_quant_kernels.py [--quick]``. Reports the median time per
call (ms), effective weight GB/s and GFLOP/s, plus lscpu's SIMD flags.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import time

import torch
import torch.nn.functional as F

from dsvl2.model import native


def cpu_flags() -> list[str]:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    flags = next((l.split(":", 1)[1].split() for l in out.splitlines() if l.startswith("Flags")), [])
    return sorted(f for f in flags if f.startswith(("avx", "amx", "fma", "f16c")))


def timeit(fn, reps: int) -> float:
    fn()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def int4_pack(n: int, k: int, group: int):
    q = torch.randint(0, 16, (n, k), dtype=torch.int32)
    packed = torch._convert_weight_to_int4pack_for_cpu(q, 2)
    sz = torch.zeros(k // group, n, 2, dtype=torch.bfloat16)
    sz[..., 0] = 0.01
    return packed, sz


def bench_shape(name: str, n: int, k: int, reps: int, prefill_m: int) -> dict:
    wb = (torch.randn(n, k) * k ** -0.5).to(torch.bfloat16)
    w8 = torch.randint(-127, 128, (n, k), dtype=torch.int8)
    s8 = torch.rand(n, dtype=torch.bfloat16) * 0.01
    s8f = s8.float()
    res: dict = {"shape": [n, k]}
    buf32 = torch.empty(n, k)
    for m in (1, 4, 16):
        xb = torch.randn(m, k, dtype=torch.bfloat16)
        xf = xb.float()
        cands = {
            "bf16": (lambda: F.linear(xb, wb), 2),
            "int8pack_bf16x": (lambda: torch._weight_int8pack_mm(xb, w8, s8), 1),
            "int8pack_fp32x": (lambda: torch._weight_int8pack_mm(xf, w8, s8f), 1),
            "int8_deq_bf16": (lambda: F.linear(xb, w8.to(torch.bfloat16) * s8[:, None]), 1),
        }
        if native.available():  # dsvl2/model/native: float32 activations, weights read once for all rows
            cands["native_bf16"] = (lambda: native.linear(xf, wb), 2)
            cands["native_int8"] = (lambda: native.linear_int8(xf, w8, s8), 1)
        for g in (32, 64, 128, 256):
            if k % g == 0:
                p, sz = int4_pack(n, k, g)
                cands[f"int4pack_g{g}"] = ((lambda p=p, sz=sz, g=g: torch._weight_int4pack_mm_for_cpu(xb, p, g, sz)), 0.5)
        row = {}
        for c, (fn, bpe) in cands.items():
            t = timeit(fn, reps)
            row[c] = {"ms": round(t * 1e3, 4), "weight_GB_s": round(n * k * bpe / t / 1e9, 2),
                      "GFLOP_s": round(2 * m * n * k / t / 1e9, 2)}
        res[f"decode_m{m}"] = row
    xb = torch.randn(prefill_m, k, dtype=torch.bfloat16)
    xf = xb.float()
    p, sz = int4_pack(n, k, 64)
    cands = {
        "fp32_upcast": lambda: F.linear(xf, buf32.copy_(wb)),
        "int8_deq_fp32": lambda: F.linear(xf, torch.mul(w8, s8f[:, None], out=buf32)),
        "int8pack_bf16x": lambda: torch._weight_int8pack_mm(xb, w8, s8),
        "int8pack_fp32x": lambda: torch._weight_int8pack_mm(xf, w8, s8f),
        "int4pack_g64": lambda: torch._weight_int4pack_mm_for_cpu(xb, p, 64, sz),
    }
    row = {}
    for c, fn in cands.items():
        t = timeit(fn, max(3, reps // 10))
        row[c] = {"ms": round(t * 1e3, 3), "GFLOP_s": round(2 * prefill_m * n * k / t / 1e9, 2)}
    res[f"prefill_m{prefill_m}"] = row
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="fewer repetitions, no lm_head")
    args = ap.parse_args()
    reps = 20 if args.quick else 60
    shapes = {"expert_gate_up": (896, 1280), "expert_down": (1280, 896), "attn_proj": (1280, 1280)}
    if not args.quick:
        shapes["lm_head"] = (129280, 1280)
    out = {"torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.machine(),
           "cpu_flags": cpu_flags(), "results": {}}
    for name, (n, k) in shapes.items():
        out["results"][name] = bench_shape(name, n, k, reps if name != "lm_head" else 5, 512 if name != "lm_head" else 64)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
