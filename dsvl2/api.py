"""The Python API: load a model, chat with it (one conversation or many), stream.

    import dsvl2
    model = dsvl2.load("deepseek-ai/deepseek-vl2-tiny")          # or a local folder
    print(model.chat("Describe this image.", images=["photo.jpg"]).text)

``chat`` takes a prompt string (with ``images``), one conversation (reference format with
``<|User|>`` / ``<|Assistant|>`` roles, or OpenAI-style messages with ``image_url`` /
``image`` parts, where an ``<image>`` typed in the text is text), or a list of
conversations (answered as one batch). Images may be paths, PIL images, bytes or
``data:`` URLs. Sampling options are those of ``SamplingParams``; the default is greedy
decoding. An ``Answer`` carries the text, the
finish reason, token counts (``usage``), the token ids, the grounding boxes in pixels of
the original image, the engine's timings and the prompt tokens found in the prefix cache;
``chat``, ``stream`` (its last ``Delta``) and ``submit(...)[i].result()`` all give one.
``logprobs=N`` (0..20 alternatives, or True) fills ``Answer.logprobs``;
``response_format={...}`` (OpenAI's shape) or ``json_schema={...}`` constrain the answer
(``structured.py``).

dtype ``"auto"`` keeps weights in bfloat16 (half the memory of float32; the real
checkpoints are bf16) and, on CPUs, computes in float32: big matrix products upcast a
layer's weights on the fly (bf16 GEMMs are ~7x slower than fp32 on AVX2 machines),
decoding reads the bf16 weights directly. ``"float32"`` reproduces the reference's
float32 numbers (the oracle's setting).
"""

from __future__ import annotations

import functools
import sys
import threading
import warnings
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
from PIL import Image

from .engine.driver import Driver, Handle, QueueSink, raise_for_error
from .engine import heap, openmp
from .engine.engine import Engine, GenerationOutput
from .engine.runner import TILE_BATCH
from .engine.sampling import SamplingParams
from .errors import ConversationError, DSVL2Error, GenerationError
from .grounding import GroundingResult, draw_grounding, grounding_to_json, parse_grounding
from .checkpoint.hub import DEMO, resolve_model
from .model import native, ops
from .model.native import policy
from .model.vl import DeepseekVL2
from .processing import BatchInputs, Processor
from .sizes import parse_size
from .structured import (Logprob, LogprobStream, content_logprobs, guide_from_response_format,
    guide_from_schema)
from .checkpoint.load import load_model

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise DSVL2Error(f"unknown device {device!r}; use auto, cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DSVL2Error("device 'cuda' requested but no CUDA GPU is available; use --device cpu")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise DSVL2Error("device 'mps' requested but MPS is not available; use --device cpu")
    return dev


def pick_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.bfloat16
    if dtype not in _DTYPES:
        raise DSVL2Error(f"unknown dtype {dtype!r}; use auto, float32 or bfloat16")
    return _DTYPES[dtype]


@dataclass
class Answer:
    """One model answer: what ``chat`` returns, what ``stream``'s last ``Delta`` carries and
    what ``result()`` of a handle made by ``VLModel.submit`` returns (one type on every
    path; the engine's own ``GenerationOutput`` stays on ``Handle.output``)."""

    text: str
    # "stop" (eos, stop id or stop string) | "length"; a failed request raises in chat /
    # result(), and an Answer made from its output (make_answer) has "error" / "cancelled"
    finish_reason: str
    prompt_tokens: int  # image tokens included
    completion_tokens: int
    token_ids: list[int]  # the answer's ids (an ending eos / stop id included)
    grounding: GroundingResult
    boxes: list[dict] = field(default_factory=list)  # label, box_norm (0..999), box_px, image_index
    images: list[Image.Image] = field(default_factory=list, repr=False)  # the conversation's images
    # one per answer token when asked for (``logprobs=N``): token, logprob, bytes, top_logprobs
    # (``structured.Logprob``; an ending eos / stop id has none); None otherwise
    logprobs: list[Logprob] | None = field(default=None, repr=False)
    # the engine's per-request timings (seconds): queue_s, vision_s, prefill_s,
    # first_token_s, total_s, max_inter_token_s, mean_inter_token_s (``Timings.to_dict``)
    timings: dict | None = field(default=None, repr=False)
    cached_tokens: int = 0  # prompt tokens whose KV was reused from the prefix cache
    error: str | None = None  # why the request failed (finish_reason "error"), else None

    @property
    def ids(self) -> list[int]:
        """``token_ids`` under the engine's name (``GenerationOutput.ids``)."""
        return self.token_ids

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    @property
    def usage(self) -> dict:
        """OpenAI's ``usage``: prompt / completion / total tokens and the cached prompt tokens."""
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.total_tokens, "prompt_tokens_details": {"cached_tokens": self.cached_tokens}}

    def draw(self, image_index: int = -1) -> Image.Image:
        """The conversation's image (default: the last one) with the boxes drawn on it."""
        if not self.images:
            raise DSVL2Error("this conversation has no image to draw the boxes on")
        return draw_grounding(self.images, self.grounding, image_index=image_index)

    def to_dict(self) -> dict:
        """The answer as a JSON record (the CLI's ``--json``, the batch job's results): only
        what the request decides, so equal requests give equal records (no timings, no
        cache hits: read those from the attributes)."""
        return {"text": self.text, "finish_reason": self.finish_reason,
                "usage": {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                          "total_tokens": self.total_tokens},
                "boxes": self.boxes, "grounding_problems": self.grounding.problems,
                **({} if self.logprobs is None else {"logprobs": [e.to_dict() for e in self.logprobs]})}


