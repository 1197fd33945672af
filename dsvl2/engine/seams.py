"""The engine's seams: how tests and benchmarks observe and steer it without patching.

Nothing here is needed to serve requests; it is what a caller may plug in instead of
replacing an engine's methods or a module's names (see ``engine``'s docstring for where
each is called):

* ``StepReport``: what one ``Engine.step`` did and how long each stage took, handed to
  the observers of ``Engine.add_step_observer``;
* ``Sampler``: the signature of the function that picks the next tokens
  (``sampling.sample_next``'s); an engine's own is ``Engine(sampler=)``, and
  ``use_sampler`` sets one for every engine without its own, for engines a test cannot
  reach before they sample (the one ``dsvl2 chat`` loads, a server's).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import torch

from .sampling import SamplingParams

__all__ = ["Sampler", "StepReport", "process_sampler", "use_sampler"]

# (logits [B, V], params per row, generator per row, seen [B, V] bool or None) -> ids [B]
Sampler = Callable[[torch.Tensor, Sequence[SamplingParams], Sequence["torch.Generator | None"],
                    "torch.Tensor | None"], torch.Tensor]

_samplers: list[Sampler] = []  # open use_sampler blocks, innermost last


@contextmanager
def use_sampler(sampler: Sampler) -> Iterator[None]:
    """Within this block, every engine without a sampler of its own samples with
    ``sampler``, in every thread (the driver's too). Blocks nest: the innermost wins."""
    if not callable(sampler):
        raise TypeError(f"a sampler must be callable, got {type(sampler).__name__}")
    _samplers.append(sampler)
    try:
        yield
    finally:
        _samplers.remove(sampler)


def process_sampler() -> Sampler | None:
    """The sampler of the innermost open ``use_sampler`` block, or None."""
    return _samplers[-1] if _samplers else None


@dataclass
class StepReport:
    """What one ``Engine.step`` did, handed to step observers. Requests appear as ids (an
    observer must not change engine state). Work that failed is listed too; its requests
    are in ``finished`` with "error"."""

    step: int              # steps this engine ran before this one
    running: list[int]     # requests running as the step began (a budget token each)
    admitted: list[int] = field(default_factory=list)  # got their seats and KV blocks in it
    vision: list[tuple[int, int]] = field(default_factory=list)  # per tower call: (request, tiles)
    # per packed prefill forward: [(request, first position, tokens), ...]
    prefill: list[list[tuple[int, int, int]]] = field(default_factory=list)
    sampled: list[int] = field(default_factory=list)   # requests that got a token
    # the decode forward's rows: (request, position of the token it writes); [] if none ran
    decode: list[tuple[int, int]] = field(default_factory=list)
    preempted: list[int] = field(default_factory=list)  # gave their blocks back, wait again
    finished: dict[int, str] = field(default_factory=dict)  # request -> finish reason
    # seconds per stage: "admit" (seats, blocks, block copies), "vision", "prefill",
    # "sample" (logits to events: masks, sampling, detokenising, stops), "decode" (blocks
    # for the new tokens, the fault hook, the forward; 0 when none ran), "total" (the step)
    timings: dict[str, float] = field(default_factory=lambda: dict.fromkeys(
        ("admit", "vision", "prefill", "sample", "decode", "total"), 0.0))

    @property
    def prefill_tokens(self) -> int:
        """Prompt tokens prefilled in this step."""
        return sum(n for forward in self.prefill for _, _, n in forward)

    @property
    def vision_tiles(self) -> int:
        """Image tiles encoded in this step."""
        return sum(k for _, k in self.vision)
