"""The generation engine's token-id core: requests -> admission -> batched decode steps.

Legend: B active rows, T tokens in a step, V vocab, D width.

Layers: the pure sampler (``sampling``); the ``Scheduler`` (queue, seats, per-step token
budget, admission by free KV blocks, preemption); the ``KVManager`` over the
``BlockPool`` (block tables, prefix blocks shared between requests); the ``ModelRunner``
(vision, packed prefill and decode forwards over one paged ``KVCache``); the output layer
(``output``: detokenise, stop strings, finish); this ``Engine``, whose ``step`` ties
them together for ONE caller; and the ``Driver`` (``driver``), the one loop that owns an
engine so that any number of threads / iterators can submit, read and cancel. No HTTP,
no text formatting.

* Memory is a budget: the KV cache is a pool of ``kv_cache_bytes`` in blocks of
  ``block_size`` tokens; a request holds the blocks of its tokens and nothing more, and
  gives them back when it ends. A request that could never fit alone (prompt +
  ``max_new_tokens`` beyond the pool) is refused at ``submit``; one that does not fit
  now waits; when running requests need blocks that are not there, the newest is
  preempted and computed again later.
* Requests start, advance and finish independently. ``step()`` admits waiting requests,
  runs this step's admission work (vision tiles, prefill chunks) within the token budget,
  samples one token for every running request and runs ONE batched decode forward for
  the rows that go on. Finished rows leave at once and cost nothing more: continuous
  batching.
* Failures stay with their request: an error in one request's vision or in a prefill
  forward ends the requests of that work with "error"; an error in the decode forward
  ends the rows of that forward; ``step`` returns their final events with the others'.
* ``submit`` only queues (no model work in the caller's thread): images are encoded by
  ``step``, a few tiles at a time when a budget is set.
* Stops: eos, ``stop_token_ids``, stop strings (cut before the string), ``max_new_tokens``
  and the context window. The stop token / string is not part of the text.
* Batch rows vs alone: a row's decode products compute in bf16 whatever the batch (see
  ``ops.decoding``), prefill and vision in float32, so a row's greedy output equals the
  same conversation alone in every dtype except where two logits tie within float32
  rounding of the attention / router sums (which depend on the padded batch shape).

Seams (``seams``): tests, benchmarks and surfaces observe and steer an engine through
these methods, never by replacing its methods or writing into its attributes:

* ``add_step_observer(fn)``: ``fn(report)`` after every ``step`` with a ``StepReport``:
  what ran (vision calls, prefill chunks, sampled requests, the decode forward's rows,
  preemptions, finishes; request ids and positions) and seconds per stage. Called in the
  thread that steps (the driver's, under a ``Driver``); an observer that raises is logged
  and kept. Without observers nothing is recorded or timed.
* ``set_fault_hook(hook)``: ``hook(stage, requests)`` right before the work of stage
  "vision", "prefill" or "decode" of those requests. What it raises is that work's
  failure (those requests end with "error", the others go on); the time it takes counts
  as that stage's (a hook that sleeps is a slow forward).
* ``set_sampler(fn)`` / ``Engine(sampler=)``: picks the next tokens
  (``sampling.sample_next``'s signature); without one, that of an open
  ``seams.use_sampler`` block (for engines made out of reach: the CLI's, a server's),
  else ``sample_next``.
* ``set_guide_compiler(c)``: what compiles a request's ``guided.Guide``
  (``c.compile(guide)``; by default ``guided.GuideCompiler``, made on first use).
* ``set_progress(hook)``: ``hook(stage, done, total)`` as a request's tiles / prompt
  tokens are processed; ``set_context_window(n)``: the tokens a request may hold.
"""

from __future__ import annotations

import itertools
import logging
import os
import time
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch

from ..errors import GenerationError
from ..model.cache import KVCache
from ..model.vl import DeepseekVL2, num_tiles, used_crops
from ..processing import BatchInputs, Tokenizer
from .blocks import BlockPool
from .kv_manager import KVManager
from .output import OutputProcessor
from .prefix import image_hashes, prompt_keys
from .request import Request, Timings
from .runner import TILE_BATCH, ModelRunner
from .sampling import SamplingParams, make_generator, sample_next
from .scheduler import Prefill, Scheduler, Vision
from .seams import Sampler, StepReport, process_sampler, use_sampler  # noqa: F401  (use_sampler: re-exported)

