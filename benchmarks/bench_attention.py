"""Prefill and vision attention: the native bf16 kernel (``native.attention_bf16``,
``dsvl2/model/native/attention.c``) against torch's fused float32 attention, as one JSON
object.

    python benchmarks/bench_attention.py                       # the four shapes, best of 3
    python benchmarks/bench_attention.py --repeats 5 --threads 2 --shapes vision,mla_chunk

Shapes (the real models' attention calls):

* ``vision``: the SigLIP tower on a 7-tile image: B = 7 tiles, H = 16, T = S = 729
  patches, dk = dv = 72, no mask;
* ``mla_chunk``: an MLA prefill chunk of 512 tokens after 512 cached ones: B = 1, H = 32,
  T = 512, S = 1024, dk = 192 (128 + 64), dv = 128, causal mask at offset 512;
* ``mla_prompt``: a whole 1485-token prompt through MLA (small / base): T = S = 1485, causal;
* ``mha_tiny``: the same prompt through tiny's MHA: H = 10, T = S = 1485, hd = 128, causal.

torch: ``F.scaled_dot_product_attention`` on float32 q, k, v with the model's additive mask
(0 / float32 min), v zero-padded to dk where dv < dk as ``model/attention.py`` does, so
torch takes its fused kernel. Native: the same values as bf16 (what the model hands it), the
same mask, a float32 output. Only the attention call is timed (inputs made beforehand);
each after one warm-up call, the best of ``--repeats``. The native wrapper derives each
query row's last visible key from the mask once per mask object (every layer of a step
shares one), so the repeats time the kernel itself, as the model's later layers do.

FLOPs per call: 2 B H T S (dk + dv), the full product for every shape: NOT discounted for
causal masks (torch's fused kernel with an explicit mask computes every block; the native
kernel skips a row's keys after its last visible one, so about half of a causal prompt's:
``visible_pairs_fraction``), so a causal shape's native rate can pass the GEMM peak.
GFLOP/s = those FLOPs / the best time; ``fraction_of_bf16_peak`` = the native kernel's
GFLOP/s over the bf16 GEMM rate measured in the same run (``policy.matmul_gflops``, a
512 x 2048 x 2048 product as ``bench_chat.py`` measures it, the best of before and after
the shapes: a shared machine's peak moves); the fp32 GEMM rate for torch's beside it.
``max_rel_diff``: max |native - torch| / max |torch|, a check that both computed the same
attention (bf16 level, ~1e-3).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

from dsvl2.model import native
from dsvl2.model.native.cpu import cpu_info
from dsvl2.model.native.policy import matmul_gflops

# name: (B, H, T, S, dk, dv, causal)
SHAPES = {
    "vision": (7, 16, 729, 729, 72, 72, False),
    "mla_chunk": (1, 32, 512, 1024, 192, 128, True),
    "mla_prompt": (1, 32, 1485, 1485, 192, 128, True),
    "mha_tiny": (1, 10, 1485, 1485, 128, 128, True),
}


def log(*a) -> None:
    print(*a, file=sys.stderr, flush=True)


def best_ms(fn, repeats: int) -> float:
    fn()  # warm-up: thread team, scratch buffers, the mask's limits
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best * 1e3


def measure(name: str, repeats: int) -> dict:
    b, h, t, s, dk, dv, causal = SHAPES[name]
    g = torch.Generator().manual_seed(0)
    q = torch.randn(b, h, t, dk, generator=g).to(torch.bfloat16)  # [B, H, T, dk]
    k = torch.randn(b, h, s, dk, generator=g).to(torch.bfloat16)  # [B, H, S, dk]
    v = torch.randn(b, h, s, dv, generator=g).to(torch.bfloat16)  # [B, H, S, dv]
    mask, visible = None, 1.0
    if causal:  # query i sits at position S - T + i
        seen = torch.ones(t, s, dtype=torch.bool).tril(s - t)
        mask = torch.zeros(1, 1, t, s).masked_fill_(~seen, torch.finfo(torch.float32).min)  # [1, 1, T, S]
        visible = seen.float().mean().item()
    scale = dk ** -0.5
    qf, kf = q.float(), k.float()
    vf = F.pad(v.float(), (0, dk - dv)) if dk > dv else v.float()  # as MLA._expanded: torch's fused kernel

    def torch_call():
        return F.scaled_dot_product_attention(qf, kf, vf, attn_mask=mask, scale=scale)[..., :dv]

    def native_call():
        return native.attention_bf16(q, k, v, scale, mask)

    ref, got = torch_call(), native_call()
    diff = ((got - ref).abs().max() / ref.abs().max()).item()
    flops = 2 * b * h * t * s * (dk + dv)
    torch_ms = best_ms(torch_call, repeats)
    native_ms = best_ms(native_call, repeats)
    row = {"B": b, "H": h, "T": t, "S": s, "dk": dk, "dv": dv, "causal_mask": causal,
           "visible_pairs_fraction": round(visible, 3), "gflop_per_call": round(flops / 1e9, 2),
           "torch_fp32_ms": round(torch_ms, 2), "native_bf16_ms": round(native_ms, 2),
           "torch_fp32_gflops": round(flops / torch_ms / 1e6, 1),
           "native_bf16_gflops": round(flops / native_ms / 1e6, 1),
           "speedup": round(torch_ms / native_ms, 2),
           "max_rel_diff": float(f"{diff:.2e}")}
    log(f"{name}: {row}")
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default=",".join(SHAPES), help=f"comma-separated, of {', '.join(SHAPES)}")
    ap.add_argument("--repeats", type=int, default=3, help="timed calls per kernel and shape (best taken)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch / OpenMP threads (the native kernels share torch's team; default: torch's choice)")
    args = ap.parse_args(argv)
    names = args.shapes.split(",")
    unknown = [n for n in names if n not in SHAPES]
    if unknown:
        ap.error(f"unknown shapes {unknown}; known: {', '.join(SHAPES)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    cpu, flags = cpu_info()
    report = {"cpu": cpu, "threads": torch.get_num_threads(), "torch": torch.__version__,
              "attention_usable": native.attention_usable()}
    if not report["attention_usable"]:
        missing = [f for f in native.ATTENTION_FLAGS if f not in flags]
        report["reason"] = (f"native kernels unavailable: {native.status()['reason']}" if not native.available()
                            else f"CPU lacks {missing}" if missing
                            else "the kernels' compiler lacks the AVX-512 BF16 intrinsics")
        print(json.dumps(report, indent=1))
        return 0
    report["load_avg_1min_start"] = round(os.getloadavg()[0], 2)
    peaks = {"bf16": [matmul_gflops(torch.bfloat16, 512, reps=10)], "fp32": [matmul_gflops(torch.float32, 512, reps=10)]}
    rows = {n: measure(n, args.repeats) for n in names}
    peaks["bf16"].append(matmul_gflops(torch.bfloat16, 512, reps=10))
    peaks["fp32"].append(matmul_gflops(torch.float32, 512, reps=10))
    bf16_peak, fp32_peak = max(peaks["bf16"]), max(peaks["fp32"])
    for row in rows.values():
        row["native_fraction_of_bf16_peak"] = round(row["native_bf16_gflops"] / bf16_peak, 3)
        row["torch_fraction_of_fp32_peak"] = round(row["torch_fp32_gflops"] / fp32_peak, 3)
    report.update({
        "bf16_matmul_gflops_before_after": [round(p, 1) for p in peaks["bf16"]],
        "fp32_matmul_gflops_before_after": [round(p, 1) for p in peaks["fp32"]],
        "flops_note": ("2 B H T S (dk + dv) per call, full: not discounted for causal masks (the native kernel "
                       "skips keys after a row's last visible one, about 1 - visible_pairs_fraction of the work, "
                       "so its rate and fraction of the peak can exceed what it computes)"),
        "repeats": args.repeats, "shapes": rows,
        "load_avg_1min_end": round(os.getloadavg()[0], 2)})
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
