"""Streaming text: ids -> text deltas (``StreamDecoder``) and stop strings (``StopStringMatcher``).

The contract of ``StreamDecoder``: the concatenation of everything ``push`` and ``flush``
return equals ``decode_fn(all_ids)`` exactly, and no delta ends inside a character. It
holds for every decoder whose text for a token can only be changed by the token right
after it: byte-level BPE (``tokenizers``' ByteLevel, DeepSeek's), SentencePiece's
Metaspace, the next-token spacing cleanups (``" ." -> "."``). A decoder that rewrites
text further back cannot be streamed exactly by anyone; see the last point below.

How (the "prefix offset" technique of streaming servers, with checks):

* Only a window of the output is decoded at each step: ids ``[prefix, ...)``, where the
  ids in ``[prefix, read)`` were already emitted and serve as context. The new text is
  what the window decodes to beyond what ``[prefix, read)`` decodes to. Decoding the
  context along with the new ids matters for decoders whose output for a token depends on
  its neighbours (SentencePiece's Metaspace drops the space of the first token only).
  Each step is O(window), not O(output).
* Byte-level BPE tokens can hold part of a UTF-8 character; the decoder then ends the
  text with U+FFFD. Text ending in U+FFFD is held back until more ids arrive: a genuine
  U+FFFD (invalid bytes) is released as soon as any valid text follows, and ``flush``
  releases what is left, so the total still equals the full decode.
* Trailing whitespace is held back too, until the next id: the spacing cleanups some
  decoders apply (``" ." -> "."``) remove a space depending on the token that follows it.
  The text before the held tail is emitted at once (``_partial`` records it), so a run
  of whitespace or of U+FFFD never delays earlier text.
* A decoder that rewrites text we had already treated as settled (the window's text no
  longer extends its context's text) is detected; the decoder then stops sliding the
  window and re-decodes the whole output at each step (O(output), only for such
  decoders). Text already emitted cannot be taken back: if the full decode no longer
  starts with it, nothing more is emitted until ``flush``, which returns the full decode
  beyond their common prefix (the one case where the equality cannot hold; it cannot
  happen with byte-level BPE, whose decode is a plain concatenation of bytes).

Recent ``tokenizers`` decode special tokens apart from the byte stream, so a special token
between the bytes of one character leaves genuine U+FFFD, released once the special
token's text follows.

``StopStringMatcher`` works on the text deltas: it holds back a tail that could begin a
stop string and cuts the text before the first stop string found.
"""

from __future__ import annotations

from typing import Callable, Sequence

from ..errors import GenerationError

__all__ = ["StreamDecoder", "StopStringMatcher"]

_REPLACEMENT = "\ufffd"


def _held_tail(text: str) -> int:
    """Index where the tail of ``text`` that must wait for more ids begins (whitespace, U+FFFD)."""
    end = len(text)
    while end and (text[end - 1] == _REPLACEMENT or text[end - 1].isspace()):
        end -= 1
    return end


class StreamDecoder:
    """Incremental detokeniser for one output stream.

    ``decode_fn(ids: list[int]) -> str`` decodes a list of ids, e.g.
    ``tokenizer.decode`` of a ``tokenizers.Tokenizer`` (wrapped to drop ids beyond the
    tokenizer, which the LM head can produce). When ``skip_special_tokens`` is not None it
    is passed to ``decode_fn`` as that keyword. Note that ``tokenizers`` defaults to
    skipping special tokens; the official reference decodes with them.

    >>> dec = StreamDecoder(lambda ids: "".join("ab "[i] for i in ids))
    >>> [dec.push(i) for i in (0, 2, 1)], dec.flush()
    (['a', '', ' b'], '')
    """

    def __init__(self, decode_fn: Callable[..., str], skip_special_tokens: bool | None = None):
        if skip_special_tokens is None:
            self._decode_fn = decode_fn
        else:
            self._decode_fn = lambda ids: decode_fn(ids, skip_special_tokens=skip_special_tokens)
        self.ids: list[int] = []
        self._emitted: list[str] = []  # every delta returned so far
        self._prefix = 0  # window start: ids[prefix:read] are emitted context
        self._read = 0  # ids before this are emitted in full
        self._prefix_text = ""  # decode(ids[prefix:read])
        self._partial = ""  # text of ids[read:] emitted already (before a held tail)
        self._pinned = False  # window no longer slides (decoder rewrote settled text)
        self._broken = False  # full decode no longer starts with the emitted text

    @property
    def text(self) -> str:
        """Everything emitted so far."""
        return "".join(self._emitted)

    def _decode(self, ids: list[int]) -> str:
        return self._decode_fn(ids) if ids else ""

    def _emit(self, delta: str) -> str:
        if delta:
            self._emitted.append(delta)
        return delta

    def push(self, token_id: int) -> str:
        """Add one id; return the new text that is now settled (possibly "")."""
        self.ids.append(int(token_id))
        if self._broken:
            return ""
        window = self._decode(self.ids[self._prefix:])
        new = window[len(self._prefix_text):]
        if not (window.startswith(self._prefix_text) and new.startswith(self._partial)):
            self._pin()
            if self._broken:
                return ""
            window = self._decode(self.ids)
            new = window[len(self._prefix_text):]
        if new and len(new) == _held_tail(new):
            # Everything up to the last id is settled: slide the window.
            delta = new[len(self._partial):]
            if not self._pinned:
                self._prefix, self._read = self._read, len(self.ids)
                self._prefix_text = self._decode(self.ids[self._prefix:self._read])
                self._partial = ""
            else:
                self._partial = new
            return self._emit(delta)
        if not new and not self._partial:
            # The id decoded to nothing (special token skipped, id beyond the tokenizer):
            # nothing is pending, so it joins the emitted context.
            self._read = len(self.ids)
            return ""
        end = _held_tail(new)
        if end > len(self._partial):
            delta, self._partial = new[len(self._partial):end], new[:end]
            return self._emit(delta)
        return ""

    def pending(self) -> str:
        """The text decoded but held back (trailing whitespace, partial characters), not emitted.

        O(window), like ``push``; "" once the decoder rewrote emitted text (see ``_pin``).
        """
        if self._broken:
            return ""
        window = self._decode(self.ids[self._prefix:])
        new = window[len(self._prefix_text):]
        if window.startswith(self._prefix_text) and new.startswith(self._partial):
            return new[len(self._partial):]
        return ""

    def _pin(self) -> None:
        """Switch to decoding the whole output at each step (see the module docstring)."""
        self._pinned = True
        self._prefix = self._read = 0
        self._prefix_text = ""
        self._partial = self.text
        if not self._decode(self.ids).startswith(self._partial):
            self._broken = True

    def flush(self) -> str:
        """Return all text still held back; the stream is then complete."""
        if not self._broken:
            window = self._decode(self.ids[self._prefix:])
            new = window[len(self._prefix_text):]
            if window.startswith(self._prefix_text) and new.startswith(self._partial):
                delta = new[len(self._partial):]
                self._prefix, self._read = self._read, len(self.ids)
                self._prefix_text, self._partial = self._decode(self.ids[self._prefix:self._read]), ""
                return self._emit(delta)
        # The decoder rewrote text: reconcile with one full decode.
        full, done = self._decode(self.ids), self.text
        common = 0
        while common < min(len(full), len(done)) and full[common] == done[common]:
            common += 1
        self._pinned, self._partial = True, full
        self._prefix = self._read = 0
        self._prefix_text = ""
        return self._emit(full[common:])