@dataclass
class Delta:
    """A streamed piece of conversation ``index``'s answer; the last one carries ``answer``."""

    index: int
    text: str
    answer: Answer | None = None
    logprobs: list[Logprob] | None = None  # the entries of the tokens whose text ends in this piece


def make_answer(out: GenerationOutput, images: list[Image.Image], tokenizer=None,
                stop_ids: Iterable[int] = ()) -> Answer:
    """An engine result as an ``Answer``: grounding parsed, boxes in pixels of the last image;
    with ``tokenizer``, the tokens' logprobs (when asked for) as ``structured.Logprob``
    entries, the ending eos / stop id (one of ``stop_ids``) left out; timings, cached
    tokens and error as the engine gave them."""
    g = parse_grounding(out.text)
    boxes = []
    if images and g.refs:
        w, h = images[-1].size  # the reference draws the boxes on the last image
        for b in grounding_to_json(g, w, h)["boxes"]:
            boxes.append({**b, "image_index": len(images) - 1})
    elif g.refs:
        boxes = [{"label": lab, "box_norm": list(box), "box_px": None, "image_index": None} for lab, box in g.boxes]
    return Answer(out.text, out.finish_reason, out.prompt_tokens, out.completion_tokens, out.ids, g, boxes,
                  images, content_logprobs(out, tokenizer, stop_ids), out.timings, out.cached_tokens, out.error)


def user_turn(text: str, images: Sequence | None = None) -> dict:
    """A reference-format user message; without ``<image>`` tags in ``text``, one tag per
    image is put first, each on its own line (the reference's canonical layout)."""
    imgs = list(images or [])
    if imgs and "<image>" not in text:
        text = "<image>\n" * len(imgs) + text
    return {"role": "<|User|>", "content": text, "images": imgs}


# Per-step token budget of the scheduler (see engine/scheduler.py): a running stream waits
# at most about one decode step plus this many prompt tokens (or one image tile) of a
# newcomer's admission between two tokens.
STEP_TOKENS = 512
# ... and of a step in which no stream is running (nobody waits for a token): a lone
# prompt prefills in chunks of this many tokens (engine/scheduler.py says what it saves).
IDLE_STEP_TOKENS = 4096
# The prompt tokens a first request is assumed to prefill (a photo's prompt is ~1400):
# ``load`` faults in the heap and the KV blocks of that many while the model loads.
FIRST_REQUEST_TOKENS = 2048


