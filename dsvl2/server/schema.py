"""Checking a ``POST /v1/chat/completions`` body: OpenAI's chat schema plus dsvl2's extensions.

Written by hand rather than as pydantic models so that every refusal is one sentence
naming the field, what it got and what is allowed ("temperature must be a number from 0
to 2, got 'hot'"), in OpenAI's error shape with ``param`` set, never FastAPI's 422 list.

Accepted (everything else of OpenAI's schema that cannot change the answer, such as
``user``, ``metadata`` or ``store``, is ignored, like other OpenAI-compatible servers):

* ``messages``: roles ``system`` (``developer`` is its newer name), ``user``,
  ``assistant``; ``content`` a string or a list of ``text`` / ``image_url`` parts
  (``image_url`` either ``{"url": ...}`` or the URL string); assistant ``content`` may be
  null. Images come from ``image_url`` parts only: an ``<image>`` typed in a text is
  text. The conversation rules themselves (system first, images only from the user, not
  empty...) are the processor's (``dsvl2.processing.conversation``).
* ``model`` (optional: the served model when absent), ``n`` (1..16), ``stream``,
  ``stream_options.include_usage``, ``max_tokens`` / ``max_completion_tokens``,
  ``temperature`` (0..2), ``top_p``, ``seed``, ``stop`` (a string or up to 16 strings).
* ``logprobs`` (true / false) and ``top_logprobs`` (0..20, only with ``logprobs: true``):
  each answer token's log-probability under the model's own distribution (before
  temperature, penalties and masks, as vLLM gives them) and its most likely alternatives.
* ``response_format``: ``{"type": "text"}``, ``{"type": "json_object"}`` or ``{"type":
  "json_schema", "json_schema": {"name", "schema", "strict", "description"}}``; vLLM's
  extensions ``guided_json`` (a schema object, or its JSON text), ``guided_regex`` (a
  pattern, Rust ``regex`` syntax), ``guided_choice`` (a list of strings) and
  ``guided_grammar`` (llguidance's Lark dialect, or llama.cpp GBNF; ``engine/guided.py``
  says what each kind accepts). One guide per request; ``guided_decoding_backend`` and
  ``guided_whitespace_pattern`` are refused when set (one backend, fixed whitespace).
* Extensions: ``top_k``, ``repetition_penalty``, ``stop_token_ids`` and
  ``truncate_history`` (drop the oldest turns until the prompt fits).
* Fields the model cannot honour are refused rather than silently ignored when set to a
  non-default value: ``tools`` / ``functions``, ``frequency_penalty`` /
  ``presence_penalty``, ``logit_bias``.

Defaults are the Python API's: greedy (``temperature`` 0) and at most 512 new tokens,
not the model's whole context window.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..structured import ShapeError, guide_from_response_format, guide_from_schema
from .errors import bad_request

if TYPE_CHECKING:
    from ..engine.guided import Guide

MAX_N = 16
MAX_STOP = 16
MAX_TOP_LOGPROBS = 20  # SamplingParams' limit (engine/sampling.py; not imported: no torch here)
_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


@dataclass
class ImageRef:
    """An ``image_url`` part before it is resolved (``images.ImagePolicy``)."""

    url: str
    param: str  # where it sits in the request, for error messages


@dataclass
class ChatRequest:
    messages: list[dict]  # processor format; image parts hold an ImageRef under "image"
    model: str | None = None
    n: int = 1
    stream: bool = False
    include_usage: bool = False
    sampling: dict = field(default_factory=dict)  # SamplingParams fields
    truncate_history: bool = False

    @property
    def logprobs(self) -> bool:
        """Were logprobs asked for (``logprobs: true``)?"""
        return self.sampling.get("logprobs") is not None

    @property
    def image_refs(self) -> list[ImageRef]:
        """Every image part of the messages, in order (what is fetched before processing)."""
        return [p["image"] for m in self.messages if isinstance(m["content"], list)
                for p in m["content"] if p["type"] == "image"]


def parse_json(body: bytes) -> dict:
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise bad_request(f"the request body is not valid JSON ({e}); send a JSON object with 'messages'",
                          code="invalid_json") from None
    except RecursionError:  # json's decoder recurses per nesting level: [[[[... is not a 500
        raise bad_request("the request body is nested too deeply to be a chat request; send a JSON object with "
                          "'messages'", code="invalid_json") from None
    if not isinstance(data, dict):
        raise bad_request(f"the request body must be a JSON object, got a JSON {_kind(data)}", code="invalid_json")
    return data


def _kind(v: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", int: "number",
            float: "number", type(None): "null"}.get(type(v), type(v).__name__)


def _show(v: Any) -> str:
    text = json.dumps(v) if not isinstance(v, float) or math.isfinite(v) else repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _number(data: dict, name: str, lo: float, hi: float, *, lo_open: bool = False, allowed: str) -> float | None:
    v = data.get(name)
    if v is None:
        return None
    if not _is_num(v) or v < lo or v > hi or (lo_open and v == lo):
        raise bad_request(f"{name} must be {allowed}, got {_show(v)}", param=name)
    return v


def _integer(data: dict, name: str, lo: int, hi: int | None, allowed: str) -> int | None:
    v = data.get(name)
    if v is None:
        return None
    if not _is_int(v) or v < lo or (hi is not None and v > hi):
        raise bad_request(f"{name} must be {allowed}, got {_show(v)}", param=name)
    return v


def _boolean(data: dict, name: str, where: str | None = None) -> bool:
    v = data.get(name)
    if v is None:
        return False
    if not isinstance(v, bool):
        raise bad_request(f"{where or name} must be true or false, got {_show(v)}", param=where or name)
    return v


def _content(content: Any, where: str, role: str) -> str | list:
    if isinstance(content, str):
        return content
    if content is None and role == "assistant":
        return ""
    if not isinstance(content, list):
        raise bad_request(f"{where}.content must be a string or a list of content parts, got a {_kind(content)}",
                          param=f"{where}.content")
    parts = []
    for j, part in enumerate(content):
        at = f"{where}.content[{j}]"
        if not isinstance(part, dict):
            raise bad_request(f"{at} must be an object like {{\"type\": \"text\", \"text\": ...}}, got a {_kind(part)}",
                              param=at)
        kind = part.get("type")
        if kind == "text":
            if not isinstance(part.get("text"), str):
                raise bad_request(f"{at}.text must be a string, got {_show(part.get('text'))}", param=f"{at}.text")
            parts.append({"type": "text", "text": part["text"]})
        elif kind == "image_url":
            url = part.get("image_url")
            if isinstance(url, dict):
                url, at = url.get("url"), f"{at}.image_url.url"
            else:
                at = f"{at}.image_url"
            if not isinstance(url, str) or not url:
                raise bad_request(f"{at} must be a non-empty URL string (a data: URL such as "
                                  f"'data:image/png;base64,...'), got {_show(url)}", param=at)
            parts.append({"type": "image", "image": ImageRef(url, at)})
        else:
            raise bad_request(f"{at}.type {_show(kind)} is not supported; allowed: 'text', 'image_url'",
                              param=f"{at}.type")
    return parts


def _messages(data: dict) -> list[dict]:
    msgs = data.get("messages")
    if not isinstance(msgs, list) or not msgs:
        got = "an empty list" if msgs == [] else ("nothing" if msgs is None else f"a {_kind(msgs)}")
        raise bad_request(f"messages must be a non-empty list of messages, got {got}", param="messages")
    out = []
    for i, m in enumerate(msgs):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise bad_request(f"{where} must be an object with 'role' and 'content', got a {_kind(m)}", param=where)
        role = _ROLES.get(m.get("role")) if isinstance(m.get("role"), str) else None
        if role is None:
            raise bad_request(f"{where}.role {_show(m.get('role'))} is not supported; allowed: 'system', "
                              "'user', 'assistant' (this model has no tool calling)", param=f"{where}.role")
        if "content" not in m:
            raise bad_request(f"{where} has no 'content'", param=f"{where}.content")
        out.append({"role": role, "content": _content(m["content"], where, role)})
    return out


def _stop(data: dict) -> tuple[str, ...]:
    v = data.get("stop")
    if v is None:
        return ()
    stops = [v] if isinstance(v, str) else v
    if (not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops)
            or len(stops) > MAX_STOP):
        raise bad_request(f"stop must be a non-empty string or a list of at most {MAX_STOP} non-empty strings, "
                          f"got {_show(v)}", param="stop")
    return tuple(stops)


def _refuse_unsupported(data: dict) -> None:
    for name in ("frequency_penalty", "presence_penalty"):
        v = data.get(name)
        if v is not None and v != 0:
            raise bad_request(f"{name} is not supported (only 0); use the repetition_penalty extension "
                              "(> 0, 1 = off) instead", param=name)
    for name in ("tools", "functions"):
        if data.get(name):
            raise bad_request(f"{name} are not supported: this model has no tool calling", param=name)
    if data.get("logit_bias"):
        raise bad_request("logit_bias is not supported", param="logit_bias")
    for name in ("guided_decoding_backend", "guided_whitespace_pattern"):
        if data.get(name) is not None:
            raise bad_request(f"{name} is not supported: this server has one guided-decoding backend "
                              "(engine/guided.py) and chooses the whitespace itself", param=name)


def _logprobs(data: dict) -> int | None:
    """``logprobs`` / ``top_logprobs`` -> SamplingParams.logprobs (None: off)."""
    on = _boolean(data, "logprobs")
    top = _integer(data, "top_logprobs", 0, MAX_TOP_LOGPROBS, f"an integer from 0 to {MAX_TOP_LOGPROBS}")
    if top is not None and not on:
        raise bad_request("top_logprobs needs \"logprobs\": true", param="top_logprobs")
    return (top or 0) if on else None


def _guide(data: dict) -> Guide | None:
    """``response_format`` and vLLM's ``guided_*`` -> at most one Guide (``engine.guided``,
    imported only for a request that has one: this module imports no torch)."""
    found: dict[str, Guide] = {}
    try:
        g = guide_from_response_format(data.get("response_format"))
    except ShapeError as e:
        raise bad_request(str(e), param=e.param) from None
    if g is not None:
        found["response_format"] = g
    if all(data.get(k) is None for k in ("guided_json", "guided_regex", "guided_choice", "guided_grammar")):
        return g
    from ..engine.guided import Guide

    v = data.get("guided_json")
    if v is not None:
        if isinstance(v, str):
            try:
                v = json.loads(v)
            except (json.JSONDecodeError, RecursionError):
                raise bad_request("guided_json must be a JSON schema (an object, or its JSON text), got text that "
                                  "is not JSON", param="guided_json") from None
        try:
            found["guided_json"] = guide_from_schema(v, "guided_json")
        except ShapeError as e:
            raise bad_request(str(e), param=e.param) from None
    v = data.get("guided_regex")
    if v is not None:
        if not isinstance(v, str) or not v:
            raise bad_request(f"guided_regex must be a non-empty regular expression string, got {_show(v)}",
                              param="guided_regex")
        found["guided_regex"] = Guide.regex(v)
    v = data.get("guided_choice")
    if v is not None:
        if not isinstance(v, list) or not v or not all(isinstance(c, str) and c for c in v):
            raise bad_request(f"guided_choice must be a non-empty list of non-empty strings, got {_show(v)}",
                              param="guided_choice")
        found["guided_choice"] = Guide.choice(v)
    v = data.get("guided_grammar")
    if v is not None:
        if not isinstance(v, str) or not v.strip():
            raise bad_request(f"guided_grammar must be a non-empty grammar string, got {_show(v)}",
                              param="guided_grammar")
        found["guided_grammar"] = Guide.grammar(v)
    if len(found) > 1:
        names = list(found)
        raise bad_request(f"{', '.join(names)} each constrain the answer; give only one of them",
                          param=names[1])
    return next(iter(found.values()), None)


def parse_chat_request(data: dict) -> ChatRequest:
    """A parsed JSON body -> ``ChatRequest``; raises a 400 ``APIError`` naming the bad field."""
    messages = _messages(data)
    model = data.get("model")
    if model is not None and not isinstance(model, str):
        raise bad_request(f"model must be a string, got {_show(model)}", param="model")
    _refuse_unsupported(data)

    sampling: dict = {}
    t = _number(data, "temperature", 0, 2, allowed="a number from 0 to 2 (0 = greedy)")
    if t is not None:
        sampling["temperature"] = float(t)
    p = _number(data, "top_p", 0, 1, lo_open=True, allowed="a number with 0 < top_p <= 1")
    if p is not None:
        sampling["top_p"] = float(p)
    k = _integer(data, "top_k", -1, None, "an integer >= 0 (0 or -1 = off)")
    if k is not None:
        sampling["top_k"] = max(k, 0)
    rp = _number(data, "repetition_penalty", 0, math.inf, lo_open=True, allowed="a number > 0 (1 = off)")
    if rp is not None:
        sampling["repetition_penalty"] = float(rp)
    seed = _integer(data, "seed", -(1 << 63), (1 << 64) - 1, "an integer")
    if seed is not None:
        sampling["seed"] = seed
    limits = {name: _integer(data, name, 1, None, "an integer >= 1")
              for name in ("max_tokens", "max_completion_tokens")}
    given = {v for v in limits.values() if v is not None}
    if len(given) > 1:
        raise bad_request(f"max_tokens ({limits['max_tokens']}) and max_completion_tokens "
                          f"({limits['max_completion_tokens']}) disagree; give one of them", param="max_tokens")
    if given:
        sampling["max_new_tokens"] = given.pop()
    stop = _stop(data)
    if stop:
        sampling["stop"] = stop
    ids = data.get("stop_token_ids")
    if ids is not None:
        if not isinstance(ids, list) or not all(_is_int(i) and i >= 0 for i in ids):
            raise bad_request(f"stop_token_ids must be a list of integers >= 0, got {_show(ids)}",
                              param="stop_token_ids")
        sampling["stop_token_ids"] = tuple(ids)
    lp = _logprobs(data)
    if lp is not None:
        sampling["logprobs"] = lp
    guide = _guide(data)
    if guide is not None:
        sampling["guide"] = guide

    n = _integer(data, "n", 1, MAX_N, f"an integer from 1 to {MAX_N}")
    stream = _boolean(data, "stream")
    opts = data.get("stream_options")
    include_usage = False
    if opts is not None:
        if not stream:
            raise bad_request("stream_options is only allowed with stream: true", param="stream_options")
        if not isinstance(opts, dict):
            raise bad_request(f"stream_options must be an object, got {_show(opts)}", param="stream_options")
        include_usage = _boolean(opts, "include_usage", "stream_options.include_usage")
    return ChatRequest(messages, model, n or 1, stream, include_usage, sampling,
                       _boolean(data, "truncate_history"))
