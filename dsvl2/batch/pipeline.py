"""The job: INPUT -> what OUT lacks -> Ray Data actors -> OUT (``run_batch``)."""

from __future__ import annotations

import json
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..errors import DSVL2Error
from . import openai_format
from .answer import Answerer, ChatAnswerer
from .readers import DEFAULT_PROMPT, BatchInputError, input_path, read_rows
from .writers import JsonlResults, ParquetResults, open_results, out_format


@dataclass
class BatchSummary:
    rows: int  # requests in INPUT (rows, images, or lines of an OpenAI batch file)
    skipped: int  # already in OUT before this run
    written: int  # new results written by this run
    errors: int  # of those, results recorded with an error
    seconds: float
    out: Path


@dataclass
class _Job:
    """One INPUT format's share of a run: what to answer and how, what OUT already has."""

    total: int
    results: JsonlResults | ParquetResults
    items: list[dict]  # {"id": key, "request": JSON} for the actors
    actor: type
    options: dict  # the actor's setup options
    is_error: Callable[[dict], bool]
    noun: str
    refused: list[dict] = field(default_factory=list)  # output lines written at once, no model needed


def _rows_job(path: Path, out: str | Path, fmt: str, prompt: str, sampling: dict, rows_per_call: int) -> _Job:
    rows = read_rows(path, prompt)
    results = open_results(out, fmt)
    done = results.done()
    items = [{"id": r.id, "request": json.dumps({"prompt": r.prompt, "images": list(r.images),
                                                 "sampling": r.sampling})}
             for r in rows if r.id not in done]
    return _Job(len(rows), results, items, Answerer, dict(rows_per_call=rows_per_call, sampling=sampling),
                lambda rec: rec["error"] is not None, "rows")


def _openai_job(path: Path, out: str | Path, fmt: str, model: str | Path, sampling: dict,
                rows_per_call: int) -> _Job:
    if fmt != "jsonl":
        raise BatchInputError(f"INPUT {str(path)!r} is an OpenAI batch file, whose results are JSONL lines "
                              "(OpenAI's batch output format); name OUT .jsonl")
    batch = openai_format.read_openai_batch(path)
    results = JsonlResults(Path(out).expanduser(), key=openai_format.output_key)
    done = results.done()
    items = [{"id": r.custom_id, "request": json.dumps(r.body)} for r in batch.requests if r.custom_id not in done]
    refused = [rec for key, rec in batch.refused if key not in done]
    options = dict(rows_per_call=rows_per_call, sampling=sampling, served_model_name=str(model),
                   image_dir=str(path.parent.resolve()))
    return _Job(batch.lines, results, items, ChatAnswerer, options, openai_format.is_error, "requests", refused)


def _model_for_actors(model: str | Path) -> str:
    """A local folder is checked here and passed as an absolute path (actors do not run in
    our working directory); 'demo' and Hugging Face ids are resolved by each actor."""
    from ..checkpoint.hub import resolve_model

    text = str(model)
    if text == "demo":
        return text
    path = Path(text).expanduser()
    if path.exists() or text.startswith((".", "/", "~")):
        return str(resolve_model(path).resolve())
    return text


def _check(name: str, value, minimum) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < minimum:
        raise DSVL2Error(f"{name} must be a number >= {minimum}, got {value!r}")


