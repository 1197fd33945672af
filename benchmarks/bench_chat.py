"""What a user waits for, on any checkpoint and weight format, next to the machine's limits (JSON report).

    python -m dsvl2 init-random --preset tiny /tmp/dsvl2-tiny                    # bf16
    python benchmarks/bench_chat.py -m /tmp/dsvl2-tiny
    python -m dsvl2 init-random --preset small --quantize int8 /tmp/small-int8   # int8 on disk
    python benchmarks/bench_chat.py -m /tmp/small-int8
    python -m dsvl2 init-random --preset base --quantize int4 /tmp/base-int4     # int4 on disk
    python benchmarks/bench_chat.py -m /tmp/base-int4
    python benchmarks/bench_chat.py -m /tmp/dsvl2-tiny --quantize int8          # quantised while loading
    python benchmarks/bench_chat.py -m demo --cases c03_three_images,text --text-tokens 800 \
        --batches 1,4 --repeats 1 --decode-tokens 8                             # a quick look

The one benchmark for every model and weight format. ``--quantize int8|int4`` goes to
``dsvl2.load``; a checkpoint already quantised on disk (config.json ``"quantization"``)
loads in its own scheme (``weight_format`` says which ran: bf16, fp32, int8 or int4).

Cases (``--cases``, default ``c01_single_image,text``): a golden case's conversation
(``tests/data/golden/processor/official/<case>``; c01: one photo, 7 tiles, 1431 prompt
tokens) or ``text``, a text-only prompt of about ``--text-tokens`` tokens (default 400).
Each case, through the public API, reports under ``cases.<name>``: image processing,
vision, prefill, time to first token with its FLOPs and their fraction of the best matmul
peak, batch-1 decode after the case's prompt against its roofline, and the time to first
token of a follow-up question in the same chat (prefix cache). The first case's figures
are also at the top level (``time_to_first_token_s``, ``vision_prefill_fraction_of_best_peak``,
``decode_b1_after_prompt_fraction_of_roofline`` ...). Load time is reported apart
(``load_s``). Every engine figure comes from the per-request timings the engine records
(``Answer.timings``, the ones the server's metrics use); nothing in the engine is patched.

FLOPs of time to first token (from the model's config; multiply-add = 2 FLOPs):
* vision, per tile: 2 x tower parameters x patches + 2 x projector parameters x the
  projector's tokens (the 2x2 downsample: tokens_per_tile_side^2) + attention
  4 x layers x patches^2 x width;
* prefill of T new tokens after T0 cached ones: 2 x (active language parameters without
  the embedding table and lm_head) x T + 2 x lm_head (the logits of the last token only)
  + causal attention 2 x layers x heads x (d_qk + d_v) x (T x T0 + T (T + 1) / 2), with
  d_qk = d_v = head_dim for MHA / GQA and, for MLA, d_qk = qk_nope_head_dim +
  qk_rope_head_dim, d_v = v_head_dim (the expanded path prefill runs; the kv_b_proj
  products are in its parameters).
Their time is the engine's vision + prefill seconds; the peak is the best of fp32 and
bf16 [512, 2048] x [2048, 2048] products measured before the cases and right after them
(a shared machine's peak moves): the conservative choice.

Decode against the read roofline of the bytes a step reads, in the format the weights
are held in (``stored_bytes_per_token``): every language-model tensor counted from the
loaded model itself, ``nn.Parameter`` s at their dtype's bytes and quantised weights
(``dsvl2/model/quant.py`` ``QuantWeight.nbytes``: int8 values + bf16 scales, int4
nibbles + bf16 group scales, as in the file; only where the native kernels are not built
is int4 held in torch's CPU layout, whose scales carry a zero point each, twice the
file's bytes, and that is what its kernel reads).
Per step: the non-expert weights (attention, norms, dense MLPs, router, shared experts,
final norm) + lm_head + one embedding row per row + for each MoE layer the routed experts
the step's rows chose (one expert = the stacked [E, ...] tensors' bytes / E; batch 1: top
k; more rows: the union, seen through ``LanguageModel.routing_observers``) + the KV cache
the rows read (``KVCache.bytes_per_token`` in the engine's cache dtype x each row's mean
context during the decode). The roofline: those bytes over the read bandwidth measured
right before and right after that decode in a helper process (the higher of the two). A
fraction above 1 means that measurement caught a slow moment (the helper starved of CPU
on a loaded machine) or that a small model's step stays in the CPU's caches. Batch sizes
(``--batches``, default 1,4,16) run ``--repeats`` times, each against its own bandwidth:
the report shows the repeat with the median fraction and every repeat's fraction (this
shared machine's bandwidth moves by tens of percent within a minute). Beside it, the
compute floor of the step (every row's 2 x active parameters FLOPs at the best matmul
peak) and the roofline with both ceilings. Also peak RSS, the read bandwidth at the start
and the end, the kernel choice for this machine (``dsvl2/model/native/policy.py``),
whether the native decode kernels run, and how many malloc arenas the process ended with
(``malloc_arenas``: 1 means every thread shared glibc's main one, ``dsvl2/engine/heap.py``).

Checked by hand: ``stored_bytes_per_token.weights_batch1`` (the batch-1 weight bytes)
equals, to the byte, a sum over the checkpoint's safetensors header (``data_offsets``) of
every ``language.*`` tensor except the embedding table and the routed experts, + top-k x
the tensors of expert 0 (values + ``_scale``) of every MoE layer + one embedding row:
90,280,864 B for ``init-random --preset small --scale 0.25 --quantize int8`` and
133,976,800 B for ``--preset base --scale 0.25 --quantize int4`` (quantised weights are
held as stored; float ones load in the file's bf16, ``e_score_correction_bias`` in fp32).
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
from dsvl2.checkpoint.load import stored_scheme
from dsvl2.commands.info import describe
from dsvl2.engine import heap
from dsvl2.errors import DSVL2Error
from dsvl2.model import native
from dsvl2.model.cache import KVCache
from dsvl2.model.quant import QuantWeight
from dsvl2.model.native.policy import matmul_gflops

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_engine import ExpertCounter, bandwidth, best_read, cpu_name, peak_rss, read_parts  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CASES = ROOT / "tests" / "data" / "golden" / "processor" / "official"
IMAGES = ROOT / "tests" / "data" / "images"
TEXT_CASE = "text"


# ---- cases ---------------------------------------------------------------------------------

def golden_conversation(case: str) -> list[dict]:
    path = CASES / case / "case.json"
    if not path.is_file():
        known = sorted(p.name for p in CASES.iterdir() if (p / "case.json").is_file())
        raise SystemExit(f"bench_chat: unknown case {case!r}; use {TEXT_CASE!r} or one of {', '.join(known)}")
    conv = json.loads(path.read_text())["conversations"][0]
    for m in conv:
        if m.get("images"):
            m["images"] = [str(IMAGES / name) for name in m["images"]]
    return conv


def text_conversation(m, n_tokens: int) -> list[dict]:
    """A text-only question over a made-up log: lines are added until the prompt (chat
    template included) has at least ``n_tokens`` tokens."""
    weather = ("calm", "fog", "rain", "a gale")

    def conv(lines: int) -> list[dict]:
        log = " ".join(f"Entry {i}: ship {i * 7 % 101} passed the light at {i % 24:02d}:00 in {weather[i % 4]}, "
                       f"and the lamp burned {3 + i % 5} litres of oil." for i in range(lines))
        return [{"role": "<|User|>", "content": f"Here is a lighthouse keeper's log. {log} "
                                                "Which night burned the most oil, and why?"},
                {"role": "<|Assistant|>", "content": ""}]

    def length(lines: int) -> int:
        return m.process(conv(lines))[0].seq_lens[0]

    hi = 1
    while length(hi) < n_tokens:
        hi *= 2
    lo = hi // 2  # too few lines (or none); bisect to the fewest that reach n_tokens
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if length(mid) >= n_tokens else (mid, hi)
    return conv(hi)


# ---- what a decode step reads ----------------------------------------------------------------

def weights(module) -> list[tuple[str, object]]:
    """Every weight of ``module`` by name: its parameters and the ``QuantWeight`` s the loader
    put in place of some (plain attributes of their module, not parameters)."""
    out = []
    for mname, mod in module.named_modules():
        prefix = mname + "." if mname else ""
        out += [(prefix + n, p) for n, p in mod.named_parameters(recurse=False)]
        out += [(prefix + n, v) for n, v in vars(mod).items() if isinstance(v, QuantWeight)]
    return out


def held_format(w) -> str:
    if isinstance(w, QuantWeight):
        return f"int{w.bits}"
    return {torch.bfloat16: "bf16", torch.float32: "fp32", torch.float16: "fp16"}.get(w.dtype, str(w.dtype))


def held_bytes(w) -> int:
    return w.nbytes if isinstance(w, QuantWeight) else w.numel() * w.element_size()


class StepBytes:
    """The bytes a decode step reads, from the loaded language model's tensors (the module
    docstring says what is counted)."""

    def __init__(self, lm, cache_dtype: torch.dtype):
        cfg = lm.cfg
        self.top_k = cfg.num_experts_per_tok or 0
        self.non_expert = self.lm_head = self.embedding_row = 0
        expert: dict[int, int] = {}  # MoE layer -> bytes of one routed expert
        fixed_fmt: dict[str, int] = {}  # format -> bytes read once per step (non-expert + lm_head)
        expert_fmt: dict[str, int] = {}  # format -> bytes of one routed expert, summed over MoE layers
        for name, w in weights(lm):
            b, f = held_bytes(w), held_format(w)
            if name == "model.embed_tokens.weight":
                self.embedding_row = b // w.shape[0]
                self.embedding_format = f
            elif ".mlp.experts." in name:  # stacked [E, ...]: one expert is 1 / E of it
                layer = int(name.split(".")[2])
                expert[layer] = expert.get(layer, 0) + b // w.shape[0]
                expert_fmt[f] = expert_fmt.get(f, 0) + b // w.shape[0]
            else:
                if name.startswith("lm_head."):
                    self.lm_head += b
                else:
                    self.non_expert += b
                fixed_fmt[f] = fixed_fmt.get(f, 0) + b
        self.moe_layers = len(expert)
        self.experts_all_layers = sum(expert.values())  # one expert in every MoE layer
        self.routed_expert = self.experts_all_layers / self.moe_layers if self.moe_layers else 0
        self.kv_token = KVCache.bytes_per_token(cfg, cache_dtype)
        self.kv_dtype = str(cache_dtype).removeprefix("torch.")
        by_format = dict(fixed_fmt)
        for f, b in expert_fmt.items():
            by_format[f] = by_format.get(f, 0) + self.top_k * b
        by_format[self.embedding_format] = by_format.get(self.embedding_format, 0) + self.embedding_row
        self.by_format_batch1 = by_format

    def weights(self, rows: int, distinct: float) -> float:
        """Weight bytes of one step of ``rows`` rows whose MoE layers use ``distinct``
        routed experts each (on average over the layers)."""
        experts = self.moe_layers * distinct * self.routed_expert
        return self.non_expert + self.lm_head + rows * self.embedding_row + experts

    def kv(self, context_tokens: float) -> float:
        """KV-cache bytes read for ``context_tokens`` keys (all rows together)."""
        return self.kv_token * context_tokens

    def to_dict(self) -> dict:
        return {"non_expert": self.non_expert, "lm_head": self.lm_head, "embedding_row": self.embedding_row,
                "routed_expert": round(self.routed_expert), "moe_layers": self.moe_layers, "top_k": self.top_k,
                "weights_batch1": int(self.weights(1, self.top_k)), "weights_batch1_by_format": self.by_format_batch1,
                "kv_cache_per_context_token": self.kv_token, "kv_cache_dtype": self.kv_dtype}


class Bandwidth:
    """Read bandwidth (bench_engine.read_parts: the higher of malloc's pages and 2 MiB pages)
    measured in a helper process, on demand, right next to a measurement
    (the read bandwidth of this shared machine moves by tens of percent within minutes;
    the buffer does not count in this process's peak RSS)."""

    def __init__(self):
        self.pool = multiprocessing.get_context("spawn").Pool(1, initializer=torch.set_num_threads,
                                                              initargs=(torch.get_num_threads(),))

        self.seen: list[dict] = []  # every measurement's parts (bench_engine.read_parts), in order

    def __call__(self) -> float:
        parts = self.pool.apply(read_parts)
        self.seen.append(parts)
        return best_read(parts)

    def close(self) -> None:
        self.pool.terminate()


def mean_context(answer) -> float:
    """Keys a row's decode steps read, on average: its prompt + half of what it generated."""
    return answer.prompt_tokens + answer.completion_tokens / 2


# ---- time to first token ---------------------------------------------------------------------

def vision_flops(cfg, tiles: int, info: dict) -> float:
    vc, n = cfg.vision, cfg.vision.num_patches
    per_tile = (2 * info["params_vision"] * n + 2 * info["params_projector"] * cfg.tokens_per_tile_side ** 2
                + 4 * vc.layers * n ** 2 * vc.width)
    return tiles * per_tile


def prefill_flops(lc, info: dict, new: int, cached: int) -> float:
    """FLOPs of a prefill of ``new`` tokens after ``cached`` ones (the module docstring)."""
    d_qk, d_v = (lc.qk_nope_head_dim + lc.qk_rope_head_dim, lc.v_head_dim) if lc.use_mla else (lc.head_dim,) * 2
    pairs = new * cached + new * (new + 1) / 2  # (query, key) pairs of causal attention
    attention = 2 * lc.num_hidden_layers * lc.num_attention_heads * (d_qk + d_v) * pairs
    body = info["params_active_no_embedding"] - info["params_lm_head"]
    return 2 * body * new + 2 * info["params_lm_head"] + attention


def run_case(m, name: str, conv: list[dict], args, bw: Bandwidth, sb: StepBytes, info: dict) -> dict:
    """One case: its time to first token and FLOPs, batch-1 decode after its prompt, a
    follow-up question. Fractions of the matmul peak are added later (``finish_case``)."""
    t = time.perf_counter()
    m.process(conv)
    processing_s = time.perf_counter() - t
    gbps_before = bw()
    (h,) = m.submit(conv, max_new_tokens=args.decode_tokens)
    first = h.result()
    gbps_after = bw()
    tm = first.timings
    tiles = h.req.tiles_done
    cached = first.cached_tokens or 0
    vf = vision_flops(m.config, tiles, info)
    pf = prefill_flops(m.config.language, info, first.prompt_tokens - cached, cached)

    # batch 1 after the case's whole prompt: weights (top-k experts) + its KV cache per step
    times = h.req.timings.token_times
    after = round((len(times) - 1) / (times[-1] - times[0]), 2) if len(times) > 1 else None
    kv_step = sb.kv(mean_context(first))
    step = sb.weights(1, sb.top_k) + kv_step
    roof = max(gbps_before, gbps_after) * 1e9 / step

    follow = conv[:-1] + [{"role": "<|Assistant|>", "content": first.text},
                          {"role": "<|User|>", "content": "Tell me more about it."},
                          {"role": "<|Assistant|>", "content": ""}]
    (fh,) = m.submit(follow, max_new_tokens=4)
    fo = fh.result()
    return {
        "case": name, "image_processing_s": round(processing_s, 3),
        "prompt_tokens": first.prompt_tokens, "cached_tokens": cached, "tiles": tiles,
        "queue_s": tm["queue_s"], "vision_s": round(tm["vision_s"], 3), "prefill_s": round(tm["prefill_s"], 3),
        "time_to_first_token_s": round(tm["first_token_s"], 3),
        "vision_gflop": round(vf / 1e9, 2), "prefill_gflop": round(pf / 1e9, 2),
        "_flops": vf + pf, "_compute_s": tm["vision_s"] + tm["prefill_s"],
        "decode_b1_after_prompt_tok_per_s": after,
        "decode_b1_after_prompt_bytes_per_step": int(step),
        "decode_b1_after_prompt_kv_bytes_per_step": int(kv_step),
        "decode_b1_after_prompt_read_gbps_before_after": [gbps_before, gbps_after],
        "decode_b1_after_prompt_roofline_tok_per_s": round(roof, 2),
        "decode_b1_after_prompt_fraction_of_roofline": round(after / roof, 3) if after else None,
        "follow_up": {"prompt_tokens": fo.prompt_tokens, "cached_tokens": fo.cached_tokens,
                      "time_to_first_token_s": round(fo.timings["first_token_s"], 3),
                      "vision_s": fo.timings["vision_s"], "prefill_s": round(fo.timings["prefill_s"], 3)},
    }


def finish_case(c: dict, best_peak: float) -> dict:
    """The case's achieved vision + prefill rate and its fraction of the best matmul peak."""
    flops, compute_s = c.pop("_flops"), c.pop("_compute_s")
    rate = flops / compute_s / 1e9 if compute_s else None
    c["vision_prefill_gflops_per_s"] = round(rate, 1) if rate else None
    c["vision_prefill_fraction_of_best_peak"] = round(rate / best_peak, 3) if rate else None
    return c


# ---- decode at 1, 4, 16 rows -----------------------------------------------------------------

def decode_rate(m, n_rows: int, tokens: int, sb: StepBytes, bw: Bandwidth, flops_per_row: float,
                peak_flops: float) -> dict:
    """n_rows text conversations at once; tokens/s per row and in aggregate (while all rows
    decode), from the engine's timings; the bytes a step reads (the union of the experts
    its rows chose, their KV cache) and its roofline. Beside it, the compute floor of the
    same step (every row's products at the best matmul peak) and the roofline with both
    ceilings (the lower of the two rates): at many rows on a CPU the FLOPs, not the
    bytes, can bind."""
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
    distinct = sum(full) / len(full) if full else (0.0 if sb.moe_layers == 0 else None)
    out = {"rows": n_rows, "tokens_per_row": [o.completion_tokens for o in outs],
           "aggregate_tok_per_s": round(gen / span, 2) if span > 0 else None,
           "per_row_tok_per_s_median": round(sorted(per_row)[len(per_row) // 2], 2) if per_row else None,
           "routed_experts_per_moe_layer": round(distinct, 2) if distinct is not None else None,
           "read_gbps_before_after": [gbps_before, gbps_after]}
    if distinct is not None:
        w = sb.weights(n_rows, distinct)
        kv = sb.kv(sum(mean_context(o) for o in outs))
        out["weight_bytes_per_step"] = int(w)
        out["kv_bytes_per_step"] = int(kv)
        out["bytes_per_step"] = int(w + kv)
        out["roofline_tok_per_s"] = round(n_rows / ((w + kv) / bandwidth_bps), 2)
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


def weight_format(m) -> str:
    if getattr(m.model, "quantization", None):
        return m.model.quantization
    return held_format(m.model.language.lm_head.weight)


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("-m", "--model", default="demo", help="checkpoint folder, Hugging Face id or 'demo'")
    ap.add_argument("--quantize", choices=["int8", "int4"], default=None,
                    help="quantise a float checkpoint while loading (a quantised one loads in its own scheme)")
    ap.add_argument("--cases", default=f"c01_single_image,{TEXT_CASE}",
                    help=f"comma-separated golden cases and/or {TEXT_CASE!r} (a text-only prompt)")
    ap.add_argument("--text-tokens", type=int, default=400, help="prompt tokens of the text case")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("--batches", default="1,4,16")
    ap.add_argument("--repeats", type=int, default=3, help="decode runs per batch size (median reported)")
    args = ap.parse_args(argv)
    args.case_names = [c.strip() for c in args.cases.split(",") if c.strip()]
    if not args.case_names:
        ap.error("--cases names no case")
    try:
        args.batch_sizes = [int(b) for b in args.batches.split(",")]
    except ValueError:
        ap.error(f"--batches must be comma-separated integers, got {args.batches!r}")
    if any(b < 1 for b in args.batch_sizes):
        ap.error(f"--batches must be >= 1, got {args.batches!r}")
    if args.text_tokens < 1 or args.decode_tokens < 2:
        ap.error("--text-tokens must be >= 1 and --decode-tokens >= 2")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    convs = {name: golden_conversation(name) for name in args.case_names if name != TEXT_CASE}

    limits = {"cpu": cpu_name(), "threads": torch.get_num_threads(), "load_average": os.getloadavg()}
    limits.update(bandwidth(512 << 20))
    limits["fp32_matmul_gflops"] = round(matmul_gflops(torch.float32, 512, reps=10), 1)
    limits["bf16_matmul_gflops"] = round(matmul_gflops(torch.bfloat16, 512), 1)

    t = time.perf_counter()
    try:
        m = dsvl2.load(args.model, dtype=args.dtype, quantize=args.quantize)
    except DSVL2Error as e:
        raise SystemExit(f"bench_chat: {e}") from None
    load_s = time.perf_counter() - t
    info = describe(m.config)
    sb = StepBytes(m.model.language, m.engine.cache_dtype)
    m.chat("Hi.", max_new_tokens=2)  # one-time costs (thread pools, buffers) out of the way

    bw = Bandwidth()
    try:
        cases = {}
        for name in args.case_names:
            conv = text_conversation(m, args.text_tokens) if name == TEXT_CASE else convs[name]
            cases[name] = run_case(m, name, conv, args, bw, sb, info)
        # the peaks again right after the cases' vision + prefill (they move on a shared
        # machine, as the bandwidth does): the fractions use the best of the four
        limits["fp32_matmul_gflops_after_prefill"] = round(matmul_gflops(torch.float32, 512, reps=10), 1)
        limits["bf16_matmul_gflops_after_prefill"] = round(matmul_gflops(torch.bfloat16, 512), 1)
        best_peak = max(limits[k] for k in ("fp32_matmul_gflops", "bf16_matmul_gflops",
                                            "fp32_matmul_gflops_after_prefill", "bf16_matmul_gflops_after_prefill"))
        for c in cases.values():
            finish_case(c, best_peak)

        # one row's decode FLOPs per token: 2 x its active parameters (lm_head included)
        row_flops = 2 * info["params_active_no_embedding"]
        decode = {}
        for b in args.batch_sizes:
            runs = [decode_rate(m, b, args.decode_tokens, sb, bw, row_flops, best_peak * 1e9)
                    for _ in range(max(1, args.repeats))]
            decode[str(b)] = median_run(runs)
    finally:
        bw.close()
    after = bandwidth(512 << 20)  # the same measurement after the run: how much it moved
    limits["read_sum_gbps_after"] = after["read_sum_gbps"]
    limits["read_gbps_by_pages_seen"] = bw.seen + [after["read_sum_gbps_by_pages"]]

    b1 = decode.get("1", {})
    if "roofline_tok_per_s" in b1:
        roof = b1["roofline_tok_per_s"]
    else:  # no batch-1 decode: weights alone at the bandwidth measured at the start
        roof = limits["read_sum_gbps"] * 1e9 / sb.weights(1, sb.top_k)
    rate = b1.get("per_row_tok_per_s_median")
    first = cases[args.case_names[0]]
    report = {
        "model": args.model, "weight_format": weight_format(m), "quantize": args.quantize,
        "quantized_on_disk": stored_scheme(m.folder) is not None if m.folder is not None else False,
        "dtype": args.dtype, "machine": limits,
        "kernels": getattr(m, "kernels", None) and m.kernels.to_dict(),
        "native_decode": native.status(),
        "load_s": round(load_s, 2),
        # the first case's figures at the top level (the keys earlier reports used)
        **{k: v for k, v in first.items() if k != "follow_up"},
        "best_matmul_peak_gflops": best_peak,
        "stored_bytes_per_token": sb.to_dict(),
        "decode": decode,
        "decode_b1_roofline_tok_per_s": round(roof, 2),
        "decode_b1_fraction_of_roofline": round(rate / roof, 3) if rate else None,
        "follow_up": first["follow_up"],
        "cases": cases,
        "peak_rss_gib": round(peak_rss() / 2 ** 30, 2),
        # glibc's malloc arenas at the end: 1 where every thread shared the main one (more:
        # threads that allocated before dsvl2 was imported, dsvl2/engine/heap.py; None: not glibc)
        "malloc_arenas": heap.arenas(),
    }
    print(json.dumps(report, indent=2, default=str))


if __name__ == "__main__":
    main()
