"""The oracle's checks: golden cases found on disk, each output of ours compared with the
reference's at the tolerances of ``dsvl2/commands/oracle/__init__.py``."""


from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
from safetensors.torch import load_file

from ...errors import DSVL2Error
from ...model.vl import DeepseekVL2
from ...engine.engine import Engine
from ...engine.sampling import SamplingParams
from ...processing import BatchInputs, Processor
from ...checkpoint.load import load_model

FRAGILE = 1e-5
TOL = {
    "embeds": 1e-5,
    "vision": 1e-4,
    "logits": 1e-4,
    "logits_after_flip": 1e-3,
    "route_w": 1e-5,
    "sum_rel": 1e-5,
    "scores": 1e-4,
}


@dataclass
class Check:
    variant: str
    case: str
    name: str
    ok: bool
    detail: str = ""

    def line(self) -> str:
        return f"{'PASS' if self.ok else 'FAIL'}  {self.variant:<8} {self.case:<24} {self.name:<28} {self.detail}"


@dataclass
class Variant:
    name: str
    folder: Path
    processor_set: str
    cases: list[str]


@dataclass
class CaseData:
    """Everything the checks of one variant x case need."""

    variant: str
    case: str
    spec: dict  # case.json
    golden_proc: dict[str, torch.Tensor]
    golden_pixels: torch.Tensor  # [B, n, 3, S, S] float32 (exact reconstruction)
    golden_tile_real: torch.Tensor
    ref: dict[str, torch.Tensor]  # <variant>/outputs/<case>.safetensors
    model: DeepseekVL2
    processor: Processor
    batch: BatchInputs | None = None  # ours
    inputs: dict[str, torch.Tensor] = field(default_factory=dict)  # what the model checks use
    cache: dict = field(default_factory=dict)


# ---- discovery --------------------------------------------------------------------------
def discover(golden: Path) -> list[Variant]:
    golden = Path(golden)
    manifest_path = golden / "manifest.json"
    variants: dict[str, str] = {}
    if manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text())
        for name, info in manifest.get("variants", {}).items():
            variants[name] = (info or {}).get("processor_id", "official")
    else:
        for d in sorted(golden.iterdir()):
            if (d / "config.json").is_file():
                variants[d.name] = "official"
    sets = sorted(p.name for p in (golden / "processor").iterdir() if p.is_dir()) if (golden / "processor").is_dir() else []
    out = []
    for name, pset in variants.items():
        if pset not in sets and len(sets) == 1:
            pset = sets[0]
        cases_dir = golden / "processor" / pset
        cases = sorted(c.name for c in cases_dir.iterdir()
                       if (c / "case.json").is_file() and (golden / name / "outputs" / f"{c.name}.safetensors").is_file()) \
            if cases_dir.is_dir() else []
        out.append(Variant(name, golden / name, pset, cases))
    return out


def find_image(name: str, dirs: list[Path]) -> Path:
    for d in dirs:
        p = Path(d) / name
        if p.is_file():
            return p
    raise FileNotFoundError(f"image {name!r} not found in --images {', '.join(map(str, dirs))}")


def load_case(golden: Path, v: Variant, case: str, model: DeepseekVL2, processor: Processor) -> CaseData:
    cdir = golden / "processor" / v.processor_set / case
    spec = json.loads((cdir / "case.json").read_text())
    proc = load_file(str(cdir / "processor.safetensors"))
    npz = np.load(cdir / "pixels_u8.npz")
    u8 = torch.from_numpy(npz["pixels_u8"])
    real = torch.from_numpy(npz["tile_is_real"]).bool()
    # The README's exact inverse: ((u8 as float32) / 255 - mean) / std, padding tiles 0.0.
    mean = torch.tensor(processor.config.image_mean, dtype=torch.float32)[:, None, None]
    std = torch.tensor(processor.config.image_std, dtype=torch.float32)[:, None, None]
    px = ((u8.float() / 255) - mean) / std
    px[~real] = 0.0
    out_dir = v.folder / "outputs"
    ref = load_file(str(out_dir / f"{case}.safetensors"))
    return CaseData(v.name, case, spec, proc, px, real, ref, model, processor)


