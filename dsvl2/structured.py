"""Structured outputs and logprobs as the surfaces show them (Python API, CLI, server).

Two small pieces shared by ``api.py``, ``commands/`` and ``server/``; the engine side is
``engine/guided.py`` (constrained decoding) and ``engine/engine.py`` (``TokenLogprob``).

Structured outputs: ``guide_from_response_format`` turns OpenAI's ``response_format``
(``{"type": "text" | "json_object" | "json_schema", ...}``) into a ``Guide`` (or None for
text); ``guide_from_schema`` is the ``json_schema=`` shortcut. A bad shape raises
``ShapeError`` (a ``GenerationError``) whose ``param`` names the field, e.g.
``response_format.json_schema.schema``; the server answers it with a 400 naming it.
Importing this module imports neither torch nor the engine (``server/schema.py``, which
the batch job's driver uses, relies on that); ``Guide`` is imported when one is made.

Logprobs: the engine records, per generated token, its id, its log-probability and the
``top`` alternatives as ids (``TokenLogprob``): the model's own distribution, a
log-softmax of the raw logits before repetition penalty, temperature, top-k/top-p and
any guide's mask (what vLLM returns by default). Here they become OpenAI's entries
``{"token", "logprob", "bytes", "top_logprobs": [{"token", "logprob", "bytes"}]}``:

* ``token`` is the token's own text: the tokenizer's decode of that one id (special
  tokens included, as the answer's text has them). A byte-level BPE piece that is not
  valid UTF-8 alone (a part of a multi-byte character) decodes to U+FFFD there;
  ``bytes`` are always its exact bytes, so that joining the ``bytes`` of an answer's
  tokens and decoding them gives its text. Ids beyond the tokenizer (the LM head is
  wider) decode to nothing: ``""`` and ``[]``.
* ``bytes`` come from the byte-level vocabulary itself: each character of the token
  string (``"Ġthe"``) is mapped back to its byte with GPT-2's byte-to-unicode table,
  which is exact (``tokenizers``' ``ByteLevel`` decoder does the same and then a lossy
  UTF-8 decode). Added tokens are their content's UTF-8. A tokenizer whose decoder is not
  byte-level falls back to the UTF-8 of the decoded text (``<0xNN>`` byte-fallback
  pieces excepted, which are that byte).
* The token that ended the answer by being eos or a stop id is not part of the text and
  gets no entry (``completion_tokens`` still counts it, as before); a stop string's
  tokens keep theirs, so the tokens' texts then go beyond the cut text.
* Logprobs of -inf (or NaN from a broken checkpoint) are given as -9999.0, OpenAI's and
  vLLM's value, since JSON has no infinities.

Streaming (``LogprobStream``): a token's entry goes out with the chunk that carries the
end of its text. The detokeniser holds text back (a multi-byte character split across
tokens, trailing whitespace, a possible stop string), and the driver sends no event for
a token whose text was all held back, so the entries are aligned on the text: each
chunk takes the pending tokens whose decoded text, added to what earlier chunks took,
fits in the text sent so far. The last chunk takes every entry left, so a stream's
entries are exactly the non-streamed answer's.
"""

from __future__ import annotations

import codecs
import json
import math
import re
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterable

from .errors import GenerationError

if TYPE_CHECKING:
    from .engine.guided import Guide

__all__ = ["ShapeError", "guide_from_response_format", "guide_from_schema", "TopLogprob", "Logprob",
           "TokenTexts", "token_texts", "entry", "content_count", "content_logprobs", "LogprobStream",
           "MIN_LOGPROB"]

MIN_LOGPROB = -9999.0  # stands for -inf (OpenAI and vLLM give this value)


# --------------------------------------------------------------------------- response_format


