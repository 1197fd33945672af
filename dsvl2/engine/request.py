"""One request's state as it moves through the engine: waiting -> admitting -> running -> done.

Legend: L prompt tokens, N tiles, S tile side, D width, V vocab.

* waiting: queued, no KV blocks yet;
* admitting: holds a seat (``slot``) and the KV blocks for its tokens (``blocks``, its
  block table); its image tiles go through the vision tower a few at a time, then its
  prompt is prefilled chunk by chunk (both under the per-step token budget, so running
  streams keep getting tokens meanwhile);
* running: has ``next_logits``; one token per step, a new block every block-size tokens;
* preempted (memory ran short): back to waiting with no blocks; when admitted again,
  its prompt and the output so far are computed again (shared blocks permitting) and it
  goes on where it stopped: its sampler state and text are kept;
* done: ``finish_reason`` set ("stop" | "length" | "cancelled" | "error").

The output layer's state (detokeniser, stop-string matcher, text) lives here too, so one
object follows the request; only ``output.py`` touches those fields.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from .detokenize import StopStringMatcher, StreamDecoder
from .sampling import SamplingParams


@dataclass
class Timings:
    """perf_counter() stamps of one request (the benchmark and the server's metrics read them)."""

    submitted: float = field(default_factory=time.perf_counter)
    admitted: float | None = None        # first got its seat and KV blocks
    vision_s: float = 0.0                # time spent in the vision tower + projector
    prefill_s: float = 0.0               # time spent prefilling its prompt
    first_token: float | None = None
    token_times: list[float] = field(default_factory=list)  # one stamp per output token
    finished: float | None = None

    def to_dict(self) -> dict:
        t0 = self.submitted
        gaps = [b - a for a, b in zip(self.token_times, self.token_times[1:])]
        return {
            "queue_s": None if self.admitted is None else self.admitted - t0,
            "vision_s": self.vision_s,
            "prefill_s": self.prefill_s,
            "first_token_s": None if self.first_token is None else self.first_token - t0,
            "total_s": None if self.finished is None else self.finished - t0,
            "max_inter_token_s": max(gaps) if gaps else None,
            "mean_inter_token_s": sum(gaps) / len(gaps) if gaps else None,
        }


@dataclass
class Request:
    """One conversation being generated (engine-internal state)."""

    rid: int
    prompt_ids: list[int]
    params: SamplingParams
    chunk_size: int | None
    output_scores: bool = False
    # inputs, until the prompt is prefilled
    input_ids: torch.Tensor | None = None   # [L] int64
    seq_mask: torch.Tensor | None = None    # [L] bool, image-token slots
    tiles: torch.Tensor | None = None       # [N, 3, S, S]
    crops: list[tuple[int, int]] = field(default_factory=list)  # (tw, th) per image
    projected: list[torch.Tensor] = field(default_factory=list)  # vision output so far
    tiles_done: int = 0
    embeds: torch.Tensor | None = None      # [L, D] prompt embeddings, once the images are in
    prefilled: int = 0                      # prompt tokens already in the cache
    keys: list | None = None                # prefix keys of the prompt (prefix.py); None: no sharing
    cached_tokens: int = 0                  # prompt tokens reused from shared blocks (first admission)
    # KV blocks (kv_manager.py)
    blocks: list[int] = field(default_factory=list)  # the block table
    hashes: list[bytes] = field(default_factory=list)  # chain hash of each full block of its tokens
    registered: int = 0                     # leading blocks known to the pool (full, final)
    preemptions: int = 0
    # decoding
    slot: int = -1                          # seat among the engine's max_batch_size
    length: int = 0                         # tokens in the cache
    output_ids: list[int] = field(default_factory=list)
    next_logits: torch.Tensor | None = None  # [V] float32, logits for the next token
    generator: torch.Generator | None = None
    seen: torch.Tensor | None = None        # [V] bool, prompt + output ids (repetition penalty)
    finish_reason: str | None = None
    error: str | None = None
    scores: list[torch.Tensor] = field(default_factory=list)
    logprobs: list | None = None             # TokenLogprob per output token, when asked for
    guide: object | None = None              # the compiled guide (params.guide), if any
    matcher: object | None = None            # its per-request state: masks, accepts tokens
    timings: Timings = field(default_factory=Timings)
    # output layer
    decoder: StreamDecoder | None = None
    stopper: StopStringMatcher | None = None
    text: str = ""

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_ids)

    @property
    def prefill_len(self) -> int:
        """Tokens to compute before the next token can be sampled: the prompt, and after a
        preemption the output tokens too (the last one sampled included)."""
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def tiles_total(self) -> int:
        return 0 if self.tiles is None else self.tiles.shape[0]

    def token_key(self, p: int):
        """The prefix key of its token at position ``p`` (``prefix.py``): the prompt's key,
        then the output ids (after a preemption they are computed again too)."""
        n = len(self.prompt_ids)
        return self.keys[p] if p < n else self.output_ids[p - n]

    def prefilled_chunk(self, n: int) -> None:
        """A prefill forward wrote its next ``n`` tokens into the cache."""
        self.prefilled += n
        self.length = self.prefilled

    def decoded(self) -> None:
        """A decode forward wrote its last sampled token into the cache."""
        self.length += 1

    def preempt(self) -> None:
        """Its blocks were taken back: start admission again (sampler and text state stay)."""
        self.preemptions += 1
        self.slot = -1
        self.length = self.prefilled = self.tiles_done = 0
        self.next_logits = None
        self.drop_prefill_state()

    def drop_prefill_state(self) -> None:
        """The prompt is in the cache: its embeddings and image features are not needed any
        more (the inputs stay until the end: a preempted request computes them again)."""
        self.embeds = None
        self.projected = []

    def release_inputs(self) -> None:
        """The request is over: drop its inputs."""
        self.input_ids = self.seq_mask = self.tiles = self.embeds = None
        self.projected = []
