"""Property-based fuzzing (hypothesis) of the parsers and arithmetic that strangers' input reaches.

Each target is a strategy that draws the arguments of a plain property function, kept in
``TARGETS``; the tests below run every target with a modest number of examples, and
``benchmarks/fuzz.py`` imports the same table to run 10^5 examples per target. A new
target is one more ``Target`` entry. What an example costs is the property, not set-up:
processors, tokenizers, pixel buffers, SSL contexts and strategies are made once.

Targets:

* ``conversation``: arbitrary message lists (junk roles, contents, parts, image lists)
  -> ``normalize_conversation`` returns well-formed turns or raises ConversationError,
  nothing else; what it returns goes through ``prompt_pieces`` and the tokenizer.
* ``tiling``: arbitrary image sizes (1..10^5 a side) and candidate lists -> the best
  resolution is a candidate no other beats (effective area, then waste, then order), and
  the closed-form token count equals the number of features the model's assembly lays
  out (``DeepseekVL2.assemble_images``, an independent implementation).
* ``tiles``: real images through ``Processor`` -> every tile is 3 x 384 x 384, the
  ``<image>`` slots per image equal the closed form, the local tiles put back together in
  row-major order are the padded canvas.
* ``grounding``: markup-shaped and random text -> ``parse_grounding`` never raises and
  never evaluates (eval / exec / compile are replaced by tripwires), every box is
  ordered within 0..999 and within the image in pixels, drawing never raises.
* ``stream_decoder``: arbitrary id sequences (split characters, special tokens, ids
  beyond the tokenizer) -> ``StreamDecoder`` deltas join to the full decode.
* ``stop_strings``: stop lists and delta streams -> ``StopStringMatcher`` agrees with a
  naive matcher and never emits a stop string.
* ``sampling``: logits with NaN / +-inf / huge values and every valid extreme of
  ``SamplingParams`` -> ``sample_next`` returns ids in range or the one GenerationError
  (a sampled row left with no token); each row's token equals the row sampled alone.
* ``guard``: the server's Host / Origin guard (``server/guard.py``) on requests whose
  meaning is known by construction (options, Host and Origin in every spelling: case,
  trailing dot, leading-zero ports, bracketed IPv6 forms, the address the request came
  to) -> exactly the documented decision (served, 400, 421, 403), loopback with any port
  always served, anything not allowed refused; on junk options / header bytes -> only
  ValueError (options) or APIError with a documented status, and a served request is a
  justified one; the ASGI middleware does what ``check`` decided.
* ``host_parse``: arbitrary text -> ``parse_host`` / ``parse_origin`` return None or a
  canonical value that reads back unchanged; every IPv6 address in every spelling,
  bracketed, with any port, reads back compressed; unbracketed it is malformed.
* ``address``: every IPv4 / IPv6 address (the special ranges, their IPv4-mapped /
  compatible / 6to4 / NAT64 forms, zoned IPv6) -> ``address_class`` gives the class of
  an independent table (never "public" for 127/8, ::1, 10/8, 172.16/12, 192.168/16,
  100.64/10, 169.254/16, fe80::/10, fc00::/7, multicast, unspecified, ...); a URL naming
  it is refused before any connection exactly when the class is not allowed.
* ``fetch``: URLs of every shape (schemes, userinfo, literal and named hosts, ports,
  junk) with a resolver answering from the strategy and canned HTTP answers (redirects,
  bad lengths) -> ``Fetcher.fetch`` returns the canned body or raises FetchError, nothing
  else; the connector fails the test if asked for an address the table refuses, or after
  a lookup that returned one. No example touches the network: the connector hands out
  one end of a local socket pair, and socket's lookup / connect raise meanwhile.
* ``sizes``: ``parse_size`` on arbitrary input -> an int >= 0 or ValueError, the exact
  value (rounded down) for every spelling of the grammar; ``format_size`` -> ``parse_size``
  back within the shown precision, exactly for whole units.

A target's ``known`` examples (bugs the fuzzing found) are always tried first.
"""

from __future__ import annotations

import argparse
import builtins
import contextlib
import copy
import dataclasses
import functools
import ipaddress
import json
import math
import re
import socket
import ssl
import types
import urllib.parse
from fractions import Fraction
from typing import Callable

import hypothesis
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image, ImageOps

from dsvl2.config import ProcessorConfig
from dsvl2.engine.detokenize import StopStringMatcher, StreamDecoder
from dsvl2.engine.sampling import SamplingParams, make_generator, sample_next
from dsvl2.errors import ConversationError, GenerationError, ImageError
from dsvl2.grounding import COORD_MAX, draw_grounding, grounding_to_json, parse_grounding, strip_grounding_markup
from dsvl2.model.vl import DeepseekVL2
from dsvl2.processing import Processor, Tokenizer, normalize_conversation, num_image_tokens, prompt_pieces
from dsvl2.processing.conversation import IMAGE_TAG, Special
from dsvl2.processing.image import select_best_resolution, tokens_per_tile_side
from dsvl2.server import fetch as fetch_mod
from dsvl2.server.errors import APIError
from dsvl2.server.fetch import PRIVATE_CLASSES, Fetcher, FetchError, FetchRefused, address_class
from dsvl2.server.guard import RequestGuard, is_loopback_host, parse_host, parse_origin
from dsvl2.sizes import format_size, parse_size, size_argument
from _paths import GOLDEN

S = 384  # tile side of every released processor config


@functools.lru_cache(maxsize=None)
def tokenizer() -> Tokenizer:
    return Tokenizer.from_dir(GOLDEN / "tiny")


@functools.lru_cache(maxsize=None)
def _real_processor() -> Processor:
    return Processor.from_pretrained(GOLDEN / "tiny")


def processor(candidates: tuple | None = None) -> Processor:
    """The tiny checkpoint's processor (the real 23 candidates), or one with ``candidates``
    (the tile side is the first candidate's width, as in the reference)."""
    proc = _real_processor()
    if candidates is None:
        return proc
    return Processor(proc.tokenizer, dataclasses.replace(proc.config, candidate_resolutions=candidates))


REAL_CANDIDATES = processor().config.candidate_resolutions


@dataclasses.dataclass(frozen=True)
class Target:
    """A property and the strategy drawing its arguments (a tuple)."""

    name: str
    strategy: st.SearchStrategy
    prop: Callable[..., None]
    examples: int  # in the test suite (modest: the whole file stays well under a minute)
    known: tuple = ()  # argument tuples always tried first: the falsifying examples of bugs found


def run_target(target: Target, max_examples: int, counter: list[int] | None = None,
               seed: int | None = None, **options) -> None:
    """Run ``target`` for ``max_examples`` examples; raises the (shrunk) failure if any.
    ``counter[0]`` counts the property calls (shrinking included); ``seed`` fixes
    hypothesis' random choices; ``options`` are further ``hypothesis.settings``."""
    counter = [0] if counter is None else counter

    @settings(max_examples=max_examples, deadline=None, database=None, **options)
    @given(target.strategy)
    def check(args):
        counter[0] += 1
        target.prop(*args)

    for args in target.known:
        check = hypothesis.example(args)(check)

    (check if seed is None else hypothesis.seed(seed)(check))()


# --------------------------------------------------------------------------- conversation

_texts = st.one_of(
    st.text(max_size=20),
    st.sampled_from(["", " ", IMAGE_TAG, f"{IMAGE_TAG}\n{IMAGE_TAG}", f" {IMAGE_TAG} x", "<|User|>", "<image",
                     "<|ref|>a<|/ref|>", "\n\n<|Assistant|>:", "<｜end▁of▁sentence｜>"]),
    st.lists(st.sampled_from(["a", IMAGE_TAG, " ", "\n", "<|grounding|>"]), max_size=6).map("".join),
)
_junk = st.one_of(st.none(), st.integers(), st.floats(allow_nan=True), st.binary(max_size=4),
                  st.lists(st.integers(), max_size=2), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))
