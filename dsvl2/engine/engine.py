"""The generation engine: requests -> prefill -> batched decode steps -> tokens and text.

Legend: B active rows, T tokens in a step, V vocab, D width.

Layers (STYLE.md habit 8): the pure sampler (``sampling``), this step loop that only
knows token ids and one ``KVCache``, the streaming detokeniser (``detokenize``), and the
plain calls ``generate`` / ``stream`` on top. No HTTP, no text formatting.

* Each request owns one cache row (a "slot"); rows start, advance and finish
  independently. ``step()`` first admits waiting requests into free slots (prefill),
  then samples one token for every active request and runs ONE batched forward for the
  rows that go on. Finished rows leave the batch at once and cost nothing more. This is
  continuous batching: a server can ``submit`` new requests between steps.
* Prefill: the left-padded batch from the processor is embedded (vision included) once,
  each row's padding is stripped, and the language model runs over the packed rows,
  whole or in chunks of ``chunk_size`` tokens (bounded memory). Positions are the true
  positions of each row, so chunked prefill of a left-padded row equals the whole
  prefill (the reference's ``incremental_prefilling`` gets those rows wrong).
* Stops: eos, ``stop_token_ids``, stop strings (cut before the string), ``max_new_tokens``
  and the context window. The stop token / string is not part of the text.
"""

from __future__ import annotations

import copy
import itertools
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import torch

from ..errors import GenerationError
from ..model.cache import KVCache
from ..model.vl import DeepseekVL2
from ..processing import BatchInputs, Tokenizer
from .detokenize import StopStringMatcher, StreamDecoder
from .sampling import SamplingParams, make_generator, sample_next


@dataclass
class Request:
    """One conversation being generated (engine-internal state)."""

    rid: int
    prompt_ids: list[int]
    embeds: torch.Tensor  # [L, D] prompt embeddings (text + image features), packed
    params: SamplingParams
    chunk_size: int | None
    output_scores: bool = False
    slot: int = -1
    length: int = 0  # tokens in the cache
    output_ids: list[int] = field(default_factory=list)
    next_logits: torch.Tensor | None = None  # [V] float32, logits for the next token
    generator: torch.Generator | None = None
    seen: torch.Tensor | None = None  # [V] bool, prompt + output ids (repetition penalty)
    decoder: StreamDecoder | None = None
    stopper: StopStringMatcher | None = None
    text: str = ""
    finish_reason: str | None = None
    scores: list[torch.Tensor] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class GenerationOutput:
    """Result of one request: ids, text (stop token / string excluded), why it ended."""

    ids: list[int]
    text: str
    finish_reason: str  # "stop" | "length"
    prompt_tokens: int
    completion_tokens: int
    scores: torch.Tensor | None = None  # [steps, V] raw logits of each decoding step


@dataclass
class StreamEvent:
    """A text delta of request ``index``; the last event of a request has ``finish_reason``."""

    index: int
    delta: str
    token_id: int | None = None
    finish_reason: str | None = None
    output: GenerationOutput | None = None