__all__ = ["Engine", "GenerationOutput", "Request", "Sampler", "StepReport", "StreamEvent", "Timings",
           "TokenLogprob", "default_kv_cache_bytes", "use_sampler"]

log = logging.getLogger("dsvl2.engine")

BLOCK_SIZE = 16  # tokens per KV block (see README "Memory": chosen by measurement)
KV_MEMORY_SHARE = 0.4  # default budget: this share of the memory available after the weights


def available_memory(device: torch.device) -> int:
    """Bytes the machine can still give (Linux: MemAvailable; CUDA: free device memory)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 4 << 30


def default_kv_cache_bytes(device: torch.device | str = "cpu") -> int:
    """The KV budget when none is given: ``KV_MEMORY_SHARE`` of the memory available now
    (call it after the weights are loaded), at least 64 MiB."""
    return max(64 << 20, int(available_memory(torch.device(device)) * KV_MEMORY_SHARE))


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
    cached_tokens: int = 0              # prompt tokens reused from shared KV blocks
    logprobs: list[TokenLogprob] | None = None  # one per output token, when asked for


@dataclass
class TokenLogprob:
    """A generated token's log-probability under the model and its most likely alternatives."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # (token id, log-probability), most likely first


@dataclass
class StreamEvent:
    """A text delta of request ``index``; the last event of a request has ``finish_reason``."""

    index: int
    delta: str
    token_id: int | None = None
    finish_reason: str | None = None
    output: GenerationOutput | None = None