class ShapeError(GenerationError):
    """A structured-output option of the wrong shape; ``param`` names the field."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


def _show(v: Any) -> str:
    try:
        text = json.dumps(v)
    except (TypeError, ValueError):
        text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


def guide_from_schema(schema: Any, where: str = "json_schema") -> Guide:
    """A JSON schema (a dict, or a pydantic model class: its ``model_json_schema()``) -> Guide."""
    if hasattr(schema, "model_json_schema") and callable(schema.model_json_schema):
        schema = schema.model_json_schema()
    if not isinstance(schema, dict):
        raise ShapeError(f"{where} must be a JSON schema object (a dict), got {_show(schema)}", where)
    from .engine.guided import Guide

    try:
        return Guide.json_schema(schema)
    except (TypeError, ValueError) as e:  # json.dumps: not JSON data
        raise ShapeError(f"{where} is not JSON data: {e}", where) from None


def guide_from_response_format(fmt: Any, where: str = "response_format") -> Guide | None:
    """OpenAI's ``response_format`` -> a Guide, or None for ``{"type": "text"}`` / None.

    Shapes: ``{"type": "text"}``, ``{"type": "json_object"}`` (any JSON object),
    ``{"type": "json_schema", "json_schema": {"name": str, "schema": {...},
    "strict": bool | None, "description": str}}`` (``schema`` required; ``strict`` is
    accepted either way: the output always follows the schema). Other keys are ignored."""
    if fmt is None:
        return None
    if not isinstance(fmt, dict):
        raise ShapeError(f"{where} must be an object such as {{\"type\": \"json_object\"}}, got {_show(fmt)}",
                         where)
    kind = fmt.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        from .engine.guided import Guide

        return Guide.json_object()
    if kind != "json_schema":
        raise ShapeError(f"{where}.type must be 'text', 'json_object' or 'json_schema', got {_show(kind)}",
                         f"{where}.type")
    spec = fmt.get("json_schema")
    at = f"{where}.json_schema"
    if not isinstance(spec, dict):
        raise ShapeError(f"{at} must be an object {{\"name\": ..., \"schema\": {{...}}}}, got {_show(spec)}", at)
    name = spec.get("name")
    if not isinstance(name, str) or not name:
        raise ShapeError(f"{at}.name must be a non-empty string, got {_show(name)}", f"{at}.name")
    strict = spec.get("strict")
    if strict is not None and not isinstance(strict, bool):
        raise ShapeError(f"{at}.strict must be true, false or null, got {_show(strict)}", f"{at}.strict")
    desc = spec.get("description")
    if desc is not None and not isinstance(desc, str):
        raise ShapeError(f"{at}.description must be a string, got {_show(desc)}", f"{at}.description")
    if "schema" not in spec:
        raise ShapeError(f"{at}.schema is missing; give the JSON schema the answer must follow", f"{at}.schema")
    return guide_from_schema(spec["schema"], f"{at}.schema")


# --------------------------------------------------------------------------- token texts


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (byte-level BPE vocabularies use it)."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


_BYTE_OF = {c: b for b, c in _bytes_to_unicode().items()}
_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _decoder_kind(hf) -> str:
    """"byte_level", "byte_fallback" or "other", from the tokenizers decoder's JSON."""
    try:
        spec = json.loads(hf.decoder.__getstate__())
    except Exception:  # noqa: BLE001 - no decoder, or an unknown binding: decode-based fallback
        return "other"
    kinds = [d.get("type") for d in spec.get("decoders", [])] if spec.get("type") == "Sequence" else [spec.get("type")]
    if kinds == ["ByteLevel"]:
        return "byte_level"
    return "byte_fallback" if "ByteFallback" in kinds else "other"