class StopStringMatcher:
    """Cuts a text stream before the first stop string.

    ``feed(delta)`` returns ``(text safe to emit, stopped)``. A tail that could be the
    beginning of a stop string is held back until it is decided; when a stop string
    appears (also across deltas), the text before it is returned with ``stopped=True``
    and the stop string itself never is. After that every call returns ``("", True)``.
    ``flush()`` returns the held tail when the stream ends without a stop.

    Matching is a Knuth-Morris-Pratt automaton per distinct stop string, so a feed costs
    O(len(delta) x stops) whatever the stop strings look like; comparing every suffix of
    the held text with every prefix of every stop cost O(len(stop)^2) per feed, 0.3 s per
    token with 100 stop strings of 4000 characters.

    >>> m = StopStringMatcher(["</s>"])
    >>> m.feed("hello </"), m.feed("s> bye")
    (('hello ', False), ('', True))
    """

    def __init__(self, stops: Sequence[str]):
        stops = [stops] if isinstance(stops, str) else list(stops)
        for s in stops:
            if not isinstance(s, str) or not s:
                raise GenerationError(f"stop strings must be non-empty strings, got {s!r}")
        self.stops = stops
        self.stopped = False
        self._held = ""
        self._distinct = list(dict.fromkeys(stops))
        self._fail = [_failure(s) for s in self._distinct]
        self._state = [0] * len(self._distinct)  # per stop: length of its prefix the stream ends with

    def __copy__(self) -> "StopStringMatcher":
        # The engine probes held text with a copy: the automaton state must not be shared.
        new = object.__new__(StopStringMatcher)
        new.__dict__.update(self.__dict__)
        new._state = list(self._state)
        return new

    def feed(self, delta: str) -> tuple[str, bool]:
        if self.stopped:
            return "", True
        text = self._held + delta
        base = len(self._held)
        first = -1  # start (in text) of the earliest stop string completed by this delta
        for j, s in enumerate(self._distinct):
            m, fail, n = self._state[j], self._fail[j], len(s)
            for pos, c in enumerate(delta):
                while m and s[m] != c:
                    m = fail[m - 1]
                if s[m] == c:
                    m += 1
                    if m == n:  # a later occurrence of the same string would start later
                        start = base + pos + 1 - n  # >= 0: a state never exceeds the held text
                        first = start if first < 0 else min(first, start)
                        break
            self._state[j] = m
        if first >= 0:
            self.stopped, self._held = True, ""
            return text[:first], True
        keep = max(self._state, default=0)  # longest tail of text that is a proper prefix of a stop
        self._held = text[len(text) - keep:] if keep else ""
        return text[:len(text) - keep], False

    def flush(self) -> str:
        """The held tail (no stop string was completed)."""
        held, self._held = ("" if self.stopped else self._held), ""
        return held


def _failure(s: str) -> list[int]:
    """KMP failure function: ``f[i]`` = length of the longest proper border of ``s[:i + 1]``."""
    f = [0] * len(s)
    k = 0
    for i in range(1, len(s)):
        while k and s[i] != s[k]:
            k = f[k - 1]
        if s[i] == s[k]:
            k += 1
        f[i] = k
    return f
