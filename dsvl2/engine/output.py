"""The output layer: token ids -> text deltas, stop strings, the finish reason.

The core decides what the ids alone decide (eos or a stop id: "stop"; ``max_new_tokens``
or the context window: "length") and hands each sampled id here with that verdict. This
layer detokenises without splitting a UTF-8 character, cuts the text before a stop string
(which also finishes the request: "stop"), and returns the text delta. The stop token /
string is never part of the text.
"""

from __future__ import annotations

import copy

from .detokenize import StopStringMatcher, StreamDecoder
from .request import Request


class OutputProcessor:
    def __init__(self, decode_fn):
        self.decode_fn = decode_fn

    def start(self, req: Request) -> None:
        req.decoder = StreamDecoder(self.decode_fn, skip_special_tokens=False)
        req.stopper = StopStringMatcher(req.params.stop) if req.params.stop else None
        req.text = ""

    def process(self, r: Request, tok: int, verdict: str | None) -> str:
        """Record sampled ``tok`` (the core's ``verdict``: None, "stop" for eos / stop ids,
        "done" for a token that completes a guided output, "length"); returns the new text
        and sets ``r.finish_reason`` when it is finished."""
        if verdict == "stop":  # eos / stop id: the token itself is not text
            r.finish_reason = "stop"
            return self._finish_text(r)
        if verdict == "done":  # the token is text, and the last one
            delta = self.process(r, tok, None)
            if r.finish_reason is None:
                r.finish_reason = "stop"
                delta += self._finish_text(r)
            return delta
        delta = r.decoder.push(tok)
        if r.stopper is not None:
            delta, stopped = r.stopper.feed(delta)
            if stopped:
                r.finish_reason = "stop"
                r.text += delta
                return delta
            # The decoder holds trailing whitespace back until the next id, so a stop string
            # ending in whitespace ("\n") would be seen one token (one forward) late: probe
            # the held text with a copy of the matcher when it ends in whitespace.
            held = r.decoder.pending()
            if held[-1:].isspace() and copy.copy(r.stopper).feed(held)[1]:
                r.text += delta
                r.finish_reason = "stop"
                return delta + self._finish_text(r)
        r.text += delta
        if verdict == "length":
            r.finish_reason = "length"
            return delta + self._finish_text(r)
        return delta

    def _finish_text(self, r: Request) -> str:
        tail = r.decoder.flush()
        if r.stopper is not None:
            tail, stopped = r.stopper.feed(tail)
            if stopped:
                r.finish_reason = "stop"  # the held tail completed a stop string
            else:
                tail += r.stopper.flush()
        r.text += tail
        return tail
