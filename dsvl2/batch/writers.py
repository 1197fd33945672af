"""OUT: which requests it already holds (resume), appending results durably, Parquet.

A result file is keyed: every line names the request it answers, and ``done()`` returns
those keys, so that a re-run skips them. The key of a dsvl2 result line is its ``id``;
the key of an OpenAI batch output line is given by ``openai_format.output_key``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Hashable

from .readers import JSONL_SUFFIXES, PARQUET_SUFFIXES, BatchInputError

KeyOf = Callable[[object, str], Hashable]  # (a parsed OUT line, where it is) -> its key, or BatchInputError


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


def row_key(rec: object, where: str) -> str:
    """The key of a dsvl2 result line: its id."""
    if isinstance(rec, dict) and "custom_id" in rec and "response" in rec:
        raise BatchInputError(f"{where} is an OpenAI batch output line, but INPUT is in dsvl2's row format; "
                              "pass another OUT")
    if not isinstance(rec, dict) or "id" not in rec:
        raise BatchInputError(f"{where} has no 'id'; is it a dsvl2 batch result?")
    return str(rec["id"])


class JsonlResults:
    """A JSONL result file: the keys it holds, and appending batches to it durably."""

    def __init__(self, path: Path, key: KeyOf = row_key):
        self.path = path
        self.key = key
        self.file = None

    def done(self) -> set:
        """Keys of the lines already in the file. A torn last line (the process died
        while writing it) is cut off, so that appending continues on a line boundary."""
        keys: set = set()
        if not self.path.exists():
            return keys
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
            keys.add(self.key(rec, f"OUT {str(self.path)!r} line {n}"))
        return keys

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
