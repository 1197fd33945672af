"""Reading INPUT in dsvl2's own formats: a folder of images, or rows of a JSONL / Parquet file.

(An OpenAI batch file is read by ``openai_format``; ``pipeline.run_batch`` tells the two
apart by the first non-empty line.)
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from ..errors import DSVL2Error, GenerationError

DEFAULT_PROMPT = "Describe this image."
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")
PARQUET_SUFFIXES = (".parquet", ".pq")
SAMPLING_KEYS = ("temperature", "top_p", "top_k", "repetition_penalty", "max_new_tokens", "seed", "stop",
                 "stop_token_ids")


class BatchInputError(DSVL2Error, ValueError):
    """INPUT or OUT cannot be read as a batch job (not JSON, no id, duplicate ids...)."""


@dataclass(frozen=True)
class Row:
    """One request: a prompt about some images, with its own sampling overrides."""

    id: str
    prompt: str
    images: tuple[str, ...] = ()  # absolute paths
    sampling: dict = field(default_factory=dict)


def input_path(source: str | Path) -> Path:
    """INPUT as a path that exists (a folder or a file), or the error that says what to pass."""
    path = Path(source).expanduser()
    if not (path.is_dir() or path.is_file()):
        raise BatchInputError(f"INPUT not found: {str(path)!r} (pass a folder of images, a .jsonl/.parquet file "
                              "of rows or an OpenAI batch file)")
    return path


def read_rows(source: str | Path, prompt: str = DEFAULT_PROMPT) -> list[Row]:
    """The rows of a folder of images, a JSONL file or a Parquet file."""
    path = input_path(source)
    if path.is_dir():
        return _folder_rows(path, prompt)
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
                raise BatchInputError(f"{path.name} line {n} is not JSON ({e.msg}); each line must be one object "
                                      "with id, images, prompt (or, in an OpenAI batch file, custom_id, method, "
                                      "url, body)") from None


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
    from ..engine.sampling import SamplingParams

    unknown = sorted(set(overrides) - set(SAMPLING_KEYS))
    if unknown:
        raise GenerationError(f"unknown sampling option(s) {', '.join(map(repr, unknown))}; "
                              f"allowed: {', '.join(SAMPLING_KEYS)}")
    return SamplingParams(**{**defaults, **overrides})