class Engine:
    """Runs many requests over one model with one KV cache of ``max_batch_size`` rows."""

    def __init__(self, model: DeepseekVL2, tokenizer: Tokenizer, max_batch_size: int = 16,
                 cache_dtype: torch.dtype | None = None, context_window: int | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.cfg = model.cfg.language
        self.max_batch_size = max_batch_size
        self.device = model.language.lm_head.weight.device
        self.dtype = model.compute_dtype
        self.cache_dtype = cache_dtype or self.dtype
        self.cache: KVCache | None = None
        self.free_slots: list[int] = list(range(max_batch_size))
        self.waiting: deque[Request] = deque()
        self.active: list[Request] = []
        self.eos_ids = {i for i in (tokenizer.eos_id, self.cfg.eos_token_id) if i is not None}
        # Optional hook for long work: progress(stage, done, total) with stage "vision"
        # (tiles encoded) or "prefill" (prompt tokens processed).
        self.progress: Callable[[str, int, int], None] | None = None
        self._ids = itertools.count()
        # Prompt + output tokens allowed per request: the model's max_position_embeddings
        # unless the caller knows better (the reference itself does not enforce it).
        self.context_window = context_window or self.cfg.max_position_embeddings

    # ---- requests -----------------------------------------------------------------------
    @torch.no_grad()
    def submit(self, batch: BatchInputs, params: SamplingParams | Sequence[SamplingParams] = SamplingParams(),
               chunk_size: int | None = None, output_scores: bool = False) -> list[Request]:
        """Embed a processed batch and queue one request per row (prefill happens in ``step``)."""
        n = len(batch)
        plist = [params] * n if isinstance(params, SamplingParams) else list(params)
        if len(plist) != n:
            raise GenerationError(f"got {len(plist)} SamplingParams for {n} conversations")
        if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
            raise GenerationError(f"chunk_size must be a positive integer or None, got {chunk_size!r}")
        for b, length in enumerate(batch.seq_lens):
            if length >= self.context_window:
                raise GenerationError(f"conversation {b} has {length} prompt tokens (images included); "
                                      f"the model's context window is {self.context_window} tokens")
        b_ = batch.to(self.device)
        hook = self.progress
        embeds = self.model.prepare_inputs_embeds(
            b_.input_ids, b_.images_seq_mask, b_.pixel_values, b_.images_spatial_crop,
            progress=None if hook is None else (lambda d, t: hook("vision", d, t)))  # [B, T, D]
        reqs = []
        for b in range(n):
            valid = b_.attention_mask[b]
            ids = b_.input_ids[b][valid].tolist()
            req = Request(next(self._ids), ids, embeds[b][valid], plist[b], chunk_size, output_scores)
            reqs.append(req)
            self.waiting.append(req)
        return reqs

    def _start(self, req: Request) -> None:
        p = req.params
        req.slot = self.free_slots.pop(0)
        req.length = 0
        req.generator = None if p.is_greedy else make_generator(p.seed, self.device)
        if p.repetition_penalty != 1.0:
            req.seen = torch.zeros(self.cfg.vocab_size, dtype=torch.bool, device=self.device)
            req.seen[torch.tensor(req.prompt_ids, device=self.device)] = True
        req.decoder = StreamDecoder(self.tokenizer.decode, skip_special_tokens=False)
        req.stopper = StopStringMatcher(p.stop) if p.stop else None

    def _ensure_cache(self) -> KVCache:
        if self.cache is None:
            self.cache = KVCache(self.cfg, 1, dtype=self.cache_dtype, device=self.device)
        return self.cache

    # ---- prefill ------------------------------------------------------------------------
    @torch.no_grad()
    def _prefill(self, reqs: list[Request]) -> None:
        """Run the packed prompts of ``reqs`` through the LM (in chunks), set next_logits."""
        cache = self._ensure_cache()
        lens = [r.embeds.shape[0] for r in reqs]
        chunk = min((r.chunk_size or max(lens)) for r in reqs)
        lm = self.model.language
        if self.progress is not None:
            self.progress("prefill", 0, sum(lens))
        for start in range(0, max(lens), chunk):
            part = [(r, min(chunk, n - start)) for r, n in zip(reqs, lens) if n > start]
            t = max(k for _, k in part)
            x = torch.zeros(len(part), t, self.cfg.hidden_size, dtype=self.dtype, device=self.device)
            for i, (r, k) in enumerate(part):
                x[i, :k] = r.embeds[start:start + k]
            rows = torch.tensor([r.slot for r, _ in part], device=self.device)
            st = torch.full((len(part),), start, dtype=torch.long)
            nn_ = torch.tensor([k for _, k in part])
            _, ctx = lm.step_context(cache, st, nn_, t, rows=rows, dtype=self.dtype)
            out = lm(x, ctx, logits="none")
            ends = [(i, r, k) for i, (r, k) in enumerate(part) if start + k == r.embeds.shape[0]]
            if ends:
                h = torch.stack([out.last_hidden[i, k - 1] for i, _, k in ends])  # [b, D]
                logits = lm.lm_head(h).float()  # [b, V]
                for j, (_, r, _) in enumerate(ends):
                    r.next_logits = logits[j]
            for r, k in part:
                r.length = start + k
            if self.progress is not None:
                self.progress("prefill", sum(min(n, start + chunk) for n in lens), sum(lens))
        for r in reqs:
            r.embeds = r.embeds[:0]  # the prompt embeddings are not needed any more

    # ---- decode -------------------------------------------------------------------------
    def _admit(self) -> None:
        new = []
        while self.waiting and self.free_slots:
            req = self.waiting.popleft()
            self._start(req)
            new.append(req)
        if new:
            self._ensure_cache().ensure_rows(max(r.slot for r in new) + 1)
            self._prefill(new)
            self.active += new

    @torch.no_grad()
    def step(self) -> list[tuple[Request, int, str]]:
        """Admit waiting requests, sample one token per active request, advance the others.

        Returns (request, token id, text delta) for every token sampled in this step.
        """
        self._admit()
        if not self.active:
            return []
        reqs = self.active
        logits = torch.stack([r.next_logits for r in reqs])  # [B, V]
        seen = None
        if any(r.seen is not None for r in reqs):
            seen = torch.stack([r.seen if r.seen is not None else torch.zeros_like(logits[0], dtype=torch.bool)
                                for r in reqs])
        tokens = sample_next(logits, [r.params for r in reqs], [r.generator for r in reqs], seen).tolist()
        events = []
        for r, tok in zip(reqs, tokens):
            if r.output_scores:
                r.scores.append(r.next_logits)
            events.append((r, tok, self._accept(r, tok)))
        going = [r for r in reqs if not r.finished]
        for r in reqs:
            if r.finished:
                self.free_slots.append(r.slot)
                self.free_slots.sort()
        self.active = going
        if going:
            self._decode(going)
        return events

    def _accept(self, r: Request, tok: int) -> str:
        """Record a sampled token; detokenise; decide whether the request is finished."""
        p = r.params
        r.output_ids.append(tok)
        if r.seen is not None:
            r.seen[tok] = True
        if tok in self.eos_ids or tok in p.stop_token_ids:
            r.finish_reason = "stop"
            return self._finish_text(r)
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
        if len(r.output_ids) >= p.max_new_tokens or r.length + 1 >= self.context_window:
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

    def _decode(self, reqs: list[Request]) -> None:
        lm = self.model.language
        ids = torch.tensor([[r.output_ids[-1]] for r in reqs], device=self.device)  # [B, 1]
        x = lm.embed(ids, self.dtype)  # [B, 1, D]
        start = torch.tensor([r.length for r in reqs])
        rows = torch.tensor([r.slot for r in reqs], device=self.device)
        _, ctx = lm.step_context(self._ensure_cache(), start, torch.ones_like(start), 1, rows=rows, dtype=self.dtype)
        logits = lm(x, ctx, logits="last").logits[:, 0]  # [B, V]
        for i, r in enumerate(reqs):
            r.next_logits = logits[i]
            r.length += 1

    # ---- plain calls --------------------------------------------------------------------
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
                        out = self._output(r)
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

    def cancel(self, reqs: Sequence[Request]) -> None:
        """Drop requests (e.g. a client went away); their slots become free."""
        drop = {r.rid for r in reqs}
        for r in list(self.active):
            if r.rid in drop:
                self.active.remove(r)
                self.free_slots.append(r.slot)
        self.free_slots.sort()
        self.waiting = deque(r for r in self.waiting if r.rid not in drop)

    def _output(self, r: Request) -> GenerationOutput:
        scores = torch.stack(r.scores) if r.output_scores and r.scores else None
        return GenerationOutput(list(r.output_ids), r.text, r.finish_reason or "length", len(r.prompt_ids),
                                len(r.output_ids), scores)
