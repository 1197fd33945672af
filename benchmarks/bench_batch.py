"""Batch-inference benchmark: images/s of ``dsvl2.batch.run_batch`` with 1, 2, ... actors
on a local Ray instance, beside the same rows answered in this process without Ray.
Prints ONE JSON object on stdout (progress goes to stderr). Never asserted by a test.

    python benchmarks/bench_batch.py                                  # demo model, 1 and 2 actors
    python benchmarks/bench_batch.py --rows 24 --max-new-tokens 32 --actors 1,2
    python benchmarks/bench_batch.py --model /tmp/dsvl2-tiny --actors 1 --cpus-per-actor 2 \\
        --rows 3 --max-new-tokens 8 --no-baseline                     # the real tiny size

The rows are the repository's test images (tests/data/images) in turn, ``--rows`` distinct
files in a temporary folder (one pixel changed per copy), with the default prompt; greedy.

What is measured, per actor count (a fresh OUT each time):
* ``wall_s``: the whole ``run_batch`` call: starting Ray, starting the actors (each
  imports torch and loads the model), answering, writing. ``images_per_s`` = rows / wall.
* ``first_result_s``: until the first row is written (start-up plus one row).
* ``steady_images_per_s``: rows written in the second half of the job divided by the time
  they took: the rate once the actors are up, which is what a long job sees.
* ``baseline``: the same rows answered one ``chat`` call each in this process (no Ray),
  with ``--cpus-per-actor`` torch threads, after one untimed warm-up call: what one actor
  does without Ray, to compare with ``steady_images_per_s`` of 1 actor.
  Skipped with ``--no-baseline`` (a real-size model must not be in memory twice).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
IMAGES = REPO / "tests" / "data" / "images"


def log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def make_rows(folder: Path, rows: int) -> list[Path]:
    """``rows`` distinct images: the test images in turn, each copy with one pixel changed
    (PNG), so that no row repeats another's image content and the engine's prefix cache
    cannot skip a repeated image's work."""
    from PIL import Image

    sources = sorted(p for p in IMAGES.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    paths = []
    for i in range(rows):
        src = sources[i % len(sources)]
        img = Image.open(src).convert("RGB")
        img.putpixel((0, 0), (i % 256, i // 256 % 256, 7))
        dst = folder / f"{i:04d}_{src.stem}.png"
        img.save(dst)
        paths.append(dst)
    return paths


def baseline(model: str, paths: list[Path], prompt: str, max_new_tokens: int, threads: int, dtype: str) -> dict:
    import torch

    import dsvl2

    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    m = dsvl2.load(model, dtype=dtype, device="cpu")
    load_s = time.perf_counter() - t0
    m.chat(prompt, images=[str(paths[0])], max_new_tokens=1)  # warm-up (first-call costs), not timed
    t1 = time.perf_counter()
    tokens = 0
    for p in paths:
        tokens += m.chat(prompt, images=[str(p)], max_new_tokens=max_new_tokens).completion_tokens
    answer_s = time.perf_counter() - t1
    del m
    gc.collect()
    return {"threads": threads, "load_s": round(load_s, 2), "answer_s": round(answer_s, 2),
            "images_per_s": round(len(paths) / answer_s, 3), "completion_tokens": tokens}


def ray_run(model: str, folder: Path, out: Path, actors: int, args) -> dict:
    from dsvl2.batch import DEFAULT_PROMPT, run_batch

    stamps: list[tuple[float, int]] = []
    t0 = time.perf_counter()
    summary = run_batch(model, folder, out, prompt=DEFAULT_PROMPT, sampling={"max_new_tokens": args.max_new_tokens},
                        actors=actors, batch_size=args.batch_size, rows_per_call=args.rows_per_call,
                        cpus_per_actor=args.cpus_per_actor, dtype=args.dtype, device="cpu",
                        on_batch=lambda recs: stamps.append((time.perf_counter() - t0, len(recs))))
    wall = time.perf_counter() - t0
    # Steady rate over the second half of the writes: the first results can arrive in a
    # burst (rows finished while the pipeline was still starting), which would inflate it.
    mid = len(stamps) // 2
    after = sum(n for _, n in stamps[mid + 1:])
    span = stamps[-1][0] - stamps[mid][0]
    return {"actors": actors, "cpus_per_actor": args.cpus_per_actor, "rows": summary.written,
            "errors": summary.errors, "wall_s": round(wall, 2), "images_per_s": round(summary.written / wall, 3),
            "first_result_s": round(stamps[0][0], 2),
            "steady_images_per_s": round(after / span, 3) if span > 0 and after else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="demo")
    ap.add_argument("--actors", default="1,2", help="comma-separated actor counts")
    ap.add_argument("--rows", type=int, default=22, help="images in the job (the test images, repeated)")
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=1, help="rows per Ray batch")
    ap.add_argument("--rows-per-call", type=int, default=1)
    ap.add_argument("--cpus-per-actor", type=float, default=1)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--no-baseline", action="store_true")
    args = ap.parse_args()

    import ray

    import dsvl2.batch  # noqa: F401  (fail early if the package is missing)

    report = {"benchmark": "bench_batch", "ray_version": ray.__version__, "model": args.model,
              "cpu_count": os.cpu_count(), "load_avg_at_start": [round(x, 2) for x in os.getloadavg()],
              "rows": args.rows, "max_new_tokens": args.max_new_tokens, "batch_size": args.batch_size,
              "rows_per_call": args.rows_per_call, "dtype": args.dtype}
    with tempfile.TemporaryDirectory(prefix="dsvl2-bench-batch-") as tmp:
        folder = Path(tmp) / "images"
        folder.mkdir()
        paths = make_rows(folder, args.rows)
        if not args.no_baseline:
            log("baseline: answering in this process ...")
            report["baseline"] = baseline(args.model, paths, dsvl2.batch.DEFAULT_PROMPT, args.max_new_tokens,
                                          max(1, int(args.cpus_per_actor)), args.dtype)
        runs = []
        for n in (int(a) for a in args.actors.split(",")):
            log(f"ray: {n} actor(s) ...")
            runs.append(ray_run(args.model, folder, Path(tmp) / f"out-{n}.jsonl", n, args))
        report["runs"] = runs
    report["load_avg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
