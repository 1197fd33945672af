"""history.fit_history: which exchanges are dropped, what is never dropped, the error.

The model here is a stand-in with the two things ``fit_history`` reads (``process`` and
``engine.context_window``) and a prompt length that is the sum of the messages' word
counts, so every expected result can be worked out by hand. The real processor's lengths
are covered through the surfaces: tests/test_cli.py (interactive chat) and
tests/test_server.py (``truncate_history``).
"""

from __future__ import annotations

import pytest

from dsvl2.errors import ContextLengthError, GenerationError
from dsvl2.history import fit_history


class _Batch:
    def __init__(self, n: int):
        self.seq_lens = [n]


class _Model:
    def __init__(self, window: int):
        self.engine = type("E", (), {"context_window": window})()
        self.processed: list[list[dict]] = []

    def process(self, messages):
        self.processed.append(list(messages))
        return _Batch(sum(len(m["content"].split()) for m in messages)), False


def msg(role: str, words: int) -> dict:
    return {"role": role, "content": " ".join(["w"] * words)}


CONV = [msg("system", 2), msg("user", 10), msg("assistant", 10), msg("user", 10), msg("assistant", 10),
        msg("user", 3)]  # 45 tokens


def test_a_conversation_that_fits_is_processed_once_and_kept_whole():
    model = _Model(window=50)
    fitted = fit_history(model, CONV, room=5)
    assert (fitted.messages, fitted.dropped, fitted.prompt_tokens) == (CONV, 0, 45)
    assert len(model.processed) == 1


@pytest.mark.parametrize("window, dropped", [(45, 2), (30, 2), (25, 4), (10, 4)])
def test_the_oldest_whole_exchanges_are_dropped_until_the_room_is_free(window, dropped):
    model = _Model(window)
    fitted = fit_history(model, CONV, room=5)
    assert fitted.dropped == dropped
    assert fitted.messages == CONV[:1] + CONV[1 + dropped:]
    assert fitted.prompt_tokens + 5 <= window
    assert fitted.messages[1]["role"] == "user"


def test_an_exchange_of_several_messages_goes_as_one_and_history_never_starts_with_an_assistant():
    conv = [msg("user", 10), msg("assistant", 4), msg("assistant", 4), msg("user", 2)]
    fitted = fit_history(_Model(window=10), conv, room=3)
    assert fitted.messages == conv[3:] and fitted.dropped == 3


def test_reference_roles_count_as_user_turns():
    conv = [msg("<|User|>", 10), msg("<|Assistant|>", 10), msg("<|User|>", 3)]
    fitted = fit_history(_Model(window=10), conv, room=2)
    assert fitted.messages == conv[2:] and fitted.dropped == 2


def test_what_follows_the_last_user_message_is_kept():
    conv = [msg("user", 10), msg("assistant", 10), msg("user", 3), msg("assistant", 2)]
    fitted = fit_history(_Model(window=10), conv, room=1)
    assert fitted.messages == conv[2:]


def test_system_and_last_user_message_alone_too_long_is_an_error_with_their_count():
    conv = [msg("system", 4), msg("user", 10), msg("assistant", 10), msg("user", 8)]
    with pytest.raises(ContextLengthError) as e:
        fit_history(_Model(window=12), conv, room=4)
    assert (e.value.tokens, e.value.window, e.value.room) == (12, 12, 4)
    assert isinstance(e.value, GenerationError)
    assert "needs 12 tokens" in str(e.value) and "4 more to answer" in str(e.value) and "is 12 tokens" in str(e.value)


def test_room_must_be_positive():
    with pytest.raises(ValueError, match="room must be at least 1"):
        fit_history(_Model(window=100), CONV, room=0)
