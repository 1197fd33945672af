"""Decode-step time of one real-size MLA attention layer: the torch path against the native
block (``dsvl2/model/native/mla.c``), as one JSON object.

    python benchmarks/bench_mla_decode.py                          # small and base, B = 1 and 4, bf16
    python benchmarks/bench_mla_decode.py --presets small --weights bf16,int8 --batch 1

Per preset x weight format x batch: the best and the median ms of one layer's call
(``MLA.forward`` in ``ops.decoding()``, ``allow_native`` False / True), the bytes one call
reads (the layer's weights as held, plus each row's cached [latent | k_pe] rows:
``--cached`` tokens, 1431 = the prompt of golden case c01, float32), and those bytes over
the best time (GB/s) next to the streaming read bandwidth measured in the same run (a
float32 sum of 512 MiB, best of 5, before and after); also the median CPU time of a call,
all threads together (on a machine shared with other work the wall time includes waits
for a core). The layer's weights are random (seeded) in the preset's real shapes; calls
cycle through ``--copies`` copies of the layer so each call reads its weights from
memory, as the layers of a decode step do, not from the last-level cache.

Absorbed MLA attention costs 2 x H x (2 r + dr) FLOPs per cached token and row (~50
MFLOP per row and layer at 1431 tokens for the small size, twice that for the base):
past a few hundred cached tokens it is compute-bound on an AVX2 core, not read-bound.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from dsvl2.checkpoint.random_checkpoint import preset_config
from dsvl2.config import ModelConfig
from dsvl2.model import native, ops, quant
from dsvl2.model.attention import MLA
from dsvl2.model.cache import KVCache, StepContext, row_tables
from dsvl2.model.rope import RotaryEmbedding

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_engine import read_gbps  # noqa: E402  (the read bandwidth every benchmark reports)

BS = 16


def _nbytes(w) -> int:
    return w.nbytes if isinstance(w, quant.QuantWeight) else w.numel() * w.element_size()


def layer(cfg, weights: str, seed: int) -> MLA:
    m = MLA(cfg, 0)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "layernorm" in name:
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * p.shape[-1] ** -0.5)
    m = m.to(torch.bfloat16)
    if weights == "int8":  # what a quantised checkpoint holds: the projections in int8, kv_b_proj bf16
        for proj in ("q_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "o_proj"):
            mod = getattr(m, proj, None)
            if mod is not None:
                quant.hold(mod, "weight", quant.QuantWeight.quantize(mod.weight.detach(), 8))
    return m


def measure(cfg, weights: str, batches: list[int], cached: int, copies: int, reps: int) -> list[dict]:
    layers = [layer(cfg, weights, seed) for seed in range(copies)]
    wbytes = sum(_nbytes(p) for p in (layers[0].kv_b_proj.weight, layers[0].o_proj.weight,
                                      layers[0].kv_a_proj_with_mqa.weight,
                                      *([layers[0].q_proj.weight] if hasattr(layers[0], "q_proj")
                                        else [layers[0].q_a_proj.weight, layers[0].q_b_proj.weight])))
    lk = cfg.kv_lora_rank + cfg.qk_rope_head_dim
    rotary = RotaryEmbedding(cfg)
    rows = []
    for b in batches:
        cap = cached + 1
        cache = KVCache(cfg, 1 + b * -(-cap // BS), BS)  # every layer's pool: address space until written
        (pool,) = cache.layers[0]
        pool.copy_(torch.randn(pool.shape, generator=torch.Generator().manual_seed(9)))
        tables = row_tables(b, cap, BS, order=torch.randperm(b * -(-cap // BS), generator=torch.Generator()
                                                            .manual_seed(7)))
        start = torch.full((b,), cached)
        cos, sin = rotary(start[:, None])
        ctx = StepContext(cos, sin, torch.zeros(b, 1, 1, cap), cache=cache, table=tables, write_pos=start[:, None],
                          kv_len=cap, valid=start + 1)
        x = torch.randn(b, 1, cfg.hidden_size, generator=torch.Generator().manual_seed(3))
        read = wbytes + b * cap * lk * 4
        row = {"batch": b, "bytes_read_mb": round(read / 1e6, 2)}
        for name, on in (("torch", False), ("native", True)):
            times, cpu = [], []
            with torch.no_grad(), ops.decoding():
                for i in range(reps * copies + copies):
                    m = layers[i % copies]
                    m.allow_native = on
                    t, c = time.perf_counter(), time.process_time()
                    m(x, ctx)
                    if i >= copies:  # the first round warms up
                        times.append(time.perf_counter() - t)
                        cpu.append(time.process_time() - c)
            with ops.decoding():
                assert layers[0].native_decode(x, ctx) == on
            ms = min(times) * 1e3
            row[f"{name}_ms"] = round(ms, 3)
            row[f"{name}_median_ms"] = round(statistics.median(times) * 1e3, 3)
            row[f"{name}_gbps"] = round(read / ms / 1e6, 1)
            row[f"{name}_cpu_ms"] = round(statistics.median(cpu) * 1e3, 3)  # all threads' CPU time
        row["speedup"] = round(row["torch_ms"] / row["native_ms"], 2)
        rows.append(row)
        print(f"{weights} B={b}: {row}", file=sys.stderr)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--presets", default="small,base")
    ap.add_argument("--weights", default="bf16", help="comma-separated: bf16, int8")
    ap.add_argument("--batch", default="1,4")
    ap.add_argument("--cached", type=int, default=1431)
    ap.add_argument("--copies", type=int, default=3)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--threads", type=int, default=None, help="torch / OpenMP threads (default: torch's choice)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if not native.available():
        print(f"native kernels unavailable: {native.status()['reason']}", file=sys.stderr)
        return 1
    report = {"threads": torch.get_num_threads(), "read_gbps_before": round(read_gbps(), 1), "presets": {}}
    for name in args.presets.split(","):
        cfg = ModelConfig.from_hf(preset_config(name)).language
        shape = {"hidden": cfg.hidden_size, "heads": cfg.num_attention_heads, "kv_lora_rank": cfg.kv_lora_rank,
                 "q_lora_rank": cfg.q_lora_rank, "cached_tokens": args.cached}
        report["presets"][name] = {"shape": shape, "runs": {
            w: measure(cfg, w, [int(b) for b in args.batch.split(",")], args.cached, args.copies, args.reps)
            for w in args.weights.split(",")}}
    report["read_gbps_after"] = round(read_gbps(), 1)
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
