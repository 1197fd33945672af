"""Prefix cache: a follow-up reuses the kept KV row and answers exactly as a fresh chat.

The truth is a plain engine without a prefix cache (every prompt prefilled from scratch),
float32 weights, greedy.
"""

from __future__ import annotations

import pytest

import dsvl2
from dsvl2.engine import Engine, SamplingParams
from dsvl2.engine.prefix import PrefixCache, common_prefix, prompt_keys
from _paths import GOLDEN, IMAGES

pytestmark = pytest.mark.usefixtures("one_thread")
PHOTO, OTHER = str(IMAGES / "multi_image_2.jpeg"), str(IMAGES / "visual_grounding_2.jpg")


@pytest.fixture(scope="module")
def model():
    return dsvl2.load(GOLDEN / "small", dtype="float32")


@pytest.fixture(scope="module")
def fresh(model):
    eng = Engine(model.model, model.processor.tokenizer)  # no prefix cache

    def run(conv, n=12):
        return eng.generate(model.processor([conv]), SamplingParams(max_new_tokens=n))[0].ids
    return run


def user(text, images=()):
    return {"role": "<|User|>", "content": "<image>\n" * len(images) + text, "images": list(images)}


def test_follow_up_reuses_the_row_and_equals_a_fresh_chat(model, fresh):
    first = [user("What food is this?", [PHOTO]), {"role": "<|Assistant|>", "content": ""}]
    a1 = model.chat(first, max_new_tokens=12)
    hits = model.engine.prefix_cache.hits
    follow = [user("What food is this?", [PHOTO]), {"role": "<|Assistant|>", "content": a1.text},
              user("And what colour is it?"), {"role": "<|Assistant|>", "content": ""}]
    (h,) = model.submit(follow, max_new_tokens=12)
    out = h.result(timeout=120)
    assert model.engine.prefix_cache.hits == hits + 1
    # the image and the first turn came from the kept row: no vision, a short prefill
    assert out.cached_tokens >= a1.prompt_tokens and out.timings["vision_s"] == 0.0
    assert out.ids == fresh(follow)


def test_regenerate_reuses_all_but_one_prompt_token(model, fresh):
    conv = [user("Describe the picture.", [PHOTO]), {"role": "<|Assistant|>", "content": ""}]
    first = model.chat(conv, max_new_tokens=6)
    (h,) = model.submit(conv, max_new_tokens=6)
    out = h.result(timeout=120)
    assert out.cached_tokens == first.prompt_tokens - 1
    assert out.ids == first.token_ids == fresh(conv, 6)


def test_another_image_at_the_same_place_is_not_reused(model, fresh):
    a = [user("What is this?", [PHOTO]), {"role": "<|Assistant|>", "content": ""}]
    b = [user("What is this?", [OTHER]), {"role": "<|Assistant|>", "content": ""}]
    model.chat(a, max_new_tokens=4)
    (h,) = model.submit(b, max_new_tokens=4)
    out = h.result(timeout=120)
    first_image_slot = int(model.processor([b]).images_seq_mask[0].nonzero()[0])
    assert out.cached_tokens <= first_image_slot  # only the text before the image matched
    assert out.timings["vision_s"] > 0 and out.ids == fresh(b, 4)


def test_budget_bounds_the_kept_rows_and_evicts_least_recently_used():
    pc = PrefixCache(budget_bytes=250, min_tokens=2)
    assert pc.keep(0, [1, 2, 3], row_bytes=100) == []
    assert pc.keep(1, [1, 2, 4], row_bytes=100) == []
    assert pc.keep(2, [5, 6, 7], row_bytes=100) == [0]  # 2 rows fit: the oldest goes
    assert pc.take([1, 2, 4, 9]) == (1, 3) and list(pc.rows) == [2]
    assert pc.take([8, 8, 8]) is None  # no useful prefix
    assert pc.take([5, 6, 7]) == (2, 2)  # identical prompt: the last token is prefilled again
    assert PrefixCache(0).keep(3, [1], row_bytes=1) == [3]  # budget 0 keeps nothing


def test_a_new_request_never_waits_for_kept_rows(model):
    m = dsvl2.load(GOLDEN / "small", dtype="float32", max_batch_size=2)
    for t in ("One.", "Two.", "Three."):
        m.chat(t, max_new_tokens=2)
    assert len(m.engine.prefix_cache.rows) == 2  # both slots hold kept rows ...
    assert m.chat("Four.", max_new_tokens=2).completion_tokens == 2  # ... and one is given up


def test_keys_tell_images_apart():
    ids = [5, 9, 9, 9, 6, 9, 9, 7]
    mask = [False, True, True, True, False, True, True, False]
    k = prompt_keys(ids, mask, [3, 2], [b"A", b"B"])
    assert k == [5, b"A", b"A", b"A", 6, b"B", b"B", 7]
    assert common_prefix(k, prompt_keys(ids, mask, [3, 2], [b"A", b"C"])) == 5
