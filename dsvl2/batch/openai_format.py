"""OpenAI's batch file format: request lines in, output lines out.

An input line (https://platform.openai.com/docs/api-reference/batch/request-input)::

    {"custom_id": "q1", "method": "POST", "url": "/v1/chat/completions",
     "body": {"model": "...", "messages": [...], "max_tokens": 64}}

An output line (OpenAI's ``BatchRequestOutput``, the same shape in its output and error
files)::

    {"id": "batch_req_...", "custom_id": "q1",
     "response": {"status_code": 200, "request_id": "req_...", "body": {chat.completion}},
     "error": null}

As on OpenAI, a request the chat endpoint refuses is a *response* with its HTTP status
and the API's error body (``{"status_code": 400, "body": {"error": {"message", "type",
"param", "code"}}}``, ``"error": null``); a line that never becomes a request (not JSON,
no ``custom_id``, another method or URL) has ``"response": null`` and ``"error": {"code",
"message"}``, with ``custom_id`` null when it cannot be read.

Bodies are checked by the HTTP server's own parser (``dsvl2.server.schema``), so a body
gets the answer and the 400 message the API would give. Importing this module imports
neither Ray nor torch (``dsvl2.server.schema`` and ``dsvl2.server.errors`` do not).
"""

from __future__ import annotations

import hashlib
import json
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Hashable

from ..errors import DSVL2Error
from ..server.errors import APIError, bad_request, from_dsvl2
from ..server.schema import ChatRequest, parse_chat_request, parse_json
from .readers import JSONL_SUFFIXES, BatchInputError

METHOD = "POST"
URL = "/v1/chat/completions"
_REMOTE = ("http://", "https://")


@dataclass(frozen=True)
class ChatLine:
    """A line that is a chat request (its body passed the server's parser)."""

    custom_id: str
    body: dict
    where: str  # "requests.jsonl line 3"


@dataclass
class OpenAIBatch:
    """An OpenAI batch file, read: the requests to answer, and an output record for every
    line that cannot be one (with the key that marks it done in OUT)."""

    requests: list[ChatLine] = field(default_factory=list)
    refused: list[tuple[Hashable, dict]] = field(default_factory=list)

    @property
    def lines(self) -> int:
        return len(self.requests) + len(self.refused)


def is_openai_batch(path: Path) -> bool:
    """Whether ``path`` is a JSONL file whose first non-empty line is an object with
    ``custom_id`` and ``body`` (OpenAI's batch format; else dsvl2's rows)."""
    if not path.is_file() or path.suffix.lower() not in JSONL_SUFFIXES:
        return False
    with open(path, "rb") as f:
        for line in f:
            if line.strip():
                try:
                    first = json.loads(line)
                except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
                    return False
                return isinstance(first, dict) and "custom_id" in first and "body" in first
    return False


def chat_request(body: object) -> ChatRequest:
    """A batch line's ``body`` -> ``ChatRequest``, checked as ``POST /v1/chat/completions``
    checks it, plus what a batch cannot do; raises the API's 400 ``APIError``."""
    if not isinstance(body, dict):  # the API's own message for a body that is not an object
        parse_json(json.dumps(body).encode())
    req = parse_chat_request(body)
    if req.stream:
        raise bad_request("stream is not supported in a batch (each answer is written whole to the output file); "
                          "remove \"stream\" or set it to false", param="stream", code="unsupported_value")
    for ref in req.image_refs:
        if ref.url.lower().startswith(_REMOTE):
            raise bad_request(f"{ref.param}: dsvl2 batch does not fetch remote images ({ref.url[:80]!r}); send the "
                              "image as a data:image/<format>;base64,... URL or as a path relative to the batch "
                              "file's folder", param=ref.param, code="invalid_image_url")
    return req


def read_openai_batch(path: Path) -> OpenAIBatch:
    """Every non-empty line of ``path``: a request, or the output record that refuses it.

    A ``custom_id`` used twice is an error of the whole file (``BatchInputError``, naming
    both lines), as OpenAI refuses such a file: results are matched to requests by
    ``custom_id``, so two lines with one id could not be told apart in OUT."""
    batch = OpenAIBatch()
    first_at: dict[str, str] = {}
    seen_raw: dict[str, int] = {}
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            where = f"{path.name} line {n}"
            cid, outcome = _line(raw, where)
            if cid is None:  # keyed by its content (a re-run must not report it again)
                digest = hashlib.sha256(raw.strip()).hexdigest()[:24]
                k = seen_raw[digest] = seen_raw.get(digest, -1) + 1
                rid = f"batch_req_{digest}" + (f"_{k}" if k else "")
                batch.refused.append((("line", rid), error_record(None, *outcome, rid=rid)))
                continue
            if cid in first_at:
                raise BatchInputError(f"{where}: custom_id {cid!r} is already used at {first_at[cid]}; custom_ids "
                                      "must be unique (OpenAI refuses such a file too)")
            first_at[cid] = where
            if isinstance(outcome, dict):
                batch.requests.append(ChatLine(cid, outcome, where))
            elif isinstance(outcome, APIError):
                batch.refused.append((cid, failure_record(cid, outcome)))
            else:
                batch.refused.append((cid, error_record(cid, *outcome)))
    if not batch.lines:
        raise BatchInputError(f"INPUT {str(path)!r} has no lines")
    return batch


