"""The driver: one loop owns the engine; streams, threads and asyncio share it safely.

The truth for every answer is the same conversation run alone (greedy) on a plain
``Engine`` in one thread. Nothing is timed: the fairness test counts scheduler steps.
"""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch

import dsvl2
from dsvl2.engine import Engine, SamplingParams
from dsvl2.engine.driver import AsyncSink, Driver
from dsvl2.engine.scheduler import Prefill, Scheduler, Vision
from dsvl2.errors import GenerationError
from _paths import GOLDEN, IMAGES

pytestmark = pytest.mark.usefixtures("one_thread")


def conv(text, images=()):
    return [{"role": "<|User|>", "content": "<image>\n" * len(images) + text,
             "images": [str(IMAGES / i) for i in images]},
            {"role": "<|Assistant|>", "content": ""}]


CONVS = [conv("Hello, how are you today?"), conv("What food is this?", ("multi_image_2.jpeg",)),
         conv("Tell me a story about a cat."),
         conv("Compare.", ("multi_image_2.jpeg", "visual_grounding_2.jpg"))]


@pytest.fixture(scope="module")
def model():
    return dsvl2.load(GOLDEN / "small")


@pytest.fixture(scope="module")
def alone(model):
    """Greedy ids of each conversation alone, on a plain engine in this thread."""
    eng = Engine(model.model, model.processor.tokenizer)
    return [eng.generate(model.processor([c]), SamplingParams(max_new_tokens=24))[0].ids for c in CONVS]


def test_two_interleaved_streams_both_finish(model, alone):
    a = model.stream(CONVS[0], max_new_tokens=24)
    b = model.stream(CONVS[1], max_new_tokens=24)
    got = {0: [], 1: []}
    answers = {}
    live = {0: a, 1: b}
    while live:  # strictly alternate: each iterator reads one delta at a time
        for k in list(live):
            d = next(live[k], None)
            if d is None:
                del live[k]
                continue
            got[k].append(d.text)
            if d.answer is not None:
                answers[k] = d.answer
    assert answers[0].token_ids == alone[0] and answers[1].token_ids == alone[1]
    assert "".join(got[0]) == answers[0].text and "".join(got[1]) == answers[1].text


def test_four_threads_share_one_model(model, alone):
    results: dict[int, list[int]] = {}
    errors = []

    def worker(i):
        try:
            results[i] = model.chat(CONVS[i], max_new_tokens=24).token_ids
        except Exception as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors and not any(t.is_alive() for t in threads)
    assert [results[i] for i in range(4)] == alone


def test_breaking_out_of_a_stream_frees_its_slot(model):
    it = model.stream(CONVS[2], max_new_tokens=200)
    next(it)
    it.close()  # the consumer went away
    # the next request gets a slot and the engine ends with every slot free
    assert model.chat(CONVS[0], max_new_tokens=3).completion_tokens == 3
    s = model.driver.stats()
    assert s["slots_in_use"] == 0 and s["running"] == 0 and s["waiting"] == 0


def test_asyncio_consumers(model, alone):
    async def one(i):
        sink = AsyncSink()
        (h,) = model.submit(CONVS[i], max_new_tokens=24, sink=sink)
        text = ""
        while True:
            ev = await sink.get()
            text += ev.delta
            if ev.output is not None:
                return ev.output.ids, text, ev.output.text

    async def main():
        return await asyncio.gather(*(one(i) for i in range(3)))

    for i, (ids, streamed, full) in enumerate(asyncio.run(main())):
        assert ids == alone[i] and streamed == full


