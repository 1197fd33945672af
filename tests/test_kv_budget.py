"""The KV cache as a memory budget: admission by free blocks, preemption and recompute,
refusal of what can never fit; and the block pool's bookkeeping under random traffic.

The truth for answers is the same request alone on an engine with plenty of memory
(float32 weights, so a recomputed prefix computes what the first pass did)."""

from __future__ import annotations

import functools
import os
import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import dsvl2
from dsvl2.engine import Engine, SamplingParams
from dsvl2.engine.blocks import BlockPool
from dsvl2.engine.kv_manager import KVManager
from dsvl2.engine.request import Request
from dsvl2.errors import DSVL2Error, GenerationError
from dsvl2.model.cache import KVCache
from _paths import GOLDEN, IMAGES

pytestmark = pytest.mark.usefixtures("one_thread")
PHOTO = str(IMAGES / "multi_image_2.jpeg")


@functools.cache
def model(variant: str = "small"):
    return dsvl2.load(GOLDEN / variant, dtype="float32", kv_cache_bytes=1 << 24)


def conv(text: str, images=()):
    return [{"role": "<|User|>", "content": "<image>\n" * len(images) + text, "images": list(images)},
            {"role": "<|Assistant|>", "content": ""}]


def alone(variant: str, c, params: SamplingParams) -> list[int]:
    m = model(variant)
    eng = Engine(m.model, m.processor.tokenizer, kv_cache_bytes=1 << 24, prefix_caching=False)
    return eng.generate(m.processor([c]), params)[0].ids


def tight_engine(variant: str, blocks: int, **kw) -> Engine:
    m = model(variant)
    per_block = 16 * KVCache.bytes_per_token(m.model.cfg.language, torch.float32)
    return Engine(m.model, m.processor.tokenizer, kv_cache_bytes=(blocks + 1) * per_block, **kw)


def run(eng: Engine, convs, params) -> list:
    m = next(model(v) for v in ("small", "tiny") if model(v).model is eng.model)
    reqs = [eng.submit(m.processor([c]), p)[0] for c, p in zip(convs, params)]
    steps = 0
    while not all(r.finished for r in reqs):
        eng.step()
        eng.pool.check()
        assert eng.pool.used <= eng.pool.usable
        steps += 1
        assert steps < 2000, "no progress"
    return reqs


@pytest.mark.parametrize("variant", ["small", "tiny"])
@pytest.mark.parametrize("prefix_caching", [True, False])
def test_preempted_requests_answer_as_alone(variant, prefix_caching):
    """Three requests whose tokens need more blocks than the pool has: the newest gives its
    blocks back and is recomputed; every answer equals the same request alone."""
    convs = [conv("Tell me a long story about a cat."), conv("Why is the sky blue? Explain."),
             conv("Count from one to fifty, please.")]
    params = [SamplingParams(max_new_tokens=40), SamplingParams(max_new_tokens=40),
              SamplingParams(max_new_tokens=40, temperature=0.9, seed=7)]  # seeded: its sampler state carries on
    eng = tight_engine(variant, 8, prefix_caching=prefix_caching)
    reqs = run(eng, convs, params)
    assert eng.scheduler.preemptions > 0 and any(r.preemptions for r in reqs)
    for c, p, r in zip(convs, params, reqs):
        assert r.output_ids == alone(variant, c, p), r.rid
    assert eng.pool.used == 0 and eng.kv_stats()["kv_cache_bytes_peak"] <= eng.kv_stats()["kv_cache_bytes_capacity"]