# ---- helpers ----------------------------------------------------------------------------
def _close(a: torch.Tensor, b: torch.Tensor, atol: float, rtol: float = 0.0) -> tuple[bool, str]:
    if a.shape != b.shape:
        return False, f"shape {list(a.shape)} != reference {list(b.shape)}"
    if not torch.isfinite(a).all():
        return False, "non-finite values"
    diff = (a.double() - b.double()).abs()
    bound = atol + rtol * b.double().abs()
    ok = bool((diff <= bound).all())
    return ok, f"max|d|={float(diff.max()) if diff.numel() else 0.0:.2e} (atol {atol:g}{f', rtol {rtol:g}' if rtol else ''})"


def _exact(a: torch.Tensor, b: torch.Tensor) -> tuple[bool, str]:
    if a.shape != b.shape:
        return False, f"shape {list(a.shape)} != reference {list(b.shape)}"
    bad = int((a != b).sum())
    return bad == 0, "exact" if bad == 0 else f"{bad} of {a.numel()} differ"


# ---- checks: processor ------------------------------------------------------------------
def run_processor(c: CaseData, image_dirs: list[Path]) -> list[tuple[str, bool, str]]:
    convs = []
    for conv in c.spec["conversations"]:
        msgs = []
        for m in conv:
            m = dict(m)
            if m.get("images"):
                m["images"] = [str(find_image(n, image_dirs)) for n in m["images"]]
            msgs.append(m)
        convs.append(msgs)
    c.cache["conversations"] = convs
    batch = c.processor(convs)
    c.batch = batch
    g = c.golden_proc
    res = []
    for key in ("input_ids", "attention_mask", "images_seq_mask", "images_spatial_crop"):
        ok, d = _exact(getattr(batch, key), g[key].to(getattr(batch, key).dtype))
        res.append((f"processor.{key}", ok, d))
    shape_ok = list(batch.pixel_values.shape) == g["images_shape"].tolist()
    if shape_ok:
        eq = torch.equal(batch.pixel_values, c.golden_pixels) and torch.equal(batch.tile_is_real, c.golden_tile_real)
        bad = int((batch.pixel_values != c.golden_pixels).sum())
        res.append(("processor.pixels", eq, "bit-exact" if eq else f"{bad} values differ"))
    else:
        res.append(("processor.pixels", False, f"shape {list(batch.pixel_values.shape)} != {g['images_shape'].tolist()}"))
    proc_ok = all(r[1] for r in res)
    # Model checks run on our processor's output when it is right, else on the oracle's
    # tensors, so that a processor bug does not hide the state of the model.
    if proc_ok:
        c.inputs = dict(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                        images_seq_mask=batch.images_seq_mask, images_spatial_crop=batch.images_spatial_crop,
                        pixel_values=batch.pixel_values)
    else:
        c.inputs = dict(input_ids=g["input_ids"], attention_mask=g["attention_mask"].bool(),
                        images_seq_mask=g["images_seq_mask"].bool(), images_spatial_crop=g["images_spatial_crop"],
                        pixel_values=c.golden_pixels)
    return res