class TokenTexts:
    """Each token id's own text and exact bytes under a ``processing.Tokenizer`` (cached)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        hf = getattr(tokenizer, "_tok", None)
        self.kind = _decoder_kind(hf) if hf is not None else "other"
        self.added: set[int] = set(hf.get_added_tokens_decoder()) if hf is not None else set()
        self._cache: dict[int, tuple[str, bytes]] = {}

    def __call__(self, token_id: int) -> tuple[str, bytes]:
        """(text, bytes) of one id."""
        hit = self._cache.get(token_id)
        if hit is None:
            hit = self._cache[token_id] = self._piece(token_id)
        return hit

    def _piece(self, token_id: int) -> tuple[str, bytes]:
        tok = self.tokenizer
        if not 0 <= token_id < len(tok):
            return "", b""  # beyond the tokenizer: decodes to nothing
        text = tok.decode([token_id])
        raw = None
        if token_id not in self.added:
            piece = tok.id_to_token(token_id) or ""
            if self.kind == "byte_level" and piece and all(c in _BYTE_OF for c in piece):
                raw = bytes(_BYTE_OF[c] for c in piece)
            elif self.kind == "byte_fallback":
                m = _BYTE_FALLBACK.fullmatch(piece)
                if m:
                    raw = bytes([int(m.group(1), 16)])
        if raw is None:
            raw = text.encode("utf-8")
        return text, raw


_TEXTS: "weakref.WeakKeyDictionary[Any, TokenTexts]" = weakref.WeakKeyDictionary()


def token_texts(tokenizer) -> TokenTexts:
    """The (shared, cached) ``TokenTexts`` of ``tokenizer``."""
    texts = _TEXTS.get(tokenizer)
    if texts is None:
        texts = _TEXTS[tokenizer] = TokenTexts(tokenizer)
    return texts


# --------------------------------------------------------------------------- entries


def _value(lp: float) -> float:
    return lp if math.isfinite(lp) else MIN_LOGPROB


@dataclass
class TopLogprob:
    """One of the most likely tokens at a position."""

    token: str
    logprob: float
    bytes: list[int]
    token_id: int

    def to_dict(self) -> dict:
        return {"token": self.token, "logprob": self.logprob, "bytes": self.bytes}


@dataclass
class Logprob:
    """A generated token: its text, log-probability, exact bytes and the most likely
    alternatives at its position (most likely first), as OpenAI's ``logprobs.content``."""

    token: str
    logprob: float
    bytes: list[int]
    top_logprobs: list[TopLogprob] = field(default_factory=list)
    token_id: int = -1

    def to_dict(self) -> dict:
        """OpenAI's shape (``token_id`` left out)."""
        return {"token": self.token, "logprob": self.logprob, "bytes": self.bytes,
                "top_logprobs": [t.to_dict() for t in self.top_logprobs]}


def entry(t, texts: TokenTexts) -> Logprob:
    """An engine ``TokenLogprob`` -> ``Logprob``."""
    text, raw = texts(t.token_id)
    top = []
    for i, lp in t.top:
        tt, tb = texts(i)
        top.append(TopLogprob(tt, _value(lp), list(tb), i))
    return Logprob(text, _value(t.logprob), list(raw), top, t.token_id)


def content_count(out, stop_ids: Iterable[int]) -> int:
    """How many of ``out.logprobs`` belong to the answer: all but an ending eos / stop id."""
    n = len(out.logprobs)
    if n and out.finish_reason == "stop" and out.logprobs[-1].token_id in set(stop_ids):
        n -= 1
    return n


def content_logprobs(out, tokenizer, stop_ids: Iterable[int] = ()) -> list[Logprob] | None:
    """The entries of a ``GenerationOutput``'s tokens (None when logprobs were not asked
    for). ``stop_ids``: the eos and stop ids that ended answers (not text, no entry)."""
    if out.logprobs is None or tokenizer is None:
        return None
    texts = token_texts(tokenizer)
    return [entry(t, texts) for t in out.logprobs[:content_count(out, stop_ids)]]


class LogprobStream:
    """Entries of one streamed answer, chunk by chunk (see the module docstring).

    ``live()`` returns the engine's list of ``TokenLogprob`` of the request as it grows
    (``Request.logprobs``; read from another thread: it is only ever appended to). Call
    ``take(delta)`` for every event in order, with ``output`` on the last one."""

    def __init__(self, live: Callable[[], list | None], tokenizer, stop_ids: Iterable[int] = ()):
        self.live = live
        self.texts = token_texts(tokenizer)
        self.stop_ids = frozenset(stop_ids)
        self.sent = 0        # characters of text streamed so far
        self.taken = 0       # entries handed out
        self.chars = 0       # characters the taken tokens' bytes decode to (whole characters)
        self.decoder = codecs.getincrementaldecoder("utf-8")("replace")

    def take(self, delta: str, output=None) -> list[Logprob]:
        """The entries to send with this event's text ``delta`` (all that are left when
        ``output``, the final ``GenerationOutput``, is given)."""
        self.sent += len(delta)
        if output is not None:
            if output.logprobs is None:
                return []
            done = output.logprobs[self.taken:content_count(output, self.stop_ids)]
            self.taken += len(done)
            return [entry(t, self.texts) for t in done]
        src = self.live() or []
        out = []
        while self.taken < len(src):
            t = src[self.taken]
            if t.token_id in self.stop_ids:
                break  # an ending token: never text (the final event decides)
            _, raw = self.texts(t.token_id)
            tail = self.decoder.getstate()[0]
            if self.chars + len((tail + raw).decode("utf-8", "replace")) > self.sent:
                break  # its text (or the end of it) has not been sent yet
            self.chars += len(self.decoder.decode(raw))
            self.taken += 1
            out.append(entry(t, self.texts))
        return out
