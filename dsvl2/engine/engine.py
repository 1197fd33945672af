"""The generation engine's token-id core: requests -> admission -> batched decode steps.

Legend: B active rows, T tokens in a step, V vocab, D width.

Layers (STYLE.md habit 8, DESIGN.md "engine"): the pure sampler (``sampling``); the
``Scheduler`` (queue, slots, per-step token budget); the ``ModelRunner`` (vision, packed
prefill and decode forwards over one ``KVCache``); the output layer (``output``:
detokenise, stop strings, finish); this ``Engine``, whose ``step`` ties them together for
ONE caller; and the ``Driver`` (``driver``), the one loop that owns an engine so that any
number of threads / iterators can submit, read and cancel. No HTTP, no text formatting.

* Each request owns one cache row (a "slot"); rows start, advance and finish
  independently. ``step()`` admits waiting requests into free slots, runs this step's
  admission work (vision tiles, prefill chunks) within the token budget, samples one
  token for every running request and runs ONE batched decode forward for the rows that
  go on. Finished rows leave at once and cost nothing more: continuous batching.
* ``submit`` only queues (no model work in the caller's thread): images are encoded by
  ``step``, a few tiles at a time when a budget is set.
* Stops: eos, ``stop_token_ids``, stop strings (cut before the string), ``max_new_tokens``
  and the context window. The stop token / string is not part of the text.
* Batch rows vs alone: a row's decode products compute in bf16 whatever the batch (see
  ``ops.decoding``), prefill and vision in float32, so a row's greedy output equals the
  same conversation alone in every dtype except where two logits tie within float32
  rounding of the attention / router sums (which depend on the padded batch shape).
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch

from ..errors import GenerationError
from ..model.cache import KVCache
from ..model.vl import DeepseekVL2, num_tiles, used_crops
from ..processing import BatchInputs, Tokenizer
from .output import OutputProcessor
from .prefix import PrefixCache, image_hashes, prompt_keys
from .request import Request, Timings
from .runner import ModelRunner
from .sampling import SamplingParams, make_generator, sample_next
from .scheduler import Prefill, Scheduler, Vision

__all__ = ["Engine", "GenerationOutput", "Request", "StreamEvent", "Timings"]


@dataclass
class GenerationOutput:
    """Result of one request: ids, text (stop token / string excluded), why it ended."""

    ids: list[int]
    text: str
    finish_reason: str  # "stop" | "length" | "cancelled" | "error"
    prompt_tokens: int
    completion_tokens: int
    scores: torch.Tensor | None = None  # [steps, V] raw logits of each decoding step
    timings: dict | None = None         # Timings.to_dict()
    error: str | None = None
    cached_tokens: int = 0              # prompt tokens reused from the prefix cache


@dataclass
class StreamEvent:
    """A text delta of request ``index``; the last event of a request has ``finish_reason``."""

    index: int
    delta: str
    token_id: int | None = None
    finish_reason: str | None = None
    output: GenerationOutput | None = None


class Engine:
    """Runs many requests over one model with one KV cache of ``max_batch_size`` rows.

    One caller at a time: ``step`` is not thread-safe. Share an engine between threads or
    iterators through a ``Driver``. ``step_tokens`` is the per-step token budget of the
    scheduler (None: admission work is never split, the whole prompt prefills at once).
    ``prefix_cache_bytes`` > 0 keeps finished rows for follow-ups (``prefix``).
    """

    def __init__(self, model: DeepseekVL2, tokenizer: Tokenizer, max_batch_size: int = 16,
                 cache_dtype: torch.dtype | None = None, context_window: int | None = None,
                 step_tokens: int | None = None, prefix_cache_bytes: int = 0):
        self.model = model
        self.tokenizer = tokenizer
        self.cfg = model.cfg.language
        self.max_batch_size = max_batch_size
        self.runner = ModelRunner(model, cache_dtype)
        self.device = self.runner.device
        self.dtype = self.runner.dtype
        self.cache_dtype = self.runner.cache_dtype
        vc = model.cfg.vision
        self.prefix_cache = PrefixCache(prefix_cache_bytes)
        self.scheduler = Scheduler(max_batch_size, step_tokens, tile_cost=(vc.image_size // vc.patch_size) ** 2,
                                   prefix=self.prefix_cache)
        self.output = OutputProcessor(tokenizer.decode)
        self.eos_ids = {i for i in (tokenizer.eos_id, self.cfg.eos_token_id) if i is not None}
        # Optional hook for long work: progress(stage, done, total) with stage "vision"
        # (tiles encoded) or "prefill" (prompt tokens processed), per request.
        self.progress: Callable[[str, int, int], None] | None = None
        self._ids = itertools.count()
        # Prompt + output tokens allowed per request: the model's max_position_embeddings
        # unless the caller knows better (the reference itself does not enforce it).
        self.context_window = context_window or self.cfg.max_position_embeddings

    # ---- state seen from outside -------------------------------------------------------
    @property
    def cache(self) -> KVCache | None:
        return self.runner.cache

    @cache.setter
    def cache(self, value: KVCache | None) -> None:
        self.runner.cache = value

    @property
    def free_slots(self) -> list[int]:
        return self.scheduler.free_slots

    @property
    def waiting(self):
        return self.scheduler.waiting

    @property
    def active(self) -> list[Request]:
        """Requests holding a cache row: being admitted or running."""
        return self.scheduler.admitting + self.scheduler.running

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    # ---- requests -----------------------------------------------------------------------
    def submit(self, batch: BatchInputs, params: SamplingParams | Sequence[SamplingParams] = SamplingParams(),
               chunk_size: int | None = None, output_scores: bool = False) -> list[Request]:
        """Queue one request per row of a processed batch (all model work happens in ``step``)."""
        reqs = self.make_requests(batch, params, chunk_size, output_scores)
        self.add(reqs)
        return reqs

    def make_requests(self, batch: BatchInputs, params: SamplingParams | Sequence[SamplingParams] = SamplingParams(),
                      chunk_size: int | None = None, output_scores: bool = False) -> list[Request]:
        """Check a processed batch and make one request per row; touches no engine state
        (safe from any thread: the ``Driver`` calls it in the caller's thread)."""
        n = len(batch)
        plist = [params] * n if isinstance(params, SamplingParams) else list(params)
        if len(plist) != n:
            raise GenerationError(f"got {len(plist)} SamplingParams for {n} conversations")
        if chunk_size is not None and (not isinstance(chunk_size, int) or isinstance(chunk_size, bool)
                                       or chunk_size < 1):
            raise GenerationError(f"chunk_size must be a positive integer or None, got {chunk_size!r}")
        for b, length in enumerate(batch.seq_lens):
            if length >= self.context_window:
                raise GenerationError(f"conversation {b} has {length} prompt tokens (images included); "
                                      f"the model's context window is {self.context_window} tokens")
        reqs = []
        for b in range(n):
            valid = batch.attention_mask[b]
            ids = batch.input_ids[b][valid]
            crops = used_crops(batch.images_spatial_crop[b].tolist())
            tiles = batch.pixel_values[b, :num_tiles(crops)] if crops else None
            seq_mask = batch.images_seq_mask[b][valid]
            keys = None
            if self.prefix_cache.enabled:
                keys = prompt_keys(ids.tolist(), seq_mask.tolist(), batch.num_image_tokens[b],
                                   image_hashes(tiles, crops) if crops else [])
            reqs.append(Request(next(self._ids), ids.tolist(), plist[b], chunk_size, output_scores,
                                input_ids=ids.to(self.device), seq_mask=seq_mask.to(self.device),
                                tiles=None if tiles is None else tiles.to(self.device), crops=crops, keys=keys))
        return reqs

    def add(self, reqs: Sequence[Request]) -> None:
        for req in reqs:
            self.scheduler.add(req)

    def cancel(self, reqs: Sequence[Request], reason: str = "cancelled") -> None:
        """Drop requests (e.g. a client went away); their slots become free ("error": the
        row's content is not trusted, so it is not kept for the prefix cache)."""
        for r in reqs:
            if not r.finished:
                r.finish_reason = reason
                r.timings.finished = time.perf_counter()
            self._release(r, keep=reason != "error")
            r.release_inputs()

    def _release(self, r: Request, keep: bool = True) -> None:
        keys = None
        if keep and r.keys is not None and self.prefix_cache.enabled and r.length > 0:
            keys = (r.keys + r.output_ids)[:r.length]  # the tokens whose KV is in the row
        cache = self.runner.cache
        row_bytes = cache.nbytes() // max(cache.rows, 1) if cache is not None else 0
        self.scheduler.release(r, keys, row_bytes)

    def _start(self, req: Request) -> None:
        p = req.params
        req.timings.admitted = time.perf_counter()
        if req.cached_tokens:  # a kept row holds the first cached_tokens tokens' KV
            req.prefilled = req.length = req.cached_tokens
            slots = req.seq_mask.nonzero()
            if not slots.numel() or int(slots[-1]) < req.cached_tokens:
                req.tiles_done = req.tiles_total  # every image is inside the prefix: no vision
        req.generator = None if p.is_greedy else make_generator(p.seed, self.device)
        if p.repetition_penalty != 1.0:
            req.seen = torch.zeros(self.cfg.vocab_size, dtype=torch.bool, device=self.device)
            req.seen[torch.tensor(req.prompt_ids, device=self.device)] = True
        self.output.start(req)

    # ---- one step ----------------------------------------------------------------------
    @torch.no_grad()
    def step(self) -> list[tuple[Request, int, str]]:
        """Admission work within the budget, one token per running request, one decode forward.

        Returns (request, token id, text delta) for every token sampled in this step.
        """
        for req in self.scheduler.admit():
            self._start(req)
        self._admission_work()
        reqs = list(self.scheduler.running)
        if not reqs:
            return []
        logits = torch.stack([r.next_logits for r in reqs])  # [B, V]
        seen = None
        if any(r.seen is not None for r in reqs):
            seen = torch.stack([r.seen if r.seen is not None else torch.zeros_like(logits[0], dtype=torch.bool)
                                for r in reqs])
        tokens = sample_next(logits, [r.params for r in reqs], [r.generator for r in reqs], seen).tolist()
        now = time.perf_counter()
        events = []
        for r, tok in zip(reqs, tokens):
            if r.output_scores:
                r.scores.append(r.next_logits)
            if r.timings.first_token is None:
                r.timings.first_token = now
            r.timings.token_times.append(now)
            events.append((r, tok, self.output.process(r, tok, self._verdict(r, tok))))
        for r in reqs:
            if r.finished:
                r.timings.finished = now
                self._release(r)
        going = [r for r in reqs if not r.finished]
        if going:
            self.runner.decode(going)
        return events

    def _verdict(self, r: Request, tok: int) -> str | None:
        """What the ids alone decide: record ``tok``; "stop" (eos / stop id), "length" or None."""
        r.output_ids.append(tok)
        if r.seen is not None:
            r.seen[tok] = True
        if tok in self.eos_ids or tok in r.params.stop_token_ids:
            return "stop"
        if len(r.output_ids) >= r.params.max_new_tokens or r.length + 1 >= self.context_window:
            return "length"
        return None

    def _admission_work(self) -> None:
        hook = self.progress
        for work in self.scheduler.plan():
            if isinstance(work, Vision):
                r = work.req
                if hook is not None and r.tiles_done == 0:
                    hook("vision", 0, r.tiles_total)
                self.runner.vision(r, work.k)
                if hook is not None:
                    hook("vision", r.tiles_done, r.tiles_total)
            elif isinstance(work, Prefill):
                if hook is not None:
                    for r, _ in work.chunks:
                        if r.prefilled == 0:
                            hook("prefill", 0, r.prompt_len)
                for r in self.runner.prefill(work.chunks):
                    r.release_inputs()
                    self.scheduler.start_running(r)
                if hook is not None:
                    for r, _ in work.chunks:
                        hook("prefill", r.prefilled, r.prompt_len)

    # ---- plain calls (one caller) ------------------------------------------------------
    def stream(self, batch: BatchInputs, params: SamplingParams | Sequence[SamplingParams] = SamplingParams(),
               chunk_size: int | None = None, output_scores: bool = False) -> Iterator[StreamEvent]:
        """Generate for every row of ``batch``, yielding text deltas as tokens arrive."""
        reqs = self.submit(batch, params, chunk_size, output_scores)
        index = {r.rid: i for i, r in enumerate(reqs)}
        pending = set(index)
        try:
            while pending:
                for r, tok, delta in self.step():
                    if r.rid not in index:
                        continue
                    out = None
                    if r.finished:
                        pending.discard(r.rid)
                        out = self.result(r)
                    if delta or r.finished:
                        yield StreamEvent(index[r.rid], delta, tok, r.finish_reason, out)
        finally:
            self.cancel([r for r in reqs if r.rid in pending])

    def generate(self, batch: BatchInputs, params: SamplingParams | Sequence[SamplingParams] = SamplingParams(),
                 chunk_size: int | None = None, output_scores: bool = False) -> list[GenerationOutput]:
        outs: list[GenerationOutput | None] = [None] * len(batch)
        for ev in self.stream(batch, params, chunk_size, output_scores):
            if ev.output is not None:
                outs[ev.index] = ev.output
        return outs  # type: ignore[return-value]

    def result(self, r: Request) -> GenerationOutput:
        scores = torch.stack(r.scores) if r.output_scores and r.scores else None
        return GenerationOutput(list(r.output_ids), r.text, r.finish_reason or "length", len(r.prompt_ids),
                                len(r.output_ids), scores, r.timings.to_dict(), r.error, r.cached_tokens)