# ---- checks: vision, projector, embeddings ---------------------------------------------
def check_vision(c: CaseData) -> list[tuple[str, bool, str]]:
    i = c.inputs
    with torch.no_grad():
        feats = c.model.encode_images(i["pixel_values"], i["images_spatial_crop"], keep_tower_outputs=True)
    c.cache["features"] = feats
    ref = c.ref
    res = []
    if feats.vision is None:
        n_ref = ref["vision_out_tile_sum"].numel() if "vision_out_tile_sum" in ref else 0
        res.append(("vision.tiles", n_ref == 0, "no image: tower skipped" if n_ref == 0 else f"reference has {n_ref} tiles"))
        return res
    vis, proj = feats.vision, feats.projected
    if "vision_out_tile0" in ref:
        ok, d = _close(vis[0], ref["vision_out_tile0"], TOL["vision"], TOL["vision"])
    else:
        r0 = ref["vision_out_tile0_first32"]
        ok, d = _close(vis[0, : r0.shape[0]], r0, TOL["vision"], TOL["vision"])
    res.append(("vision.tile0", ok, d))
    res.append(("vision.tile0_token_norm", *_close(vis[0].norm(dim=-1), ref["vision_out_tile0_token_norm"],
                                                    TOL["vision"], TOL["vision"])))
    res.append(("vision.tile_sums", *_sums(vis, ref["vision_out_tile_sum"], ref["vision_out_tile_abssum"])))
    res.append(("projector.tile0", *_close(proj[0], ref["projector_out_tile0"], TOL["vision"], TOL["vision"])))
    res.append(("projector.tile_sums", *_sums(proj, ref["projector_out_tile_sum"], ref["projector_out_tile_abssum"])))
    return res


def _sums(x: torch.Tensor, ref_sum: torch.Tensor, ref_abs: torch.Tensor) -> tuple[bool, str]:
    if x.shape[0] != ref_sum.numel():
        return False, f"{x.shape[0]} tiles, reference {ref_sum.numel()}"
    flat = x.reshape(x.shape[0], -1).double()
    d_sum = (flat.sum(-1) - ref_sum.double()).abs()
    d_abs = (flat.abs().sum(-1) - ref_abs.double()).abs()
    bound = TOL["sum_rel"] * ref_abs.double() + 1e-4
    ok = bool((d_sum <= bound).all() and (d_abs <= bound).all())
    return ok, f"{x.shape[0]} tiles, max|d sum|={float(d_sum.max()):.2e}, max|d abssum|={float(d_abs.max()):.2e}"


def check_embeds(c: CaseData) -> list[tuple[str, bool, str]]:
    i = c.inputs
    with torch.no_grad():
        emb = c.model.prepare_inputs_embeds(i["input_ids"], i["images_seq_mask"], features=c.cache.get("features"))
    c.cache["embeds"] = emb
    am = i["attention_mask"]
    ok, d = _close(emb[am], c.ref["inputs_embeds"][am], TOL["embeds"])
    return [("embeds.inputs_embeds", ok, d)]


