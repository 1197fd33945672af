"""Decode / prefill speed and memory of one checkpoint in one weight format (prints JSON).

    python benchmarks/bench_quant.py MODEL [--quantize int8|int4] [--new 24] [--prompt 256]

Text-only prompts (vision stays bf16 in every format). ``prefill_tok_s`` from a
1-token generation; ``decode_tok_s_bN`` = (new - 1) tokens / (time(new) - time(1)) at
batch N; ``peak_rss_gb`` from getrusage (this process, load included); ``weight_gb``:
bytes of the checkpoint's safetensors; ``roofline_decode_tok_s``: 20 GB/s (the measured
effective bandwidth of this machine) over the bytes one token reads (non-expert LM
weights + top-k experts per MoE layer, estimated from the config).
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

import torch

from dsvl2.engine.engine import Engine
from dsvl2.engine.sampling import SamplingParams
from dsvl2.model.quant import QuantWeight
from dsvl2.processing import Processor
from dsvl2.weights import load_model

BANDWIDTH = 20e9


def bytes_per_token(model) -> float:
    cfg = model.cfg.language
    total, expert = 0, 0
    for mod in model.language.modules():
        for name, w in list(mod._parameters.items()) + [(k, v) for k, v in vars(mod).items() if isinstance(v, QuantWeight)]:
            if w is None:
                continue
            nb = w.nbytes if isinstance(w, QuantWeight) else w.numel() * w.element_size()
            if type(mod).__name__ == "Experts":
                expert += nb
            elif "embed" not in name:
                total += nb
    k = cfg.num_experts_per_tok or 0
    return total + (expert * k / cfg.n_routed_experts if cfg.n_routed_experts else 0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model", type=Path)
    ap.add_argument("--quantize", default=None)
    ap.add_argument("--new", type=int, default=24)
    ap.add_argument("--prompt", type=int, default=256)
    args = ap.parse_args()
    t = time.perf_counter()
    model = load_model(args.model, torch.bfloat16, quantize=args.quantize)
    load_s = time.perf_counter() - t
    proc = Processor.from_pretrained(args.model)
    text = " ".join(["the quick brown fox"] * (args.prompt // 4))
    res = {"model": str(args.model), "quantize": args.quantize or getattr(model, "quantization", None),
           "load_s": round(load_s, 1),
           "weight_gb": round(sum(f.stat().st_size for f in args.model.glob("*.safetensors")) / 1e9, 3)}
    bpt = bytes_per_token(model)
    res["bytes_per_token_gb"] = round(bpt / 1e9, 3)
    res["roofline_decode_tok_s"] = round(BANDWIDTH / bpt, 2)
    for b in (1, 4):
        batch = proc([[{"role": "<|User|>", "content": text}, {"role": "<|Assistant|>", "content": ""}]] * b)
        eng = Engine(model, proc.tokenizer, max_batch_size=b)
        times = {}
        for n in (1, args.new):
            t = time.perf_counter()
            eng.generate(batch, SamplingParams(max_new_tokens=n))
            times[n] = time.perf_counter() - t
        if b == 1:
            res["prompt_tokens"] = int(batch.attention_mask.sum())
            res["prefill_tok_s"] = round(res["prompt_tokens"] / times[1], 1)
        res[f"decode_tok_s_b{b}"] = round(b * (args.new - 1) / (times[args.new] - times[1]), 2)
    res["peak_rss_gb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9, 3)
    print(json.dumps(res))


if __name__ == "__main__":
    main()
