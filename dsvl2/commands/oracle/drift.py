"""The oracle's quantised mode: how far int8 / int4 weights move a golden tree's numbers.

    python -m dsvl2.commands.oracle GOLDEN --images DIR --quantize int8 [--quantize int4]

Quantisation cannot meet the float32 tolerances, so nothing passes or fails here: per
variant x case it reports, against the reference's float32 outputs,
* ``logits_last``: max |d| of the last prompt position's logits, and that relative to
  the reference's max |logit|;
* ``logsumexp``: max |d| of the per-position logsumexp (all valid positions);
* ``prefill_top1``: share of valid prompt positions whose argmax equals the reference's;
* ``greedy``: share of greedy tokens equal to the reference's ``gen_ids``, position by
  position up to the first difference counted as agreement (``agree_prefix``) and
  overall (``agree_all``: positions equal anywhere).
The model is loaded with ``load_model(..., quantize=scheme)`` (the same weights as a
``dsvl2 quantize`` checkpoint gives) and runs the engine's normal paths.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Iterable

import torch

from ...processing import Processor
from ...checkpoint.load import load_model
from .checks import generate, load_case, run_processor, select

COLUMNS = ("variant", "case", "scheme", "logits_last_maxd", "logits_last_rel", "logsumexp_maxd",
           "prefill_top1", "greedy_prefix", "greedy_all")


def drift_case(c, scheme: str, image_dirs: list[Path]) -> dict:

    run_processor(c, image_dirs)
    i, ref = c.inputs, c.ref
    am = i["attention_mask"]
    with torch.no_grad():
        out = c.model(i["input_ids"], am, i["images_seq_mask"], pixel_values=i["pixel_values"],
                      images_spatial_crop=i["images_spatial_crop"])
    logits = out.logits.float()
    row = {"variant": c.variant, "case": c.case, "scheme": scheme}
    last = logits[:, -1]
    d = (last - ref["logits_last"]).abs()
    row["logits_last_maxd"] = float(d.max())
    row["logits_last_rel"] = float(d.max() / ref["logits_last"].abs().max())
    row["logsumexp_maxd"] = float((logits.logsumexp(-1) - ref["logits_logsumexp"]).abs()[am].max())
    row["prefill_top1"] = float((logits.argmax(-1) == ref["logits_argmax"])[am].float().mean())
    if "gen_ids" in ref:
        ref_ids = ref["gen_ids"]
        eos = c.processor.tokenizer.eos_id
        outs = generate(c, c.batch, ref_ids.shape[1], None)
        n, prefix, equal = 0, 0, 0
        for b, o in enumerate(outs):
            want = ref_ids[b].tolist()
            got = (o.ids + [eos] * len(want))[: len(want)]
            same = [x == y for x, y in zip(got, want)]
            n += len(want)
            equal += sum(same)
            prefix += next((k for k, s in enumerate(same) if not s), len(same))
        row["greedy_prefix"] = prefix / n
        row["greedy_all"] = equal / n
    else:
        row["greedy_prefix"] = row["greedy_all"] = None
    return row


def format_row(r: dict) -> str:
    def f(v, spec):
        return "-" if v is None else format(v, spec)

    return (f"{r['variant']:<8} {r['case']:<24} {r['scheme']:<5} {f(r['logits_last_maxd'], '10.4f')} "
            f"{f(r['logits_last_rel'], '9.4f')} {f(r['logsumexp_maxd'], '10.4f')} {f(r['prefill_top1'], '8.3f')} "
            f"{f(r['greedy_prefix'], '8.3f')} {f(r['greedy_all'], '8.3f')}")


HEADER = (f"{'variant':<8} {'case':<24} {'bits':<5} {'|d logit|':>10} {'rel':>9} {'|d lse|':>10} "
          f"{'top1':>8} {'greedy<':>8} {'greedy=':>8}")


def run_drift(golden: Path, image_dirs: list[Path], schemes: Iterable[str], variants: Iterable[str] = (),
              cases: Iterable[str] = (), emit: Callable[[str], None] = print) -> list[dict]:
    golden = Path(golden)
    selected = select(golden, variants, cases)
    rows: list[dict] = []
    emit("# quantised mode: drift against the float32 reference (no pass/fail)")
    emit(HEADER)
    for scheme in schemes:
        for v, chosen in selected:
            t0 = time.perf_counter()
            model = load_model(v.folder, torch.float32, quantize=scheme)
            processor = Processor.from_pretrained(v.folder)
            for case in chosen:
                r = drift_case(load_case(golden, v, case, model, processor), scheme, image_dirs)
                rows.append(r)
                emit(format_row(r))
            emit(f"# {v.name} {scheme}: {time.perf_counter() - t0:.1f} s")
    for scheme in schemes:  # per-variant summary: the greedy agreement asked for
        for name in dict.fromkeys(r["variant"] for r in rows):
            sel = [r for r in rows if r["variant"] == name and r["scheme"] == scheme and r["greedy_all"] is not None]
            if sel:
                emit(f"# {name} {scheme}: greedy tokens equal to the reference "
                     f"{sum(r['greedy_all'] for r in sel) / len(sel):.3f} (mean over {len(sel)} cases), "
                     f"prefill top-1 {sum(r['prefill_top1'] for r in sel) / len(sel):.3f}")
    return rows
