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
"""

from __future__ import annotations

import json
import secrets
import time

from ..api import Answer


def new_id() -> str:
    return "chatcmpl-" + secrets.token_hex(12)


def grounding_field(answer: Answer) -> list[dict] | None:
    """The ``grounding`` extension of one answer, or None when it holds no box."""
    if not answer.boxes:
        return None
    return [{"label": b["label"], "box": list(b["box_norm"]), "box_px": b["box_px"], "image_index": b["image_index"]}
            for b in answer.boxes]


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def message(answer: Answer) -> dict:
    msg = {"role": "assistant", "content": answer.text}
    g = grounding_field(answer)
    if g is not None:
        msg["grounding"] = g
    return msg


def completion(rid: str, model: str, answers: list[Answer], prompt_tokens: int,
               dropped_turns: int | None = None) -> dict:
    """A whole ``chat.completion``; ``prompt_tokens`` counts image tokens (once for all choices)."""
    body = {
        "id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
        "choices": [{"index": i, "message": message(a), "finish_reason": a.finish_reason, "logprobs": None}
                    for i, a in enumerate(answers)],
        "usage": usage(prompt_tokens, sum(a.completion_tokens for a in answers)),
    }
    if dropped_turns is not None:
        body["dropped_turns"] = dropped_turns
    return body


def chunk(rid: str, model: str, created: int, index: int, delta: dict, finish_reason: str | None = None,
          **extra) -> dict:
    return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": index, "delta": delta, "finish_reason": finish_reason, "logprobs": None}],
            **extra}


def sse(obj: dict) -> str:
    """One server-sent event carrying a JSON object."""
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


SSE_DONE = "data: [DONE]\n\n"
