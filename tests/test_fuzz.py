"""Property-based fuzzing (hypothesis) of the parsers and arithmetic that strangers' input reaches.

Each target is a strategy that draws the arguments of a plain property function, kept in
``TARGETS``; the tests below run every target with a modest number of examples, and
``benchmarks/fuzz.py`` imports the same table to run 10^5 examples per target. A new
target (the HTTP request schema, once the server exists) is one more ``Target`` entry.

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
"""

from __future__ import annotations

import builtins
import contextlib
import copy
import dataclasses
import functools
import types
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
        assert t.text.count(IMAGE_TAG) == len(t.images)
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


def _assembled_tokens(tw: int, th: int) -> int:
    """Image features the model lays out for one image with a tw x th grid (d = 1)."""
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


def prop_tiles(size: tuple[int, int], candidates: tuple | None, n_images: int, seed: int) -> None:
    # Processor._process_one: the uint8 tiles before normalisation and padding (collate is
    # a plain stack, covered by the conversation target); a third of the full call's cost.
    proc = processor(candidates)
    w, h = size
    img = Image.frombytes("RGB", size, np.random.default_rng(seed).bytes(w * h * 3))
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
    # the local tiles of the first image, put back row-major, are the padded canvas
    grid = tiles[1:1 + tw * th].reshape(th, tw, 3, S, S).transpose(2, 0, 3, 1, 4).reshape(3, th * S, tw * S)
    canvas = np.asarray(ImageOps.pad(img, expect_best, color=(127, 127, 127))).transpose(2, 0, 1)
    assert np.array_equal(grid, canvas)


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
_logits = st.tuples(st.integers(1, 4), st.integers(0, 2**32 - 1), st.sampled_from([0.0, 1.0, 10.0, 1e4, 1e30]),
                    st.lists(st.tuples(st.integers(0, 3), st.integers(0, _V - 1), _special_logits), max_size=10))
_params = st.builds(
    SamplingParams,
    temperature=st.one_of(st.just(0.0), st.floats(0, 1e6), st.sampled_from([1e-50, 1e-5, 5e-324, 1e300])),
    top_p=st.one_of(st.just(1.0), st.floats(0, 1.0, exclude_min=True)),
    top_k=st.one_of(st.just(0), st.integers(1, 2 * _V), st.just(10**30)),
    repetition_penalty=st.one_of(st.just(1.0), st.floats(1e-308, 1e308), st.sampled_from([1e-308, 1e308])),
    seed=st.integers(-2**70, 2**70),
)
sampling_args = st.tuples(_logits, st.lists(_params, min_size=4, max_size=4),
                          st.lists(st.integers(0, _V - 1), max_size=5))


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


# --------------------------------------------------------------------------- the table

TARGETS: dict[str, Target] = {t.name: t for t in (
    Target("conversation", conversation_args, prop_conversation, 300),
    Target("tiling", tiling_args, prop_tiling, 300),
    Target("tiles", tiles_args, prop_tiles, 25),
    Target("grounding", grounding_args, prop_grounding, 300),
    Target("stream_decoder", stream_args, prop_stream_decoder, 200),
    Target("stop_strings", stop_args, prop_stop_strings, 300),
    Target("sampling", sampling_args, prop_sampling, 100),
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