def run_batch(model: str | Path, source: str | Path, out: str | Path, *, prompt: str = DEFAULT_PROMPT,
              sampling: dict | None = None, actors: int = 1, batch_size: int = 4, rows_per_call: int = 1,
              cpus_per_actor: float = 1, gpus_per_actor: float = 0, dtype: str = "auto", device: str = "auto",
              quantize: str | None = None, kv_cache_bytes: int | None = None, address: str | None = None,
              fmt: str | None = None,
              on_batch: Callable[[list[dict]], None] | None = None,
              log: Callable[[str], None] | None = None) -> BatchSummary:
    """Answer every request of ``source`` not yet in ``out`` on Ray; see the package docstring.

    ``source``: a folder of images, a JSONL / Parquet file of rows, or an OpenAI batch file
    (told apart by its first non-empty line; ``prompt`` is then unused, and ``sampling``
    fills in what a body does not set). ``address``: None starts a local Ray instance
    (with the machine's CPUs), otherwise the cluster to join. ``kv_cache_bytes``: each
    actor's KV-cache budget (None: derived from the memory free after its weights).
    ``on_batch`` is called with each batch's result records after they are written.
    ``log`` receives progress lines (default: stderr)."""
    from ..engine.sampling import SamplingParams

    log = log or (lambda line: print(line, file=sys.stderr, flush=True))
    t0 = time.perf_counter()
    for name, value, minimum in (("actors (--actors)", actors, 1), ("batch_size (--batch-size)", batch_size, 1),
                                 ("rows_per_call (--rows-per-call)", rows_per_call, 1),
                                 ("cpus_per_actor (--cpus-per-actor)", cpus_per_actor, 0),
                                 ("gpus_per_actor (--gpus-per-actor)", gpus_per_actor, 0)):
        _check(name, value, minimum)
    if kv_cache_bytes is not None:
        _check("kv_cache_bytes (--kv-cache-bytes)", kv_cache_bytes, 1)
    sampling = dict(sampling or {})
    SamplingParams(**sampling)  # bad defaults fail now, not once per row
    fmt = out_format(out, fmt)
    path = input_path(source)
    if openai_format.is_openai_batch(path):
        job = _openai_job(path, out, fmt, model, sampling, rows_per_call)
    else:
        job = _rows_job(path, out, fmt, prompt, sampling, rows_per_call)
    skipped = job.total - len(job.items) - len(job.refused)
    written = errors = 0
    try:
        if not job.items and not job.refused:
            log(f"dsvl2 batch: all {job.total} {job.noun} of INPUT are already in {out}; nothing to do")
            return BatchSummary(job.total, skipped, 0, 0, time.perf_counter() - t0, Path(out))
        model_ref = _model_for_actors(model) if job.items else None  # a bad model fails before OUT is touched

        def write(records: list[dict], lines: list[str]) -> None:
            nonlocal written, errors
            job.results.append(lines)
            written += len(records)
            errors += sum(job.is_error(r) for r in records)
            elapsed = time.perf_counter() - t0
            log(f"dsvl2 batch: {skipped + written}/{job.total} {job.noun} done ({written} new, {errors} with "
                f"errors), {written / elapsed:.2f} new {job.noun}/s")
            if on_batch is not None:
                on_batch(records)

        if job.refused:  # lines that cannot be requests: their error lines need no model
            write(job.refused, [json.dumps(r, ensure_ascii=False) for r in job.refused])
        if not job.items:
            return BatchSummary(job.total, skipped, written, errors, time.perf_counter() - t0, Path(out))

        from ..ray_connect import connected

        with connected(address, num_cpus=None) as local:
            import ray

            check_resources(ray, actors, cpus_per_actor, gpus_per_actor, local, log)
            log(f"dsvl2 batch: {job.total} {job.noun}, {skipped} already in {out}, {len(job.items)} to answer "
                f"on {actors} actor(s) (Ray {ray.__version__})")
            seen = {item["id"] for item in job.items}  # what this run may write, each once
            load = dict(model=model_ref, dtype=dtype, device=device, quantize=quantize,
                        kv_cache_bytes=kv_cache_bytes, threads=max(1, int(cpus_per_actor)))
            for batch in ray_pipeline(ray, job.items, job.actor, {**load, **job.options}, actors, batch_size,
                                      cpus_per_actor, gpus_per_actor):
                lines, records = [], []
                for rid, line in zip(batch["id"], batch["record"]):
                    if str(rid) not in seen:  # a retried batch must not write a request twice
                        continue
                    seen.discard(str(rid))
                    lines.append(str(line))
                    records.append(json.loads(line))
                if records:
                    write(records, lines)
    finally:
        job.results.close()  # for Parquet: merges the journal (a killed run's too)
    return BatchSummary(job.total, skipped, written, errors, time.perf_counter() - t0, Path(out))


def check_resources(ray, actors: int, cpus: float, gpus: float, local: bool, log) -> None:
    have = ray.cluster_resources()
    for what, per in (("CPU", cpus), ("GPU", gpus)):
        need, total = actors * per, have.get(what, 0)
        if need > total:
            msg = (f"{actors} actor(s) x {per:g} {what}(s) each need {need:g} {what}s, "
                   f"but the Ray cluster has {total:g}")
            if local:  # a local instance never grows: the job would wait forever
                raise DSVL2Error(f"{msg}; use fewer --actors or a smaller --{what.lower()}s-per-actor")
            log(f"dsvl2 batch: warning: {msg}; the job waits until the cluster grows")


def ray_pipeline(ray, items: list[dict], actor: type, actor_kwargs: dict, actors: int, batch_size: int,
                 cpus: float, gpus: float):
    """Yield the result batches as the actors finish them."""
    import logging

    import ray.data
    from ray.util.debug import log_once

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # one line per written batch instead (see run_batch)
    log_once("ray_data_progress_manager_disabled")  # ... and no warning that Ray's bars are off
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    ds = ray.data.from_items(items).map_batches(
        actor, batch_size=batch_size, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=actors),
        fn_constructor_kwargs=actor_kwargs, num_cpus=cpus, num_gpus=gpus)
    try:
        yield from ds.iter_batches(batch_size=None, batch_format="numpy")
    except ray.exceptions.RayError as e:
        raise DSVL2Error(f"the Ray job failed: {_root_message(e)}") from None  # re-running resumes


def _root_message(e: BaseException) -> str:
    """The message worth showing from a Ray error: a DSVL2Error raised inside an actor
    (Ray passes it on as text, inside a formatted traceback, e.g. a model that cannot be
    loaded), else the last line of the innermost message."""
    texts = []
    while e is not None and len(texts) < 10:
        texts.append(str(e))
        e = getattr(e, "cause", None) or e.__cause__
    for text in texts:
        found = re.findall(r"^dsvl2\.errors\.\w+: (.+)$", text, flags=re.M)
        if found:
            return found[-1]
    lines = [line.strip() for text in texts for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else "unknown error"
