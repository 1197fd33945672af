"""What a user waits for, on any checkpoint, next to the machine's limits (JSON report).

    python benchmarks/bench_chat.py -m /tmp/dsvl2-tiny      # dsvl2 init-random --preset tiny
    python benchmarks/bench_chat.py -m demo --case c03_three_images

Runs a golden case's conversation (images + text; default c01_single_image: one photo,
7 tiles, 1431 prompt tokens) through the public API and reports: load, image processing,
vision, prefill, time to first token, decode tokens/s at batch 1, 4 and 16, and the
time to first token of a follow-up question in the same chat (prefix cache), plus peak
RSS. Every engine figure comes from the per-request timings the engine records
(``Answer.timings``, the ones the server's metrics use); nothing in the engine
is patched. Beside them, measured in the same run: memory read bandwidth, fp32 and bf16
matrix-product peaks, and the kernel choice for this machine (``model/kernels.py``).

Rooflines: vision / prefill FLOPs (2 x parameters x tokens + attention) over the best
matmul peak; decode: the weights a step reads (batch 1: the active parameters without
the embedding table, at the weights' bytes per parameter; more rows: the union of the
experts they chose, seen through ``LanguageModel.routing_observers``) over the read
bandwidth measured right before and right after that decode in a helper process (the
higher of the two). Each batch size runs ``--repeats`` times, each repeat against its own
bandwidth: the report shows the repeat with the median fraction and every repeat's
fraction (this shared machine's bandwidth moves by tens of percent within a minute).
Beside it, the compute floor of the step (every row's 2 x active parameters FLOPs at the
best matmul peak) and the roofline with both ceilings. Also: batch-1 decode after the
case's whole prompt, against weights + the KV cache it reads.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import time
from pathlib import Path

import torch

import dsvl2
from dsvl2.commands.info import describe
from dsvl2.model import native
from dsvl2.model.native.policy import _gflops

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_engine import ExpertCounter, bandwidth, cpu_name, peak_rss, read_gbps  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CASES = ROOT / "tests" / "data" / "golden" / "processor" / "official"
IMAGES = ROOT / "tests" / "data" / "images"


def conversation(case: str) -> list[dict]:
    spec = json.loads((CASES / case / "case.json").read_text())
    conv = spec["conversations"][0]
    for m in conv:
        if m.get("images"):
            m["images"] = [str(IMAGES / name) for name in m["images"]]
    return conv


class Bandwidth:
    """Read bandwidth measured in a helper process, on demand, right next to a measurement
    (the read bandwidth of this shared machine moves by tens of percent within minutes;
    the buffer does not count in this process's peak RSS)."""

    def __init__(self):
        self.pool = multiprocessing.get_context("spawn").Pool(1, initializer=torch.set_num_threads,
                                                              initargs=(torch.get_num_threads(),))

    def __call__(self) -> float:
        return round(self.pool.apply(read_gbps), 1)

    def close(self) -> None:
        self.pool.terminate()


def decode_rate(m, n_rows: int, tokens: int, bytes_per_step, bw: Bandwidth, flops_per_row: float,
                peak_flops: float) -> dict:
    """n_rows text conversations at once; tokens/s per row and in aggregate (while all rows
    decode), from the engine's timings; the weights a step reads (the union of the experts
    its rows chose) and its roofline. Beside it, the compute floor of the same step (every
    row's products at the best matmul peak) and the roofline with both ceilings (the
    lower of the two rates): at many rows on a CPU the FLOPs, not the bytes, can bind."""
    gbps_before = bw()
    use = ExpertCounter(m.model, decode_only=True)
    use.on = True
    try:
        handles = [h for i in range(n_rows)
                   for h in m.submit(f"Tell me story number {i} about a lighthouse.", max_new_tokens=tokens)]
        outs = [h.result() for h in handles]
    finally:
        use.close()
    gbps_after = bw()
    # the roofline takes the higher of the two measurements around this decode (the
    # conservative choice: the machine showed it could read that fast)
    bandwidth_bps = max(gbps_before, gbps_after) * 1e9
    starts = [h.req.timings.first_token for h in handles]
    ends = [h.req.timings.finished for h in handles]
    # steady state: from the moment every row has its first token (the last prefill is
    # done) to the first row's end, the tokens every row got in that window
    t_a, t_b = max(starts), min(ends)
    gen = sum(1 for h in handles for t in h.req.timings.token_times if t_a < t <= t_b)
    span = t_b - t_a
    per_row = [(o.completion_tokens - 1) / (e - s) for o, s, e in zip(outs, starts, ends) if e > s]
    full = [d for r, d in use.calls if r == n_rows]  # steps where every row was decoding
    distinct = sum(full) / len(full) if full else None
    out = {"rows": n_rows, "tokens_per_row": [o.completion_tokens for o in outs],
           "aggregate_tok_per_s": round(gen / span, 2) if span > 0 else None,
           "per_row_tok_per_s_median": round(sorted(per_row)[len(per_row) // 2], 2) if per_row else None,
           "routed_experts_per_moe_layer": round(distinct, 2) if distinct is not None else None,
           "read_gbps_before_after": [gbps_before, gbps_after]}
    if distinct is not None:
        step_bytes = bytes_per_step(distinct)
        out["weight_bytes_per_step"] = int(step_bytes)
        out["roofline_tok_per_s"] = round(n_rows / (step_bytes / bandwidth_bps), 2)
        compute = peak_flops / flops_per_row  # rows x tokens/s, each row costing flops_per_row a token
        out["compute_floor_tok_per_s"] = round(compute, 2)
        out["roofline_both_ceilings_tok_per_s"] = round(min(compute, out["roofline_tok_per_s"]), 2)
        if out["aggregate_tok_per_s"]:
            out["fraction_of_roofline"] = round(out["aggregate_tok_per_s"] / out["roofline_tok_per_s"], 3)
            out["fraction_of_roofline_both_ceilings"] = round(
                out["aggregate_tok_per_s"] / out["roofline_both_ceilings_tok_per_s"], 3)
    return out


def median_run(runs: list[dict]) -> dict:
    """The run with the median fraction of its roofline, with every run's fraction beside it."""
    key = [r.get("fraction_of_roofline") or 0.0 for r in runs]
    order = sorted(range(len(runs)), key=lambda i: key[i])
    out = dict(runs[order[len(runs) // 2]])
    out["fraction_of_roofline_repeats"] = [r.get("fraction_of_roofline") for r in runs]
    out["aggregate_tok_per_s_repeats"] = [r.get("aggregate_tok_per_s") for r in runs]
    return out


def decode_after_prompt(handle) -> float | None:
    """Tokens/s of one request's decode after its first token (its own token stamps)."""
    times = handle.req.timings.token_times
    return round((len(times) - 1) / (times[-1] - times[0]), 2) if len(times) > 1 else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("-m", "--model", default="demo")
    ap.add_argument("--case", default="c01_single_image")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("--batches", default="1,4,16")
    ap.add_argument("--repeats", type=int, default=3, help="decode runs per batch size (median reported)")
    args = ap.parse_args()

    limits = {"cpu": cpu_name(), "threads": torch.get_num_threads(), "load_average": os.getloadavg()}
    limits.update(bandwidth(512 << 20))
    limits["fp32_matmul_gflops"] = round(_gflops(torch.float32, 512, 2048, 2048, reps=10), 1)
    limits["bf16_matmul_gflops"] = round(_gflops(torch.bfloat16, 512, 2048, 2048), 1)

    t = time.perf_counter()
    m = dsvl2.load(args.model, dtype=args.dtype)
    load_s = time.perf_counter() - t
    info = describe(m.config)
    conv = conversation(args.case)

    t = time.perf_counter()
    batch, _ = m.process(conv)
    processing_s = time.perf_counter() - t
    m.chat("Hi.", max_new_tokens=2)  # one-time costs (thread pools, buffers) out of the way

    (h,) = m.submit(conv, max_new_tokens=args.decode_tokens)
    first = h.result()
    tm = first.timings
    vc = m.config.vision
    n_patch = (vc.image_size // vc.patch_size) ** 2
    tiles = h.req.tiles_done
    vparams = info["params_active_vision"]
    vision_flops = tiles * (2 * vparams * n_patch + 4 * vc.layers * n_patch ** 2 * vc.width)
    lc = m.config.language
    t_tok = first.prompt_tokens
    attn_dim = lc.num_attention_heads * (lc.qk_nope_head_dim + lc.qk_rope_head_dim if lc.use_mla else lc.head_dim)
    prefill_flops = 2 * info["params_active_no_embedding"] * t_tok + 2 * lc.num_hidden_layers * t_tok ** 2 * attn_dim
    compute_s = tm["vision_s"] + tm["prefill_s"]
    # the fp32 peak again right after vision + prefill (it moves on a shared machine, as
    # the bandwidth does): the fractions use the higher of the two (the conservative choice)
    limits["fp32_matmul_gflops_after_prefill"] = round(_gflops(torch.float32, 512, 2048, 2048, reps=10), 1)
    best_peak = max(limits["fp32_matmul_gflops"], limits["fp32_matmul_gflops_after_prefill"],
                    limits["bf16_matmul_gflops"])

    follow = conv[:-1] + [{"role": "<|Assistant|>", "content": first.text},
                          {"role": "<|User|>", "content": "Tell me more about it."},
                          {"role": "<|Assistant|>", "content": ""}]
    (fh,) = m.submit(follow, max_new_tokens=4)
    fo = fh.result()

    wbytes = next(p for p in m.model.language.parameters()).element_size()
    token_bytes = info["params_active_no_embedding"] * wbytes
    moe_layers = sum(1 for i in range(lc.num_hidden_layers) if lc.is_moe_layer(i))
    expert_bytes = 3 * lc.hidden_size * lc.moe_intermediate_size * wbytes
    routed_b1 = moe_layers * lc.num_experts_per_tok * expert_bytes if moe_layers else 0

    def bytes_per_step(distinct: float) -> float:  # batch 1: distinct = experts per token
        return token_bytes - routed_b1 + moe_layers * distinct * expert_bytes

    bw = Bandwidth()
    # one row's decode FLOPs per token: 2 x its active parameters (lm_head included)
    row_flops = 2 * info["params_active_no_embedding"]
    try:
        decode = {}
        for b in map(int, args.batches.split(",")):
            runs = [decode_rate(m, b, args.decode_tokens, bytes_per_step, bw, row_flops, best_peak * 1e9)
                    for _ in range(max(1, args.repeats))]
            decode[str(b)] = median_run(runs)
    finally:
        bw.close()
    after = bandwidth(512 << 20)  # the same measurement after the run: how much it moved
    limits["read_sum_gbps_after"] = after["read_sum_gbps"]
    b1 = decode.get("1", {}).get("per_row_tok_per_s_median")
    # batch-1 rooflines from the bandwidth decode_rate used around the batch-1 decode (the
    # higher of its two measurements), or the one at the start without a batch-1 decode
    b1_bps = (max(decode["1"]["read_gbps_before_after"]) if "1" in decode else limits["read_sum_gbps"]) * 1e9
    roof = decode["1"]["roofline_tok_per_s"] if "1" in decode else b1_bps / token_bytes
    after_prompt = decode_after_prompt(h)
    # after the case's prompt a step also reads the row's KV cache: at the decode's mean
    # context length, in the engine's cache dtype
    kv_token = info["kv_cache_bytes_per_token"]["fp32" if m.engine.cache_dtype == torch.float32 else "bf16"]
    kv_step = kv_token * (first.prompt_tokens + first.completion_tokens / 2)
    roof_after = b1_bps / (bytes_per_step(lc.num_experts_per_tok) + kv_step)
    report = {
        "model": args.model, "case": args.case, "dtype": args.dtype, "machine": limits,
        "kernels": getattr(m, "kernels", None) and m.kernels.to_dict(),
        "native_decode": native.status(),
        "load_s": round(load_s, 2),
        "image_processing_s": round(processing_s, 3),
        "prompt_tokens": first.prompt_tokens, "tiles": tiles,
        "queue_s": tm["queue_s"], "vision_s": round(tm["vision_s"], 3), "prefill_s": round(tm["prefill_s"], 3),
        "time_to_first_token_s": round(tm["first_token_s"], 3),
        "vision_gflop": round(vision_flops / 1e9, 1), "prefill_gflop": round(prefill_flops / 1e9, 1),
        "vision_prefill_gflops_per_s": round((vision_flops + prefill_flops) / compute_s / 1e9, 1) if compute_s else None,
        "best_matmul_peak_gflops": best_peak,
        "vision_prefill_fraction_of_best_peak": round((vision_flops + prefill_flops) / compute_s / 1e9 / best_peak, 3)
        if compute_s else None,
        "decode": decode,
        "decode_b1_roofline_tok_per_s": round(roof, 2),
        "decode_b1_fraction_of_roofline": round(b1 / roof, 3) if b1 else None,
        # batch 1 after the case's whole prompt: weights + its KV cache per step
        "decode_b1_after_prompt_tok_per_s": after_prompt,
        "decode_b1_after_prompt_kv_bytes_per_step": int(kv_step),
        "decode_b1_after_prompt_roofline_tok_per_s": round(roof_after, 2),
        "decode_b1_after_prompt_fraction_of_roofline": round(after_prompt / roof_after, 3) if after_prompt else None,
        "follow_up": {"prompt_tokens": fo.prompt_tokens, "cached_tokens": fo.cached_tokens,
                      "time_to_first_token_s": round(fo.timings["first_token_s"], 3),
                      "vision_s": fo.timings["vision_s"], "prefill_s": round(fo.timings["prefill_s"], 3)},
        "peak_rss_gib": round(peak_rss() / 2 ** 30, 2),
    }
    print(json.dumps(report, indent=2, default=str))


if __name__ == "__main__":
    main()