def first_request_bytes(cfg, step_tokens: int) -> int:
    """About the heap a first request grows on the CPU (what ``heap.reserve`` faults in at
    load): a prefill step of up to ``FIRST_REQUEST_TOKENS`` tokens (float32 rows of the
    width, 16 per token, and the dense MLP's bf16 intermediates) and a vision batch of
    ``TILE_BATCH`` tiles (engine/runner.py: float32 rows of the tower's width, 6 per patch,
    and its MLP's bf16 hidden). For the real tiny model 516 MiB (423 MiB when it counted 5
    tiles, where its first 7-tile photo, c01, grew the heap to 460 MiB in batches of 4, 1
    and 2)."""
    lang, vis = cfg.language, cfg.vision
    tokens = min(step_tokens, FIRST_REQUEST_TOKENS)
    prefill = tokens * (lang.hidden_size * 4 * 16 + lang.intermediate_size * 2 * 4)
    patches = TILE_BATCH * (vis.image_size // vis.patch_size) ** 2
    return prefill + patches * (vis.width * 4 * 6 + vis.mlp_hidden * 2 * 2)


class VLModel:
    """A loaded DeepSeek-VL2 model with its processor and generation engine."""

    def __init__(self, model: DeepseekVL2, processor: Processor, folder: Path | None = None,
                 max_batch_size: int = 16, step_tokens: int = STEP_TOKENS,
                 kv_cache_bytes: int | str | None = None, prefix_caching: bool = True):
        self.model = model
        self.processor = processor
        self.folder = folder
        # One driver loop owns the engine: chat / stream / submit are safe from any thread
        # and from interleaved iterators; the per-step token budget keeps running streams
        # flowing while a big image request is admitted.
        if isinstance(kv_cache_bytes, str):
            try:
                kv_cache_bytes = parse_size(kv_cache_bytes)
            except ValueError as e:
                raise DSVL2Error(f"kv_cache_bytes: {e}") from None
        self.driver = Driver(Engine(model, processor.tokenizer, max_batch_size=max_batch_size,
                                    step_tokens=step_tokens, kv_cache_bytes=kv_cache_bytes,
                                    prefix_caching=prefix_caching, idle_step_tokens=IDLE_STEP_TOKENS))

    @property
    def engine(self) -> Engine:
        return self.driver.engine

    @property
    def config(self):
        return self.model.cfg

    # ---- inputs -------------------------------------------------------------------------
    @staticmethod
    def _conversations(messages: Any, images: Sequence | None, system: str | None) -> tuple[list, bool]:
        """-> (list of conversations, was a batch given)."""
        if isinstance(images, (str, Path, bytes, bytearray, Image.Image)):
            images = [images]  # one image, not one per character / byte
        if isinstance(messages, str):
            conv = [user_turn(messages, images)]
            if system:
                conv.insert(0, {"role": "system", "content": system})
            return [conv], False
        if not isinstance(messages, (list, tuple)) or not messages:
            raise ConversationError("messages must be a prompt string, a conversation (list of message dicts) "
                                    f"or a list of conversations, got {type(messages).__name__} {messages!r:.60}")
        if all(isinstance(m, (list, tuple)) for m in messages):
            if images is not None:
                raise ConversationError("with a batch of conversations, attach images inside each conversation")
            return [list(c) for c in messages], True
        conv = list(messages)
        if system:
            conv.insert(0, {"role": "system", "content": system})
        if images:
            return [(conv, list(images))], False
        return [conv], False

    def process(self, messages: Any, images: Sequence | None = None, system: str | None = None) -> tuple[BatchInputs, bool]:
        convs, batched = self._conversations(messages, images, system)
        plain, extra = [], []
        for c in convs:
            if isinstance(c, tuple):
                plain.append(c[0])
                extra.append(c[1])
            else:
                plain.append(c)
                extra.append(None)
        try:
            return self.processor(plain, images=extra if any(e is not None for e in extra) else None), batched
        finally:
            openmp.release()  # the team image processing started here: the driver's alone runs (engine/openmp.py)

    # ---- chat ---------------------------------------------------------------------------
    def chat(self, messages: Any, images: Sequence | None = None, *, system: str | None = None,
             chunk_size: int | None = None, **sampling) -> Answer | list[Answer]:
        """Answer one conversation (-> Answer) or a list of conversations (-> list[Answer])."""
        params = _params(sampling)
        batch, batched = self.process(messages, images, system)
        answers = {d.index: d.answer for d in self._deltas(batch, params, chunk_size) if d.answer is not None}
        result = [answers[i] for i in sorted(answers)]
        return result if batched else result[0]

    def stream(self, messages: Any, images: Sequence | None = None, *, system: str | None = None,
               chunk_size: int | None = None, **sampling) -> Iterator[Delta]:
        """Like ``chat`` but yields ``Delta`` pieces as tokens arrive (the last per row has ``answer``)."""
        params = _params(sampling)
        batch, _ = self.process(messages, images, system)
        yield from self._deltas(batch, params, chunk_size)

    def submit(self, messages: Any, images: Sequence | None = None, *, system: str | None = None,
               chunk_size: int | None = None, sink=None, **sampling) -> list[Handle]:
        """Queue a conversation (or a batch) and return at once: one ``Handle`` per
        conversation (``.events()``, ``.result()``, ``.cancel()``). ``result()`` gives the
        same ``Answer`` as ``chat`` (timings and cached tokens included); ``.output`` holds
        the engine's raw ``GenerationOutput`` once finished and ``.images`` the loaded
        images. Input errors are raised here, in the caller."""
        params = _params(sampling)
        batch, _ = self.process(messages, images, system)
        handles = self.driver.submit(batch, params, chunk_size=chunk_size, sink=sink)
        tok, stops = self.processor.tokenizer, self.engine.eos_ids | set(params.stop_token_ids)
        for h in handles:
            h.images = batch.images[h.index]
            h.make_result = functools.partial(make_answer, images=h.images, tokenizer=tok, stop_ids=stops)
        return handles

    def _deltas(self, batch: BatchInputs, params: SamplingParams, chunk_size: int | None) -> Iterator[Delta]:
        sink = QueueSink()
        handles = self.driver.submit(batch, params, chunk_size=chunk_size, sink=sink)
        left = len(handles)
        tok, stops = self.processor.tokenizer, self.engine.eos_ids | set(params.stop_token_ids)
        lps = None if params.logprobs is None else [LogprobStream(lambda h=h: h.req.logprobs, tok, stops)
                                                    for h in handles]
        try:
            while left:
                ev = sink.get()
                answer = None
                if ev.output is not None:
                    left -= 1
                    answer = make_answer(raise_for_error(ev.output), batch.images[ev.index], tok, stops)
                entries = None if lps is None else lps[ev.index].take(ev.delta, ev.output)
                yield Delta(ev.index, ev.delta, answer, entries)
        finally:
            self.driver.cancel([h for h in handles if not h.finished])


def _params(sampling: dict) -> SamplingParams:
    """``params=SamplingParams(...)`` or its fields as keywords; ``max_tokens`` is the
    OpenAI name of ``max_new_tokens``. Unknown names are a one-line error listing the
    allowed ones (not a TypeError about SamplingParams).

    Also: ``logprobs`` True / False (= 0 alternatives / off) besides None or 0..20;
    ``response_format`` (OpenAI's shape: ``{"type": "json_object"}``, ``{"type":
    "json_schema", "json_schema": {"name": ..., "schema": {...}}}``) and ``json_schema``
    (a schema dict or a pydantic model class), which set ``guide``: one guide at most."""
    options = tuple(f.name for f in fields(SamplingParams))
    sampling = dict(sampling)
    params = sampling.pop("params", None)
    if isinstance(sampling.get("logprobs"), bool):
        sampling["logprobs"] = 0 if sampling["logprobs"] else None
    guides = {name: sampling[name] for name in ("guide",) if sampling.get(name) is not None}
    if "response_format" in sampling:
        g = guide_from_response_format(sampling.pop("response_format"))
        if g is not None:
            guides["response_format"] = g
    if "json_schema" in sampling:
        v = sampling.pop("json_schema")
        if v is not None:
            guides["json_schema"] = guide_from_schema(v)
    if len(guides) > 1:
        raise GenerationError(f"{' and '.join(guides)} both constrain the answer; give one of them")
    if guides:
        sampling["guide"] = next(iter(guides.values()))
    if "max_tokens" in sampling:
        alias = sampling.pop("max_tokens")
        if "max_new_tokens" in sampling and sampling["max_new_tokens"] != alias:
            raise GenerationError(f"max_tokens={alias!r} and max_new_tokens={sampling['max_new_tokens']!r} "
                                  "disagree; give one of them (max_tokens is an alias of max_new_tokens)")
        sampling["max_new_tokens"] = alias
    unknown = [k for k in sampling if k not in options]
    if unknown:
        raise GenerationError(f"unknown option{'s' * (len(unknown) > 1)} {', '.join(map(repr, unknown))}; "
                              f"allowed: {', '.join(options)}, max_tokens (alias of max_new_tokens), "
                              "response_format, json_schema, params (a SamplingParams), images, system, chunk_size")
    if params is None:
        return SamplingParams(**sampling)
    if not isinstance(params, SamplingParams):
        raise GenerationError(f"params must be a SamplingParams, got {type(params).__name__}")
    if sampling:
        raise GenerationError(f"give params=SamplingParams(...) or sampling options ({', '.join(sampling)}), "
                              "not both")
    return params


# What ``load`` says, once per process, when it loads the shipped demo checkpoint; the CLI
# and the server say it in their own words (``demo_note_given``).
DEMO_WARNING = ("the built-in demo checkpoint has RANDOM weights (answers are gibberish); load "
                "deepseek-ai/deepseek-vl2-tiny (or a checkpoint folder) for a real model")
_demo_said = False
_demo_lock = threading.Lock()
_PACKAGE = Path(__file__).resolve().parent


def demo_note_given() -> None:
    """The caller has told the user that the demo's weights are random (the CLI and the
    server print their own note): ``load("demo")`` does not warn again."""
    global _demo_said
    _demo_said = True


def _warn_demo(folder: Path) -> None:
    global _demo_said
    try:
        demo = folder.resolve() == DEMO
    except OSError:
        return
    with _demo_lock:
        if not demo or _demo_said:
            return
        _demo_said = True
    # pointed at the first caller outside this package (dsvl2.load wraps api.load)
    level, frame = 2, sys._getframe(1)  # stacklevel 2: the caller of this function
    while frame is not None and Path(frame.f_code.co_filename).resolve().is_relative_to(_PACKAGE):
        level, frame = level + 1, frame.f_back
    warnings.warn(DEMO_WARNING, UserWarning, stacklevel=level)


def load(model: str | Path = "demo", *, dtype: str | torch.dtype = "auto", device: str = "auto",
         max_batch_size: int = 16, step_tokens: int = STEP_TOKENS,
         kv_cache_bytes: int | str | None = None, prefix_caching: bool = True,
         progress: Callable[[int, int], None] | None = None, quantize: str | None = None) -> VLModel:
    """Load a checkpoint folder or Hugging Face id (``demo`` = the shipped random model,
    which warns once per process that its answers are gibberish: ``DEMO_WARNING``).

    ``quantize``: None, "int8" (every language-model linear layer, per output channel) or
    "int4" (routed experts in int4 groups, the rest int8), applied tensor by tensor while
    loading; a checkpoint written by ``dsvl2 quantize`` loads in its own scheme.

    ``max_batch_size``: conversations decoded together; ``step_tokens``: the scheduler's
    per-step token budget (see ``STEP_TOKENS``); ``kv_cache_bytes``: the KV cache's memory
    (bytes, or a size such as "1.5MiB" / "2GiB"; None: 40 % of the memory available after
    the weights, ``engine.default_kv_cache_bytes``); ``prefix_caching``: share the KV
    blocks of equal prefixes (a photo, a system prompt, earlier turns) between requests."""
    folder = resolve_model(model)
    _warn_demo(folder)
    dev = pick_device(device)
    dt = pick_dtype(dtype, dev)
    net = load_model(folder, dt, dev, progress=progress, quantize=quantize)
    kept = heap.keep_freed_memory()  # steps reuse freed pages instead of faulting new ones (engine/heap.py)
    # the dtype of vision / prefill products on this machine (model/native/policy.py)
    kernels = policy.choose(dev, dt)
    ops.apply_kernel_choice(kernels)
    if kernels.big_products == "bf16":
        # the vision tower's weights reordered once for oneDNN (model/prepack.py), before the
        # KV cache is sized from the memory left
        net.vision.prepack()
    vl = VLModel(net, Processor.from_pretrained(folder), folder, max_batch_size=max_batch_size,
                 step_tokens=step_tokens, kv_cache_bytes=kv_cache_bytes, prefix_caching=prefix_caching)
    vl.kernels = kernels
    native.prepare(dev)  # build / load the native decode kernels now, not in the first request (model/native)
    if dev.type == "cpu":
        net.warm_vision(vl.engine.runner.tile_batch)  # oneDNN's kernels for a photo's batches of tiles, now
        if kept:
            heap.reserve(first_request_bytes(net.cfg, IDLE_STEP_TOKENS))  # its page faults now (engine/heap.py)
            first = min(IDLE_STEP_TOKENS, FIRST_REQUEST_TOKENS)  # and those of its KV blocks (model/cache.py)
            vl.engine.cache.touch(-(-first // vl.engine.block_size))
    openmp.release()  # this thread's OpenMP team: the driver's alone runs the model (engine/openmp.py)
    return vl
