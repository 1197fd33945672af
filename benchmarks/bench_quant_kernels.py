"""Micro-benchmark of the products with quantised weights at the real small / base sizes (prints JSON).

Decode (``ops.decoding()``; rows B = 1, 4, 16):
* one product of a base routed expert's gate / up ([1536, 2560]) and down ([2560, 1536])
  projection in int4 (group 128): ``native_int4`` (dsvl2's ``native.linear_int4``: the
  stored format, dequantised in registers) against ``int4pack`` (torch's
  ``_weight_int4pack_mm_for_cpu``, bf16 activations: the int4 path before the native
  kernel); and a small expert's ([1408, 2048], [2048, 1408]) in int8: ``native_int8``
  against ``int8pack`` (``torch._weight_int8pack_mm``);
* a whole MoE layer: base (72 experts of D 2560, F 1536, top-6) in int4, ``native_int4``
  (``native.experts_int4``, one call) against ``int4pack`` (the per-expert loop of
  ``Experts.forward`` over int4pack weights); small (64 experts of D 2048, F 1408, top-6)
  in int8, ``native_int8`` (``native.experts_int8``). Routing is random, one new draw per call.
Each weight is read from memory, not cache: products rotate over copies whose total
exceeds the L3. Reported: ms per call, best and median; ``GB_s`` (weight bytes the call
reads over its best time: for a layer, the experts that the routing chose) and
``of_read_bw`` (that over the read bandwidth measured in the same run, before and after: a
float32 sum of 512 MiB, best of 5, the higher of the two). Best, not median: on a shared
machine a 2-thread call of ~0.1 ms often waits milliseconds for its second thread.

Prefill (1431 rows, a c01 prompt with an image): a base expert's gate projection in int4
and the small dense layer's gate ([10944, 2048]) in int8, ``before`` (int4: the int4pack
mm; int8: 2048 rows at a time dequantised to float32, float32 GEMMs) against ``after``
(``QuantWeight.block_gemm``: dequantise a block into the reused buffer in the dtype the
kernel policy chose for this machine, one GEMM per block), and the other dtype for
reference; and a whole base MoE layer's routed experts on those tokens (random top-6 of
72, ``Experts.forward``'s per-expert loop, three products per expert): int4pack before,
the dequantise-then-GEMM products after. GFLOP/s = 2 M N K / best time.

Prefill MoE layers (``prefill_moe_layers``; ``--moe-prefill`` runs only these): 1431 tokens
(random top-6 routing) through the routed experts of one layer of the real small size (64
experts, D 2048, F 1408, int8) and of base (72 experts, D 2560, F 1536, int4 group 128), in
the big-product dtype this machine's kernel policy picks: ``old`` (the loop before: per
expert three ``block_gemm`` s, int8 dequantised by torch ops, a copy then a multiply),
``new`` (``Experts.forward``: per expert and matrix one native dequantisation into a reused
buffer and one GEMM, ``native.amx`` off), ``fused`` (the same with gate and up side by side
in one [2F, D] buffer and one GEMM for both: the alternative, measured slower), and on a
CPU with AMX (bf16 products) ``amx`` (``Experts.forward`` with the products on AMX tiles,
``native/amx.py``: no dequantised copy, no oneDNN reorder).
Timed alternately in the same process, ``--moe-repeats`` rounds, best of each; GFLOP/s =
2 x 3 matrices x 1431 x 6 x D x F / best, ``of_peak`` = that over the bf16 (or fp32) GEMM peak
(``policy.matmul_gflops(dtype, 512)``) measured before and after each layer, the higher;
``load`` = the 1-minute load average at the start and end of each layer (other jobs on
the machine: the interleaving keeps the comparison fair, not the absolute figures).

``--tiny`` adds the real tiny model's expert products with one weight called repeatedly
(read from cache): torch's bf16 product against the native bf16 / int8 / int4 kernels.

Native quantised candidates run in the variant in use (``native.quant_variant``: on a CPU
with AVX-512 VNNI, or without AVX-512, int4 by integer digits) and again as
``name[variant]`` in every other variant the CPU has (e.g. ``native_int4[avx512]``, the
float path), one after the other.

Usage: ``python benchmarks/bench_quant_kernels.py [--quick] [--tiny] [--moe-prefill]
[--moe-repeats N]`` (``--quick``: fewer repeats, B = 1 and 16 only). About 35 s on 2 quiet
Zen 4 threads, and a minute more for the prefill MoE layers (1 GB of random weights).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import torch
import torch.nn.functional as F

from dsvl2.model import native, ops, quant
from dsvl2.model.moe import Experts, Routing
from dsvl2.model.native import amx, policy
from dsvl2.model.native.cpu import cpu_info
from dsvl2.model.scratch import buffer, upcast

L3_BYTES = 64 << 20  # rotate over at least this many weight bytes (above this machine's 32 MiB L3)


def times(fn, reps: int) -> tuple[float, float]:
    """(best, median) seconds of ``reps`` calls after one warm-up call."""
    fn()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return min(ts), statistics.median(ts)


def read_gbps(nbytes: int = 512 << 20) -> float:
    """Read bandwidth: a float32 sum of ``nbytes`` (best of 5)."""
    src = torch.ones(nbytes // 4)
    return nbytes / times(src.sum, 5)[0] / 1e9


def int4_weight(e: int, n: int, k: int, seed: int) -> quant.QuantWeight:
    """A random int4 stack [e, n, k] in the stored format (group 128)."""
    g = torch.Generator().manual_seed(seed)
    group = quant.int4_group(k)
    data = torch.randint(0, 256, (e, n, k // 2), dtype=torch.uint8, generator=g)
    scale = (torch.rand(e, n, k // group, generator=g) * 0.01 + 0.001).to(torch.bfloat16)
    return quant.QuantWeight("int4", (e, n, k), data, scale, group)


def as_int4pack(w: quant.QuantWeight) -> quant.QuantWeight:
    """The same values in torch's int4pack layout."""
    e, n, k = w.shape
    packed = torch.empty(e, n, k // 2, dtype=torch.uint8)
    sz = torch.zeros(e, k // w.group, n, 2, dtype=torch.bfloat16)
    for i in range(e):
        u = quant.unpack_int4(w.data[i]).to(torch.int32) + 8
        packed[i].copy_(torch._convert_weight_to_int4pack_for_cpu(u.contiguous(), 2))
        sz[i, ..., 0].copy_(w.scale[i].t())
    return quant.QuantWeight("int4pack", w.shape, packed, sz, w.group)


def int8_weight(e: int, n: int, k: int, seed: int) -> quant.QuantWeight:
    g = torch.Generator().manual_seed(seed)
    data = torch.randint(-127, 128, (e, n, k), dtype=torch.int8, generator=g)
    scale = (torch.rand(e, n, generator=g) * 0.01 + 0.001).to(torch.bfloat16)
    return quant.QuantWeight("int8", (e, n, k), data, scale)


def other_variants() -> list[str]:
    """The quantised products' variants this CPU has besides the one in use (``native.quant_variant``)."""
    if not native.available():
        return []
    now = native.quant_variant()
    try:
        return [v for v in native.QUANT_VARIANTS if v != now and native.quant_variant(v) == v]
    finally:
        native.quant_variant(now)


def in_variant(fn, variant: str):
    """fn run with the quantised products' variant ``variant``, the one in use restored after."""
    def run(*args):
        now = native.quant_variant()
        native.quant_variant(variant)
        try:
            return fn(*args)
        finally:
            native.quant_variant(now)
    return run


def with_variants(cands: dict, names: tuple[str, ...]) -> dict:
    """cands plus, for each native candidate in ``names``, ``name[variant]`` for every other
    variant the CPU has (the same call, in that variant: e.g. int4 by integer digits on
    AVX-512 VNNI against the float path on AVX-512)."""
    out = dict(cands)
    for name in names:
        if name in cands:
            for v in other_variants():
                fn = cands[name]
                out[f"{name}[{v}]"] = (in_variant(fn[0], v), fn[1]) if isinstance(fn, tuple) else in_variant(fn, v)
    return out


def row(t: tuple[float, float], nbytes: float, flops: float | None = None) -> dict:
    """Best and median ms; GB/s (and GFLOP/s) of the best call, as the bandwidth is a best of 5."""
    best, med = t
    out = {"ms_best": round(best * 1e3, 3), "ms_median": round(med * 1e3, 3), "GB_s": round(nbytes / best / 1e9, 2)}
    if flops is not None:
        out["GFLOP_s"] = round(flops / best / 1e9, 1)
    return out


def add_fractions(tree, bw: float) -> None:
    """``of_read_bw`` beside every ``GB_s`` (``bw``: the read bandwidth of the run)."""
    if isinstance(tree, dict):
        if "GB_s" in tree:
            tree["of_read_bw"] = round(tree["GB_s"] / bw, 3)
        for v in tree.values():
            add_fractions(v, bw)


def bench_products(rows: tuple[int, ...], reps: int) -> dict:
    """One projection: int4 base expert, int8 small expert."""
    res = {}
    shapes = (("base_expert_gate_up_int4", 4, (1536, 2560)), ("base_expert_down_int4", 4, (2560, 1536)),
              ("small_expert_gate_up_int8", 8, (1408, 2048)), ("small_expert_down_int8", 8, (2048, 1408)))
    for name, bits, (n, k) in shapes:
        one = n * k // 2 + n * k // 64 if bits == 4 else n * k + 2 * n
        copies = max(2, L3_BYTES // one)
        w = int4_weight(copies, n, k, 1) if bits == 4 else int8_weight(copies, n, k, 1)
        cands = {}
        if bits == 4:
            wp = as_int4pack(w)
            if native.available():
                cands["native_int4"] = (lambda x, i: native.linear_int4(x, w.data[i], w.scale[i]), one)
            cands["int4pack"] = (lambda x, i: torch._weight_int4pack_mm_for_cpu(x.to(torch.bfloat16), wp.data[i],
                                                                                 wp.group, wp.scale[i]), one)
        else:
            if native.available():
                cands["native_int8"] = (lambda x, i: native.linear_int8(x, w.data[i], w.scale[i]), one)
            cands["int8pack"] = (lambda x, i: torch._weight_int8pack_mm(x.to(torch.bfloat16), w.data[i], w.scale[i]),
                                 one)
        cands = with_variants(cands, ("native_int4", "native_int8"))
        out = {"shape": [n, k]}
        for m in rows:
            x = torch.randn(m, k)
            r = {}
            for c, (fn, nbytes) in cands.items():
                it = iter(range(10 ** 9))
                t = times(lambda: fn(x, next(it) % copies), reps)
                r[c] = row(t, nbytes, 2 * m * n * k)
            out[f"B{m}"] = r
        res[name] = out
    return res


def experts_loop(x, idx, wt, gate, up, down):
    """``Experts.forward``'s per-expert loop (what int4pack weights ran in decode)."""
    k = idx.shape[1]
    flat = idx.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=gate.shape[0]).tolist()
    token = order // k
    w = wt.reshape(-1)[order]
    out = torch.zeros_like(x)
    start = 0
    for e, c in enumerate(counts):
        if c:
            sel = token[start:start + c]
            out.index_add_(0, sel, ops.gated_mlp(x[sel], gate[e], up[e], down[e]) * w[start:start + c, None])
            start += c
    return out


def bench_layers(rows: tuple[int, ...], reps: int) -> dict:
    res = {}
    layers = {"base_moe_int4": (4, 2560, 1536, 72), "small_moe_int8": (8, 2048, 1408, 64)}
    for name, (bits, d, f, e) in layers.items():
        make = int4_weight if bits == 4 else int8_weight
        gate, up, down = make(e, f, d, 1), make(e, f, d, 2), make(e, d, f, 3)
        per_expert = sum(w.nbytes for w in (gate, up, down)) / e
        cands = {}
        if native.available():
            fn = native.experts_int4 if bits == 4 else native.experts_int8
            cands[f"native_int{bits}"] = lambda x, i, wt, fn=fn: fn(x, i, wt, gate, up, down)
        if bits == 4:
            packed = [as_int4pack(w) for w in (gate, up, down)]
            cands["int4pack"] = lambda x, i, wt: experts_loop(x, i, wt, *packed)
        cands = with_variants(cands, (f"native_int{bits}",))
        out = {"D": d, "F": f, "experts": e, "top_k": 6, "bits": bits}
        g = torch.Generator().manual_seed(0)
        for m in rows:
            x = torch.randn(m, d)
            r = {}
            for c, fn in cands.items():
                draws = [torch.stack([torch.randperm(e, generator=g)[:6] for _ in range(m)]) for _ in range(reps + 1)]
                wts = torch.rand(m, 6, generator=g)
                it = iter(draws)
                used = [len(set(i.flatten().tolist())) for i in draws]
                with ops.decoding():
                    t = times(lambda: fn(x, next(it), wts), reps)
                r[c] = row(t, statistics.mean(used) * per_expert)
                r[c]["experts_read"] = round(statistics.mean(used), 1)
            out[f"B{m}"] = r
        res[name] = out
    return res


def bench_tiny_products(reps: int) -> dict:
    """The real tiny model's expert gate ([896, 1280]) and down ([1280, 896]) projections,
    one weight called repeatedly (so read from cache): torch's bf16 product against the
    native kernels per weight format (the comparison docs/performance.md quotes)."""
    res = {}
    for name, (n, k) in {"expert_gate_up": (896, 1280), "expert_down": (1280, 896)}.items():
        wb = (torch.randn(n, k) * k ** -0.5).to(torch.bfloat16)
        w8 = int8_weight(1, n, k, 1)[0]
        w4 = int4_weight(1, n, k, 1)[0]
        p4 = as_int4pack(int4_weight(1, n, k, 1))[0]
        out = {"shape": [n, k]}
        for m in (1, 4, 16):
            xf = torch.randn(m, k)
            xb = xf.to(torch.bfloat16)
            cands = {"bf16": lambda: F.linear(xb, wb),
                     "int8pack": lambda: torch._weight_int8pack_mm(xb, w8.data, w8.scale),
                     "int4pack": lambda: torch._weight_int4pack_mm_for_cpu(xb, p4.data, p4.group, p4.scale)}
            if native.available():
                cands |= {"native_bf16": lambda: native.linear(xf, wb),
                          "native_int8": lambda: native.linear_int8(xf, w8.data, w8.scale),
                          "native_int4": lambda: native.linear_int4(xf, w4.data, w4.scale)}
                cands = with_variants(cands, ("native_int8", "native_int4"))
            out[f"B{m}"] = {c: row(times(fn, reps), 0, 2 * m * n * k) for c, fn in cands.items()}
            for r in out[f"B{m}"].values():
                del r["GB_s"]  # read from cache: no bandwidth to speak of
        res[name] = out
    return res


def old_int8_prefill(x: torch.Tensor, w: quant.QuantWeight) -> torch.Tensor:
    """The int8 prefill before: 2048 rows at a time dequantised to float32 into the reused
    buffer, float32 GEMMs."""
    n = w.shape[-2]
    parts = []
    for i in range(0, n, 2048):
        wb = upcast(w.data[i:i + 2048], torch.float32).mul_(w.scale[i:i + 2048].float()[:, None])
        parts.append(F.linear(x, wb))
    return torch.cat(parts, dim=-1)


def bench_prefill(m: int, reps: int, bf16: bool) -> dict:
    res = {}
    after, other = (torch.bfloat16, torch.float32) if bf16 else (torch.float32, torch.bfloat16)
    for name, bits, (n, k) in (("base_expert_gate_int4", 4, (1536, 2560)), ("small_dense_gate_int8", 8, (10944, 2048))):
        w = (int4_weight if bits == 4 else int8_weight)(1, n, k, 5)[0]
        x = torch.randn(m, k)
        if bits == 4:
            wp = as_int4pack(int4_weight(1, n, k, 5))[0]
            before = lambda: torch._weight_int4pack_mm_for_cpu(x.to(torch.bfloat16), wp.data, wp.group, wp.scale)
        else:
            before = lambda: old_int8_prefill(x, w)
        cands = {"before": before, f"after_{str(after)[6:]}": lambda: w.block_gemm(x, after),
                 f"other_{str(other)[6:]}": lambda: w.block_gemm(x, other)}
        res[name] = {"shape": [n, k], "rows": m}
        for c, fn in cands.items():
            best, med = times(fn, reps)
            res[name][c] = {"ms_best": round(best * 1e3, 2), "ms_median": round(med * 1e3, 2),
                            "GFLOP_s": round(2 * m * n * k / best / 1e9, 1)}
    # a whole base MoE layer (routed experts) on m tokens: Experts.forward's per-expert loop
    d, f, e = 2560, 1536, 72
    gate, up, down = int4_weight(e, f, d, 1), int4_weight(e, f, d, 2), int4_weight(e, d, f, 3)
    packed = [as_int4pack(w) for w in (gate, up, down)]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(m, d)
    idx = torch.stack([torch.randperm(e, generator=g)[:6] for _ in range(m)])
    wt = torch.rand(m, 6, generator=g)
    before = ops.big_products_in_weights_dtype()
    ops.set_big_products_in_weights_dtype(bf16)
    try:
        row = {"rows": m, "experts": e, "top_k": 6}
        for c, fn in {"before": lambda: experts_loop(x, idx, wt, *packed),
                      "after": lambda: experts_loop(x, idx, wt, gate, up, down)}.items():
            best, med = times(fn, 1)
            row[c] = {"ms_best": round(best * 1e3, 1), "ms_median": round(med * 1e3, 1),
                      "GFLOP_s": round(2 * 3 * m * 6 * d * f / best / 1e9, 1)}
        res["base_moe_layer_int4"] = row
    finally:
        ops.set_big_products_in_weights_dtype(before)
    return res


def old_block_gemm(x: torch.Tensor, w: quant.QuantWeight, e: int, dtype: torch.dtype) -> torch.Tensor:
    """``QuantWeight.linear`` outside decode before the native int8 dequantiser, for slot e of
    a stack (a whole expert matrix is one block): rows sliced, int8 copied into the buffer
    then multiplied by the scales (two passes), int4 by ``native.dequantize_int4``; one GEMM,
    the result back in x's dtype."""
    n, k = w.shape[-2:]
    q, s = w.data[e][0:n], w.scale[e][0:n]
    if w.kind == "int8":
        wd = upcast(q, dtype).mul_(s.to(dtype)[:, None])
    else:
        wd = native.dequantize_int4(q, s, buffer(n * k, dtype).view(n, k))
    return F.linear(x.to(dtype), wd).to(x.dtype)


def sorted_pairs(idx: torch.Tensor, wt: torch.Tensor, e: int):
    """Experts.forward's sort of the (token, choice) pairs by expert: (token, weight, counts)."""
    flat = idx.reshape(-1)
    order = torch.argsort(flat, stable=True)
    return order // idx.shape[1], wt.reshape(-1)[order], torch.bincount(flat, minlength=e).tolist()


def old_moe_prefill(x, idx, wt, gate, up, down, dtype):
    """The routed experts' prefill loop before: per expert three ``old_block_gemm`` s."""
    token, w, counts = sorted_pairs(idx, wt, gate.shape[0])
    out = torch.zeros_like(x)
    start = 0
    for e, c in enumerate(counts):
        if c:
            sel = token[start:start + c]
            xe = x[sel]
            h = F.silu(old_block_gemm(xe, gate, e, dtype)) * old_block_gemm(xe, up, e, dtype)
            out.index_add_(0, sel, old_block_gemm(h, down, e, dtype) * w[start:start + c, None])
            start += c
    return out


def fused_moe_prefill(x, idx, wt, gate, up, down, dtype):
    """``Experts.quantised_prefill`` with gate and up dequantised side by side into one
    [2F, D] buffer and one GEMM for both (then silu(g) * u): the alternative measured."""
    token, w, counts = sorted_pairs(idx, wt, gate.shape[0])
    f, d = gate.shape[-2:]
    wbuf = buffer(2 * f * d, dtype)
    gate_up, df = wbuf.view(2 * f, d), wbuf[:d * f].view(d, f)
    g_rows, u_rows = gate_up[:f], gate_up[f:]
    xd = x.to(dtype)
    out = torch.zeros_like(x)
    start = 0
    for e, c in enumerate(counts):
        if c:
            sel = token[start:start + c]
            gate.dequantize_into(g_rows, e)
            up.dequantize_into(u_rows, e)
            h = F.linear(xd.index_select(0, sel), gate_up).float()  # [c, 2F]
            a = F.silu(h[:, :f]).mul_(h[:, f:]).mul_(w[start:start + c, None]).to(dtype)
            out.index_add_(0, sel, F.linear(a, down.dequantize_into(df, e)).to(x.dtype))
            start += c
    return out


def load1() -> float:
    return round(os.getloadavg()[0], 2)


def moe_prefill_layer(bits: int, d: int, f: int, e: int, m: int, rounds: int, dtype: torch.dtype) -> dict:
    """One layer of random weights (freed on return): old / new / fused, timed alternately."""
    make = int4_weight if bits == 4 else int8_weight
    gate, up, down = make(e, f, d, 1), make(e, f, d, 2), make(e, d, f, 3)
    mod = Experts(e, d, f)
    for attr, wq in zip(("gate_proj", "up_proj", "down_proj"), (gate, up, down)):
        del mod._parameters[attr]
        setattr(mod, attr, wq)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(m, d, generator=g)
    idx = torch.rand(m, e, generator=g).argsort(-1)[:, :6]
    wt = torch.rand(m, 6, generator=g)
    cands = {"old": lambda: old_moe_prefill(x, idx, wt, gate, up, down, dtype),
             "new": lambda: experts_call(mod, x, idx, wt, use_amx=False),
             "fused": lambda: fused_moe_prefill(x, idx, wt, gate, up, down, dtype)}
    if dtype is torch.bfloat16 and amx.usable():
        cands["amx"] = lambda: experts_call(mod, x, idx, wt, use_amx=True)
    flops = 2 * 3 * m * 6 * d * f
    row = {"D": d, "F": f, "experts": e, "bits": bits, "GFLOP": round(flops / 1e9, 2), "load_start": load1()}
    peaks = [policy.matmul_gflops(dtype, 512)]
    ts = {c: [] for c in cands}
    with torch.no_grad():
        for fn in cands.values():  # warm-up (buffers, page faults)
            fn()
        for _ in range(rounds):
            for c, fn in cands.items():
                t = time.perf_counter()
                fn()
                ts[c].append(time.perf_counter() - t)
    peaks.append(policy.matmul_gflops(dtype, 512))
    peak = max(peaks)
    row["load_end"] = load1()
    row["peak_GFLOP_s_before_after"] = [round(p, 1) for p in peaks]
    for c, t in ts.items():
        best = min(t)
        row[c] = {"ms_best": round(best * 1e3, 1), "ms_median": round(statistics.median(t) * 1e3, 1),
                  "GFLOP_s": round(flops / best / 1e9, 1), "of_peak": round(flops / best / 1e9 / peak, 3)}
    row["new_over_old_speedup"] = round(min(ts["old"]) / min(ts["new"]), 2)
    row["new_over_fused_speedup"] = round(min(ts["fused"]) / min(ts["new"]), 2)
    if "amx" in ts:
        row["amx_over_new_speedup"] = round(min(ts["new"]) / min(ts["amx"]), 2)
    with torch.no_grad():
        ref = cands["old"]()
        for c in [c for c in cands if c != "old"]:
            diff = (cands[c]() - ref).abs().max() / ref.abs().max()
            row[f"{c}_vs_old_max_abs_diff_over_max"] = round(diff.item(), 5)
    return row


def experts_call(mod: Experts, x, idx, wt, use_amx: bool) -> torch.Tensor:
    """``mod`` on x with the experts' AMX products on or off (``native.amx.enabled``)."""
    before = amx.enabled
    amx.enabled = use_amx
    try:
        return mod(x, Routing(idx, wt))
    finally:
        amx.enabled = before


def bench_moe_prefill(m: int, rounds: int, bf16: bool) -> dict:
    """The routed experts of a small (int8) and a base (int4) MoE layer on m tokens."""
    dtype = torch.bfloat16 if bf16 else torch.float32
    res = {"rows": m, "top_k": 6, "products": str(dtype)[6:], "threads": torch.get_num_threads()}
    before = ops.big_products_in_weights_dtype()
    ops.set_big_products_in_weights_dtype(bf16)
    try:
        res["small_moe_int8"] = moe_prefill_layer(8, 2048, 1408, 64, m, rounds, dtype)
        res["base_moe_int4"] = moe_prefill_layer(4, 2560, 1536, 72, m, rounds, dtype)
    finally:
        ops.set_big_products_in_weights_dtype(before)
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="fewer repeats, B = 1 and 16 only")
    ap.add_argument("--tiny", action="store_true", help="also the real tiny model's products, weights in cache")
    ap.add_argument("--moe-prefill", action="store_true", help="only the prefill MoE layers, old / new / fused")
    ap.add_argument("--moe-repeats", type=int, default=5, help="rounds of the prefill MoE layers (default 5)")
    args = ap.parse_args()
    rows = (1, 16) if args.quick else (1, 4, 16)
    reps = 9 if args.quick else 21
    choice = policy.choose("cpu", torch.bfloat16)
    name, flags = cpu_info()
    out = {"torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.machine(), "cpu": name,
           "cpu_flags": sorted(f for f in flags if f.startswith(("avx", "amx", "fma", "f16c"))),
           "native": native.status(), "big_products": choice.big_products,
           "quant_variant": native.quant_variant() if native.available() else None}
    if args.moe_prefill:
        out["prefill_moe_layers"] = bench_moe_prefill(1431, args.moe_repeats, choice.big_products == "bf16")
        print(json.dumps(out, indent=1))
        return
    bw = [read_gbps()]
    out["decode_products"] = bench_products(rows, reps * 3)
    out["decode_moe_layers"] = bench_layers(rows, reps)
    bw.append(read_gbps())
    out["read_GB_s_before_after"] = [round(b, 1) for b in bw]
    add_fractions(out, max(bw))
    out["prefill"] = bench_prefill(1431, 3, choice.big_products == "bf16")
    out["prefill_moe_layers"] = bench_moe_prefill(1431, args.moe_repeats, choice.big_products == "bf16")
    if args.tiny:
        out["tiny_products_cached"] = bench_tiny_products(reps * 3)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