_IMG = "IMG"  # an image source; the processor gets a small PIL image for it
_image_url = st.one_of(st.fixed_dictionaries({"url": st.one_of(st.just(_IMG), _junk, st.just(""))}),
                       st.just(_IMG), st.just(""), _junk)
_parts = st.one_of(
    st.fixed_dictionaries({"type": st.just("text"), "text": st.one_of(_texts, _junk)}),
    st.fixed_dictionaries({"type": st.just("image")}, optional={"image": st.one_of(st.just(_IMG), _junk)}),
    st.fixed_dictionaries({"type": st.just("image_url")}, optional={"image_url": _image_url}),
    st.fixed_dictionaries({"type": st.one_of(st.sampled_from(["audio", "Text", ""]), _junk)}),
    _texts, _junk,
)
_contents = st.one_of(_texts, st.lists(_parts, max_size=4), st.tuples(_parts), _junk)
_roles = st.one_of(st.sampled_from(["user", "assistant", "system", "<|User|>", "<|Assistant|>", "User", "tool", ""]),
                   _junk)
_messages = st.one_of(
    st.fixed_dictionaries({}, optional={"role": _roles, "content": _contents,
                                        "images": st.one_of(st.lists(st.just(_IMG), max_size=3), st.just(_IMG),
                                                            _junk)}),
    _texts, _junk,
)
_conversations = st.one_of(st.lists(_messages, max_size=5), st.tuples(_messages, _messages), _texts, _junk)
conversation_args = st.tuples(_conversations, st.one_of(st.none(), st.lists(st.just(_IMG), max_size=3)))


def _swap_images(x, img):
    """Every ``_IMG`` source replaced by ``img`` (the processor needs something to decode)."""
    if isinstance(x, str):
        return img if x == _IMG else x
    if isinstance(x, dict):
        return {k: _swap_images(v, img) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_swap_images(v, img) for v in x)
    return x


def prop_conversation(messages, images) -> None:
    try:
        turns = normalize_conversation(messages, images)
    except ConversationError:
        return
    assert turns[-1].role == "assistant" and not turns[-1].text.strip()
    roles = [t.role for t in turns]
    assert set(roles) <= {"system", "user", "assistant"} and "system" not in roles[1:]
    for t in turns:
        assert isinstance(t.text, str)
        assert t.tag_count() == len(t.images)  # tags, not typed "<image>" text of OpenAI messages
        assert t.role == "user" or not t.images
    pieces = prompt_pieces(turns)
    assert pieces[0] is Special.BOS and all(isinstance(p, (str, Special)) for p in pieces)
    n_images = sum(len(t.images) for t in turns)
    if n_images > 3:
        return  # the processor part costs ~2 tiles per image
    try:  # the same input through the processor: only dsvl2 errors (a junk image source -> ImageError)
        batch = processor()(_swap_images(messages, Image.new("RGB", (8, 8), (1, 2, 3))),
                            images=_swap_images(images, Image.new("RGB", (8, 8), (1, 2, 3))))
    except (ConversationError, ImageError):
        return
    assert int(batch.images_seq_mask.sum()) == sum(batch.num_image_tokens[0])
    # text pieces are split at the tags, so the image id appears only in image slots
    assert int((batch.input_ids == tokenizer().image_id).sum()) == int(batch.images_seq_mask.sum())


# --------------------------------------------------------------------------- tiling (geometry)

_grid = st.tuples(st.integers(1, 12), st.integers(1, 12)).map(lambda t: (t[0] * S, t[1] * S))
_candidates = st.one_of(st.just(REAL_CANDIDATES), st.lists(_grid, min_size=1, max_size=10).map(tuple))
_side = st.one_of(st.integers(1, 4000), st.integers(1, 100_000), st.sampled_from([1, 2, 383, 384, 385, 767, 768]))
tiling_args = st.tuples(_side, _side, _candidates)


def _effective_waste(w: int, h: int, cand: tuple[int, int]) -> tuple[int, int]:
    scale = min(cand[0] / w, cand[1] / h)
    effective = min(int(w * scale) * int(h * scale), w * h)
    return effective, cand[0] * cand[1] - effective


@functools.lru_cache(maxsize=None)
def _assembled_tokens(tw: int, th: int) -> int:
    """Image features the model lays out for one image with a tw x th grid (d = 1).
    Deterministic in (tw, th), so computed once per grid (at most 12 x 12 of them): the
    torch set-up was a third of the tiling property's time."""
    side = tokens_per_tile_side(S, 14, 2)
    fake = types.SimpleNamespace(
        cfg=types.SimpleNamespace(language=types.SimpleNamespace(hidden_size=1), global_view_pos="head"),
        image_newline=torch.zeros(1), view_seperator=torch.zeros(1))
    projected = torch.zeros(1 + tw * th, side * side, 1)
    return DeepseekVL2.assemble_images(fake, projected, [(tw, th)]).shape[0]


def prop_tiling(w: int, h: int, candidates: tuple) -> None:
    best = select_best_resolution(w, h, candidates)
    assert best in candidates
    k = candidates.index(best)
    e_best, waste_best = _effective_waste(w, h, best)
    for i, c in enumerate(candidates):
        e, waste = _effective_waste(w, h, c)
        assert e < e_best or (e == e_best and (waste > waste_best or (waste == waste_best and i >= k))), \
            (c, best)
    tw, th = best[0] // S, best[1] // S
    assert (tw * S, th * S) == best
    if tw * th <= 36:  # the assembly check builds [1 + tw*th, 196, 1] tensors
        assert num_image_tokens(tw, th, 14) == _assembled_tokens(tw, th)


# --------------------------------------------------------------------------- tiles (pixels)

_pixel_side = st.one_of(st.integers(1, 1600), st.sampled_from([1, 383, 384, 385, 768, 1152]))
_small_grid = st.tuples(st.integers(1, 4), st.integers(1, 3)).map(lambda t: (t[0] * S, t[1] * S))
_small_grids = st.tuples(st.integers(1, 3).map(lambda t: (S, t * S)),  # first width S: 384-pixel tiles
                         st.lists(_small_grid, max_size=5)).map(lambda t: (t[0], *t[1]))
tiles_args = st.tuples(
    st.one_of(st.tuples(_pixel_side, _pixel_side), st.tuples(st.integers(1, 3), st.integers(1000, 8000)),
              st.tuples(st.integers(1000, 8000), st.integers(1, 3))),
    st.one_of(st.just(None), _small_grids),
    st.sampled_from([1, 1, 1, 2, 3]),
    st.integers(0, 2**32 - 1),
)


@functools.lru_cache(maxsize=None)
def _pixel_pool() -> bytes:
    """Random bytes, made once; an image's pixels are a slice of it at a drawn offset (a
    fresh random image per example without generating up to 7.7 MB per example)."""
    return np.random.default_rng(0).bytes(2 * 1600 * 1600 * 3)


def _random_image(size: tuple[int, int], seed: int) -> Image.Image:
    w, h = size
    pool = _pixel_pool()
    n = w * h * 3
    start = seed % (len(pool) - n + 1)
    return Image.frombytes("RGB", size, memoryview(pool)[start:start + n])


def prop_tiles(size: tuple[int, int], candidates: tuple | None, n_images: int, seed: int) -> None:
    # Processor._process_one: the uint8 tiles before normalisation and padding (collate is
    # a plain stack, covered by the conversation target); a third of the full call's cost.
    proc = processor(candidates)
    w, h = size
    img = _random_image(size, seed)
    conv = [{"role": "user", "content": [{"type": "image", "image": img}] * n_images + [{"type": "text", "text": "x"}]}]
    sample = proc._process_one(conv, None)
    tiles = sample.tiles  # [n, 3, S, S] uint8, every image: global view, then locals row-major
    assert tiles.dtype == np.uint8 and tiles.shape[1:] == (3, S, S)
    expect_best = select_best_resolution(w, h, proc.config.candidate_resolutions) if n_images <= 2 else (S, S)
    assert sample.best == [expect_best] * n_images
    tw, th = expect_best[0] // S, expect_best[1] // S
    assert sample.crops == [(tw, th)] * n_images and tiles.shape[0] == n_images * (1 + tw * th)
    assert sample.num_tokens == [num_image_tokens(tw, th, 14)] * n_images
    assert sum(sample.seq_mask) == n_images * _assembled_tokens(tw, th)
    assert len(sample.ids) == len(sample.seq_mask)
    # the local tiles of the first image, put back row-major, are the padded canvas (compared
    # tile by tile: the canvas [th*S, tw*S, 3] viewed as [th, tw, 3, S, S], no copy of either)
    canvas = np.asarray(ImageOps.pad(img, expect_best, color=(127, 127, 127)))
    grid = tiles[1:1 + tw * th].reshape(th, tw, 3, S, S)
    assert np.array_equal(grid, canvas.reshape(th, S, tw, S, 3).transpose(0, 2, 4, 1, 3))


