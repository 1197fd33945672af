"""Speed and memory of one checkpoint in one weight format, against its memory roofline (prints JSON).

    python benchmarks/bench_quant.py MODEL [--quantize int8|int4] [--new 16] [--prompt 256] [--tiles 2]

One run, one format, in one process (peak RSS is this process's, load included), in order:
* ``bandwidth_gb_s``: this machine's read bandwidth now, measured first (best of 5 sums of
  a 512 MiB float32 tensor, far beyond the caches); every roofline below uses it. The
  machine may be shared: ``loadavg_start`` / ``loadavg_end`` are the 1-minute load averages.
* ``load_s``; ``weight_gb``: bytes of the checkpoint's safetensors; ``peak_rss_gb`` and
  ``peak_rss_over_weights``: getrusage's peak (the whole run) over those bytes.
* ``vision_s_per_tile``: tower + projector on ``--tiles`` tiles at once (best of 2);
  vision stays bf16 in every format. Its roofline reads the vision weights once per call.
* ``prefill_tok_s``: prompt tokens over the time to the first token (batch 1); its
  roofline reads every language-model weight once (prefill is compute bound: a ceiling,
  not a target).
* ``decode_tok_s_bN``: tokens generated in the engine steps in which every row already had
  its first token, over those steps' time (one generation per batch size); the
  roofline reads, per step, the non-expert LM weights (embedding table excluded: a lookup)
  plus the routed experts the step touches: top-k per row, for N rows the expected number
  of distinct experts under uniform routing, E * (1 - (1 - k/E)^N).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time
from pathlib import Path

import torch

from dsvl2.engine.engine import Engine
from dsvl2.engine.sampling import SamplingParams
from dsvl2.model.quant import QuantWeight
from dsvl2.processing import Processor
from dsvl2.checkpoint.load import load_model


def read_bandwidth(mib: int = 512, reps: int = 5) -> float:
    """Bytes/s of a streaming read (float32 sum), the best of ``reps``."""
    a = torch.ones(mib * 2 ** 20 // 4)
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        a.sum()
        best = min(best, time.perf_counter() - t)
    return a.numel() * 4 / best


def _nbytes(w) -> int:
    return w.nbytes if isinstance(w, QuantWeight) else w.numel() * w.element_size()


def weight_bytes(model) -> dict:
    """Language-model bytes: non-expert (no embedding table), routed experts; vision + projector."""
    dense = expert = 0
    for mod in model.language.modules():
        ws = [(n, w) for n, w in mod._parameters.items() if w is not None]
        ws += [(n, v) for n, v in vars(mod).items() if isinstance(v, QuantWeight)]
        for name, w in ws:
            if type(mod).__name__ == "Experts":
                expert += _nbytes(w)
            elif not (type(mod).__name__ == "Embedding" or "embed" in name):
                dense += _nbytes(w)
    vision = sum(_nbytes(p) for p in model.vision.parameters()) + sum(_nbytes(p) for p in model.projector.parameters())
    return {"dense": dense, "expert": expert, "vision": vision}


def step_bytes(wb: dict, cfg, rows: int) -> float:
    e, k = cfg.n_routed_experts or 0, cfg.num_experts_per_tok or 0
    if not e:
        return wb["dense"] + wb["expert"]
    return wb["dense"] + wb["expert"] * (1 - (1 - k / e) ** rows)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model", type=Path)
    ap.add_argument("--quantize", default=None, choices=["int8", "int4"])
    ap.add_argument("--new", type=int, default=16, help="tokens generated in the decode runs")
    ap.add_argument("--prompt", type=int, default=256, help="about this many prompt tokens")
    ap.add_argument("--tiles", type=int, default=2, help="tiles in the vision timing (0 = skip)")
    ap.add_argument("--batches", default="1,4", help="decode batch sizes")
    args = ap.parse_args()
    res = {"model": str(args.model), "loadavg_start": round(os.getloadavg()[0], 2),
           "threads": torch.get_num_threads()}
    bw = read_bandwidth()
    res["bandwidth_gb_s"] = round(bw / 1e9, 2)
    t = time.perf_counter()
    model = load_model(args.model, torch.bfloat16, quantize=args.quantize)
    res["load_s"] = round(time.perf_counter() - t, 1)
    res["quantize"] = getattr(model, "quantization", None)
    weights = sum(f.stat().st_size for f in args.model.glob("*.safetensors"))
    res["weight_gb"] = round(weights / 1e9, 3)
    proc = Processor.from_pretrained(args.model)
    wb = weight_bytes(model)
    lcfg = model.cfg.language
    res["lm_dense_gb"], res["lm_expert_gb"], res["vision_gb"] = (round(wb[k] / 1e9, 3) for k in ("dense", "expert", "vision"))

    if args.tiles:
        s = model.cfg.vision.image_size
        tiles = torch.randn(args.tiles, 3, s, s)
        best = float("inf")
        with torch.no_grad():
            for _ in range(2):
                t = time.perf_counter()
                model.tile_features(tiles)
                best = min(best, time.perf_counter() - t)
        res["vision_s_per_tile"] = round(best / args.tiles, 3)
        res["vision_roofline_s_per_tile"] = round(wb["vision"] / bw / args.tiles, 4)

    text = " ".join(["the quick brown fox"] * (args.prompt // 4))
    for b in (int(x) for x in args.batches.split(",")):
        batch = proc([[{"role": "<|User|>", "content": text}, {"role": "<|Assistant|>", "content": ""}]] * b)
        eng = Engine(model, proc.tokenizer, max_batch_size=b)
        t0 = time.perf_counter()
        reqs = eng.submit(batch, SamplingParams(max_new_tokens=args.new))
        first = None  # time of the first token (batch 1: end of prefill)
        dec_s, dec_tokens = 0.0, 0  # engine steps in which every row was already decoding
        while not all(r.finished for r in reqs):
            before = [len(r.output_ids) for r in reqs]
            t = time.perf_counter()
            eng.step()
            dt = time.perf_counter() - t
            grown = sum(len(r.output_ids) - n for r, n in zip(reqs, before))
            if first is None and grown:
                first = time.perf_counter()
            if all(before) and grown:
                dec_s += dt
                dec_tokens += grown
        if b == 1:
            n_prompt = int(batch.attention_mask.sum())
            res["prompt_tokens"] = n_prompt
            res["prefill_tok_s"] = round(n_prompt / (first - t0), 1) if first else None
            res["prefill_roofline_tok_s"] = round(n_prompt * bw / (wb["dense"] + wb["expert"]), 1)
        res[f"decode_tok_s_b{b}"] = round(dec_tokens / dec_s, 3) if dec_s > 0 else None
        if res[f"decode_tok_s_b{b}"] is None:
            continue
        res[f"decode_bytes_per_step_gb_b{b}"] = round(step_bytes(wb, lcfg, b) / 1e9, 3)
        res[f"decode_roofline_tok_s_b{b}"] = round(b * bw / step_bytes(wb, lcfg, b), 3)
        res[f"decode_share_of_roofline_b{b}"] = round(res[f"decode_tok_s_b{b}"] / res[f"decode_roofline_tok_s_b{b}"], 3)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    res["peak_rss_gb"] = round(peak / 1e9, 3)
    res["peak_rss_over_weights"] = round(peak / weights, 3)
    res["loadavg_end"] = round(os.getloadavg()[0], 2)
    print(json.dumps(res))


if __name__ == "__main__":
    main()