def _line(raw: bytes, where: str) -> tuple[str | None, dict | APIError | tuple[str, str]]:
    """-> (custom_id or None, the body | the body's APIError | (code, message) of a line error)."""
    shape = "each line must be one object with custom_id, method, url and body"
    try:
        rec = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        return None, ("invalid_json", f"{where} is not UTF-8 text; {shape}")
    except json.JSONDecodeError as e:
        return None, ("invalid_json", f"{where} is not JSON ({e.msg}); {shape}")
    except RecursionError:
        return None, ("invalid_json", f"{where} is nested too deeply to be a batch request; {shape}")
    if not isinstance(rec, dict):
        kind = {list: "array", str: "string", bool: "boolean", int: "number", float: "number"}.get(type(rec), "null")
        return None, ("invalid_request", f"{where} is a JSON {kind}, not an object; {shape}")
    cid = rec.get("custom_id")
    if not isinstance(cid, str) or not cid:
        got = "no custom_id" if cid is None else f"custom_id {_show(cid)}"
        return None, ("invalid_custom_id", f"{where} has {got}; every line needs a custom_id, a non-empty string "
                                           "that names its result")
    if rec.get("method") != METHOD:
        return cid, ("invalid_method", f"{where}: method must be \"{METHOD}\", got {_show(rec.get('method'))}")
    if rec.get("url") != URL:
        return cid, ("invalid_url", f"{where}: url must be \"{URL}\" (the only endpoint dsvl2 batch runs), got "
                                    f"{_show(rec.get('url'))}")
    try:
        chat_request(rec.get("body"))
    except APIError as e:
        return cid, e
    return cid, rec["body"]


def _show(v: object) -> str:
    text = json.dumps(v)
    return text if len(text) <= 60 else text[:57] + "..."


# --------------------------------------------------------------------------- output lines

def new_line_id() -> str:
    return "batch_req_" + secrets.token_hex(12)


def response_record(custom_id: str | None, status: int, body: dict) -> dict:
    """An output line carrying an HTTP response (a chat.completion, or the API's error body)."""
    return {"id": new_line_id(), "custom_id": custom_id,
            "response": {"status_code": status, "request_id": "req_" + secrets.token_hex(16), "body": body},
            "error": None}


def error_record(custom_id: str | None, code: str, message: str, *, rid: str | None = None) -> dict:
    """An output line for a line that never became a request."""
    return {"id": rid or new_line_id(), "custom_id": custom_id, "response": None,
            "error": {"code": code, "message": message}}


def failure_record(custom_id: str, e: BaseException) -> dict:
    """The output line of a request that failed with ``e``: the HTTP API's status and body
    (400 / 413 for what the request got wrong, 500 for a fault of dsvl2 itself)."""
    if isinstance(e, APIError):
        err = e
    elif isinstance(e, DSVL2Error):
        err = from_dsvl2(e)
    else:
        err = APIError(500, f"{type(e).__name__}: {str(e).strip() or 'no message'}", code="internal_error")
    return response_record(custom_id, err.status, err.body())


def output_key(rec: object, where: str) -> Hashable:
    """The key of an OpenAI output line in OUT: its custom_id, or ``("line", id)`` for a
    line whose custom_id could not be read."""
    if not isinstance(rec, dict) or "custom_id" not in rec or "id" not in rec:
        raise BatchInputError(f"{where} has no 'custom_id'; is it the output of dsvl2 batch on an OpenAI batch "
                              "file? Pass a new OUT")
    cid = rec["custom_id"]
    return ("line", str(rec["id"])) if cid is None else str(cid)


def is_error(rec: dict) -> bool:
    """Whether an output line is anything but an answer (OpenAI puts those in its error file)."""
    return rec.get("error") is not None or (rec.get("response") or {}).get("status_code") != 200
