"""From a checked request to queued engine requests (runs in a worker thread).

Everything slow that a request needs before the driver takes it happens here, off the
event loop, so that a big image does not stall the other clients' streams: resolving
``image_url`` parts (base64, files; fetched URLs arrive already fetched, see app.py), decoding and tiling the images, tokenising,
the context-window check and ``truncate_history``.

Notable choices

* ``n`` choices: the conversation is processed ONCE and its batch submitted ``n`` times
  (one engine request, one batch slot, one handle each); events are re-labelled with
  the choice index on the way to the request's shared sink. Choice ``i`` samples with
  ``seed + i`` when a seed is given, so the choices differ but the response is
  reproducible; with temperature 0 they are equal.
* Context: a prompt of L tokens (image tokens included) needs L < context window (the
  engine's rule: one token of room to answer). With ``truncate_history`` the oldest
  exchanges are dropped by ``history.fit_history`` until L + ``ANSWER_ROOM`` <= window
  (the system message and the last user message are never dropped).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..api import VLModel
from ..engine.driver import Handle
from ..engine.sampling import SamplingParams
from ..errors import ContextLengthError
from ..history import fit_history
from ..processing import BatchInputs
from .errors import APIError, bad_request
from .images import ImagePolicy
from .schema import ChatRequest

# Answer tokens a truncated history leaves free at least.
ANSWER_ROOM = 16


@dataclass
class Submission:
    handles: list[Handle]
    prompt_tokens: int
    dropped_turns: int | None  # None unless truncate_history was asked for
    images: list = field(default_factory=list)


class _ChoiceSink:
    """Forwards a handle's events to the request's sink, labelled with the choice index."""

    def __init__(self, target, index: int):
        self.target, self.index = target, index

    def put(self, ev) -> None:
        ev.index = self.index
        self.target.put(ev)


def resolve_images(req: ChatRequest, policy: ImagePolicy, fetched: dict | None = None) -> list[dict]:
    """The request's messages in the processor's format, each image as encoded bytes;
    ``fetched``: ``id(ImageRef)`` -> the bytes already fetched (off the worker pool)."""
    fetched = fetched or {}
    out = []
    for m in req.messages:
        content = m["content"]
        if isinstance(content, list):
            content = [{"type": "image", "image": policy.load(p["image"], fetched.get(id(p["image"])))}
                       if p["type"] == "image" else p for p in content]
        out.append({"role": m["role"], "content": content})
    return out


def _too_long(tokens: int, window: int, truncated: bool) -> APIError:
    if truncated:
        msg = (f"the system message and the last user message alone need {tokens} prompt tokens (images "
               f"included) and {ANSWER_ROOM} more to answer, but the model's context window is {window} tokens; "
               "shorten the message or send fewer / smaller images")
    else:
        msg = (f"the prompt has {tokens} tokens (images included) but the model's context window is {window} "
               "tokens; shorten the conversation, send fewer / smaller images, or set \"truncate_history\": true "
               "to drop the oldest turns")
    return bad_request(msg, param="messages", code="context_length_exceeded")


def fit_context(model: VLModel, messages: list[dict], truncate: bool) -> tuple[BatchInputs, int]:
    """Process ``messages`` (dropping old turns if ``truncate``) -> (batch, messages dropped)."""
    if truncate:
        try:
            fitted = fit_history(model, messages, ANSWER_ROOM)
        except ContextLengthError as e:
            raise _too_long(e.tokens, e.window, True) from None
        return fitted.batch, fitted.dropped
    batch, _ = model.process(messages)
    if batch.seq_lens[0] >= model.engine.context_window:
        raise _too_long(batch.seq_lens[0], model.engine.context_window, False)
    return batch, 0


def submit(model: VLModel, req: ChatRequest, policy: ImagePolicy, sink, chunk_size: int | None,
           fetched: dict | None = None) -> Submission:
    """Resolve, process and queue ``req.n`` engine requests feeding ``sink``."""
    messages = resolve_images(req, policy, fetched)
    batch, dropped = fit_context(model, messages, req.truncate_history)
    sampling = dict(req.sampling)
    seed = sampling.pop("seed", None)
    params = [SamplingParams(**sampling, seed=None if seed is None else (seed + i) % (1 << 64))
              for i in range(req.n)]
    handles: list[Handle] = []
    try:
        for i, p in enumerate(params):
            (h,) = model.driver.submit(batch, p, chunk_size=chunk_size, sink=_ChoiceSink(sink, i))
            h.images = batch.images[0]
            handles.append(h)
    except BaseException:
        model.driver.cancel(handles)
        raise
    return Submission(handles, batch.seq_lens[0], dropped if req.truncate_history else None,
                      images=batch.images[0])
