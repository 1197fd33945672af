"""Batch inference on Ray Data: ``dsvl2 batch -m MODEL INPUT OUT``.

INPUT is a folder of images (one row per image file, found recursively, id = its path
relative to the folder, the prompt from ``--prompt``) or a JSONL / Parquet file of rows::

    {"id": "cat-1", "images": ["cats/1.jpg"], "prompt": "What breed?", "sampling": {"max_new_tokens": 64}}

(``images``: paths relative to the file's folder, or absolute; ``prompt`` defaults to
``--prompt``; ``sampling`` overrides the command-line sampling options for that row).
OUT gets one result per row::

    {"id": "cat-1", "text": "...", "finish_reason": "stop", "usage": {...}, "boxes": [...],
     "grounding_problems": [], "error": null}

Pipeline: rows -> drop the ids already in OUT -> ``ray.data.from_items`` ->
``map_batches(_Answerer)`` on a fixed pool of ``actors`` actors, each loading the model
once -> the driver receives each finished batch and appends it to OUT.

Notable choices:
* The driver writes OUT, not Ray's ``write_json`` / ``write_parquet`` (which write a
  folder of part files at the end): appending each batch as it arrives, flushed and
  fsynced, is what makes a run resumable. A crash or Ctrl-C loses at most the batches in
  flight; re-running the same command skips every id already in OUT. Rows are written in
  the order they finish, not the input order.
* Parquet cannot be appended to, so a Parquet OUT is built from a JSONL journal next to
  it (``OUT.partial.jsonl``): rows go to the journal as they arrive, and when the run ends
  (finished, interrupted or failed) journal and OUT are merged into a new OUT. A journal
  left by a killed run is merged by the next one.
* A row that fails (unreadable image, prompt longer than the context window, bad sampling
  values) becomes a result with ``error`` set and ``text`` null; it never stops the job.
  Such rows count as done: re-running does not retry them (delete their lines to retry).
  Problems with INPUT itself (not JSON, no id, duplicate ids) stop the job before any work
  starts, naming the line.
* One ``chat`` call per row by default, so every answer is exactly what
  ``dsvl2.load(MODEL).chat(prompt, images=[...])`` gives. ``rows_per_call > 1`` lets the
  engine batch rows (faster, above all on a GPU); in bfloat16 a batched row can then
  differ in the last bits from the same row answered alone.
* Fault tolerance is Ray Data's: an actor that dies (killed, its node lost) is restarted
  and its batches are retried, without limit (Ray Data's defaults, ``max_restarts=-1``,
  ``max_task_retries=-1``). Results are keyed by id, and the writer drops an id it has
  already written, so every row is in OUT exactly once.
* Image paths are resolved to absolute paths on the driver and read by the actors: on a
  multi-machine cluster they must be on storage every node mounts at the same path.
* Importing this module imports neither Ray nor torch (the CLI registers ``batch``
  without slowing ``dsvl2 chat``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

from .errors import DSVL2Error, GenerationError

DEFAULT_PROMPT = "Describe this image."
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")
PARQUET_SUFFIXES = (".parquet", ".pq")
SAMPLING_KEYS = ("temperature", "top_p", "top_k", "repetition_penalty", "max_new_tokens", "seed", "stop",
                 "stop_token_ids")
RESULT_KEYS = ("id", "text", "finish_reason", "usage", "boxes", "grounding_problems", "error")


class BatchInputError(DSVL2Error, ValueError):
    """INPUT or OUT cannot be read as a batch job (not JSON, no id, duplicate ids...)."""


@dataclass(frozen=True)
class Row:
    """One request: a prompt about some images, with its own sampling overrides."""

    id: str
    prompt: str
    images: tuple[str, ...] = ()  # absolute paths
    sampling: dict = field(default_factory=dict)


@dataclass
class BatchSummary:
    rows: int  # in INPUT
    skipped: int  # already in OUT before this run
    written: int  # new results written by this run
    errors: int  # of those, rows recorded with an error
    seconds: float
    out: Path


# ---------------------------------------------------------------------------------------
# reading INPUT
# ---------------------------------------------------------------------------------------

def read_rows(source: str | Path, prompt: str = DEFAULT_PROMPT) -> list[Row]:
    """The rows of a folder of images, a JSONL file or a Parquet file."""
    path = Path(source).expanduser()
    if path.is_dir():
        return _folder_rows(path, prompt)
    if not path.is_file():
        raise BatchInputError(f"INPUT not found: {str(path)!r} (pass a folder of images or a .jsonl/.parquet file)")
    suffix = path.suffix.lower()
    if suffix in JSONL_SUFFIXES:
        records = _jsonl_records(path)
    elif suffix in PARQUET_SUFFIXES:
        records = _parquet_records(path)
    else:
        raise BatchInputError(f"INPUT {str(path)!r}: unknown file type {suffix or '(none)'!r}; pass a folder of images, "
                              f"a JSONL file ({', '.join(JSONL_SUFFIXES)}) or a Parquet file ({', '.join(PARQUET_SUFFIXES)})")
    rows, where_of = [], {}
    for where, rec in records:
        row = _row(rec, where, path.parent.resolve(), prompt)
        if row.id in where_of:
            raise BatchInputError(f"{where}: id {row.id!r} is already used at {where_of[row.id]}; ids must be unique")
        where_of[row.id] = where
        rows.append(row)
    if not rows:
        raise BatchInputError(f"INPUT {str(path)!r} has no rows")
    return rows


def _folder_rows(folder: Path, prompt: str) -> list[Row]:
    files = sorted(p for p in folder.rglob("*")
                   if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                   and not any(part.startswith(".") for part in p.relative_to(folder).parts))
    if not files:
        raise BatchInputError(f"no image files ({', '.join(IMAGE_SUFFIXES)}) in the folder {str(folder)!r}")
    return [Row(p.relative_to(folder).as_posix(), prompt, (str(p.resolve()),)) for p in files]


def _jsonl_records(path: Path) -> Iterable[tuple[str, object]]:
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield f"{path.name} line {n}", json.loads(line)
            except json.JSONDecodeError as e:
                raise BatchInputError(f"{path.name} line {n} is not JSON ({e.msg}); "
                                      "each line must be one object with id, images, prompt") from None


def _parquet_records(path: Path) -> Iterable[tuple[str, object]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise BatchInputError("reading Parquet needs pyarrow: pip install 'dsvl2[ray]'") from None
    for n, rec in enumerate(pq.read_table(path).to_pylist()):
        yield f"{path.name} row {n}", rec


def _row(rec: object, where: str, base: Path, default_prompt: str) -> Row:
    if not isinstance(rec, dict):
        raise BatchInputError(f"{where}: a row must be an object with id, images, prompt, got {type(rec).__name__}")
    rid = rec.get("id")
    if isinstance(rid, bool) or not isinstance(rid, (str, int)) or rid == "":
        raise BatchInputError(f"{where}: 'id' must be a non-empty string or an integer, got {rid!r}")
    if "images" not in rec and "image" in rec:
        raise BatchInputError(f"{where}: unknown key 'image'; the list of image paths is called 'images'")
    images = rec.get("images") or []
    if isinstance(images, str):
        images = [images]
    if not isinstance(images, (list, tuple)) or not all(isinstance(p, str) and p for p in images):
        raise BatchInputError(f"{where}: 'images' must be a list of image paths, got {images!r}")
    prompt = rec.get("prompt")
    if prompt is None:
        prompt = default_prompt
    if not isinstance(prompt, str):
        raise BatchInputError(f"{where}: 'prompt' must be a string, got {type(prompt).__name__}")
    sampling = rec.get("sampling") or {}
    if isinstance(sampling, str):  # e.g. a Parquet column of JSON strings
        try:
            sampling = json.loads(sampling)
        except json.JSONDecodeError:
            raise BatchInputError(f"{where}: 'sampling' is a string but not JSON: {sampling!r}") from None
    if not isinstance(sampling, dict):
        raise BatchInputError(f"{where}: 'sampling' must be an object such as {{\"max_new_tokens\": 64}}, "
                              f"got {sampling!r}")
    paths = tuple(str((base / Path(p).expanduser()).resolve()) for p in images)
    return Row(str(rid), prompt, paths, {k: v for k, v in sampling.items() if v is not None})


def sampling_params(defaults: dict, overrides: dict):
    """``SamplingParams`` of the command line's options updated by a row's ``sampling``."""
    from .engine.sampling import SamplingParams

    unknown = sorted(set(overrides) - set(SAMPLING_KEYS))
    if unknown:
        raise GenerationError(f"unknown sampling option(s) {', '.join(map(repr, unknown))}; "
                              f"allowed: {', '.join(SAMPLING_KEYS)}")
    return SamplingParams(**{**defaults, **overrides})


# ---------------------------------------------------------------------------------------
# OUT: what is done, appending, Parquet
# ---------------------------------------------------------------------------------------

def out_format(out: str | Path, fmt: str | None = None) -> str:
    if fmt is not None:
        if fmt not in ("jsonl", "parquet"):
            raise BatchInputError(f"unknown format {fmt!r}; use jsonl or parquet")
        return fmt
    suffix = Path(out).suffix.lower()
    if suffix in JSONL_SUFFIXES:
        return "jsonl"
    if suffix in PARQUET_SUFFIXES:
        return "parquet"
    raise BatchInputError(f"cannot tell the format of OUT {str(out)!r} from its extension; "
                          "name it .jsonl or .parquet, or pass --format jsonl|parquet")


class JsonlResults:
    """A JSONL result file: the ids it holds, and appending batches to it durably."""

    def __init__(self, path: Path):
        self.path = path
        self.file = None

    def done(self) -> set[str]:
        """Ids already in the file. A torn last line (the process died while writing
        it) is cut off, so that appending continues on a line boundary."""
        ids: set[str] = set()
        if not self.path.exists():
            return ids
        if self.path.is_dir():
            raise BatchInputError(f"OUT {str(self.path)!r} is a folder; pass a file name ending in .jsonl")
        data = self.path.read_bytes()
        end = data.rfind(b"\n") + 1
        if end < len(data):
            with open(self.path, "r+b") as f:
                f.truncate(end)
        for n, line in enumerate(data[:end].splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                raise BatchInputError(f"OUT {str(self.path)!r} line {n} is not JSON; is it a dsvl2 batch result? "
                                      "Pass a new OUT or remove the line") from None
            if not isinstance(rec, dict) or "id" not in rec:
                raise BatchInputError(f"OUT {str(self.path)!r} line {n} has no 'id'; is it a dsvl2 batch result?")
            ids.add(str(rec["id"]))
        return ids

    def append(self, lines: list[str]) -> None:
        if self.file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.file = open(self.path, "a", encoding="utf-8")
        self.file.write("".join(line + "\n" for line in lines))
        self.file.flush()
        os.fsync(self.file.fileno())  # a batch costs minutes of compute: make it survive a crash

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


class ParquetResults:
    """A Parquet result file fed through a JSONL journal (Parquet cannot be appended to)."""

    def __init__(self, path: Path):
        self.path = path
        self.journal = JsonlResults(path.with_name(path.name + ".partial.jsonl"))

    def done(self) -> set[str]:
        ids = self.journal.done()
        if self.path.exists():
            import pyarrow.parquet as pq

            try:
                ids |= {str(i) for i in pq.read_table(self.path, columns=["id"]).column("id").to_pylist()}
            except Exception as e:  # pyarrow's errors have no common base worth naming
                raise BatchInputError(f"OUT {str(self.path)!r} cannot be read as a dsvl2 batch result ({e})") from None
        return ids

    def append(self, lines: list[str]) -> None:
        self.journal.append(lines)

    def close(self) -> None:
        self.journal.close()
        if not self.journal.path.exists():
            return
        import pyarrow as pa
        import pyarrow.parquet as pq

        new = [json.loads(line) for line in self.journal.path.read_text(encoding="utf-8").splitlines() if line.strip()]
        tables = [pq.read_table(self.path).cast(result_schema())] if self.path.exists() else []
        tables.append(pa.Table.from_pylist(new, schema=result_schema()))
        tmp = self.path.with_name(self.path.name + ".tmp")
        pq.write_table(pa.concat_tables(tables), tmp)
        os.replace(tmp, self.path)  # OUT is always a whole file: old or new, never half written
        self.journal.path.unlink()


def result_schema():
    """The Parquet schema of a result row (a function: pyarrow is imported only when used)."""
    import pyarrow as pa

    box = pa.struct([("label", pa.string()), ("box_norm", pa.list_(pa.int64())), ("box_px", pa.list_(pa.int64())),
                     ("image_index", pa.int64())])
    usage = pa.struct([("prompt_tokens", pa.int64()), ("completion_tokens", pa.int64()),
                       ("total_tokens", pa.int64())])
    return pa.schema([("id", pa.string()), ("text", pa.string()), ("finish_reason", pa.string()), ("usage", usage),
                      ("boxes", pa.list_(box)), ("grounding_problems", pa.list_(pa.string())),
                      ("error", pa.string())])


def open_results(out: str | Path, fmt: str) -> JsonlResults | ParquetResults:
    path = Path(out).expanduser()
    return ParquetResults(path) if fmt == "parquet" else JsonlResults(path)


# ---------------------------------------------------------------------------------------
# the actor: one model per actor, one result per row
# ---------------------------------------------------------------------------------------

class _Answerer:
    """The ``map_batches`` callable: loads the model once, answers a batch of requests.

    A batch is ``{"id": [...], "request": [JSON strings]}`` (JSON keeps Ray's column
    types simple whatever each row's sampling holds) and comes back as
    ``{"id": [...], "record": [JSON result lines]}``."""

    def __init__(self, model: str, dtype: str, device: str, quantize: str | None, threads: int, rows_per_call: int,
                 sampling: dict):
        import torch

        from .api import load

        torch.set_num_threads(threads)  # the CPUs Ray reserved for this actor, not the whole node
        self.model = load(model, dtype=dtype, device=device, quantize=quantize)
        self.rows_per_call = rows_per_call
        self.sampling = sampling

    def __call__(self, batch: dict) -> dict:
        ids = [str(i) for i in batch["id"]]
        requests = [json.loads(r) for r in batch["request"]]
        results: dict[str, dict] = {}
        for start in range(0, len(ids), self.rows_per_call):
            chunk = list(zip(ids[start:start + self.rows_per_call], requests[start:start + self.rows_per_call]))
            if len(chunk) > 1:
                results.update(self._together(chunk))
            for rid, req in chunk:
                if rid not in results:
                    results[rid] = self._alone(rid, req)
        return {"id": ids, "record": [json.dumps(results[i], ensure_ascii=False) for i in ids]}

    def _alone(self, rid: str, req: dict) -> dict:
        try:
            params = sampling_params(self.sampling, req["sampling"])
            answer = self.model.chat(req["prompt"], images=req["images"], params=params)
        except Exception as e:  # a bad row is a result, never the end of the job
            return error_record(rid, e)
        return answer_record(rid, answer)

    def _together(self, chunk: list[tuple[str, dict]]) -> dict[str, dict]:
        """Rows with the same sampling in one engine batch; {} if that fails (each row is
        then answered alone, so that only the bad row gets the error)."""
        from .api import user_turn

        groups: dict[str, list[tuple[str, dict]]] = {}
        for rid, req in chunk:
            groups.setdefault(json.dumps(req["sampling"], sort_keys=True), []).append((rid, req))
        out = {}
        for members in groups.values():
            try:
                params = sampling_params(self.sampling, members[0][1]["sampling"])
                convs = [[user_turn(req["prompt"], req["images"])] for _, req in members]
                answers = self.model.chat(convs, params=params)
            except Exception:
                continue
            out.update({rid: answer_record(rid, a) for (rid, _), a in zip(members, answers)})
        return out


def answer_record(rid: str, answer) -> dict:
    return {"id": rid, **answer.to_dict(), "error": None}


def error_record(rid: str, e: BaseException) -> dict:
    msg = str(e).strip() or type(e).__name__
    if not isinstance(e, DSVL2Error):  # a bug or an OS error, not a message written for users
        msg = f"{type(e).__name__}: {msg}"
    return {"id": rid, "text": None, "finish_reason": None, "usage": None, "boxes": [], "grounding_problems": [],
            "error": msg}


# ---------------------------------------------------------------------------------------
# the job
# ---------------------------------------------------------------------------------------

def _model_for_actors(model: str | Path) -> str:
    """A local folder is checked here and passed as an absolute path (actors do not run in
    our working directory); 'demo' and Hugging Face ids are resolved by each actor."""
    from .hub import resolve_model

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
              quantize: str | None = None, address: str | None = None, fmt: str | None = None,
              on_batch: Callable[[list[dict]], None] | None = None,
              log: Callable[[str], None] | None = None) -> BatchSummary:
    """Answer every row of ``source`` not yet in ``out`` on Ray; see the module docstring.

    ``address``: None starts a local Ray instance (with the machine's CPUs), otherwise
    the cluster to join. ``on_batch`` is called with each batch's result records after
    they are written. ``log`` receives progress lines (default: stderr)."""
    from .engine.sampling import SamplingParams

    log = log or (lambda line: print(line, file=sys.stderr, flush=True))
    t0 = time.perf_counter()
    for name, value, minimum in (("actors (--actors)", actors, 1), ("batch_size (--batch-size)", batch_size, 1),
                                 ("rows_per_call (--rows-per-call)", rows_per_call, 1),
                                 ("cpus_per_actor (--cpus-per-actor)", cpus_per_actor, 0),
                                 ("gpus_per_actor (--gpus-per-actor)", gpus_per_actor, 0)):
        _check(name, value, minimum)
    sampling = dict(sampling or {})
    SamplingParams(**sampling)  # bad defaults fail now, not once per row
    fmt = out_format(out, fmt)
    rows = read_rows(source, prompt)
    results = open_results(out, fmt)
    done = results.done()
    todo = [r for r in rows if r.id not in done]
    skipped = len(rows) - len(todo)
    if not todo:
        log(f"dsvl2 batch: all {len(rows)} rows of INPUT are already in {out}; nothing to do")
        results.close()  # merges a journal a killed Parquet run left behind
        return BatchSummary(len(rows), skipped, 0, 0, time.perf_counter() - t0, Path(out))
    model_ref = _model_for_actors(model)

    from .ray_connect import connected

    written = errors = 0
    try:
        with connected(address, num_cpus=None) as local:
            import ray

            _check_resources(ray, actors, cpus_per_actor, gpus_per_actor, local, log)
            log(f"dsvl2 batch: {len(rows)} rows, {skipped} already in {out}, {len(todo)} to answer "
                f"on {actors} actor(s) (Ray {ray.__version__})")
            seen = set(done)
            for batch in _pipeline(ray, todo, model_ref, sampling, actors, batch_size, rows_per_call,
                                   cpus_per_actor, gpus_per_actor, dict(dtype=dtype, device=device,
                                                                        quantize=quantize)):
                lines, records = [], []
                for rid, line in zip(batch["id"], batch["record"]):
                    if str(rid) in seen:  # a retried batch must not write a row twice
                        continue
                    seen.add(str(rid))
                    lines.append(str(line))
                    records.append(json.loads(line))
                results.append(lines)
                written += len(records)
                errors += sum(r["error"] is not None for r in records)
                elapsed = time.perf_counter() - t0
                log(f"dsvl2 batch: {skipped + written}/{len(rows)} rows done ({written} new, {errors} with errors), "
                    f"{written / elapsed:.2f} new rows/s")
                if on_batch is not None:
                    on_batch(records)
    finally:
        results.close()
    return BatchSummary(len(rows), skipped, written, errors, time.perf_counter() - t0, Path(out))


def _check_resources(ray, actors: int, cpus: float, gpus: float, local: bool, log) -> None:
    have = ray.cluster_resources()
    for what, per in (("CPU", cpus), ("GPU", gpus)):
        need, total = actors * per, have.get(what, 0)
        if need > total:
            msg = (f"{actors} actor(s) x {per:g} {what}(s) each need {need:g} {what}s, "
                   f"but the Ray cluster has {total:g}")
            if local:  # a local instance never grows: the job would wait forever
                raise DSVL2Error(f"{msg}; use fewer --actors or a smaller --{what.lower()}s-per-actor")
            log(f"dsvl2 batch: warning: {msg}; the job waits until the cluster grows")


def _pipeline(ray, todo: list[Row], model: str, sampling: dict, actors: int, batch_size: int, rows_per_call: int,
              cpus: float, gpus: float, load_kwargs: dict):
    """Yield the result batches as the actors finish them."""
    import logging

    import ray.data
    from ray.util.debug import log_once

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # one line per written batch instead (see run_batch)
    log_once("ray_data_progress_manager_disabled")  # ... and no warning that Ray's bars are off
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    items = [{"id": r.id, "request": json.dumps({"prompt": r.prompt, "images": list(r.images),
                                                 "sampling": r.sampling})} for r in todo]
    ds = ray.data.from_items(items).map_batches(
        _Answerer, batch_size=batch_size, batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=actors),
        fn_constructor_kwargs=dict(model=model, **load_kwargs, threads=max(1, int(cpus)),
                                   rows_per_call=rows_per_call, sampling=sampling),
        num_cpus=cpus, num_gpus=gpus)
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


# ---------------------------------------------------------------------------------------
# the command line
# ---------------------------------------------------------------------------------------

EPILOG = """examples:
  dsvl2 batch -m ./deepseek-vl2-tiny photos/ captions.jsonl
  dsvl2 batch -m ./deepseek-vl2-tiny --prompt "List the objects." photos/ objects.parquet
  dsvl2 batch -m ./deepseek-vl2-tiny requests.jsonl out.jsonl --actors 4 --address auto

INPUT rows (JSONL, or Parquet with the same columns):
  {"id": "a1", "images": ["a1.jpg"], "prompt": "What is this?", "sampling": {"max_new_tokens": 64}}
Re-running the same command skips the ids already in OUT (resume after a crash or Ctrl-C)."""


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``dsvl2 batch`` on the CLI's subparsers."""
    p = subparsers.add_parser("batch", help="answer every image / row of a dataset on Ray (resumable)",
                              description="Answer every image of a folder, or every row of a JSONL/Parquet file, "
                              "on Ray Data actors; results go to OUT (JSONL or Parquet) as they finish.",
                              epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("input", metavar="INPUT", help="a folder of images, or a .jsonl/.parquet file of rows")
    p.add_argument("out", metavar="OUT", help="result file (.jsonl or .parquet); rows already in it are skipped")
    p.add_argument("-m", "--model", required=True, help="checkpoint folder, Hugging Face id, or 'demo'")
    p.add_argument("--prompt", default=DEFAULT_PROMPT, help=f"prompt for rows without one (default: {DEFAULT_PROMPT!r})")
    p.add_argument("--format", choices=["jsonl", "parquet"], help="OUT's format (default: from its extension)")
    r = p.add_argument_group("Ray")
    r.add_argument("--actors", type=int, default=1, help="model copies answering in parallel (default 1)")
    r.add_argument("--batch-size", type=int, default=4, help="rows per Ray batch, written together (default 4)")
    r.add_argument("--rows-per-call", type=int, default=1,
                   help="rows the engine answers together (default 1: exactly the answers of one chat call each)")
    r.add_argument("--cpus-per-actor", type=float, default=1, help="CPUs (and torch threads) per actor (default 1)")
    r.add_argument("--gpus-per-actor", type=float, default=0, help="GPUs per actor (default 0)")
    r.add_argument("--address", help="join this Ray cluster (auto, HOST:PORT, ray://HOST:10001); "
                   "default: start a local Ray instance")
    g = p.add_argument_group("sampling (default: greedy; a row's 'sampling' overrides these)")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0, help="0 = off")
    g.add_argument("--repetition-penalty", type=float, default=1.0, help="1 = off")
    g.add_argument("--max-new-tokens", type=int, default=512)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop string (repeatable)")
    t = p.add_argument_group("runtime")
    t.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="auto = bf16 weights, fp32 compute on CPU")
    t.add_argument("--device", default="auto", help="auto, cpu, cuda or mps (on each actor)")
    t.add_argument("--quantize", choices=["int8", "int4"], default=None,
                   help="quantize the language model's weights while loading (less memory per actor)")
    p.set_defaults(func=cmd_batch)
    return p


def cmd_batch(args) -> int:
    sampling = dict(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                    repetition_penalty=args.repetition_penalty, max_new_tokens=args.max_new_tokens, seed=args.seed)
    if args.stop:
        sampling["stop"] = tuple(args.stop)
    try:
        summary = run_batch(args.model, args.input, args.out, prompt=args.prompt, sampling=sampling,
                            actors=args.actors, batch_size=args.batch_size, rows_per_call=args.rows_per_call,
                            cpus_per_actor=args.cpus_per_actor, gpus_per_actor=args.gpus_per_actor,
                            dtype=args.dtype, device=args.device, quantize=args.quantize, address=args.address,
                            fmt=args.format)
    except GenerationError as e:  # name the command-line flag, not the dataclass field
        msg = str(e)
        for name in SAMPLING_KEYS:
            msg = msg.replace(f"SamplingParams.{name}", "--" + name.replace("_", "-"))
        raise GenerationError(msg) from None
    except KeyboardInterrupt:
        print(f"\ndsvl2 batch: the results so far are in {args.out}; run the same command again to continue",
              file=sys.stderr)
        raise
    print(f"dsvl2 batch: wrote {summary.written} new row(s) ({summary.errors} with errors) to {summary.out} "
          f"in {summary.seconds:.1f} s; {summary.skipped} were already there", file=sys.stderr)
    return 0