# --------------------------------------------------------------------------- grounding

_numbers = st.one_of(
    st.integers(-10**40, 10**40).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(["nan", "inf", "-0", "1e5", ".5", "5.", "+3", "0x10", "١٢٣", "𝟗", "999999999999", "-", "+", "."]),
    st.integers(0, 999).map(str),
    st.text(max_size=4),
)
_boxes = st.lists(_numbers, max_size=6).map(lambda xs: "[" + ", ".join(xs) + "]")
_det_bodies = st.lists(st.one_of(_boxes, _numbers, st.sampled_from(["[", "]", ",", " ", "[[", "]]"])),
                       max_size=6).map(lambda bs: "[" + ", ".join(bs) + "]")
_pieces = st.one_of(st.sampled_from(["<|ref|>", "<|/ref|>", "<|det|>", "<|/det|>", "<|grounding|>", "<|", "|>",
                                     "<|ref", "[", "]", ",", "\n", "__import__('os').system('x')"]),
                    _det_bodies, st.text(max_size=10))
grounding_args = st.tuples(
    st.one_of(st.lists(_pieces, max_size=14).map("".join), st.text(max_size=100)),
    st.tuples(st.integers(1, 10_000), st.integers(1, 10_000)),
)


@contextlib.contextmanager
def tripwires():
    """eval / exec / compile raise while model output is handled."""
    saved = {n: getattr(builtins, n) for n in ("eval", "exec", "compile")}

    def refuse(*args, **kwargs):
        raise AssertionError("model output reached eval / exec / compile")

    try:
        for n in saved:
            setattr(builtins, n, refuse)
        yield
    finally:
        for n, f in saved.items():
            setattr(builtins, n, f)


