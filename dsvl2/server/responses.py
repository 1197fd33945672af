"""OpenAI response objects: ``chat.completion``, ``chat.completion.chunk``, SSE framing.

Extension fields (ignored by OpenAI clients, readable from their ``model_extra``):

* ``choices[i].message.grounding`` (streaming: the ``delta`` of the choice's last chunk):
  present when the answer holds ``<|ref|>...<|/ref|><|det|>[[x1, y1, x2, y2]]<|/det|>``
  markup; a list of ``{"label", "box", "box_px", "image_index"}`` with ``box`` in the
  model's 0..999 coordinates and ``box_px`` in pixels of the image it refers to (the
  conversation's last image, as the reference draws them; None without an image). The
  message text keeps the markup.
* ``dropped_turns`` (top level; streaming: the first chunk): how many messages
  ``truncate_history`` left out, when the request asked for it.

Logprobs (``logprobs: true``): ``choices[i].logprobs = {"content": [{"token", "logprob",
"bytes", "top_logprobs": [{"token", "logprob", "bytes"}, ...]}, ...]}``, null when not
asked for (``structured.py`` says what each field holds). Streaming: each chunk that
carries text carries the entries of the tokens whose text ends in it (``{"content": []}``
when none does); the role chunk has null; the last chunk of a choice carries the entries
left (tokens of a stop string, held text flushed at the end), or null when none is left.
"""

from __future__ import annotations

import json
import secrets
import time

from ..api import Answer, VLModel, make_answer
from ..engine.engine import GenerationOutput
from .schema import ChatRequest
from .submit import Submission


def new_id() -> str:
    return "chatcmpl-" + secrets.token_hex(12)


def grounding_field(answer: Answer) -> list[dict] | None:
    """The ``grounding`` extension of one answer, or None when it holds no box."""
    if not answer.boxes:
        return None
    return [{"label": b["label"], "box": list(b["box_norm"]), "box_px": b["box_px"], "image_index": b["image_index"]}
            for b in answer.boxes]


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict:
    """OpenAI's ``usage``; ``cached_tokens``: prompt tokens whose KV came from the cache
    (shared blocks of an earlier request) instead of being prefilled."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def cached_tokens(outputs) -> int:
    """The ``cached_tokens`` of a request's choices (``Answer`` or engine outputs), counted like its
    prompt: once. The smallest over the choices: each choice is its own engine request
    and may reuse the blocks a sibling choice has just prefilled, which is this request's
    own work, not a cache hit; the minimum is what every choice found already cached."""
    return min((o.cached_tokens for o in outputs), default=0)


def logprobs_field(entries: list | None) -> dict | None:
    """A choice's ``logprobs``: ``{"content": [...]}`` of ``structured.Logprob`` entries, or None."""
    return None if entries is None else {"content": [e.to_dict() for e in entries]}


def message(answer: Answer) -> dict:
    msg = {"role": "assistant", "content": answer.text}
    g = grounding_field(answer)
    if g is not None:
        msg["grounding"] = g
    return msg


def completion(rid: str, model: str, answers: list[Answer], prompt_tokens: int,
               dropped_turns: int | None = None, cached: int = 0) -> dict:
    """A whole ``chat.completion``; ``prompt_tokens`` counts image tokens, and ``cached``
    the prompt tokens reused from the KV cache (both once for all choices)."""
    body = {
        "id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
        "choices": [{"index": i, "message": message(a), "finish_reason": a.finish_reason,
                     "logprobs": logprobs_field(a.logprobs)} for i, a in enumerate(answers)],
        "usage": usage(prompt_tokens, sum(a.completion_tokens for a in answers), cached),
    }
    if dropped_turns is not None:
        body["dropped_turns"] = dropped_turns
    return body


def stop_ids(model: VLModel, req: ChatRequest) -> set[int]:
    """The ids that end a choice of ``req``: the model's eos ids and the request's
    ``stop_token_ids`` (a choice's logprobs leave the ending one out)."""
    return model.engine.eos_ids | set(req.sampling.get("stop_token_ids", ()))


def failed_output(outputs) -> GenerationOutput | None:
    """The first of a request's finished choices that ended in an error or was cancelled, or None."""
    return next((o for o in outputs if o.finish_reason in ("error", "cancelled")), None)


def finished_completion(rid: str, served_model_name: str, model: VLModel, sub: Submission,
                        outputs: dict[int, GenerationOutput], stops: set[int]) -> dict:
    """The ``chat.completion`` of a request whose choices have all finished (none failed):
    ``outputs`` choice index -> its engine output; what the server (``app.py``) and the
    batch job's OpenAI mode (``batch/answer.py``) both answer."""
    answers = [make_answer(outputs[i], sub.images, model.processor.tokenizer, stops) for i in range(len(outputs))]
    return completion(rid, served_model_name, answers, sub.prompt_tokens, sub.dropped_turns, cached_tokens(answers))


def chunk(rid: str, model: str, created: int, index: int, delta: dict, finish_reason: str | None = None,
          logprobs: list | None = None, **extra) -> dict:
    """One ``chat.completion.chunk``; ``logprobs``: the ``structured.Logprob`` entries it carries."""
    return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": index, "delta": delta, "finish_reason": finish_reason,
                         "logprobs": logprobs_field(logprobs)}],
            **extra}


def sse(obj: dict) -> str:
    """One server-sent event carrying a JSON object."""
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


SSE_DONE = "data: [DONE]\n\n"