class Engine:
    """Runs many requests over one model with one paged KV cache of ``kv_cache_bytes``.

    One caller at a time: ``step`` is not thread-safe. Share an engine between threads or
    iterators through a ``Driver``. ``max_batch_size``: requests admitted at once;
    ``step_tokens``: the scheduler's per-step token budget (None: admission work is never
    split, the whole prompt prefills at once); ``idle_step_tokens``: the budget of a step in
    which no stream is running (None: ``step_tokens``); ``kv_cache_bytes``: the KV pool (None:
    ``default_kv_cache_bytes``); ``block_size``: tokens per block; ``prefix_caching``:
    share the blocks of equal prefixes between requests (``kv_manager``); ``sampler``:
    picks the next tokens (None: an open ``seams.use_sampler`` block's, else
    ``sampling.sample_next``); ``tile_batch``: the most tiles the vision tower encodes at once
    (``runner.TILE_BATCH``: its activations bound a step's memory).
    """

    def __init__(self, model: DeepseekVL2, tokenizer: Tokenizer, max_batch_size: int = 16,
                 cache_dtype: torch.dtype | None = None, context_window: int | None = None,
                 step_tokens: int | None = None, kv_cache_bytes: int | None = None,
                 block_size: int = BLOCK_SIZE, prefix_caching: bool = True, sampler: Sampler | None = None,
                 idle_step_tokens: int | None = None, tile_batch: int = TILE_BATCH):
        self.model = model
        self.tokenizer = tokenizer
        self.cfg = model.cfg.language
        self.max_batch_size = max_batch_size
        device = model.language.lm_head.weight.device
        self.dtype = model.compute_dtype
        self.cache_dtype = cache_dtype or self.dtype
        if kv_cache_bytes is None:
            kv_cache_bytes = default_kv_cache_bytes(device)
        if not isinstance(kv_cache_bytes, int) or isinstance(kv_cache_bytes, bool) or kv_cache_bytes <= 0:
            raise GenerationError(f"kv_cache_bytes must be a positive number of bytes, got {kv_cache_bytes!r}")
        if not isinstance(block_size, int) or block_size < 1:
            raise GenerationError(f"block_size must be a positive integer, got {block_size!r}")
        _check_callable("sampler", sampler)
        if not isinstance(tile_batch, int) or isinstance(tile_batch, bool) or tile_batch < 1:
            raise GenerationError(f"tile_batch must be a positive integer, got {tile_batch!r}")
        block_bytes = block_size * KVCache.bytes_per_token(self.cfg, self.cache_dtype)
        num_blocks = kv_cache_bytes // block_bytes
        if num_blocks < 2:
            raise GenerationError(f"kv_cache_bytes={kv_cache_bytes} holds {num_blocks} block(s) of {block_size} "
                                  f"tokens ({block_bytes} bytes each); at least 2 are needed "
                                  f"(>= {2 * block_bytes} bytes)")
        self.kv_cache_bytes = kv_cache_bytes
        self.block_size = block_size
        self.runner = ModelRunner(model, KVCache(self.cfg, num_blocks, block_size, self.cache_dtype, device),
                                  tile_batch)
        self.device = self.runner.device
        self.pool = BlockPool(num_blocks, block_size, block_bytes)
        self.kv = KVManager(self.pool, prefix_caching)
        vc = model.cfg.vision
        self.scheduler = Scheduler(max_batch_size, self.kv, step_tokens,
                                   tile_cost=(vc.image_size // vc.patch_size) ** 2, idle_tokens=idle_step_tokens)
        self.output = OutputProcessor(tokenizer.decode)
        self.eos_ids = {i for i in (tokenizer.eos_id, self.cfg.eos_token_id) if i is not None}
        # Optional hook for long work: progress(stage, done, total) with stage "vision"
        # (tiles encoded) or "prefill" (prompt tokens processed), per request (set_progress).
        self.progress: Callable[[str, int, int], None] | None = None
        # The seams (module docstring), each changed through its set_* method.
        self._fault_hook: Callable[[str, list[Request]], None] | None = None
        self._sampler: Sampler | None = sampler
        self._observers: list[Callable[[StepReport], None]] = []
        # compile(guide) -> compiled guide, raising GenerationError for what it cannot
        # enforce; None: a guided.GuideCompiler, made when a request first has a guide
        self._guide_compiler = None
        self.steps = 0  # steps run since start
        self._ids = itertools.count()
        # Prompt + output tokens allowed per request: the model's max_position_embeddings
        # unless the caller knows better (the reference itself does not enforce it).
        self.context_window = context_window or self.cfg.max_position_embeddings

    # ---- state seen from outside -------------------------------------------------------
    @property
    def cache(self) -> KVCache:
        return self.runner.cache

    @property
    def prefix_caching(self) -> bool:
        return self.kv.prefix_caching

    @property
    def max_tokens_held(self) -> int:
        """Tokens one request may hold at most: the whole pool."""
        return self.pool.usable * self.block_size

    @property
    def free_slots(self) -> list[int]:
        return self.scheduler.free_slots

    @property
    def waiting(self):
        return self.scheduler.waiting

    @property
    def active(self) -> list[Request]:
        """Requests holding a seat and KV blocks: being admitted or running."""
        return self.scheduler.admitting + self.scheduler.running

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    def kv_stats(self) -> dict:
        """The KV pool and what it saved, for metrics (bytes, counts since start)."""
        p, bb = self.pool, self.pool.block_bytes
        return {"kv_cache_bytes_capacity": p.usable * bb, "kv_cache_bytes_used": p.used * bb,
                "kv_cache_bytes_peak": p.peak * bb, "kv_cache_bytes_cached": p.cached * bb,
                "kv_block_size": self.block_size, "kv_blocks_total": p.usable, "kv_blocks_used": p.used,
                "preemptions": self.scheduler.preemptions, "prefix_cache_hit_tokens": self.kv.hit_tokens,
                "vision_tiles": self.runner.tiles_encoded}

    # ---- seams (module docstring) -------------------------------------------------------
    def add_step_observer(self, fn: Callable[[StepReport], None]) -> Callable[[StepReport], None]:
        """Call ``fn(report)`` after every step; returns ``fn``."""
        if not callable(fn):
            raise TypeError(f"a step observer must be callable, got {type(fn).__name__}")
        self._observers.append(fn)
        return fn

    def remove_step_observer(self, fn: Callable[[StepReport], None]) -> None:
        """Stop calling ``fn`` (nothing happens if it is not an observer)."""
        if fn in self._observers:
            self._observers.remove(fn)

    @property
    def fault_hook(self) -> Callable[[str, list[Request]], None] | None:
        return self._fault_hook

    def set_fault_hook(self, hook: Callable[[str, list[Request]], None] | None):
        """``hook(stage, requests)`` before the work of each stage from the next one on
        (None: no hook); returns the hook it replaces."""
        _check_callable("fault_hook", hook)
        previous, self._fault_hook = self._fault_hook, hook
        return previous

    @property
    def sampler(self) -> Sampler | None:
        return self._sampler

    def set_sampler(self, sampler: Sampler | None) -> Sampler | None:
        """This engine's own sampler from the next step on (None: the process's, see
        ``seams.use_sampler``); returns the one it replaces."""
        _check_callable("sampler", sampler)
        previous, self._sampler = self._sampler, sampler
        return previous

    @property
    def guide_compiler(self):
        return self._guide_compiler

    def set_guide_compiler(self, compiler):
        """What compiles the guides of the requests made from now on: ``compile(guide)``
        returns the compiled guide or raises ``GenerationError`` (None: the default
        ``guided.GuideCompiler``, made on first use); returns the one it replaces."""
        if compiler is not None and not callable(getattr(compiler, "compile", None)):
            raise GenerationError(f"a guide compiler needs a compile(guide) method, got {type(compiler).__name__}")
        previous, self._guide_compiler = self._guide_compiler, compiler
        return previous

    def set_progress(self, hook: Callable[[str, int, int], None] | None):
        """``hook(stage, done, total)`` as vision tiles / prompt tokens of a request are
        processed (None: none); returns the hook it replaces."""
        _check_callable("progress", hook)
        previous, self.progress = self.progress, hook
        return previous

    def set_context_window(self, tokens: int) -> int:
        """Prompt + output tokens allowed per request from now on (requests already running
        stop at the new limit too); returns the previous limit."""
        if not isinstance(tokens, int) or isinstance(tokens, bool) or tokens < 2:
            raise GenerationError(f"context_window must be an integer >= 2 (a prompt token and an answer "
                                  f"token), got {tokens!r}")
        previous, self.context_window = self.context_window, tokens
        return previous

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
            most = min(length + plist[b].max_new_tokens, self.context_window)
            if most > self.max_tokens_held:
                raise GenerationError(
                    f"conversation {b} needs up to {most} tokens of KV cache ({length} prompt tokens + "
                    f"max_new_tokens {plist[b].max_new_tokens}), more than the whole KV cache holds "
                    f"({self.max_tokens_held} tokens in {self.kv_cache_bytes} bytes); lower max_new_tokens "
                    "or the prompt, or give the cache more memory (kv_cache_bytes / --kv-cache-bytes)")
        guides = [self.compile_guide(p.guide) if p.guide is not None else None for p in plist]
        reqs = []
        for b in range(n):
            valid = batch.attention_mask[b]
            ids = batch.input_ids[b][valid]
            crops = used_crops(batch.images_spatial_crop[b].tolist())
            tiles = batch.pixel_values[b, :num_tiles(crops)] if crops else None
            seq_mask = batch.images_seq_mask[b][valid]
            keys = None
            if self.kv.prefix_caching:
                keys = prompt_keys(ids.tolist(), seq_mask.tolist(), batch.num_image_tokens[b],
                                   image_hashes(tiles, crops) if crops else [])
            reqs.append(Request(next(self._ids), ids.tolist(), plist[b], chunk_size, output_scores,
                                input_ids=ids.to(self.device), seq_mask=seq_mask.to(self.device),
                                tiles=None if tiles is None else tiles.to(self.device), crops=crops, keys=keys,
                                guide=guides[b]))
        return reqs

    def compile_guide(self, guide):
        """The compiled form of a ``guided.Guide`` (compiled once per distinct guide; raises
        ``GenerationError`` naming what is not supported)."""
        if self._guide_compiler is None:
            from .guided import GuideCompiler  # the grammar library is imported on first use

            self._guide_compiler = GuideCompiler(self.tokenizer, self.cfg.vocab_size, self.eos_ids)
        return self._guide_compiler.compile(guide)

    def add(self, reqs: Sequence[Request]) -> None:
        for req in reqs:
            self.scheduler.add(req)

    def cancel(self, reqs: Sequence[Request], reason: str = "cancelled") -> None:
        """Drop requests (e.g. a client went away); their seats and blocks are given back
        ("error": their blocks' content is not trusted, so it is not kept for reuse)."""
        for r in reqs:
            if not r.finished:
                r.finish_reason = reason
                r.timings.finished = time.perf_counter()
            self.scheduler.release(r, keep=reason != "error")
            r.release_inputs()

    def _fail(self, reqs: Sequence[Request], exc: BaseException, what: str) -> list[tuple[Request, None, str]]:
        """End ``reqs`` with "error" (``what`` failed); their final events."""
        log.error("%s failed for request(s) %s", what, [r.rid for r in reqs], exc_info=exc)
        for r in reqs:
            r.error = f"{what} failed: {type(exc).__name__}: {exc}"
        self.cancel(reqs, reason="error")
        return [(r, None, "") for r in reqs]

    def _start(self, req: Request) -> None:
        """A request got its blocks (first admission, or again after a preemption)."""
        p = req.params
        now = time.perf_counter()
        first = req.timings.admitted is None
        if first:
            req.timings.admitted = now
            req.cached_tokens = req.length
        if req.length and req.seq_mask is not None:  # the first length tokens' KV is shared
            slots = req.seq_mask.nonzero()
            if not slots.numel() or int(slots[-1]) < req.length:
                req.tiles_done = req.tiles_total  # every image is inside the prefix: no vision
        if first:
            req.generator = None if p.is_greedy else make_generator(p.seed, self.device)
            if req.guide is not None:
                req.matcher = req.guide.matcher()
            if p.logprobs is not None:
                req.logprobs = []
            if p.repetition_penalty != 1.0:
                req.seen = torch.zeros(self.cfg.vocab_size, dtype=torch.bool, device=self.device)
                req.seen[torch.tensor(req.prompt_ids, device=self.device)] = True
            self.output.start(req)

    # ---- one step ----------------------------------------------------------------------
    @torch.no_grad()
    def step(self) -> list[tuple[Request, int | None, str]]:
        """Admission work within the budget, one token per running request, one decode forward.

        Returns (request, token id, text delta) for every token sampled in this step, and
        (request, None, "") for every request that failed in it (finish_reason "error").
        Then the step observers get its ``StepReport``.
        """
        observers = self._observers
        if not observers:
            events = self._step(None)
            self.steps += 1
            return events
        t0 = time.perf_counter()
        rep = StepReport(self.steps, [r.rid for r in self.scheduler.running])
        events = self._step(rep)
        self.steps += 1
        rep.timings["total"] = time.perf_counter() - t0
        rep.finished = {r.rid: r.finish_reason for r, _, _ in events if r.finished}
        for fn in list(observers):
            try:
                fn(rep)
            except Exception:  # the step is done; its requests must not pay for an observer
                log.exception("step observer %r failed", fn)
        return events

    def _step(self, rep: StepReport | None) -> list[tuple[Request, int | None, str]]:
        """``step``'s work; records what ran and its times into ``rep`` when one is given."""
        t = time.perf_counter() if rep is not None else 0.0
        admitted = self.scheduler.admit()
        for req in admitted:
            self._start(req)
        self.kv.run_copies(self.cache.copy_block)
        if rep is not None:
            rep.admitted = [r.rid for r in admitted]
            rep.timings["admit"] = time.perf_counter() - t
        events = self._admission_work(rep)
        reqs = list(self.scheduler.running)
        if not reqs:
            return events
        if rep is not None:
            t = time.perf_counter()
            rep.sampled = [r.rid for r in reqs]
        logits = torch.stack([r.next_logits for r in reqs])  # [B, V]
        for i, r in enumerate(reqs):
            if r.matcher is not None:
                r.matcher.fill_mask(logits[i])  # tokens that cannot continue a valid output: -inf
        seen = None
        if any(r.seen is not None for r in reqs):
            seen = torch.stack([r.seen if r.seen is not None else torch.zeros_like(logits[0], dtype=torch.bool)
                                for r in reqs])
        # looked up at each step: use_sampler blocks begin and end while an engine lives
        sample = self._sampler or process_sampler() or sample_next
        tokens = sample(logits, [r.params for r in reqs], [r.generator for r in reqs], seen).tolist()
        now = time.perf_counter()
        for r, tok in zip(reqs, tokens):
            if r.output_scores:
                r.scores.append(r.next_logits)
            if r.logprobs is not None:
                r.logprobs.append(token_logprob(r.next_logits, tok, r.params.logprobs))
            if r.matcher is not None:
                r.matcher.accept(tok)
            if r.timings.first_token is None:
                r.timings.first_token = now
            r.timings.token_times.append(now)
            events.append((r, tok, self.output.process(r, tok, self._verdict(r, tok))))
        for r in reqs:
            if r.finished:
                r.timings.finished = now
                self.scheduler.release(r)
                r.release_inputs()
        if rep is not None:
            t_decode = time.perf_counter()
            rep.timings["sample"] = t_decode - t
        going = self._make_room([r for r in reqs if not r.finished], rep)
        if going:
            if rep is not None:
                rep.decode = [(r.rid, r.length) for r in going]
            try:
                if self._fault_hook is not None:
                    self._fault_hook("decode", going)
                self.runner.decode(going)
            except Exception as e:  # the rows of this forward end; the others go on
                events += self._fail(going, e, "decode step")
            else:
                for r in going:
                    self.kv.computed(r)
            if rep is not None:
                rep.timings["decode"] = time.perf_counter() - t_decode
        return events

    def _make_room(self, going: list[Request], rep: StepReport | None = None) -> list[Request]:
        """A block for every going row's next token, oldest first; where the pool is empty
        the newest active request is preempted (maybe one of these). Returns those left."""
        for r in sorted(going, key=lambda r: r.rid):
            while r in self.scheduler.running and not self.kv.grow(r):
                victim = self.scheduler.preempt_newest()
                log.info("KV cache full: request %d preempted (%d tokens given back), recomputed later",
                         victim.rid, victim.prefill_len)
                if rep is not None:
                    rep.preempted.append(victim.rid)
        return [r for r in going if r in self.scheduler.running]

    def _verdict(self, r: Request, tok: int) -> str | None:
        """What the ids alone decide: record ``tok``; "stop" (eos / stop id), "length" or None."""
        r.output_ids.append(tok)
        if r.seen is not None:
            r.seen[tok] = True
        if tok in self.eos_ids or tok in r.params.stop_token_ids:
            return "stop"
        if r.matcher is not None and r.matcher.done():
            return "done"  # the guided output is complete: nothing but the end may follow
        if len(r.output_ids) >= r.params.max_new_tokens or r.length + 1 >= self.context_window:
            return "length"
        return None

    def _admission_work(self, rep: StepReport | None = None) -> list[tuple[Request, None, str]]:
        """This step's vision and prefill work; returns the final events of the requests
        whose work failed (a tile batch fails its request, a prefill forward its chunks')."""
        hook = self.progress
        failed: list = []
        for work in self.scheduler.plan():
            t = time.perf_counter() if rep is not None else 0.0
            if isinstance(work, Vision):
                r = work.req
                if r.finished:
                    continue
                if rep is not None:
                    rep.vision.append((r.rid, work.k))
                try:
                    if hook is not None and r.tiles_done == 0:
                        hook("vision", 0, r.tiles_total)
                    if self._fault_hook is not None:
                        self._fault_hook("vision", [r])
                    self.runner.vision(r, work.k)
                    if hook is not None:
                        hook("vision", r.tiles_done, r.tiles_total)
                except Exception as e:
                    failed += self._fail([r], e, "image encoding")
                if rep is not None:
                    rep.timings["vision"] += time.perf_counter() - t
            elif isinstance(work, Prefill):
                chunks = [(r, n) for r, n in work.chunks if not r.finished]
                if not chunks:
                    continue
                if rep is not None:
                    rep.prefill.append([(r.rid, r.prefilled, n) for r, n in chunks])
                try:
                    if hook is not None:
                        for r, _ in chunks:
                            if r.prefilled == 0:
                                hook("prefill", 0, r.prefill_len)
                    if self._fault_hook is not None:
                        self._fault_hook("prefill", [r for r, _ in chunks])
                    done = self.runner.prefill(chunks)
                except Exception as e:
                    failed += self._fail([r for r, _ in chunks], e, "prefill")
                    done = None
                if done is not None:
                    for r, _ in chunks:
                        self.kv.computed(r)
                    for r in done:
                        r.drop_prefill_state()
                        self.scheduler.start_running(r)
                    if hook is not None:
                        for r, _ in chunks:
                            hook("prefill", r.prefilled, r.prefill_len)
                if rep is not None:
                    rep.timings["prefill"] += time.perf_counter() - t
        return failed

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
                                len(r.output_ids), scores, r.timings.to_dict(), r.error, r.cached_tokens,
                                None if r.logprobs is None else list(r.logprobs))


def _check_callable(what: str, fn) -> None:
    if fn is not None and not callable(fn):
        raise GenerationError(f"{what} must be a function or None, got {type(fn).__name__}")


def token_logprob(logits: torch.Tensor, tok: int, top: int) -> TokenLogprob:
    """``tok``'s log-probability under raw ``logits`` [V] and the ``top`` most likely tokens'."""
    lp = torch.log_softmax(logits.float(), -1)  # [V]
    alts = []
    if top:
        vals, ids = lp.topk(top)
        alts = list(zip(ids.tolist(), vals.tolist()))
    return TokenLogprob(tok, float(lp[tok]), alts)