def prop_grounding(text: str, size: tuple[int, int]) -> None:
    W, H = size
    with tripwires():
        g = parse_grounding(text)
        for _, (x1, y1, x2, y2) in g.boxes:
            assert all(isinstance(v, int) for v in (x1, y1, x2, y2))
            assert 0 <= x1 <= x2 <= COORD_MAX and 0 <= y1 <= y2 <= COORD_MAX
        j = grounding_to_json(g, W, H)
        assert len(j["boxes"]) == len(g.boxes)
        for b in j["boxes"]:
            px1, py1, px2, py2 = b["box_px"]
            assert 0 <= px1 <= px2 <= W and 0 <= py1 <= py2 <= H, (b, W, H)
        assert isinstance(strip_grounding_markup(text), str)
        if g.refs:  # drawing: on a small canvas of the same aspect
            small = Image.new("RGB", (max(1, W // 100), max(1, H // 100)))
            assert draw_grounding(small, g).size == small.size


# --------------------------------------------------------------------------- streaming detokeniser


@functools.lru_cache(maxsize=None)
def _special_ids() -> tuple[int, ...]:
    return tuple(sorted(tokenizer().special_ids))


def _id_lists():
    n = len(tokenizer())
    piece = st.one_of(
        st.lists(st.integers(0, n + 100), max_size=8),  # any ids, some beyond the tokenizer
        st.text(max_size=6).map(tokenizer().encode),  # whole characters (multi-byte ones split across ids)
        st.sampled_from(["héllo wörld", "🙂🙂", "中文", " \n\t ", "a . b", "\ufffd"]).map(tokenizer().encode),
        st.lists(st.sampled_from(_special_ids()), max_size=2),
    )
    return st.lists(piece, max_size=6).map(lambda ps: [i for p in ps for i in p])


stream_args = st.tuples(st.deferred(_id_lists), st.sampled_from([None, False, True]))


def prop_stream_decoder(ids: list[int], skip_special_tokens: bool | None) -> None:
    tok = tokenizer()
    dec = StreamDecoder(tok.decode, skip_special_tokens=skip_special_tokens)
    deltas = []
    for i in ids:
        deltas.append(dec.push(i))
        assert dec.text == "".join(deltas)
        dec.pending()  # never raises
    deltas.append(dec.flush())
    full = tok.decode(ids, skip_special_tokens=bool(skip_special_tokens))
    assert "".join(deltas) == full


# --------------------------------------------------------------------------- stop strings

_stop_text = st.text(alphabet="ab c\n", min_size=1, max_size=6)
stop_args = st.tuples(st.lists(_stop_text, min_size=1, max_size=5),
                      st.lists(st.text(alphabet="ab c\n", max_size=5), max_size=12),
                      st.integers(0, 12))


def _naive_stop(stops: list[str], deltas: list[str]) -> tuple[str, bool]:
    """The obvious matcher: after each delta, cut before the earliest stop string in the
    unreleased text; release all but the longest tail that begins a stop string."""
    out, held = [], ""
    for d in deltas:
        text = held + d
        hits = [i for i in (text.find(s) for s in stops) if i >= 0]
        if hits:
            out.append(text[:min(hits)])
            return "".join(out), True
        keep = max((n for s in stops for n in range(1, len(s)) if text.endswith(s[:n])), default=0)
        out.append(text[:len(text) - keep])
        held = text[len(text) - keep:]
    return "".join(out) + held, False


def prop_stop_strings(stops: list[str], deltas: list[str], probe_at: int) -> None:
    m = StopStringMatcher(stops)
    out, stopped = [], False
    for k, d in enumerate(deltas):
        if k == probe_at:  # a probe on a copy (as the engine does) leaves the original untouched
            copy.copy(m).feed("ab c\n" * 2)
        piece, stopped = m.feed(d)
        out.append(piece)
        if stopped:
            break
    if not stopped:
        out.append(m.flush())
    got = "".join(out)
    assert (got, stopped) == _naive_stop(stops, deltas)
    full = "".join(deltas)
    assert not any(s in got for s in stops)
    if stopped:
        assert any(full.startswith(got + s) for s in stops)
    else:
        assert got == full


# --------------------------------------------------------------------------- sampler

_V = 40
_special_logits = st.sampled_from([float("inf"), float("-inf"), float("nan"), 0.0, 3e38, -3e38, 1e-45, 88.0])
# logits: B rows of seeded normals times a scale, with special values planted at drawn places
def _logits(B: int) -> st.SearchStrategy:
    return st.tuples(st.just(B), st.integers(0, 2**32 - 1), st.sampled_from([0.0, 1.0, 10.0, 1e4, 1e30]),
                     st.lists(st.tuples(st.integers(0, 3), st.integers(0, _V - 1), _special_logits), max_size=10))


_params = st.builds(
    SamplingParams,
    temperature=st.one_of(st.just(0.0), st.floats(0, 1e6), st.sampled_from([1e-50, 1e-5, 5e-324, 1e300])),
    top_p=st.one_of(st.just(1.0), st.floats(0, 1.0, exclude_min=True)),
    top_k=st.one_of(st.just(0), st.integers(1, 2 * _V), st.just(10**30)),
    repetition_penalty=st.one_of(st.just(1.0), st.floats(1e-308, 1e308), st.sampled_from([1e-308, 1e308])),
    seed=st.integers(-2**70, 2**70),
)
# One SamplingParams per row (B of them): drawing four and using B was most of the
# generation cost (floats are hypothesis' dearest draws), for nothing the property saw.
@functools.lru_cache(maxsize=None)
def _sampling_args(B: int) -> st.SearchStrategy:
    return st.tuples(_logits(B), st.lists(_params, min_size=B, max_size=B),
                     st.lists(st.integers(0, _V - 1), max_size=5))


sampling_args = st.integers(1, 4).flatmap(_sampling_args)


def prop_sampling(spec: tuple, params: list[SamplingParams], seen_ids: list[int]) -> None:
    B, seed, scale, planted = spec
    logits = torch.from_numpy(np.random.default_rng(seed).standard_normal((B, _V)).astype(np.float32) * scale)
    for row, col, value in planted:
        logits[row % B, col] = value  # [B, V]
    params = params[:B]
    seen = [seen_ids] * B

    def gens():
        return [None if p.is_greedy else make_generator(p.seed) for p in params]

    try:
        out = sample_next(logits, params, gens(), seen).tolist()
    except GenerationError as e:
        assert "removed" in str(e)  # the one refusal: a sampled row with no token left
        return
    for b, (tok, p) in enumerate(zip(out, params)):
        assert 0 <= tok < _V
        row = logits[b]
        if p.repetition_penalty == 1.0 and bool((row > float("-inf")).any()):  # (a penalty can make NaN: 0 / 0)
            assert bool(row[tok] > float("-inf")), (tok, row)  # never a NaN or removed token
        # a row's token depends on its own logits, options and seed only
        alone = sample_next(logits[b:b + 1], [p], [None if p.is_greedy else make_generator(p.seed)], [seen_ids])
        assert int(alone[0]) == tok


# --------------------------------------------------------------------------- server: Host / Origin guard

# The documented rules, written out here independently of guard.py: a Host address "names
# this machine" when it is in one of these networks; an origin's default port by scheme.
_THIS_MACHINE = [ipaddress.ip_network(n) for n in (
    "127.0.0.0/8", "0.0.0.0/32", "::1/128", "::/128", "::ffff:127.0.0.0/104", "::ffff:0.0.0.0/128")]
_SCHEME_PORT = {"http": 80, "https": 443, "ws": 80, "wss": 443}
_GUARD_REFUSALS = {(400, "invalid_host"), (421, "host_not_allowed"), (403, "origin_not_allowed")}
SERVED = "served"


def _names_this_machine(ip) -> bool:
    return any(ip in n for n in _THIS_MACHINE if n.version == ip.version)


def _cased(s: str, mask: int) -> str:
    """``s`` with the characters whose bit is set in ``mask`` upper-cased."""
    return "".join(c.upper() if (mask >> (i % 31)) & 1 else c for i, c in enumerate(s))


def _v6_forms(ip: ipaddress.IPv6Address) -> list[str]:
    """Spellings of one IPv6 address: compressed, exploded, upper-case, dotted-quad tail."""
    tail = ip.exploded[:30] + str(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
    return [ip.compressed, ip.exploded, ip.compressed.upper(), tail]


def _render_host(host: str, port: int | None) -> str:
    return (f"[{host}]" if ":" in host else host) + ("" if port is None else f":{port}")


def _ip_or_none(text: str):
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


@functools.lru_cache(maxsize=None)
def _pick(options: tuple) -> st.SearchStrategy:
    """``st.sampled_from(options)``, built once: a strategy made inside a composite is
    otherwise built (and checked) again at every draw, most of a draw's cost."""
    return st.sampled_from(options)


@functools.lru_cache(maxsize=None)
def _int(lo: int, hi: int) -> st.SearchStrategy:
    return st.integers(lo, hi)


_mask = st.integers(0, 2**31 - 1)
_BOOL = st.booleans()
_label = st.tuples(st.sampled_from("abcxyz"), st.text("az09-_", max_size=5)).map(lambda t: (t[0] + t[1]).rstrip("-"))
_dns_name = st.lists(_label, min_size=1, max_size=3).map(".".join)  # never an IP literal, never "localhost"
_any_port = st.one_of(st.none(), st.integers(0, 65535), st.sampled_from([80, 443, 8000]))
_BAD_PORTS = ["", "65536", "99999", "123456", "-1", "+80", " 80", "\u0668\u0660", "8o", "0x50", "80:80"]
_BAD_HOSTS = ["[::1", "[1.2.3.4]", "a b", "evil.example/x", "user@host", "-a.b", ".", "::1", "fe80::1", "[::1]x",
              "[::1]:", "[::1]]", "a..", "\u00e9vil.example", "[]"]
_SERVERS = [("127.0.0.1", 8000), ("::1", 8000), ("192.168.1.5", 8000), ("::ffff:192.168.1.5", 8000),
            ("fe80::1%eth0", 8000), ("10.9.8.7", 443), None, (None, None), ("/run/dsvl2.sock", None)]
_ANY_IP = st.ip_addresses()
_LOOPBACK_IPS = st.one_of(
    st.ip_addresses(network="127.0.0.0/8"), st.ip_addresses(network="::ffff:127.0.0.0/104"),
    st.sampled_from([ipaddress.ip_address(a) for a in ("0.0.0.0", "::", "::1", "::ffff:0.0.0.0")]))


def _local_ip(server):
    """The address a request came to (a dual-stack socket reports a.b.c.d as ::ffff:a.b.c.d)."""
    if not server or not isinstance(server[0], str):
        return None
    ip = _ip_or_none(server[0].split("%")[0])
    return (ip.ipv4_mapped or ip) if ip is not None and ip.version == 6 else ip


def _draw_host(draw, names: tuple[str, ...], local):
    """(text, canonical host, or None when malformed): a name of the pool or another one,
    ``localhost``, an IP literal (any, loopback, the server's own) in any spelling, junk."""
    kind = draw(_pick(("pool", "pool", "other", "localhost", "ip", "loopback_ip", "local", "bad")))
    mask = draw(_mask)
    if kind == "bad":
        return draw(_pick(tuple(_BAD_HOSTS))), None
    if kind in ("pool", "other", "localhost"):
        if kind == "pool":
            name = names[draw(_int(0, len(names) - 1))]
        else:
            name = draw(_dns_name) if kind == "other" else "localhost"
        return _cased(name, mask) + draw(_pick(("", "", "."))), name
    if kind == "local" and local is not None:
        ip = local
    else:
        ip = draw(_LOOPBACK_IPS if kind == "loopback_ip" else _ANY_IP)
    if ip.version == 4:
        return str(ip), str(ip)
    return "[" + _cased(_v6_forms(ip)[draw(_int(0, 3))], mask) + "]", str(ip)


_BAD_ORIGINS = ["null", "", "http://x/", "http://u@x", "x", "ftp://x", "http://", "http://[::1", "http://x:99999",
                "http://x:", "file:///etc", "http//x", "http://x/?", "http://[::1]/", "https://a.b:443/"]


def _draw_origin(draw, names: tuple[str, ...], local, request_scheme: str):
    """(text, canonical (scheme, host, port), or None when it is not an origin)."""
    if draw(_int(0, 9)) == 0:
        return draw(_pick(tuple(_BAD_ORIGINS))), None
    scheme = draw(_pick((request_scheme, "http", "https", "ws", "wss")))
    text, host = _draw_host(draw, names, local)
    port = draw(_any_port)
    if host is None:
        return f"{scheme}://{text}", None
    full = (scheme, host, _SCHEME_PORT[scheme] if port is None else port)
    return _cased(scheme, draw(_mask)) + "://" + text + ("" if port is None else f":{port}"), full


_NAME_LISTS = st.lists(_dns_name, min_size=1, max_size=3, unique=True)
_OPTION_PORT = st.one_of(st.none(), st.sampled_from([80, 8000]))


@st.composite
def _guard_request(draw):
    """A request with known meaning: the guard's options, the Host / Origin headers and the
    address it came to, each drawn with its canonical value, and the decision the
    documented rules give for them (``_expected_guard``)."""
    names = tuple(draw(_NAME_LISTS))
    server = draw(_pick(tuple(_SERVERS)))
    local = _local_ip(server)
    scheme = draw(_pick(("http", "https", "ws", "wss")))
    allowed_hosts, hosts = [], set()  # the options' text; canonical (host, port or None)
    for _ in range(draw(_int(0, 3))):
        text, host = _draw_host(draw, names, None)
        if host is None:
            continue
        port = draw(_OPTION_PORT)
        if ":" in host and port is None and draw(_BOOL):
            text = text[1:-1]  # the options also take an unbracketed IPv6 address
        allowed_hosts.append(text + ("" if port is None else f":{port}"))
        hosts.add((host, port))
    any_host = draw(_int(0, 9)) == 0
    if any_host:
        allowed_hosts.append(draw(_pick(("*", " * "))))
    allowed_origins, origins = [], set()
    for _ in range(draw(_int(0, 2))):
        text, full = _draw_origin(draw, names, None, "https")
        if full is not None:
            allowed_origins.append(text)
            origins.add(full)
    headers, host_keys, origin_keys = [], [], []
    for _ in range(draw(_pick((1, 1, 1, 1, 0, 2)))):
        if draw(_int(0, 19)) == 0:
            headers.append((b"host", b""))
            host_keys.append(None)
            continue
        text, host = _draw_host(draw, names, local)
        port = draw(_any_port)
        if draw(_int(0, 9)) == 0:
            text, host = text + ":" + draw(_pick(tuple(_BAD_PORTS))), None
        elif port is not None:
            text += ":" + str(port).zfill(draw(_int(len(str(port)), 5)))  # leading zeros: 5 digits at most
        text = draw(_pick(("", " ", "\t"))) + text + draw(_pick(("", " ")))
        headers.append((b"host", text.encode()))
        host_keys.append((host, port))
    for _ in range(draw(_pick((0, 0, 1, 1, 1, 2)))):
        text, full = _draw_origin(draw, names, local, scheme)
        headers.append((b"origin", text.encode()))
        origin_keys.append(full)
    scope = {"type": draw(_pick(("http", "http", "websocket"))), "headers": draw(st.permutations(headers)),
             "scheme": scheme, "server": server}
    return allowed_hosts, allowed_origins, scope, _expected_guard(host_keys, origin_keys, hosts, any_host, origins,
                                                                  local, scheme)


def _expected_guard(host_keys, origin_keys, hosts, any_host, origins, local, scheme):
    """SERVED or the (status, code) of the refusal, by the rules of guard.py's docstring."""
    if host_keys == [None]:
        host_keys = []  # an empty Host is no Host
    if len(host_keys) > 1:
        return 400, "invalid_host"
    own = None
    if host_keys:
        if host_keys[0] is None or host_keys[0][0] is None:
            return 400, "invalid_host"
        host, port = host_keys[0]
        ip = _ip_or_none(host)
        if not (any_host or host == "localhost" or (ip is not None and (_names_this_machine(ip) or ip == local))
                or (host, None) in hosts or (host, port) in hosts):
            return 421, "host_not_allowed"
        own = (scheme, host, _SCHEME_PORT[scheme] if port is None else port)
    if origin_keys and (len(origin_keys) > 1 or origin_keys[0] is None
                        or (origin_keys[0] != own and origin_keys[0] not in origins)):
        return 403, "origin_not_allowed"
    return SERVED


_raw_header = st.one_of(st.binary(max_size=24), st.text(max_size=24).map(lambda s: s.encode("utf-8")),
                        st.text(alphabet="[]:.0123456789abcdef%_-/@ LOCALHOST", max_size=24).map(str.encode))
_raw_request = st.tuples(  # junk options and headers: the expected decision is not known (None)
    st.lists(st.one_of(st.text(max_size=12), st.sampled_from(["*", "::1", "[::1]:80", "a.b:x", "localhost", "A.b."])),
             max_size=3),
    st.lists(st.one_of(st.text(max_size=16), st.sampled_from(["https://a.b", "http://[::1]:8000", "null"])),
             max_size=2),
    st.fixed_dictionaries({"type": st.sampled_from(["http", "websocket"]),
                           "headers": st.lists(st.tuples(st.sampled_from([b"host", b"origin", b"x-other"]),
                                                         _raw_header), max_size=4),
                           "scheme": st.sampled_from(["http", "https", "ws", "wss"]),
                           "server": st.sampled_from(_SERVERS)}),
    st.none(),
)
guard_args = st.one_of(_guard_request(), _raw_request)


def _run_asgi(guard: RequestGuard, scope: dict) -> tuple[bool, list]:
    """The middleware's coroutine driven by hand (it never waits on anything): whether the
    app was called, and the messages sent."""
    called, sent = [], []

    async def app(scope, receive, send):
        called.append(True)

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    guard.app = app
    coro = guard(scope, receive, send)
    try:
        coro.send(None)
    except StopIteration:
        return bool(called), sent
    coro.close()
    raise AssertionError("the guard waited on something")


def _served_is_justified(guard: RequestGuard, scope: dict) -> None:
    """For a served request with junk options: its Host and Origin are ones the rules serve."""
    hosts = [v for k, v in scope["headers"] if k == b"host"]
    hosts = [] if hosts == [b""] else hosts
    assert len(hosts) <= 1
    own = None
    if hosts:
        parsed = parse_host(hosts[0].decode("latin-1"))
        assert parsed is not None
        host, port = parsed
        ip = _ip_or_none(host)
        assert (guard.any_host or host == "localhost" or (ip is not None and (_names_this_machine(ip)
                or ip == _local_ip(scope["server"]))) or (host, None) in guard.hosts or (host, port) in guard.hosts)
        own = (scope["scheme"], host, _SCHEME_PORT[scope["scheme"]] if port is None else port)
    origins = [v for k, v in scope["headers"] if k == b"origin"]
    if origins:
        parsed = parse_origin(origins[0].decode("latin-1")) if len(origins) == 1 else None
        assert parsed is not None and (parsed == own or parsed in guard.origins)


def prop_guard(allowed_hosts: list[str], allowed_origins: list[str], scope: dict, expected) -> None:
    try:
        guard = RequestGuard(None, allowed_hosts=allowed_hosts, allowed_origins=allowed_origins)
    except ValueError:  # the options' one error (the CLI turns it into a usage error)
        assert expected is None, "valid options refused"
        return
    try:
        guard.check(scope)
        got = SERVED
    except APIError as e:  # the one refusal, with a documented status and code
        got = (e.status, e.code)
        assert got in _GUARD_REFUSALS, got
    if expected is not None:
        assert got == expected, (got, expected)
    elif got == SERVED:
        _served_is_justified(guard, scope)
    called, sent = _run_asgi(guard, scope)  # the middleware does what check decided
    if got == SERVED:
        assert called and not sent
    elif scope["type"] == "websocket":
        assert not called and sent == [{"type": "websocket.close", "code": 1008}]
    else:
        assert not called and sent[0]["type"] == "http.response.start" and sent[0]["status"] == got[0]
        assert json.loads(sent[1]["body"])["error"]["code"] == got[1]


_hostish = st.one_of(
    st.text(max_size=40),
    st.text(alphabet="[]:.0123456789abcdefABCDEF%_-/@ \tLOCALHOST\u212a", max_size=30),
    st.tuples(st.sampled_from(["", "http://", "HTTPS://", "ws://", "wss://", "ftp://", "null", "http:///"]),
              st.text(alphabet="[]:.0123456789abcdef%_-/@ xyz", max_size=30)).map("".join),
)
host_parse_args = st.tuples(_hostish, st.one_of(st.ip_addresses(v=6), _LOOPBACK_IPS.filter(lambda ip: ip.version == 6)),
                            st.integers(0, 3), _any_port, st.sampled_from(sorted(_SCHEME_PORT)))


def prop_host_parse(text: str, ip6: ipaddress.IPv6Address, form: int, port: int | None, scheme: str) -> None:
    # arbitrary text: None or a canonical (host, port) that reads back the same
    r = parse_host(text)
    if r is not None:
        host, p = r
        assert isinstance(host, str) and host and (p is None or (type(p) is int and 0 <= p <= 65535)), r
        if ":" in host:
            assert str(ipaddress.IPv6Address(host)) == host
        else:
            assert re.fullmatch(r"[a-z0-9_.-]+", host) and not host.endswith("."), r
        assert parse_host(_render_host(host, p)) == r
    o = parse_origin(text)
    if o is not None:
        s, host, p = o
        assert s in _SCHEME_PORT and type(p) is int and 0 <= p <= 65535, o
        assert parse_origin(f"{s}://{_render_host(host, p)}") == o
        assert parse_origin(f"{s}://{_render_host(host, None)}") == (s, host, _SCHEME_PORT[s])
    assert is_loopback_host(text) in (True, False)
    # a bracketed IPv6 address, any spelling, with any port: its compressed form and the port
    spelled, port_text = _v6_forms(ip6)[form], "" if port is None else f":{port}"
    assert parse_host(f"[{spelled}]{port_text}") == (str(ip6), port)
    assert parse_host(spelled + port_text) is None  # unbracketed: malformed
    assert parse_origin(f"{scheme}://[{spelled}]{port_text}") == (scheme, str(ip6), _SCHEME_PORT[scheme] if port is None
                                                                  else port)
    assert is_loopback_host(str(ip6)) == _names_this_machine(ip6)


# --------------------------------------------------------------------------- server: image URL guard (fetch)

# The address classes, written out here independently of fetch.py (first match wins).
_ADDRESS_TABLE = [(ipaddress.ip_network(n), c) for n, c in (
    ("100.100.100.200/32", "cloud metadata"), ("fd00:ec2::254/128", "cloud metadata"),
    ("0.0.0.0/32", "unspecified"), ("::/128", "unspecified"), ("127.0.0.0/8", "loopback"), ("::1/128", "loopback"),
    ("169.254.0.0/16", "link-local"), ("fe80::/10", "link-local"), ("224.0.0.0/4", "multicast"),
    ("ff00::/8", "multicast"), ("10.0.0.0/8", "private"), ("172.16.0.0/12", "private"), ("192.168.0.0/16", "private"),
    ("100.64.0.0/10", "private"), ("fc00::/7", "private"), ("fec0::/10", "private"), ("0.0.0.0/8", "reserved"),
    ("240.0.0.0/4", "reserved"), ("192.0.2.0/24", "reserved"), ("198.51.100.0/24", "reserved"),
    ("203.0.113.0/24", "reserved"), ("198.18.0.0/15", "reserved"), ("2001:db8::/32", "reserved"))]
_ADDRESS_CLASSES = {None, "loopback", "private", "link-local", "multicast", "unspecified", "reserved", "cloud metadata"}
_M32 = 0xFFFFFFFF
# IPv6 forms that carry an IPv4 address: (name, the IPv6 integer for IPv4 v and filler bits r)
_WRAPPERS = {
    "mapped": lambda v, r: (0xFFFF << 32) | v,                                   # ::ffff:a.b.c.d
    "compat": lambda v, r: v,                                                   # ::a.b.c.d
    "6to4": lambda v, r: (0x2002 << 112) | (v << 80) | (r & (2**80 - 1)),        # 2002:AABB:CCDD::/48
    "nat64": lambda v, r: (0x64FF9B << 96) | v,                                 # 64:ff9b::a.b.c.d
    "nat64-local": lambda v, r: (0x64FF9B0001 << 80) | ((r & (2**48 - 1)) << 32) | v,  # 64:ff9b:1::/48
}


def _table_class(ip) -> str | None:
    return next((c for n, c in _ADDRESS_TABLE if n.version == ip.version and ip in n), None)


def _inner_v4(ip):
    """(the IPv4 address an IPv6 form carries, whether it is the IPv4-compatible form)."""
    n = int(ip)
    if ip.version == 4:
        return None, False
    if n >> 32 == 0xFFFF or n >> 32 == 0x64FF9B << 64 or n >> 80 == 0x64FF9B0001:
        return ipaddress.IPv4Address(n & _M32), False
    if n >> 112 == 0x2002:
        return ipaddress.IPv4Address((n >> 80) & _M32), False
    if n >> 32 == 0 and n > 1:
        return ipaddress.IPv4Address(n), True
    return None, False


def _expected_class(ip) -> str | None:
    """The class the table gives (wrapped IPv4 forms: their IPv4 address's), or "?" for an
    address outside the table: public, or "reserved" (another special-purpose range)."""
    inner, compat = _inner_v4(ip)
    if inner is not None:
        return _table_class(inner) or ("reserved" if compat else "?")
    return _table_class(ip) or "?"


def _refused(ip_text: str, allow_private: bool) -> bool:
    """Whether the table forbids connecting to ``ip_text`` (not an address at all: too)."""
    ip = _ip_or_none(ip_text)
    if ip is None:
        return True
    c = _expected_class(ip)
    return c != "?" and not (allow_private and c in ("loopback", "private"))


_v4_table = st.one_of([st.ip_addresses(network=str(n)) for n, _ in _ADDRESS_TABLE if n.version == 4])
_any_table = st.one_of([st.ip_addresses(network=str(n)) for n, _ in _ADDRESS_TABLE])
_public = st.one_of(st.ip_addresses(network="8.0.0.0/7"), st.ip_addresses(network="2600::/12"))  # global unicast
_v6_table = st.one_of([st.ip_addresses(network=str(n)) for n, _ in _ADDRESS_TABLE if n.version == 6])
_wrapped = st.tuples(st.one_of(_v4_table, st.ip_addresses(v=4)), st.sampled_from(sorted(_WRAPPERS)),
                     st.integers(0, 2**80 - 1)).map(lambda t: ipaddress.IPv6Address(_WRAPPERS[t[1]](int(t[0]), t[2])))
# IPv6 addresses with a zone (fe80::1%eth0): what getaddrinfo answers for link-local names,
# and what a URL may spell ([fe80::1%25eth0]); the zone changes no address's class
_zoned = st.tuples(st.one_of(_v6_table, _wrapped, st.ip_addresses(v=6)), st.sampled_from(["eth0", "1", "25eth0"])).map(
    lambda t: ipaddress.IPv6Address(f"{t[0]}%{t[1]}"))
_addresses = st.one_of(st.ip_addresses(v=4), st.ip_addresses(v=6), _any_table, _wrapped, _zoned)
address_args = st.tuples(_addresses, st.booleans())


class _NoConnection(OSError):
    """What the fuzz connector answers for an address it may be asked for."""


class _LocalSocket(socket.socket):
    """One end of a local socket pair standing in for a TCP connection: http.client's
    TCP_NODELAY is a no-op on it (a Unix socket has no such option)."""

    def setsockopt(self, level, option, value, *rest):
        if (level, option) != (socket.IPPROTO_TCP, socket.TCP_NODELAY):
            super().setsockopt(level, option, value, *rest)


def _refuse_connect(allow_private: bool):
    def connect(ip: str, port: int, timeout: float):
        assert not _refused(ip, allow_private), f"the fetcher connected to a refused address {ip}"
        raise _NoConnection(111, "no connection in a fuzz example")
    return connect


def _no_resolve(host: str, port: int):
    raise AssertionError(f"an IP-literal URL was looked up ({host!r})")


@contextlib.contextmanager
def no_network():
    """The fetcher's default lookup / connection and socket's raise while an example runs."""
    def refuse(*args, **kwargs):
        raise AssertionError("a fuzz example reached the network")

    saved = [(m, n, getattr(m, n)) for m, n in ((fetch_mod, "system_resolve"), (fetch_mod, "system_connect"),
                                                (socket, "create_connection"), (socket, "getaddrinfo"))]
    try:
        for m, n, _ in saved:
            setattr(m, n, refuse)
        yield
    finally:
        for m, n, f in saved:
            setattr(m, n, f)


def prop_address(ip, allow_private: bool) -> None:
    got = address_class(ip)
    assert got in _ADDRESS_CLASSES, got
    want = _expected_class(ip)
    if want == "?":
        inner = _inner_v4(ip)[0] or ip
        assert got in (None, "reserved") and (got is not None or inner.is_global), (ip, got)
    else:
        assert got == want, (ip, got, want)
    # the same address as a URL: refused before any connection, or connected to (the fuzz
    # connector then fails: nothing is ever opened)
    url = f"http://{ip}/" if ip.version == 4 else f"http://[{ip}]/"
    with no_network():
        try:
            Fetcher(allow_private=allow_private, resolve=_no_resolve, connect=_refuse_connect(allow_private),
                    timeout_s=60).fetch(url)
            raise AssertionError("fetched without a connection")
        except FetchRefused as e:
            assert e.address_class == got and not (got is None or (allow_private and got in PRIVATE_CLASSES))
        except FetchError as e:
            assert isinstance(e.__context__, _NoConnection) or "no connection" in str(e), e
            assert got is None or (allow_private and got in PRIVATE_CLASSES), (ip, got)


_real_getaddrinfo = socket.getaddrinfo
_NO_NAMES = {"img.test": "fail", "cdn.test": "fail", "rebind.test": "fail"}
_NAME_POOL = ("img.test", "cdn.test", "rebind.test")
_addr_text = st.one_of(_addresses.map(str), st.sampled_from(
    ["", "not-an-ip", "1.2.3.4 ", "fe80::1%eth0", "2606:4700::1%eth0", "0177.0.0.1", "::ffff:127.0.0.1",
     "93.184.216.34"]))
_TRICKY_URLS = ["http://0x7f000001/", "http://2130706433/", "http://127.1/", "http://[::ffff:127.0.0.1]/",
                "http://[::1", "http://[v1.x]/", "http://a b/", "http://8.8.8.8 x/", "file:///etc/passwd",
                "http://127.0.0.1%2f@img.test/", "http://img.test@127.0.0.1/", "http://[2606:4700::1%25a b]/",
                "HTTP://IMG.TEST:80/x", "http://:80/", "http:///x", "//img.test/x", "http://[fe80::1%25eth0]/",
                "http://169.254.169.254/latest/meta-data/", "http://[fd00:ec2::254]/", "http://100.100.100.200/"]


_URL_TEXT = st.one_of(st.text(max_size=40), st.sampled_from(_TRICKY_URLS))
_URL_KIND = st.sampled_from(["name"] * 3 + ["v4"] * 2 + ["v6"] * 2 + ["other", "junk"])
_URL_NAME = st.sampled_from(_NAME_POOL + ("localhost", "nowhere.test"))
_URL_V4 = st.one_of(st.ip_addresses(network="8.0.0.0/7"), st.ip_addresses(v=4), _v4_table)
_URL_V6 = st.one_of(st.ip_addresses(network="2600::/12"), st.ip_addresses(v=6), _v6_table, _wrapped)
_URL_OTHER = st.sampled_from(["0x7f000001", "2130706433", "127.1", "0177.0.0.1", "[::1", "[v1.x]", "a b", "8.8.8.8 x",
                              "", "img.test.", "IMG.test"])
_URL_JUNK = st.text(max_size=8)
_URL_PATH = st.one_of(st.sampled_from(["", "/", "/img.png", "/a?b=c", "/%2e%2e/x", "#f", "?q", "/\\x"]),
                      st.text(max_size=8).map(lambda t: "/" + t))


@st.composite
def _url(draw):
    """Mostly http(s)://host/... with a host of every kind (a name the fuzz resolver knows,
    an IPv4 / IPv6 literal of any class in any spelling, tricks, junk); else anything."""
    shape = draw(_pick(("plain",) * 6 + ("odd", "text")))
    if shape == "text":
        return draw(_URL_TEXT)
    if shape == "plain":
        scheme, sep, user = draw(_pick(("http", "https", "HTTP"))), "://", ""
    else:
        scheme = draw(_pick(("http", "https", "hTtPs", "ftp", "file", "", "gopher")))
        sep = draw(_pick(("://", ":", ":///", ":\\\\")))
        user = draw(_pick(("", "u@", "u:p@", "127.0.0.1@", "img.test@")))
    kind = draw(_URL_KIND)
    if kind == "name":
        host = _cased(draw(_URL_NAME), draw(_mask))
    elif kind == "v4":
        host = str(draw(_URL_V4))
    elif kind == "v6":
        host = ("[" + _cased(_v6_forms(draw(_URL_V6))[draw(_int(0, 3))], draw(_mask))
                + draw(_pick(("", "", "%25eth0", "%eth0", "%25a b"))) + "]")
    elif kind == "other":
        host = draw(_URL_OTHER)
    else:
        host = draw(_URL_JUNK)
    port = draw(_pick(("", ":80", ":0", ":443", ":65535", ":65536", ":-1", ":x", ":"))) if shape == "odd" \
        else draw(_pick(("", ":80", ":8080")))
    path = draw(_URL_PATH)
    return f"{scheme}{sep}{user}{host}{port}{path}"


# A canned answer per connection: (status, Location or None, Content-Length or None = the
# body's, body)
_response = st.tuples(st.sampled_from([200, 200, 200, 301, 302, 303, 307, 308, 404, 500, 204]),
                      st.one_of(st.none(), _url().map(lambda u: u.replace("\r", "").replace("\n", ""))),
                      st.one_of(st.none(), st.sampled_from(["0", "3", "99999999999", "\u00b2", "-1", "x"])),
                      st.binary(max_size=40))
fetch_args = st.tuples(
    _url(),
    st.fixed_dictionaries({n: st.one_of(st.lists(_public.map(str), min_size=1, max_size=3),
                                        st.lists(_addr_text, max_size=3), st.just("fail")) for n in _NAME_POOL}),
    st.lists(_response, min_size=1, max_size=5) | st.just([]), st.booleans(), st.sampled_from([0, 16, 32 << 20]),
    st.integers(0, 3))


def _literal_target(url: str):
    """The IP address an http(s) URL names literally (None: a name, or a URL the fetcher
    cannot split)."""
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018 - raises for a bad port
    except ValueError:
        return None
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        return None
    return _ip_or_none(parts.hostname)


@functools.lru_cache(maxsize=None)
def _ssl_context() -> ssl.SSLContext:
    return ssl.create_default_context()  # made once: loading the CA store is a few ms


def prop_fetch(url: str, answers: dict, responses: list, allow_private: bool, max_bytes: int,
               max_redirects: int) -> None:
    answers = {**answers, "localhost": ["127.0.0.1", "::1"]}
    responses = list(responses)
    resolved: set[str] = set()
    served, sockets, state = [], [], {"refused_lookup": None}

    def resolve(host: str, port: int) -> list[str]:
        assert state["refused_lookup"] is None, "a lookup after a refused one"
        ips = answers.get(host)
        if ips is None:  # what getaddrinfo answers without a lookup (127.1, 0x7f000001, ...), else "unknown"
            try:
                ips = [i[4][0] for i in _real_getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                          flags=socket.AI_NUMERICHOST)]
            except Exception:
                ips = "fail"
        if ips == "fail":
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        if any(_refused(ip, allow_private) for ip in ips):
            state["refused_lookup"] = host
        resolved.update(ips)
        return list(ips)

    def connect(ip: str, port: int, timeout: float) -> socket.socket:
        assert state["refused_lookup"] is None, \
            f"connected after {state['refused_lookup']!r} resolved to a refused address"
        assert not _refused(ip, allow_private), f"the fetcher connected to a refused address {ip}"
        assert ip in resolved or _ip_or_none(ip) is not None, ip  # an address looked up, or the URL's literal one
        if not responses:
            raise _NoConnection(111, "no connection in a fuzz example")
        status, location, length, body = responses.pop(0)
        a, b = socket.socketpair()  # a local pair: nothing leaves the process
        a = _LocalSocket(a.family, a.type, fileno=a.detach())
        sockets.extend((a, b))
        head = (f"HTTP/1.1 {status} X\r\nContent-Length: {len(body) if length is None else length}\r\n"
                "Connection: close\r\n")
        head += "" if location is None else f"Location: {location}\r\n"
        b.sendall(head.encode() + b"\r\n" + body)
        b.shutdown(socket.SHUT_WR)
        served.append((status, length, body))
        return a

    fetcher = Fetcher(allow_private=allow_private, timeout_s=60, max_bytes=max_bytes, max_redirects=max_redirects,
                      resolve=resolve, connect=connect, ssl_context=_ssl_context())
    got, error = None, None
    with no_network():
        try:
            got = fetcher.fetch(url)
        except FetchError as e:  # the documented error, FetchRefused included
            error = e
        finally:
            for s in sockets:
                s.close()
    assert len(served) <= max_redirects + 1
    if isinstance(error, FetchRefused):
        assert error.address_class in _ADDRESS_CLASSES - {None} and error.status == 400
    elif error is not None:
        assert error.status in (400, 413) and isinstance(error.code, str)
    if state["refused_lookup"] is not None:
        assert isinstance(error, FetchRefused), (state, error)
    literal = _literal_target(url)
    if literal is not None and _refused(str(literal), allow_private):  # refused before any connection
        assert isinstance(error, FetchRefused) and not served, (literal, error, served)
    if got is not None:
        status, length, body = served[-1]
        assert status == 200 and len(got) <= max_bytes and body.startswith(got)
        assert length is not None or got == body


# --------------------------------------------------------------------------- sizes

_UNIT_BYTES = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
               "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_number_text = st.one_of(
    st.integers(0, 10**15).map(str),
    st.tuples(st.integers(0, 10**6), st.text("0123456789", max_size=8)).map(lambda t: f"{t[0]}.{t[1]}"),
    st.text("0123456789", min_size=1, max_size=6).map(lambda d: "." + d),
    st.sampled_from(["0", "00012", "1.", "0.1", "1.999999999999", "18446744073709551616"]),
)
_size_text = st.tuples(
    st.sampled_from(["", "", " ", "\t"]), _number_text, st.sampled_from(["", "", " ", "  ", "\t"]),
    st.one_of(st.just(""), st.sampled_from(sorted(_UNIT_BYTES)).flatmap(
        lambda u: st.integers(0, 7).map(lambda m: _cased(u, m)))),
    st.sampled_from(["", "", " "]))
_junk_size = st.one_of(
    st.text(max_size=16), st.text(alphabet="0123456789.+-eEkKmMgGtTiIbB nafxX_,\u0661\uff11", max_size=12),
    st.sampled_from(["nan", "inf", "-1", "+1", "1e3", "1e3KB", "-0", "1,5MB", "1_000", "0x10", "1.5", "1.5B", "1 KB B",
                     "\u0661KB", "\uff11KB", "KB", ".", "1..5KB", "1kbit", "1KiBs", "Infinity", "+nan", " + inf "]),
    st.integers(-10**20, 10**20), st.booleans(), st.floats(), st.none(), st.binary(max_size=4))
sizes_args = st.tuples(st.one_of(_size_text, _junk_size), st.one_of(
    st.integers(0, 2**62), st.tuples(st.integers(0, 4), st.integers(-3, 3), st.integers(1, 1024)).map(
        lambda t: max(0, t[2] * (1 << (10 * t[0])) + t[1]))))


def prop_sizes(text, n: int) -> None:
    # arbitrary input: a whole number of bytes >= 0 or a ValueError
    try:
        got = parse_size(text if not isinstance(text, tuple) else "".join(text))
        assert type(got) is int and got >= 0, got
    except ValueError:
        got = None
    if isinstance(text, tuple):  # drawn from the grammar: the exact value, rounded down
        lead, number, space, unit, trail = text
        whole, _, frac = number.partition(".")
        value = Fraction(int(whole or "0")) + (Fraction(int(frac), 10 ** len(frac)) if frac else 0)
        factor = _UNIT_BYTES[unit.lower()] if unit else 1
        if factor == 1 and value.denominator != 1:
            assert got is None, (text, got)  # bytes are whole
        else:
            assert got == math.floor(value * factor), (text, got)
        if got is not None and "".join(text).isascii():
            assert parse_size("".join(text).swapcase()) == got  # units are case-insensitive
    elif isinstance(text, int) and not isinstance(text, bool):
        assert got == (text if text >= 0 else None)
    elif not isinstance(text, str):
        assert got is None  # floats, None, bytes, bools: refused
    try:
        assert size_argument(text if isinstance(text, str) else str(n)) > 0
    except argparse.ArgumentTypeError:
        pass
    # format_size -> parse_size: back within the shown precision, exactly for whole units
    shown = format_size(n)
    m = re.fullmatch(r"(0|[1-9][0-9]*(?:\.[0-9]?[1-9])?) (B|KiB|MiB|GiB|TiB)", shown)
    assert m, shown
    unit = _UNIT_BYTES[m[2].lower()]
    assert (Fraction(m[1]) < 1024 or m[2] == "TiB") and (n == 0 or Fraction(m[1]) >= 1), shown
    back = parse_size(shown)
    assert abs(back - n) <= unit * Fraction(1, 200) + 1, (n, shown, back)
    if n < 1024 or n % unit == 0:
        assert back == n, (n, shown, back)


# --------------------------------------------------------------------------- the table

TARGETS: dict[str, Target] = {t.name: t for t in (
    Target("conversation", conversation_args, prop_conversation, 300),
    Target("tiling", tiling_args, prop_tiling, 300),
    Target("tiles", tiles_args, prop_tiles, 25),
    Target("grounding", grounding_args, prop_grounding, 300),
    Target("stream_decoder", stream_args, prop_stream_decoder, 200),
    Target("stop_strings", stop_args, prop_stop_strings, 300),
    Target("sampling", sampling_args, prop_sampling, 100),
    Target("guard", guard_args, prop_guard, 300),
    Target("host_parse", host_parse_args, prop_host_parse, 300),
    Target("address", address_args, prop_address, 300, known=(
        (ipaddress.IPv6Address("fd00:ec2::254%eth0"), True),  # a zone hid the metadata address ("private")
    )),
    Target("fetch", fetch_args, prop_fetch, 200, known=(
        # with --allow-fetch-private, the zoned AWS metadata address was connected to
        ("http://[fd00:ec2::254%eth0]/latest/meta-data/", _NO_NAMES, [], True, 32 << 20, 3),
        # a zone with a space: http.client.InvalidURL escaped fetch() (a 500, not a 400)
        ("http://[2606:4700::1%25a b]/", _NO_NAMES, [], False, 32 << 20, 3),
        # a redirect to a malformed bracketed host: urljoin's ValueError escaped fetch()
        ("http://img.test/", {**_NO_NAMES, "img.test": ["8.8.8.8"]}, [(301, "http://[::1", None, b"")], False,
         32 << 20, 3),
    )),
    Target("sizes", sizes_args, prop_sizes, 300),
)}


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("name", list(TARGETS))
def test_fuzz(name):
    target = TARGETS[name]
    counter = [0]
    run_target(target, target.examples, counter, suppress_health_check=[HealthCheck.too_slow])
    assert counter[0] >= min(target.examples, 20)  # the strategy really produced examples


# --------------------------------------------------------------------------- the checks check


def test_the_naive_stop_matcher_is_a_real_oracle():
    assert _naive_stop(["bc"], ["a", "b", "cd"]) == ("a", True)
    assert _naive_stop(["bc", "abcd"], ["abcd"]) == ("", True)
    assert _naive_stop(["xy"], ["ax", "b"]) == ("axb", False)


def test_tripwires_catch_eval():
    with tripwires(), pytest.raises(AssertionError, match="eval"):
        eval("1")
    assert eval("1") == 1


def test_assembly_oracle_counts_tokens():
    assert _assembled_tokens(1, 1) == 421 and _assembled_tokens(3, 2) == 1415