def test_preempted_image_request_answers_as_alone():
    """A request with an image preempted after its prefill: recomputed (image features
    from shared blocks or the tower again), same answer, no text repeated in the stream."""
    m = model("small")
    per_token = KVCache.bytes_per_token(m.model.cfg.language, torch.float32)
    c_img = conv("What is this?", [PHOTO])
    n_img = m.processor([c_img]).seq_lens[0]
    blocks = -(-(n_img + 30) // 16) + 2
    eng = Engine(m.model, m.processor.tokenizer, kv_cache_bytes=(blocks + 1) * 16 * per_token)
    p = SamplingParams(max_new_tokens=30)
    first = eng.submit(m.processor([conv("Hi, tell me a story.")]), p)[0]
    texts = {first.rid: ""}
    for _ in range(3):  # the first request is running
        for r, _, delta in eng.step():
            texts[r.rid] += delta
    second = eng.submit(m.processor([c_img]), p)[0]
    texts[second.rid] = ""
    while not (first.finished and second.finished):
        for r, _, delta in eng.step():
            texts[r.rid] += delta
        eng.pool.check()
    assert eng.scheduler.preemptions > 0
    assert second.output_ids == alone("small", c_img, p) and texts[second.rid] == second.text
    assert first.output_ids == alone("small", conv("Hi, tell me a story."), p) and texts[first.rid] == first.text


def test_a_request_larger_than_the_whole_cache_is_refused_at_once():
    eng = tight_engine("small", 4)  # 64 tokens
    m = model("small")
    with pytest.raises(GenerationError, match=r"more than the whole KV cache holds \(64 tokens"):
        eng.submit(m.processor([conv("Hello!")]), SamplingParams(max_new_tokens=60))
    assert not eng.has_work()
    (r,) = eng.submit(m.processor([conv("Hello!")]), SamplingParams(max_new_tokens=8))  # fits: runs
    while not r.finished:
        eng.step()
    assert len(r.output_ids) == 8


def test_requests_wait_for_blocks_instead_of_failing():
    """More requests than the pool holds at once: they queue and all finish."""
    eng = tight_engine("small", 10, max_batch_size=8)
    convs = [conv(f"Say something about the number {i}.") for i in range(6)]
    reqs = run(eng, convs, [SamplingParams(max_new_tokens=12)] * 6)
    assert all(r.finish_reason == "length" for r in reqs)
    for c, r in zip(convs, reqs):
        assert r.output_ids == alone("small", c, SamplingParams(max_new_tokens=12))


def test_load_accepts_sizes_and_reports_the_budget():
    m = dsvl2.load(GOLDEN / "small", dtype="float32", kv_cache_bytes="1.5MiB")
    st_ = m.engine.kv_stats()
    assert 1.5 * 2 ** 20 - st_["kv_cache_bytes_capacity"] < 2 * m.engine.pool.block_bytes
    assert st_["kv_cache_bytes_used"] == st_["kv_cache_bytes_peak"] == 0
    with pytest.raises(DSVL2Error, match="kv_cache_bytes"):
        dsvl2.load(GOLDEN / "small", dtype="float32", kv_cache_bytes="lots")


# ---- the pool and the manager alone, under random traffic ------------------------------------


def _req(rid: int, keys: list) -> Request:
    return Request(rid, list(range(len(keys))), SamplingParams(max_new_tokens=64), None, keys=list(keys))


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_pool_bookkeeping_under_random_traffic(data):
    """Admit, grow, finish, preempt and fail requests in random order over a small pool of
    tiny blocks: no block is lost or in two states, shared blocks are never handed out
    fresh, and a block a request shares holds the same keys in every holder."""
    bs = data.draw(st.integers(1, 4))
    pool = BlockPool(data.draw(st.integers(2, 24)), bs, block_bytes=1)
    mgr = KVManager(pool, prefix_caching=data.draw(st.booleans()))
    vocab = data.draw(st.integers(1, 3))  # few distinct keys: many shared prefixes
    active: list[Request] = []
    content: dict[int, tuple] = {}  # block -> keys of the tokens written in it (what a forward wrote)
    rng = random.Random(data.draw(st.integers(0, 2 ** 16)))

    def write(r: Request, n: int, decode: bool = False) -> None:
        """A forward writes r's next ``n`` tokens (a prefill chunk, or one decode token) and
        says so as the engine's runner does; the manager registers the blocks now full."""
        for p in range(r.length, r.length + n):
            b = r.blocks[p // bs]
            assert pool.holders(b) == 1 or p % bs >= len(content.get(b, ())), "wrote into a shared block"
            content[b] = content.get(b, ())[: p % bs] + (r.token_key(p),)
        if decode:
            r.decoded()
        else:
            r.prefilled_chunk(n)
        mgr.computed(r)

    for rid in range(data.draw(st.integers(1, 30))):
        keys = [rng.randrange(vocab) for _ in range(rng.randrange(1, 3 * bs + 2))]
        r = _req(rid, keys)
        m = mgr.match(r)
        if not m.wait and mgr.admit(r, m):
            for src, dst in mgr.copies:
                content[dst] = content.get(src, ())[: m.copy_n]
            mgr.run_copies(lambda s, d: None)
            for p in range(r.length):  # reused tokens hold this request's keys
                assert content[r.blocks[p // bs]][p % bs] == r.token_key(p)
            write(r, r.prefill_len - r.prefilled)
            active.append(r)
        for a in list(active):  # some decode, some end, some are preempted
            act = rng.random()
            if act < 0.5:
                a.output_ids.append(rng.randrange(vocab))
                if mgr.grow(a):
                    write(a, 1, decode=True)
                else:
                    a.output_ids.pop()
            elif act < 0.8:
                mgr.release(a, keep=rng.random() < 0.8)
                active.remove(a)
        pool.check()
        assert pool.used == len({b for a in active for b in a.blocks})
    for a in active:
        mgr.release(a)
    pool.check()
    assert pool.used == 0


# ---- failures stay with their request ---------------------------------------------------------


def test_a_failing_image_encoding_fails_only_its_request():
    m = model("small")
    eng = Engine(m.model, m.processor.tokenizer, kv_cache_bytes=1 << 24, step_tokens=64)
    ok_text = eng.submit(m.processor([conv("Hello there.")]), SamplingParams(max_new_tokens=6))[0]
    bad = eng.submit(m.processor([conv("What is this?", [PHOTO])]), SamplingParams(max_new_tokens=6))[0]
    ok_img = eng.submit(m.processor([conv("Describe it.", [str(IMAGES / "visual_grounding_2.jpg")])]),
                        SamplingParams(max_new_tokens=6))[0]

    def fault(stage, reqs):
        if stage == "vision" and bad in reqs:
            raise RuntimeError("tile batch exploded")

    eng.set_fault_hook(fault)
    final = {}
    while eng.has_work():
        for r, tok, _ in eng.step():
            if r.finished:
                final[r.rid] = (r.finish_reason, tok)
    assert final[bad.rid] == ("error", None) and "image encoding failed: RuntimeError: tile batch exploded" in bad.error
    assert ok_text.finish_reason == ok_img.finish_reason == "length"
    assert ok_text.output_ids == alone("small", conv("Hello there."), SamplingParams(max_new_tokens=6))
    assert eng.pool.used == 0
    eng.pool.check()


def test_a_failing_decode_step_still_ends_the_request_that_finished_in_it():
    """One request finishes in a step whose decode forward then raises: it gets its final
    event (its answer is complete); the rows of the failed forward end with "error"."""
    m = model("small")
    eng = Engine(m.model, m.processor.tokenizer, kv_cache_bytes=1 << 24)
    short = eng.submit(m.processor([conv("Hi.")]), SamplingParams(max_new_tokens=3))[0]
    long = eng.submit(m.processor([conv("Tell me more.")]), SamplingParams(max_new_tokens=30))[0]

    def fault(stage, reqs):
        if stage == "decode" and len(short.output_ids) == 3:
            raise MemoryError("no room")

    eng.set_fault_hook(fault)
    events = []
    while eng.has_work():
        events += eng.step()
    finals = {r.rid: r.finish_reason for r, _, _ in events if r.finished}
    assert finals == {short.rid: "length", long.rid: "error"}
    assert short.output_ids == alone("small", conv("Hi."), SamplingParams(max_new_tokens=3))
    assert "decode step failed: MemoryError: no room" in long.error
    assert eng.pool.used == 0 and not eng.active


def _committed_kib() -> int:
    for line in open("/proc/meminfo"):
        if line.startswith("Committed_AS:"):
            return int(line.split()[1])
    raise AssertionError("no Committed_AS in /proc/meminfo")


def test_an_unused_pool_costs_no_memory_and_fork_still_works():
    """A 16 GiB pool (more than this machine's free memory): the kernel charges none of it
    to the commit limit until blocks are written, and the process can still fork (a plain
    malloc'd pool of that size made Ray's subprocess start fail with ENOMEM)."""
    cfg = model("small").model.cfg.language
    per_block = 16 * KVCache.bytes_per_token(cfg, torch.float32)
    before = _committed_kib()
    cache = KVCache(cfg, (16 << 30) // per_block, block_size=16)
    assert cache.nbytes() > 15 << 30
    assert _committed_kib() - before < 1 << 20  # < 1 GiB of 16 charged
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    assert os.waitpid(pid, 0)[1] == 0
    assert all(not t[0].any() for layer in cache.layers for t in layer)  # the null block reads as zeros
