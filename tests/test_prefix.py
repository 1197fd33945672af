"""Prefix sharing: KV blocks of equal prefixes are computed once and reused, and the
answers are exactly those of a fresh chat.

The truth is a plain engine without prefix caching (every prompt prefilled from scratch),
float32 weights, greedy.
"""

from __future__ import annotations

import pytest

import torch

import dsvl2
from dsvl2.engine import Engine, SamplingParams
from dsvl2.model.cache import KVCache
from dsvl2.engine.prefix import common_prefix, prompt_keys
from _paths import GOLDEN, IMAGES

pytestmark = pytest.mark.usefixtures("one_thread")
PHOTO, OTHER = str(IMAGES / "multi_image_2.jpeg"), str(IMAGES / "visual_grounding_2.jpg")


@pytest.fixture(scope="module")
def model():
    return dsvl2.load(GOLDEN / "small", dtype="float32", kv_cache_bytes=1 << 26)


@pytest.fixture(scope="module")
def fresh(model):
    eng = Engine(model.model, model.processor.tokenizer, kv_cache_bytes=1 << 26, prefix_caching=False)

    def run(conv, n=12):
        return eng.generate(model.processor([conv]), SamplingParams(max_new_tokens=n))[0].ids
    return run


def user(text, images=()):
    return {"role": "<|User|>", "content": "<image>\n" * len(images) + text, "images": list(images)}


def test_follow_up_reuses_the_row_and_equals_a_fresh_chat(model, fresh):
    first = [user("What food is this?", [PHOTO]), {"role": "<|Assistant|>", "content": ""}]
    a1 = model.chat(first, max_new_tokens=12)
    hits = model.engine.kv_stats()["prefix_cache_hit_tokens"]
    follow = [user("What food is this?", [PHOTO]), {"role": "<|Assistant|>", "content": a1.text},
              user("And what colour is it?"), {"role": "<|Assistant|>", "content": ""}]
    (h,) = model.submit(follow, max_new_tokens=12)
    out = h.result(timeout=120)
    assert model.engine.kv_stats()["prefix_cache_hit_tokens"] == hits + out.cached_tokens
    # the image and the first turn came from shared blocks: no vision, a short prefill
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


def test_cached_blocks_are_evicted_only_when_the_pool_needs_them(model):
    """A small pool: finished requests' blocks stay cached (reused by a repeat) until new
    requests need the room; then the least recently used go first, nothing waits."""
    per_token = KVCache.bytes_per_token(model.model.cfg.language, torch.float32)
    m = dsvl2.load(GOLDEN / "small", dtype="float32", max_batch_size=2, kv_cache_bytes=40 * 16 * per_token)
    eng = m.engine
    assert eng.pool.usable == 39  # 40 blocks of 16 tokens (the null block aside)
    prompts = [f"Tell me about the number {i}. " + "Explain it in a long and detailed way, please. " * 4
               for i in range(12)]  # ~60 tokens each: 12 of them need more than 39 blocks
    first = m.chat(prompts[0], max_new_tokens=2)
    again = m.submit(prompts[0], max_new_tokens=2)[0].result(timeout=60)
    assert again.cached_tokens == first.prompt_tokens - 1 and again.ids == first.token_ids
    for p in prompts[1:]:
        assert m.chat(p, max_new_tokens=2).completion_tokens == 2
    assert eng.pool.used == 0 and 0 < eng.pool.cached <= eng.pool.usable
    eng.pool.check()
    # the first prompt's later blocks were the least recently used: evicted (its first
    # block stayed: every later prompt copied its common start from there)
    back = m.submit(prompts[0], max_new_tokens=2)[0].result(timeout=60)
    assert 0 < back.cached_tokens < first.prompt_tokens - 1 and back.ids == first.token_ids
    assert m.submit(prompts[-1], max_new_tokens=2)[0].result(timeout=60).cached_tokens == first.prompt_tokens - 1


def test_concurrent_requests_for_one_image_encode_it_once(model, fresh):
    """Four requests about the same photo submitted at once: the first encodes and prefills
    it, the others wait for its blocks, skip the vision tower and prefill only their own
    question; every answer equals a fresh chat."""
    m = dsvl2.load(GOLDEN / "small", dtype="float32", kv_cache_bytes=1 << 26)
    convs = [[user(q, [PHOTO]), {"role": "<|Assistant|>", "content": ""}]
             for q in ("What is this?", "What colour is it?", "Is it tasty?", "Where is it?")]
    tiles = model.processor([convs[0]]).images_spatial_crop[0]
    n_tiles = 1 + int(tiles[0, 0] * tiles[0, 1])
    handles = [m.submit(c, max_new_tokens=4)[0] for c in convs]
    outs = [h.result(timeout=300) for h in handles]
    assert m.engine.kv_stats()["vision_tiles"] == n_tiles  # one image's tiles, not four
    last_image_slot = int(m.processor([convs[0]]).images_seq_mask[0].nonzero()[-1])
    assert outs[0].cached_tokens == 0
    for o in outs[1:]:
        assert o.cached_tokens > last_image_slot and o.timings["vision_s"] == 0.0
    for c, o in zip(convs, outs):
        assert o.ids == fresh(c, 4)


def test_shared_system_prompt_is_computed_once(model, fresh):
    system = "You are a careful assistant. " * 12
    convs = [[{"role": "system", "content": system}, user(q), {"role": "<|Assistant|>", "content": ""}]
             for q in ("Hi.", "Hello!", "Good day.")]
    m = dsvl2.load(GOLDEN / "small", dtype="float32", kv_cache_bytes=1 << 26)
    handles = [m.submit(c, max_new_tokens=3)[0] for c in convs]
    outs = [h.result(timeout=120) for h in handles]
    sys_tokens = len(m.processor.tokenizer.encode(system))
    assert all(o.cached_tokens >= sys_tokens - 16 for o in outs[1:])
    assert [o.ids for o in outs] == [fresh(c, 3) for c in convs]


def test_keys_tell_images_apart():
    ids = [5, 9, 9, 9, 6, 9, 9, 7]
    mask = [False, True, True, True, False, True, True, False]
    k = prompt_keys(ids, mask, [3, 2], [b"A", b"B"])
    assert k == [5, b"A", b"A", b"A", 6, b"B", b"B", 7]
    assert common_prefix(k, prompt_keys(ids, mask, [3, 2], [b"A", b"C"])) == 5
