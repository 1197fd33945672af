"""Keep a conversation inside the context window: drop its oldest exchanges.

One rule for every surface that holds a conversation longer than one request: the
server's ``truncate_history`` (``server/submit.py``) and the interactive ``dsvl2 chat``
(``commands/chat.py``). Each says how many answer tokens it keeps free (``room``).

* Lengths come from the processor itself (images included), so the check is exact, not
  an estimate. Each try processes the conversation again: the image-token count is not
  additive (cropping depends on how many images a conversation holds).
* A prompt of L tokens fits when L + ``room`` <= the context window.
* What is dropped: the oldest messages after the system message, a whole exchange at a
  time (a user message and the messages up to the next user message), so a kept history
  never starts with an assistant message. The system message and the last user message
  (with anything after it) are never dropped; when they alone do not fit,
  ``ContextLengthError`` says how many tokens they need.

Roles in either format: OpenAI's ``user`` / ``assistant`` / ``system`` or the reference's
``<|User|>`` / ``<|Assistant|>`` / ``system``.
"""

from __future__ import annotations

from dataclasses import dataclass

from .api import VLModel
from .errors import ContextLengthError
from .processing import BatchInputs

USER_ROLES = ("user", "<|User|>")


@dataclass
class Fitted:
    """A conversation that fits, processed."""

    messages: list[dict]  # the messages kept, in order
    batch: BatchInputs  # them, processed (one row)
    dropped: int  # messages left out (whole exchanges)

    @property
    def prompt_tokens(self) -> int:
        return self.batch.seq_lens[0]


def fit_history(model: VLModel, messages: list[dict], room: int) -> Fitted:
    """Drop the oldest exchanges of ``messages`` until its prompt leaves ``room`` tokens of
    ``model``'s context window free (see the module docstring).

    Raises ``ContextLengthError`` (``tokens``, ``window``, ``room``) when the system
    message and the last user message alone leave less."""
    if room < 1:
        raise ValueError(f"room must be at least 1 answer token, got {room}")
    window = model.engine.context_window
    batch, _ = model.process(messages)
    tokens = batch.seq_lens[0]
    start = 1 if messages and messages[0]["role"] == "system" else 0
    last_user = max((i for i, m in enumerate(messages) if m["role"] in USER_ROLES), default=len(messages) - 1)
    dropped = 0
    kept = messages
    while tokens + room > window:
        if start + dropped >= last_user:
            raise ContextLengthError(tokens, window, room)
        dropped += 1
        while start + dropped < last_user and messages[start + dropped]["role"] not in USER_ROLES:
            dropped += 1  # do not start the kept history with an assistant message
        kept = messages[:start] + messages[start + dropped:]
        batch, _ = model.process(kept)
        tokens = batch.seq_lens[0]
    return Fitted(list(kept), batch, dropped)