# ---- checks: prefill (routing, logits, hidden states) ----------------------------------
def check_prefill(c: CaseData) -> list[tuple[str, bool, str]]:
    i = c.inputs
    am = i["attention_mask"]
    with torch.no_grad():
        out = c.model(i["input_ids"], am, i["images_seq_mask"], inputs_embeds=c.cache["embeds"],
                      output_hidden_states=True, output_routing=True)
    ref = c.ref
    res = []
    pos_ref = ref.get("position_ids")
    if pos_ref is not None:
        mine, _ = c.model.language.padded_context(am)
        res.append(("prefill.position_ids", *_exact(mine[am], pos_ref[am])))
    # Routing: decisions with margin >= FRAGILE must agree; flips at near-ties are noted.
    flipped = torch.zeros_like(am)
    route_lines = []
    for layer, r in sorted(out.routing.items()):
        key = f"route_idx_L{layer}"
        if key not in ref:
            route_lines.append((f"routing.L{layer}", False, "no reference for this MoE layer"))
            continue
        mine_idx = r.idx.sort(-1).values.to(torch.int64)
        ref_idx = ref[key].to(torch.int64)
        same = (mine_idx == ref_idx).all(-1) | ~am
        margin = ref[f"route_margin_L{layer}"]
        hard = ~same & (margin >= FRAGILE)
        soft = ~same & (margin < FRAGILE)
        flipped |= soft
        # weights, matched by expert id, where the experts agree
        order = r.idx.argsort(-1)
        w_sorted = r.weight.gather(-1, order)
        wsel = same & am
        w_ok, w_d = _close(w_sorted[wsel], ref[f"route_w_L{layer}"][wsel], TOL["route_w"])
        n_valid = int(am.sum())
        detail = f"{n_valid - int(hard.sum()) - int(soft.sum())}/{n_valid} tokens equal"
        if int(soft.sum()):
            detail += f", {int(soft.sum())} near-tie flip(s) (margin < {FRAGILE:g}) accepted"
        if int(hard.sum()):
            detail += f", {int(hard.sum())} DIFFER with margin >= {FRAGILE:g}"
        route_lines.append((f"routing.L{layer}", int(hard.sum()) == 0 and w_ok, f"{detail}; weights {w_d}"))
    res += route_lines
    # positions whose comparison is relaxed: a flipped token itself is skipped; the rest of
    # its row is compared at TOL['logits_after_flip'].
    row_flip = flipped.any(-1)
    tol_row = torch.where(row_flip, TOL["logits_after_flip"], TOL["logits"])  # [B]
    logits = out.logits  # [B, T, V]

    def rowwise(name: str, mine: torch.Tensor, theirs: torch.Tensor, valid: torch.Tensor,
                skip: torch.Tensor) -> tuple[str, bool, str, float]:
        # mine / theirs [B, T, ...]; valid / skip [B, T]
        worst, ok = 0.0, True
        for b in range(mine.shape[0]):
            use = valid[b] & ~skip[b]
            if not use.any():
                continue
            d = (mine[b][use].double() - theirs[b][use].double()).abs()
            t = float(tol_row[b])
            ok &= bool((d <= t + t * theirs[b][use].double().abs()).all())
            worst = max(worst, float(d.max()))
        note = f" ({int((skip & valid).sum())} flipped position(s) skipped)" if (skip & valid).any() else ""
        return name, ok, f"max|d|={worst:.2e} (atol=rtol={TOL['logits']:g}){note}", worst

    sel = ref["sel_pos"]  # [B, n_sel], -1 = unused
    sel_valid = sel >= 0
    pick = lambda x: torch.stack([x[b, sel[b].clamp(min=0)] for b in range(sel.shape[0])])
    skip_sel = pick(flipped)
    res.append(rowwise("logits.selected", pick(logits), ref["logits_sel"], sel_valid, skip_sel)[:3])
    res.append(rowwise("logits.last", logits[:, -1:], ref["logits_last"][:, None],
                       torch.ones_like(flipped[:, -1:]), flipped[:, -1:])[:3])
    res.append(rowwise("logits.logsumexp", logits.logsumexp(-1), ref["logits_logsumexp"], am, flipped)[:3])
    res.append(rowwise("logits.norm", logits.norm(dim=-1), ref["logits_norm"], am, flipped)[:3])
    res.append(argmax_check(logits, ref["logits_argmax"], am & ~flipped, tol_row))
    # hidden states: L + 1 entries (embeds, inputs of layers 1.., final-norm output)
    hs = torch.stack(out.hidden_states)  # [L+1, B, T, D]
    hn = hs.norm(dim=-1)
    ref_hn = ref["hidden_norm"]
    if hn.shape != ref_hn.shape:
        res.append(("hidden.norm", False, f"shape {list(hn.shape)} != {list(ref_hn.shape)}"))
    else:
        rows = [rowwise("", hn[k], ref_hn[k], am, flipped) for k in range(hn.shape[0])]
        res.append(("hidden.norm", all(r[1] for r in rows),
                    f"{hn.shape[0]} entries, max|d|={max(r[3] for r in rows):.2e}"))
        hsel = torch.stack([pick(hs[k]) for k in range(hs.shape[0])])  # [L+1, B, n, D]
        rows = [rowwise("", hsel[k], ref["hidden_sel"][k], sel_valid, skip_sel) for k in range(hs.shape[0])]
        res.append(("hidden.selected", all(r[1] for r in rows), f"max|d|={max(r[3] for r in rows):.2e}"))
    return res


