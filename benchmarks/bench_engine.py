"""Engine benchmark on a random checkpoint: load, vision, prefill, decode, KV cache, memory,
and decode against the memory-bandwidth roofline. Prints ONE JSON object on stdout
(progress goes to stderr). Never asserted by a test: timings depend on the machine.

    python benchmarks/bench_engine.py --mid
    python benchmarks/bench_engine.py --preset golden-small
    python benchmarks/bench_engine.py --preset tiny --keep /tmp/dsvl2-tiny \\
        --tiles 1 --prompt-tokens 64 --new-tokens 8 --batch 1,4

What is measured (see benchmarks/README.md for how to read it):
* ``load_s``: ``dsvl2.checkpoint.load.load_model`` of the written checkpoint (the real loader).
* ``vision``: tower + projector on ``--tiles`` random 384 px tiles, in batches of 16 as
  ``DeepseekVL2.encode_images`` does; seconds per tile and achieved GFLOP/s.
* ``prefill``: one text prompt of ``--prompt-tokens`` tokens through ``Engine``, whole and
  in chunks of ``--chunk``; the engine's prefill stage is timed (its step observer's
  ``StepReport.timings``, summed over the forwards of one prompt).
* ``decode``: for each ``--batch`` size, that many prompts generated together for
  ``--new-tokens`` greedy tokens. The decode stage of each step (one batched forward and
  the blocks for its tokens) is timed by the step observer; ``step_ms`` is the whole step
  (sampling and detokenising too) of the steps that only decode. Medians, so that a stray
  process on a shared machine moves them less. Engines run without prefix caching, so
  that a repeated prompt is computed again.
* ``roofline``: weight bytes a decode step must read (attention + dense MLPs + router +
  shared experts + the routed experts actually chosen, counted per step from the router's
  output: K per layer at batch 1, the union over the rows beyond + one embedding row per
  row + final norm + lm_head), divided by the measured forward time, against the memory
  bandwidth measured here (a large float32 sum) and a fixed 25 GB/s (``DESIGN_BANDWIDTH_GBPS``: the
  bandwidth the project's speed targets assume; not measured). KV-cache
  bytes read are reported beside it.
* ``kv_cache``: from the engine's cache tensors after a run (not from the config).
* ``profile_decode_step``: one engine step in which every row decodes (batch 1 and the
  largest batch: sampling and the decode forward) under ``torch.profiler``: self time of
  matrix products vs other ops, and Python time (the profiled wall time minus the time
  inside top-level torch ops).

Everything is read through the engine's public seams (``Engine.add_step_observer``,
``LanguageModel.routing_observers``); nothing of the engine is replaced.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import multiprocessing
import os
import platform
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from dsvl2.checkpoint.random_checkpoint import preset_config, write_random_checkpoint
from dsvl2.engine.engine import Engine, StepReport
from dsvl2.model.cache import KVCache
from dsvl2.engine.sampling import SamplingParams
from dsvl2.model import ops, pages
from dsvl2.processing import Processor
from dsvl2.checkpoint.load import load_model

DESIGN_BANDWIDTH_GBPS = 25.0
MARKER = "bench_config.json"  # the config a kept checkpoint folder was written from
WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "the", "lazy", "dog", "while", "a", "small", "cat",
         "watches", "from", "the", "old", "red", "barn", "and", "counts", "the", "clouds", "that", "drift",
         "across", "a", "pale", "blue", "sky"]
MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::matmul", "aten::linear",
              "aten::_scaled_dot_product_flash_attention_for_cpu", "aten::scaled_dot_product_attention",
              "aten::einsum", "aten::_weight_int8pack_mm")


def log(*a) -> None:
    print(*a, file=sys.stderr, flush=True)


# ---- configs and checkpoints --------------------------------------------------------------


def mid_config() -> dict:
    """A mid-size model (~1 B parameters, 2 GB in bf16) with the real small's structure:
    MLA, 64 routed experts top-6 + 2 shared, a dense first layer, the real vocabulary."""
    cfg = preset_config("small")
    cfg["language_config"].update(
        hidden_size=1024, num_hidden_layers=8, num_attention_heads=16, num_key_value_heads=16,
        intermediate_size=4096, moe_intermediate_size=512, n_routed_experts=64, num_experts_per_tok=6,
        n_shared_experts=2, first_k_dense_replace=1, kv_lora_rank=256, q_lora_rank=None,
        qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64)
    cfg["vision_config"].update(width=384, heads=6, layers=6)
    cfg.setdefault("projector_config", {}).update(input_dim=384, n_embed=1024)
    return cfg


def checkpoint(cfg: dict, keep: str | None) -> tuple[Path, dict, Path | None]:
    """Write ``cfg`` as a random bf16 checkpoint (or reuse ``keep`` if it holds that config)."""
    if keep:
        folder = Path(keep)
        marker = folder / MARKER
        if marker.is_file() and json.loads(marker.read_text()) == cfg and (folder / "config.json").is_file():
            return folder, {"folder": str(folder), "reused": True, "write_s": None}, None
        temp = None
    else:
        folder = Path(tempfile.mkdtemp(prefix="dsvl2-bench-"))
        temp = folder
    log(f"writing a random checkpoint to {folder} ...")
    last = [0.0]

    def progress(done: int, total: int) -> None:
        if time.perf_counter() - last[0] > 10 or done == total:
            last[0] = time.perf_counter()
            log(f"  {done / 1e9:.2f} / {total / 1e9:.2f} GB")

    t = time.perf_counter()
    write_random_checkpoint(folder, cfg, seed=0, dtype=torch.bfloat16, progress=progress, overwrite=True)
    write_s = time.perf_counter() - t
    if keep:
        (folder / MARKER).write_text(json.dumps(cfg))
    return folder, {"folder": str(folder), "reused": False, "write_s": round(write_s, 2)}, temp


# ---- machine ------------------------------------------------------------------------------


def best_time(fn, repeat: int = 5) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def read_parts(nbytes: int = 512 << 20) -> dict:
    """Read bandwidth (GB/s): a float32 sum of ``nbytes`` (best of 5), from a buffer of
    malloc's pages (``malloc``) and from one in 2 MiB pages (``huge_pages``, where the
    system gives them: dsvl2/model/pages.py, as the loader places the weights; None
    elsewhere). On the Intel Xeon VM of the development notes the first read 20.7-22.4 GB/s
    where the second read 29.1-29.4, and the first swung between 22 and 32 from minute to
    minute."""
    out = {}
    src = torch.ones(nbytes // 4)
    out["malloc"] = round(nbytes / best_time(src.sum) / 1e9, 1)
    del src
    out["huge_pages"] = None
    if pages.usable():
        src = pages.empty((nbytes // 4,), torch.float32).fill_(1.0)
        out["huge_pages"] = round(nbytes / best_time(src.sum) / 1e9, 1)
    return out


def best_read(parts: dict) -> float:
    """The machine's read bandwidth as the rooflines use it: the higher of ``read_parts``'s."""
    return max(v for v in parts.values() if v is not None)


def read_gbps(nbytes: int = 512 << 20) -> float:
    return best_read(read_parts(nbytes))


def _copy_gbps(nbytes: int) -> float:
    src = torch.ones(nbytes // 4)
    dst = torch.empty_like(src)
    return 2 * nbytes / best_time(lambda: dst.copy_(src)) / 1e9


def _gemv_gbps(nbytes: int) -> float:
    weight = torch.ones(nbytes // 2 // 8192, 8192, dtype=torch.bfloat16)
    x = torch.ones(1, 8192, dtype=torch.bfloat16)
    return nbytes / best_time(lambda: torch.nn.functional.linear(x, weight)) / 1e9


def bandwidth(nbytes: int = 1 << 30, threads: int | None = None) -> dict:
    """Memory bandwidth as this torch sees it: a float32 sum (read), a copy (read + write)
    and a bf16 matrix-vector product (what a decode step does)."""
    if threads:
        torch.set_num_threads(threads)
    parts, copy = read_parts(nbytes), _copy_gbps(nbytes)
    gemv = _gemv_gbps(nbytes)
    return {"read_sum_gbps": best_read(parts), "read_sum_gbps_by_pages": parts,
            "copy_gbps": round(copy, 1), "bf16_gemv_gbps": round(gemv, 1), "design_gbps": DESIGN_BANDWIDTH_GBPS}


def cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor()


def rss_parts() -> dict:
    """Resident memory now, split into anonymous (the process's own) and file-backed
    (mapped checkpoint pages: reclaimable, but counted in RSS), in GiB."""
    out = {}
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("RssAnon", "RssFile"):
                out[key.lower() + "_gib"] = round(int(value.split()[0]) / 2 ** 20, 2)
    return out


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


# ---- model bookkeeping --------------------------------------------------------------------


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def weight_bytes(model) -> dict:
    """Bytes of the language model's weights by what a decode step does with them."""
    lm = model.language
    static = 0
    expert_bytes = {}  # MoE layer index -> bytes of ONE routed expert
    experts_total = 0
    for name, p in lm.named_parameters():
        if name == "model.embed_tokens.weight":
            continue
        if ".mlp.experts." in name:
            layer = int(name.split(".")[2])
            expert_bytes[layer] = expert_bytes.get(layer, 0) + nbytes(p) // p.shape[0]
            experts_total += nbytes(p)
            continue
        static += nbytes(p)
    emb = lm.model.embed_tokens.weight
    return {"static": static, "expert": expert_bytes, "experts_total": experts_total,
            "embedding_row": nbytes(emb) // emb.shape[0], "embedding_table": nbytes(emb),
            "vision": sum(nbytes(p) for p in model.vision.parameters()) + sum(
                nbytes(p) for p in model.projector.parameters())}


class ExpertCounter:
    """Counts the distinct routed experts each MoE layer uses while ``on`` (and, with
    ``decode_only``, only inside an engine decode step): per layer call as (rows,
    distinct experts) in ``calls``, and per step ({layer: distinct experts}) in ``steps``,
    one entry per ``end_step(keep=True)``."""

    def __init__(self, model, decode_only: bool = False):
        self.on = False
        self.decode_only = decode_only
        self.steps: list[dict[int, int]] = []
        self.calls: list[tuple[int, int]] = []
        self.current: dict[int, int] = {}
        self.observers = model.language.routing_observers
        self.observers.append(self._observe)

    def _observe(self, i: int, routing) -> None:
        if self.on and (not self.decode_only or ops.decoding_active()):
            n = int(routing.idx.unique().numel())
            self.calls.append((routing.idx[..., 0].numel(), n))
            self.current[i] = n

    def end_step(self, keep: bool = True) -> None:
        """A step is over: what it counted goes to ``steps`` (``keep``) or is dropped."""
        if keep:
            self.steps.append(self.current)
        self.current = {}

    def close(self) -> None:
        if self._observe in self.observers:
            self.observers.remove(self._observe)


def prompt_conversation(tok, n_tokens: int, row: int) -> list[dict]:
    """A text-only conversation whose user text is about ``n_tokens`` tokens (distinct per row)."""
    k = row % len(WORDS)
    words = WORDS[k:] + WORDS[:k]
    text = " ".join(itertools.islice(itertools.cycle(words), 2 * n_tokens + 8))
    ids = tok.encode(text)[: max(1, n_tokens - 8)]  # the chat template adds ~8 tokens
    return [{"role": "<|User|>", "content": tok.decode(ids)}, {"role": "<|Assistant|>", "content": ""}]


def observed(eng: Engine) -> list[StepReport]:
    """The engine's step reports from now on, in a list."""
    reports: list[StepReport] = []
    eng.add_step_observer(reports.append)
    return reports


# ---- measurements -------------------------------------------------------------------------


def bench_vision(model, tiles: int, repeat: int) -> dict:
    vcfg = model.cfg.vision
    dtype = model.compute_dtype
    x = torch.rand(tiles, 3, vcfg.image_size, vcfg.image_size, generator=torch.Generator().manual_seed(0))
    x = (x * 2 - 1).to(dtype)

    def run():
        with torch.no_grad():
            for i in range(0, tiles, 16):
                model.projector(model.vision(x[i:i + 16]))

    s = best_time(run, repeat)
    n_patch = (vcfg.image_size // vcfg.patch_size) ** 2
    vparams = sum(p.numel() for n, p in model.vision.named_parameters() if not n.startswith("attn_pool"))
    flops = tiles * (2 * vparams * n_patch + 4 * vcfg.layers * n_patch ** 2 * vcfg.width)
    return {"tiles": tiles, "s": round(s, 3), "s_per_tile": round(s / tiles, 3),
            "gflops_per_s": round(flops / s / 1e9, 1)}


def bench_prefill(model, proc, n_tokens: int, chunk: int, repeat: int) -> dict:
    b = proc([prompt_conversation(proc.tokenizer, n_tokens, 0)])
    tokens = b.seq_lens[0]
    out = {"tokens": tokens}
    for label, cs in (("whole", None), ("chunked", chunk)):
        eng = Engine(model, proc.tokenizer, max_batch_size=1, prefix_caching=False)
        reports = observed(eng)
        times: list[float] = []  # seconds of the prompt's prefill forwards, per run
        for _ in range(repeat):
            reports.clear()
            eng.generate(b, SamplingParams(max_new_tokens=1), chunk_size=cs)
            times.append(sum(rep.timings["prefill"] for rep in reports))
        forwards = sum(len(rep.prefill) for rep in reports)
        best = min(times)
        out[label] = {"chunk_size": cs, "forwards": forwards, "s": round(best, 3),
                      "tok_per_s": round(tokens / best, 1)}
    return out


def bench_decode(model, proc, batch: int, prompt_tokens: int, new_tokens: int, wb: dict, bw_gbps: float,
                 gemv_gbps: float, cache_dtype) -> dict:
    eng = Engine(model, proc.tokenizer, max_batch_size=batch, cache_dtype=cache_dtype, prefix_caching=False)
    b = proc([prompt_conversation(proc.tokenizer, prompt_tokens, r) for r in range(batch)])
    counter = ExpertCounter(model, decode_only=True)  # the experts of the decode forwards only
    counter.on = True
    reports: list[StepReport] = []

    def observe(rep: StepReport) -> None:
        counter.end_step(keep=bool(rep.decode))
        reports.append(rep)

    eng.add_step_observer(observe)
    reqs = eng.submit(b, SamplingParams(max_new_tokens=new_tokens))
    try:
        while not all(r.finished for r in reqs):
            eng.step()
    finally:
        counter.close()
    decodes = [rep for rep in reports if rep.decode]
    if not decodes:
        return {"batch": batch, "error": "no decode step ran (new_tokens must be >= 2)"}
    fwd = [rep.timings["decode"] for rep in decodes]
    rows = [len(rep.decode) for rep in decodes]
    per_token = KVCache.bytes_per_token(eng.cfg, eng.cache.dtype)
    # each row reads its cache up to the position it writes; the padded batch reads the longest
    kv_read = [len(rep.decode) * (max(pos for _, pos in rep.decode) + 1) * per_token for rep in decodes]
    only_decode = [rep for rep in decodes if not (rep.prefill or rep.vision)]  # the first step also prefilled
    later = [rep.timings["total"] for rep in only_decode]
    med = statistics.median(fwd)
    mean_rows = sum(rows) / len(rows)
    # weights read per step: everything but the routed experts and the embedding table,
    # + the experts this step's router chose (union over the rows), + one embedding row per row
    per_step = [wb["static"] + sum(wb["expert"][i] * n for i, n in used.items()) + r * wb["embedding_row"]
                for used, r in zip(counter.steps, rows)]
    step_bytes = statistics.median(per_step)
    experts_per_layer = statistics.mean(statistics.mean(u.values()) for u in counter.steps if u) if wb["expert"] else 0
    prefill_s = sum(rep.timings["prefill"] for rep in reports)
    return {
        "batch": batch,
        "prompt_tokens_min_max": [min(b.seq_lens), max(b.seq_lens)],
        "decode_steps": len(fwd),
        "mean_rows_per_step": round(mean_rows, 2),
        "forward_ms_median": round(med * 1e3, 2),
        "forward_ms_min": round(min(fwd) * 1e3, 2),
        "step_ms_median": round(statistics.median(later) * 1e3, 2) if later else None,
        "per_row_tok_per_s": round(1 / med, 2),
        "aggregate_tok_per_s": round(mean_rows / med, 2),
        "aggregate_tok_per_s_end_to_end": round(sum(len(rep.decode) for rep in only_decode) / sum(later), 2)
        if later else None,
        "prefill_s": round(prefill_s, 3),
        "routed_experts_per_moe_layer": round(experts_per_layer, 2),
        "weight_bytes_per_step": int(step_bytes),
        "kv_bytes_read_per_step": int(statistics.median(kv_read)),
        "weight_gbps": round(step_bytes / med / 1e9, 3),
        "roofline_fraction_measured_bw": round(step_bytes / med / 1e9 / bw_gbps, 3),
        "roofline_fraction_design_bw": round(step_bytes / med / 1e9 / DESIGN_BANDWIDTH_GBPS, 3),
        "roofline_fraction_measured_bw_best_step": round(step_bytes / min(fwd) / 1e9 / bw_gbps, 3),
        "roofline_fraction_gemv_bw": round(step_bytes / med / 1e9 / gemv_gbps, 3),
        "kv_cache": {"dtype": str(eng.cache.dtype).replace("torch.", ""), "block_size": eng.cache.block_size,
                     "blocks": eng.cache.num_blocks, "pool_bytes": eng.cache.nbytes(),
                     "peak_bytes_used": eng.kv_stats()["kv_cache_bytes_peak"],
                     "values_per_token_per_layer": eng.cache.values_per_token_per_layer,
                     "bytes_per_token": KVCache.bytes_per_token(eng.cfg, eng.cache.dtype)},
    }


def profile_decode(model, proc, prompt_tokens: int, batch: int) -> dict:
    """One engine step in which every row decodes (sampling and the decode forward): where
    its wall time goes.

    ``python_ms`` is the profiled wall time minus the time inside top-level torch ops (what
    the Python code of the engine and the modules costs between ops); ``matmul_ms`` /
    ``other_ops_ms`` split the ops' self time. The profiler adds a little to every op, so
    the parts add up to somewhat more than the unprofiled ``step_wall_ms`` (of which
    ``decode_forward_ms`` is the decode stage, from the step observer)."""
    from torch.profiler import ProfilerActivity, profile

    eng = Engine(model, proc.tokenizer, max_batch_size=batch, prefix_caching=False)
    b = proc([prompt_conversation(proc.tokenizer, prompt_tokens, r) for r in range(batch)])
    reports = observed(eng)
    reqs = eng.submit(b, SamplingParams(max_new_tokens=10_000))
    for _ in range(4):  # prefill, then warm decode steps
        eng.step()
    for _ in range(5):
        eng.step()
    walls = [rep.timings["total"] for rep in reports[-5:]]
    forwards = [rep.timings["decode"] for rep in reports[-5:]]
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t = time.perf_counter()
        eng.step()
        profiled = time.perf_counter() - t
    rows = len(reports[-1].decode)  # a random model may end a row with eos: say how many ran
    eng.cancel(reqs)
    events = [e for e in prof.events() if e.name.startswith("aten::")]
    top_level = sum(e.cpu_time_total for e in events if e.cpu_parent is None) / 1e3  # ms
    self_ms: dict[str, list] = {}
    for e in events:
        entry = self_ms.setdefault(e.name, [0, 0.0])
        entry[0] += 1
        entry[1] += e.self_cpu_time_total / 1e3

    def is_matmul(name: str) -> bool:
        return name in MATMUL_OPS or "mm" in name.split("::")[1] or "scaled_dot" in name

    mm = sum(v[1] for k, v in self_ms.items() if is_matmul(k))
    ops = sum(v[1] for v in self_ms.values())
    top = sorted(self_ms.items(), key=lambda kv: kv[1][1], reverse=True)[:10]
    return {
        "batch": batch,
        "rows_profiled": rows,
        "step_wall_ms": round(statistics.median(walls) * 1e3, 2),
        "decode_forward_ms": round(statistics.median(forwards) * 1e3, 2),
        "profiled_wall_ms": round(profiled * 1e3, 2),
        "matmul_ms": round(mm, 2),
        "other_ops_ms": round(ops - mm, 2),
        "python_ms": round(max(profiled * 1e3 - top_level, 0.0), 2),
        "top_level_op_calls": sum(1 for e in events if e.cpu_parent is None),
        "top_ops_self_ms": {k: [v[0], round(v[1], 2)] for k, v in top},
    }


# ---- main ---------------------------------------------------------------------------------


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    which = ap.add_mutually_exclusive_group()
    which.add_argument("--preset", help="tiny, small, base, golden-tiny, golden-small, golden-base, golden-dsv2x")
    which.add_argument("--mid", action="store_true", help="a ~1B-parameter MLA/MoE model (hidden 1024, 8 layers)")
    ap.add_argument("--scale", type=float, default=1.0, help="shrink the preset's widths and depths (0, 1]")
    ap.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16", help="dtype the weights are loaded in")
    ap.add_argument("--cache-dtype", choices=("auto", "bf16", "fp32"), default="auto",
                    help="KV-cache dtype (auto: the engine's default, the compute dtype)")
    ap.add_argument("--tiles", type=int, default=2, help="384 px tiles through the vision tower (0: skip)")
    ap.add_argument("--prompt-tokens", type=int, default=256)
    ap.add_argument("--chunk", type=int, default=128, help="chunk size of the chunked prefill")
    ap.add_argument("--batch", default="1,4,16", help="decode batch sizes, comma-separated")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--keep", metavar="DIR", help="write the checkpoint here once and reuse it on later runs")
    ap.add_argument("--repeat", type=int, default=2, help="runs of the vision and prefill timings (best kept)")
    ap.add_argument("--no-profile", action="store_true", help="skip the profiled decode steps")
    ap.add_argument("--bandwidth-mib", type=int, default=1024, help="buffer size of the bandwidth test")
    args = ap.parse_args(argv)
    if not args.mid and not args.preset:
        ap.error("choose --preset NAME or --mid")
    if args.new_tokens < 2:
        ap.error("--new-tokens must be >= 2 (one prefill token + decode steps)")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = mid_config() if args.mid else preset_config(args.preset, args.scale)
    report: dict = {"benchmark": "engine", "model": {"preset": "mid" if args.mid else args.preset,
                                                       "scale": None if args.mid else args.scale,
                                                       "dtype": args.dtype}}
    report["machine"] = {"cpu": cpu_name(), "threads": torch.get_num_threads(), "torch": torch.__version__,
                         "load_avg_1min_start": round(os.getloadavg()[0], 2)}
    log("measuring memory bandwidth ...")
    # In a child process, so that its buffers do not count in this process's peak RSS.
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        bw = pool.apply(bandwidth, (args.bandwidth_mib << 20, torch.get_num_threads()))
    report["machine"]["bandwidth"] = bw

    folder, ck, temp = checkpoint(cfg, args.keep)
    report["checkpoint"] = ck
    try:
        dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
        log("loading ...")
        t = time.perf_counter()
        model = load_model(folder, dtype)
        report["load_s"] = round(time.perf_counter() - t, 2)
        report["memory_after_load"] = {**rss_parts(), "peak_rss_gib": round(peak_rss() / 2 ** 30, 2)}
        proc = Processor.from_pretrained(folder)
        lang = model.cfg.language
        wb = weight_bytes(model)
        k = lang.num_experts_per_tok or 0
        b1_bytes = wb["static"] + k * sum(wb["expert"].values()) + wb["embedding_row"]
        report["model"].update({
            "attention": "MLA" if lang.use_mla else "MHA", "hidden": lang.hidden_size,
            "layers": lang.num_hidden_layers, "routed_experts": lang.n_routed_experts, "top_k": k,
            "vocab": lang.vocab_size,
            "params": sum(p.numel() for p in model.parameters()),
            "weight_bytes_loaded": sum(nbytes(p) for p in model.parameters()),
            "language_static_bytes": wb["static"], "routed_expert_bytes": wb["experts_total"],
            "embedding_bytes": wb["embedding_table"], "vision_projector_bytes": wb["vision"],
        })
        cache_dtype = {"auto": None, "bf16": torch.bfloat16, "fp32": torch.float32}[args.cache_dtype]

        log("warming up ...")
        warm = Engine(model, proc.tokenizer, max_batch_size=1, prefix_caching=False)
        warm.generate(proc([prompt_conversation(proc.tokenizer, 16, 0)]), SamplingParams(max_new_tokens=3))
        if args.tiles:
            log(f"vision: {args.tiles} tile(s) ...")
            report["vision"] = bench_vision(model, args.tiles, args.repeat)
        log(f"prefill: {args.prompt_tokens} tokens ...")
        report["prefill"] = bench_prefill(model, proc, args.prompt_tokens, args.chunk, args.repeat)
        report["decode"] = {}
        for batch in (int(x) for x in args.batch.split(",")):
            log(f"decode: batch {batch} ...")
            report["decode"][str(batch)] = bench_decode(model, proc, batch, args.prompt_tokens, args.new_tokens,
                                                        wb, bw["read_sum_gbps"], bw["bf16_gemv_gbps"],
                                                        cache_dtype)
        first = next(iter(report["decode"].values()))
        report["kv_cache"] = first["kv_cache"]
        report["roofline"] = {
            "weight_bytes_per_token_batch1": b1_bytes,
            "bandwidth_gbps_measured": bw["read_sum_gbps"],
            "bandwidth_gbps_bf16_gemv": bw["bf16_gemv_gbps"],
            "bandwidth_gbps_design": DESIGN_BANDWIDTH_GBPS,
            "max_tok_per_s_batch1_measured_bw": round(bw["read_sum_gbps"] * 1e9 / b1_bytes, 1),
            "max_tok_per_s_batch1_design_bw": round(DESIGN_BANDWIDTH_GBPS * 1e9 / b1_bytes, 1),
            "fraction_batch1_measured_bw": report["decode"].get("1", {}).get("roofline_fraction_measured_bw"),
            "fraction_batch1_gemv_bw": report["decode"].get("1", {}).get("roofline_fraction_gemv_bw"),
        }
        if not args.no_profile:
            report["profile_decode_step"] = {}
            for batch in sorted({1, max(int(x) for x in args.batch.split(","))}):
                log(f"profiling one decode step, batch {batch} ...")
                report["profile_decode_step"][str(batch)] = profile_decode(model, proc, args.prompt_tokens, batch)
        report["peak_rss_bytes"] = peak_rss()
        report["peak_rss_gib"] = round(peak_rss() / 2 ** 30, 2)
        report["machine"]["load_avg_1min_end"] = round(os.getloadavg()[0], 2)
    finally:
        if temp is not None:
            shutil.rmtree(temp, ignore_errors=True)
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