def test_a_failing_step_fails_its_requests_and_the_driver_goes_on(model, monkeypatch):
    eng = model.engine
    real = eng.runner.decode
    calls = {"n": 0}

    def broken(reqs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("simulated out of memory")
        return real(reqs)

    monkeypatch.setattr(eng.runner, "decode", broken)
    with pytest.raises(GenerationError, match="simulated out of memory"):
        model.chat(CONVS[0], max_new_tokens=10)
    monkeypatch.setattr(eng.runner, "decode", real)
    assert model.chat(CONVS[0], max_new_tokens=4).completion_tokens == 4
    assert model.driver.stats()["slots_in_use"] == 0


def test_a_stream_keeps_flowing_while_an_image_request_is_admitted():
    """Two threads on one model: while a 2-image request is admitted (vision tiles and
    prefill chunks under a 64-token budget), the running stream gets a token in every
    step, and no step does more than one unit of admission work beyond the budget."""
    m = dsvl2.load(GOLDEN / "small", step_tokens=64)
    eng = m.engine
    plans = []
    real_plan = eng.scheduler.plan

    def recording():
        work = real_plan()
        running = eng.scheduler.running
        plans.append((len(running), any(r.rid == first_rid[0] for r in running), work))
        return work

    first_rid = [-1]

    eng.scheduler.plan = recording
    first = m.submit(CONVS[2], max_new_tokens=400)[0]
    first_rid[0] = first.rid
    events = first.events()
    next(events)  # the text request is running
    big = m.submit(CONVS[3], max_new_tokens=2)[0]
    assert big.result(timeout=120).completion_tokens == 2
    assert not first.finished
    first.cancel()
    admission = [(running, w) for running, first_in, w in plans if w and first_in]
    # the admission was spread over many steps, and in each of them the running stream
    # was sampled (every step samples every running row): it never waited longer than a step
    assert len(admission) >= 10
    assert all(first_in for _, first_in, w in plans if w and any(getattr(x, "req", None) is big.req or
               any(r is big.req for r, _ in getattr(x, "chunks", ())) for x in w))
    tile = eng.scheduler.tile_cost
    for running, work in admission:
        cost = sum(w.k * tile if isinstance(w, Vision) else sum(n for _, n in w.chunks) for w in work)
        one_unit = max(tile if isinstance(w, Vision) else max(n for _, n in w.chunks) for w in work)
        assert cost <= max(64 - running, one_unit)


def test_scheduler_plan_respects_the_budget():
    class R:  # the scheduler reads only these fields
        def __init__(self, rid, tiles, toks, chunk=None):
            self.rid, self.tiles_total, self.tiles_done = rid, tiles, 0
            self.prompt_len, self.prefilled, self.chunk_size = toks, 0, chunk

    s = Scheduler(4, step_tokens=1000, tile_cost=300)
    a, b = R(0, 5, 900), R(1, 0, 50)
    s.admitting = [a, b]
    work = s.plan()
    # 3 tiles of a fit (900); a's remaining 2 tiles block later work in this step (FIFO)
    assert len(work) == 1 and isinstance(work[0], Vision) and work[0].k == 3
    a.tiles_done = 5
    work = s.plan()
    assert isinstance(work[0], Prefill) and work[0].chunks == [(a, 900), (b, 50)]
    s.running = [object()] * 3  # 3 decode rows leave 997
    work = s.plan()
    assert work[0].chunks == [(a, 900), (b, 50)]
    s.step_tokens = 100
    work = s.plan()  # 97 tokens left: a gets them all
    assert work[0].chunks == [(a, 97)]
    s.running = [object()] * 200  # over budget: still one unit, a chunk of at most step_tokens
    assert s.plan()[0].chunks == [(a, 100)]
    unlimited = Scheduler(4, step_tokens=None, tile_cost=300)
    c = R(2, 0, 300, chunk=128)
    unlimited.admitting = [c]
    assert [w.chunks for w in unlimited.plan()] == [[(c, 128)], [(c, 128)], [(c, 44)]]


def test_driver_on_a_plain_engine_equals_generate(model, alone):
    eng = Engine(model.model, model.processor.tokenizer, step_tokens=100)
    d = Driver(eng)
    handles = d.submit(model.processor(CONVS), SamplingParams(max_new_tokens=24))
    assert [h.result(timeout=120).ids for h in handles] == alone
    d.close()
    assert torch.is_tensor(eng.cache.layers[0][0])