def argmax_check(logits: torch.Tensor, ref_argmax: torch.Tensor, use: torch.Tensor,
                  tol_row: torch.Tensor) -> tuple[str, bool, str]:
    """Top-1 equal at every used position [B, T], except float32 near-ties: where the
    reference's token scores within the logits tolerance (atol = rtol) of our maximum,
    either answer is right. Such ties are counted and reported; nothing else is relaxed."""
    top = logits.max(-1)  # [B, T]
    differ = (top.indices != ref_argmax) & use
    theirs = logits.gather(-1, ref_argmax.clamp(min=0)[..., None])[..., 0]  # our logit of their token
    tol = tol_row[:, None].to(logits.dtype)
    tie = differ & ((top.values - theirs) <= tol + tol * top.values.abs())
    bad = differ & ~tie
    n_use, n_bad, n_tie = int(use.sum()), int(bad.sum()), int(tie.sum())
    detail = f"{n_use - n_bad - n_tie}/{n_use} equal"
    if n_tie:
        detail += f", {n_tie} near-tie(s) within the logits tolerance accepted"
    if n_bad:
        detail += f", {n_bad} DIFFER"
    return "logits.argmax", n_bad == 0, detail


# ---- checks: generation ---------------------------------------------------------------
def generate(c: CaseData, batch_inputs: BatchInputs, n_new: int, chunk: int | None):
    # The reference does not enforce max_position_embeddings (a golden case may exceed it).
    engine = Engine(c.model, c.processor.tokenizer, max_batch_size=max(len(batch_inputs), 1), context_window=1 << 30)
    return engine.generate(batch_inputs, SamplingParams(max_new_tokens=n_new), chunk_size=chunk, output_scores=True)


def _ids_equal(outs, ref_ids: torch.Tensor, eos: int) -> tuple[bool, str]:
    bad = []
    for b, o in enumerate(outs):
        want = ref_ids[b].tolist()
        got = (o.ids + [eos] * len(want))[: len(want)]  # the reference fills finished rows with eos
        if got != want:
            first = next(i for i, (x, y) in enumerate(zip(got, want)) if x != y)
            bad.append(f"row {b} differs from step {first}")
    return not bad, "; ".join(bad) if bad else f"{len(outs)} row(s) x {ref_ids.shape[1]} tokens equal"


def check_generation(c: CaseData) -> list[tuple[str, bool, str]]:
    ref = c.ref
    if "gen_ids" not in ref:
        return []
    ref_ids = ref["gen_ids"]
    n_new = ref_ids.shape[1]
    eos = c.processor.tokenizer.eos_id
    batch = c.batch
    res = []
    outs = generate(c, batch, n_new, None)
    res.append(("gen.greedy_ids", *_ids_equal(outs, ref_ids, eos)))
    # decode-step scores: [steps, B, V] raw logits of each step (step 0 = the prompt pass)
    worst, ok, notes = 0.0, True, []
    for b, o in enumerate(outs):
        sc = o.scores  # [steps, V]
        steps = min(sc.shape[0], ref["gen_scores_logsumexp"].shape[0])
        first4 = ref["gen_scores_first4"][: min(4, steps), b]
        for name, mine, theirs in (
            ("first4", sc[: first4.shape[0]], first4),
            ("logsumexp", sc[:steps].logsumexp(-1), ref["gen_scores_logsumexp"][:steps, b]),
            ("norm", sc[:steps].norm(dim=-1), ref["gen_scores_norm"][:steps, b]),
            ("top32", sc[:steps].topk(ref["gen_scores_top32_val"].shape[-1], dim=-1).values,
             ref["gen_scores_top32_val"][:steps, b]),
        ):
            d = (mine.double() - theirs.double()).abs()
            good = bool((d <= TOL["scores"] + TOL["scores"] * theirs.double().abs()).all())
            ok &= good
            worst = max(worst, float(d.max()))
            if not good:
                notes.append(f"row {b} {name}")
        # top-32 ids must agree wherever the reference's values are not near-ties
        vals, idx = ref["gen_scores_top32_val"][:steps, b], ref["gen_scores_top32_idx"][:steps, b].long()
        mine_idx = sc[:steps].topk(idx.shape[-1], dim=-1).indices
        gap = torch.full_like(vals, float("inf"))
        gap[:, 1:] = vals[:, :-1] - vals[:, 1:]
        gap[:, :-1] = torch.minimum(gap[:, :-1], vals[:, :-1] - vals[:, 1:])
        clear = gap > 2 * TOL["scores"]
        if bool(((mine_idx != idx) & clear).any()):
            ok = False
            notes.append(f"row {b} top32 ids")
    res.append(("gen.scores", ok, f"max|d|={worst:.2e} (atol=rtol={TOL['scores']:g})"
                + (f"; bad: {', '.join(notes)}" if notes else "")))
    # chunked prefill: chunks of 128 tokens, then greedy = the reference's standard gen_ids
    chunked = generate(c, batch, n_new, 128)
    res.append(("gen.chunked_prefill_128", *_ids_equal(chunked, ref_ids, eos)))
    # every row of a batch equals the same conversation run alone
    if len(batch) > 1:
        alone = []
        for b in range(len(batch)):
            single = c.processor([c.cache["conversations"][b]])
            alone += generate(c, single, n_new, None)
        same = [a.ids == o.ids for a, o in zip(alone, outs)]
        res.append(("gen.batch_rows_vs_alone", all(same),
                    f"{sum(same)}/{len(same)} rows equal their conversation run alone"))
    return res


