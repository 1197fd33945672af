"""Verify an installation against a golden oracle tree produced by the official reference.

    python -m dsvl2.commands.oracle GOLDEN_DIR --images DIR [--images DIR ...] [--variant V ...] [--case C ...]

Everything is discovered, nothing is hard-coded: variants and their processor sets from
``GOLDEN_DIR/manifest.json`` (or, without one, every folder holding a ``config.json``),
cases from ``processor/<set>/<case>/case.json`` that also have
``<variant>/outputs/<case>.safetensors``. Each variant's checkpoint, tokenizer and
``processor_config.json`` are loaded from its own folder; images are looked up by name in
the ``--images`` folders.

Per variant x case it prints one line per check and ends with ``N passed, M failed``;
the exit status is 0 only if nothing failed. Tolerances are the ones the golden README
recommends (float32):

* processor: ids, masks, crops exactly equal; pixels bit-exact;
* vision / projector outputs: atol = rtol = 1e-4; per-tile sums within 1e-5 of the
  tile's absolute sum;
* ``inputs_embeds``: atol 1e-5;
* routing: chosen experts equal wherever the reference's decision margin >= 1e-5
  (closer decisions are "either answer"); weights atol 1e-5 where the experts agree;
* prefill logits / hidden states: atol = rtol = 1e-4 at every valid position, except
  positions whose near-tie routing decision went the other way here (those, and the
  rest of their row at 1e-3, are reported but not failed: a flipped near-tie moves that
  token's logits by up to ~0.5 and later ones by ~1e-4);
* prefill top-1 (``logits.argmax``): equal at every position, except float32 near-ties:
  where the reference's token scores within the logits tolerance of our maximum (e.g.
  3.6079900 vs 3.6079910), either token is right; such ties are counted in the line;
* generation: greedy ids equal; decode-step scores atol 1e-4; chunked prefill (chunk
  128) and every batch row run alone give the same ids as the reference's ``gen_ids``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from ...errors import DSVL2Error
from .checks import TOL, Check, discover, run, select
from .drift import run_drift

__all__ = ["TOL", "Check", "discover", "main", "run", "run_drift", "select"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dsvl2.commands.oracle", description=__doc__.split("\n\n")[0])
    ap.add_argument("golden", type=Path, help="golden oracle folder (with manifest.json, processor/, <variant>/)")
    ap.add_argument("--images", type=Path, action="append", required=True, help="folder with the input images (repeatable)")
    ap.add_argument("--variant", action="append", default=[], help="only this variant (repeatable)")
    ap.add_argument("--case", action="append", default=[], help="only this case (repeatable)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--quantize", action="append", choices=["int8", "int4"], default=[],
                    help="quantised mode: report the drift of these weights against the reference (repeatable)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.golden.is_dir():
        print(f"error: {args.golden}: golden folder not found", file=sys.stderr)
        return 2
    if args.quantize:  # a report, not a verification: see drift.py
        try:
            rows = run_drift(args.golden, args.images, args.quantize, args.variant, args.case)
        except DSVL2Error as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        return 0 if rows else 1
    t0 = time.perf_counter()
    try:
        results = run(args.golden, args.images, args.variant, args.case)
    except DSVL2Error as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    passed = sum(r.ok for r in results)
    failed = len(results) - passed
    print(f"# total {time.perf_counter() - t0:.1f} s")
    if not results:
        print("error: no check ran (no variant x case matched)", file=sys.stderr)
        return 1
    print(f"{passed} passed, {failed} failed")
    return 0 if failed == 0 else 1