# Later layers append further checks here: fn(CaseData) -> results.
EXTRA_CHECKS: list[Callable[[CaseData], list[tuple[str, bool, str]]]] = [check_generation]


def evaluate_case(c: CaseData, image_dirs: list[Path]) -> list[Check]:
    out: list[Check] = []
    steps = [lambda c: run_processor(c, image_dirs), check_vision, check_embeds, check_prefill, *EXTRA_CHECKS]
    for step in steps:
        try:
            results = step(c)
        except (DSVL2Error, FileNotFoundError, ValueError, RuntimeError) as e:
            name = getattr(step, "__name__", "processor")
            out.append(Check(c.variant, c.case, name.replace("check_", "") + ".error", False, f"{type(e).__name__}: {e}"))
            break
        out += [Check(c.variant, c.case, n, ok, d) for n, ok, d in results]
    return out


def select(golden: Path, variants: Iterable[str] = (), cases: Iterable[str] = ()) -> list[tuple[Variant, list[str]]]:
    """The golden tree's variants, each with its cases, narrowed to the names asked for
    (none asked: all). A name that the tree does not hold is a ``DSVL2Error`` naming the
    ones it does."""
    found = discover(golden)
    want_v, want_c = set(variants), set(cases)
    if want_v - {v.name for v in found}:
        raise DSVL2Error(f"unknown variant(s) {sorted(want_v - {v.name for v in found})}; "
                         f"available: {', '.join(v.name for v in found)}")
    chosen = [v for v in found if not want_v or v.name in want_v]
    held = {c for v in chosen for c in v.cases}
    if want_c - held:
        raise DSVL2Error(f"unknown case(s) {sorted(want_c - held)}; available: {', '.join(sorted(held))}")
    return [(v, [c for c in v.cases if not want_c or c in want_c]) for v in chosen]


def run(golden: Path, image_dirs: list[Path], variants: Iterable[str] = (), cases: Iterable[str] = (),
        emit: Callable[[str], None] = print) -> list[Check]:
    golden = Path(golden)
    results: list[Check] = []
    for v, chosen in select(golden, variants, cases):
        t0 = time.perf_counter()
        model = load_model(v.folder, torch.float32)
        processor = Processor.from_pretrained(v.folder)
        for case in chosen:
            c = load_case(golden, v, case, model, processor)
            for chk in evaluate_case(c, image_dirs):
                results.append(chk)
                emit(chk.line())
        emit(f"# {v.name}: {time.perf_counter() - t0:.1f} s")
    return results
