"""The driver: one loop owns the engine; streams, threads and asyncio share it safely.

The truth for every answer is the same conversation run alone (greedy) on a plain
``Engine`` in one thread. Nothing is timed: the fairness test reads the engine's step
reports (``Engine.add_step_observer``).

Failure isolation: faults are injected through the seams made for it
(``Driver(fault_hook=)``, ``Engine.set_fault_hook``) or are real ones (a sink whose
``put`` raises); no engine method is replaced. Every wait is bounded (join / result timeouts), so
a driver that hangs fails its test instead of hanging the suite.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import threading
import time

import pytest
import torch

import dsvl2
from dsvl2.engine import Engine, SamplingParams
from dsvl2.api import user_turn
from dsvl2.engine.driver import AsyncSink, Driver, QueueSink
from dsvl2.engine.blocks import BlockPool
from dsvl2.engine.kv_manager import KVManager
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
    # no prefix sharing: the answers are compared with fresh runs, and in the default dtype
    # a prompt that reuses shared blocks may differ in the last bits (README, "Memory")
    return dsvl2.load(GOLDEN / "small", prefix_caching=False)


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


def test_a_stream_keeps_flowing_while_an_image_request_is_admitted():
    """Two threads on one model: while a 2-image request is admitted (vision tiles and
    prefill chunks under a 64-token budget), the running stream gets a token in every
    step, and no step does more than one unit of admission work beyond the budget."""
    m = dsvl2.load(GOLDEN / "small", step_tokens=64)
    eng = m.engine
    reports = []
    eng.add_step_observer(reports.append)  # called in the driver's thread, after each step
    first = m.submit(CONVS[2], max_new_tokens=400)[0]
    events = first.events()
    next(events)  # the text request is running
    big = m.submit(CONVS[3], max_new_tokens=2)[0]
    assert big.result(timeout=120).completion_tokens == 2
    assert not first.finished
    first.cancel()

    def admits_big(rep) -> bool:
        return any(rid == big.rid for rid, _ in rep.vision) or any(rid == big.rid for f in rep.prefill
                                                                   for rid, _, _ in f)

    # the admission was spread over many steps, and in each of them the running stream
    # was sampled (every step samples every running row): it never waited longer than a step
    assert sum(map(admits_big, reports)) >= 10
    assert all(first.rid in rep.running and first.rid in rep.sampled for rep in reports if admits_big(rep))
    tile = eng.scheduler.tile_cost
    admission = [rep for rep in reports if (rep.vision or rep.prefill) and first.rid in rep.running]
    assert admission
    for rep in admission:
        cost = sum(k * tile for _, k in rep.vision) + rep.prefill_tokens
        one_unit = max([tile] * bool(rep.vision) + [max(n for _, _, n in f) for f in rep.prefill])
        assert cost <= max(64 - len(rep.running), one_unit)


def test_scheduler_plan_respects_the_budget():
    class R:  # the scheduler reads only these fields
        def __init__(self, rid, tiles, toks, chunk=None):
            self.rid, self.tiles_total, self.tiles_done = rid, tiles, 0
            self.prefill_len, self.prefilled, self.chunk_size = toks, 0, chunk

    kv = KVManager(BlockPool(8, 16, 1))  # plan() never asks for blocks
    s = Scheduler(4, kv, step_tokens=1000, tile_cost=300)
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
    unlimited = Scheduler(4, kv, step_tokens=None, tile_cost=300)
    c = R(2, 0, 300, chunk=128)
    unlimited.admitting = [c]
    assert [w.chunks for w in unlimited.plan()] == [[(c, 128)], [(c, 128)], [(c, 44)]]


def test_scheduler_idle_budget_only_while_no_stream_runs():
    """With nobody decoding, a step's budget is ``idle_tokens`` (where larger): a lone prompt
    prefills in one chunk, and a request's tiles, as the step's first unit, all run in it;
    as soon as a stream runs, ``step_tokens`` bounds the step again."""
    class R:
        def __init__(self, rid, tiles, toks):
            self.rid, self.tiles_total, self.tiles_done = rid, tiles, 0
            self.prefill_len, self.prefilled, self.chunk_size = toks, 0, None

    kv = KVManager(BlockPool(8, 16, 1))
    s = Scheduler(4, kv, step_tokens=512, tile_cost=729, idle_tokens=4096)
    a = R(0, 7, 1431)
    s.admitting = [a]
    work = s.plan()  # all 7 tiles (5103 tokens' worth, over the 4096): the prompt waits for the next step
    assert len(work) == 1 and isinstance(work[0], Vision) and work[0].k == 7
    b = R(1, 7, 1431)
    s.admitting = [a, b]
    work = s.plan()  # only the step's first unit takes all: b's tiles wait
    assert [(type(w), w.k) for w in work] == [(Vision, 7)] and work[0].req is a
    s.running = [object()]  # a stream runs: 511 left, one tile (the unit that always runs)
    assert [(w.req, w.k) for w in s.plan()] == [(a, 1)]
    s.running, s.admitting = [], [a]
    a.tiles_done = 3  # 4 left (2916 tokens' worth): the budget's rest starts the prompt
    work = s.plan()
    assert (work[0].req, work[0].k) == (a, 4) and work[1].chunks == [(a, 4096 - 4 * 729)]
    a.tiles_done = 7
    assert s.plan()[0].chunks == [(a, 1431)]
    s.running = [object()]  # a stream runs: 511 left for admission
    assert s.plan()[0].chunks == [(a, 511)]
    no_idle = Scheduler(4, kv, step_tokens=4096, tile_cost=729)  # no idle budget: the budget alone
    a.tiles_done = 0
    no_idle.admitting = [a]
    assert [w.k for w in no_idle.plan()] == [5]
    a.tiles_done = 7
    s.running = []
    a.prefill_len = 9000  # longer than the idle budget: chunks of 4096
    assert s.plan()[0].chunks == [(a, 4096)]
    small_idle = Scheduler(4, kv, step_tokens=512, idle_tokens=100)  # never below step_tokens
    small_idle.admitting = [a]
    assert small_idle.plan()[0].chunks == [(a, 512)]
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="idle_tokens"):
            Scheduler(4, kv, step_tokens=512, idle_tokens=bad)


def test_driver_on_a_plain_engine_equals_generate(model, alone):
    eng = Engine(model.model, model.processor.tokenizer, step_tokens=100)
    d = Driver(eng)
    handles = d.submit(model.processor(CONVS), SamplingParams(max_new_tokens=24))
    assert [h.result(timeout=120).ids for h in handles] == alone
    d.close()
    assert torch.is_tensor(eng.cache.layers[0][0])


# ---- failure isolation (the demo model: tiny and random; its answers run to max_new_tokens) ----

WAIT = 60  # seconds: any wait longer than this is a hang


@pytest.fixture(scope="module")
def demo():
    return dsvl2.load("demo")


@pytest.fixture
def make_driver(demo):
    """Drivers on engines of their own over the demo weights: a fault leaves no state behind
    for the other tests. Each is closed at the end."""
    made = []

    def make(fault_hook=None, idle_exit=2.0):
        d = Driver(Engine(demo.model, demo.processor.tokenizer), idle_exit=idle_exit, fault_hook=fault_hook)
        made.append(d)
        return d

    yield make
    for d in made:
        d.close()


def rows(demo, *texts):
    """A processed batch, one conversation per text."""
    return demo.process([[user_turn(t)] for t in texts])[0]


def greedy(n):
    return SamplingParams(max_new_tokens=n)


def once(point, exc):
    """A fault hook that raises ``exc`` the first time the loop reaches ``point``."""
    fired = []

    def hook(p, reqs):
        if p == point and not fired:
            fired.append(p)
            raise exc

    return hook


def wait_until(cond, what):
    deadline = time.monotonic() + WAIT
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def test_a_sink_that_raises_cancels_its_request_and_the_others_are_served(demo, caplog):
    """The issue's reproduction: a broken consumer's sink used to kill the driver thread,
    and every later request then waited forever."""
    class Broken:
        def __init__(self):
            self.got = []

        def put(self, ev):
            self.got.append(ev)
            raise RuntimeError("the consumer went away")

    sink = Broken()
    answers, errors = {}, []

    def worker(i):
        try:
            answers[i] = demo.chat("hello", max_tokens=8)
        except Exception as e:  # reported below
            errors.append(e)

    with caplog.at_level(logging.ERROR, logger="dsvl2.driver"):
        (h,) = demo.submit("hi", sink=sink, max_tokens=8)
        threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(WAIT)
        assert not any(t.is_alive() for t in threads), "the driver stopped serving"
        assert not errors
        assert all(answers[i].completion_tokens == 8 for i in range(4))
        wait_until(lambda: h.finished, "the broken request's end")
    # cancelled at the step boundary after its first delta failed; its final event was
    # still offered to the sink (which raised again, silently)
    assert h.output.finish_reason == "cancelled"
    assert [ev.finish_reason for ev in sink.got] == [None, "cancelled"]
    logged = [r for r in caplog.records if f"request {h.rid}:" in r.getMessage()]
    assert len(logged) == 1 and "sink" in logged[0].getMessage()
    assert demo.chat("hello", max_tokens=3).completion_tokens == 3


def test_a_failing_step_fails_its_requests_and_the_driver_goes_on(demo, make_driver):
    calls = []

    def hook(point, reqs):
        if point == "step":
            calls.append(point)
            if len(calls) == 3:
                raise RuntimeError("simulated out of memory")

    d = make_driver(hook)
    (h,) = d.submit(rows(demo, "hello"), greedy(10))
    with pytest.raises(GenerationError, match="RuntimeError: simulated out of memory"):
        h.result(timeout=WAIT)
    assert h.output.finish_reason == "error" and h.output.completion_tokens == 2
    (h,) = d.submit(rows(demo, "hello"), greedy(4))
    assert h.result(timeout=WAIT).completion_tokens == 4
    assert d.stats()["slots_in_use"] == 0


def test_a_request_the_engine_failed_in_its_step_gets_one_final_error_event(demo, make_driver):
    """The engine attributes a decode failure to the rows of that forward and returns
    their final events; the driver delivers each exactly once, stream complete."""
    d = make_driver()
    decodes = []

    def hook(stage, reqs):  # the engine's own seam
        if stage == "decode":
            decodes.append(stage)
            if len(decodes) == 3:
                raise RuntimeError("simulated decode failure")

    d.engine.set_fault_hook(hook)
    (h,) = d.submit(rows(demo, "hello"), greedy(10))
    streamed = list(h.events(timeout=WAIT))
    assert [ev.finish_reason for ev in streamed] == [None] * (len(streamed) - 1) + ["error"]
    out = streamed[-1].output
    assert "simulated decode failure" in out.error and out.completion_tokens < 10
    assert "".join(ev.delta for ev in streamed) == out.text
    d.engine.set_fault_hook(None)
    (h,) = d.submit(rows(demo, "hello"), greedy(4))
    assert h.result(timeout=WAIT).completion_tokens == 4
    assert d.stats()["slots_in_use"] == 0


def test_a_request_that_finished_in_a_failed_step_still_gets_its_result(demo, make_driver):
    """The step where the short request finishes raises after its events were computed:
    the short one still ends with its own result and a complete stream; the long one, in
    the same step, ends with the error; the loop goes on."""
    reference = make_driver()
    short_ref, long_ref = reference.submit(rows(demo, "hi", "hello"), [greedy(3), greedy(12)])
    short_ref = short_ref.result(timeout=WAIT)

    ready = threading.Event()
    box = []

    def hook(point, reqs):
        if point == "step":
            ready.wait(WAIT)  # the handles are known before the first step
        elif point == "deliver" and any(r is box[0].req and r.finished for r in reqs) and not box[1].finished:
            raise RuntimeError("simulated failure after the step")

    d = make_driver(hook)
    box.extend(d.submit(rows(demo, "hi", "hello"), [greedy(3), greedy(12)]))
    ready.set()
    short, long = box
    streamed = list(short.events(timeout=WAIT))
    out = streamed[-1].output
    assert out.finish_reason == "length" and out.ids == short_ref.ids
    assert "".join(ev.delta for ev in streamed) == out.text == short_ref.text
    with pytest.raises(GenerationError, match="simulated failure after the step"):
        long.result(timeout=WAIT)
    assert long.output.completion_tokens == 3
    (h,) = d.submit(rows(demo, "hello"), greedy(4))
    assert h.result(timeout=WAIT).completion_tokens == 4
    assert d.stats()["slots_in_use"] == 0


def test_a_failing_add_fails_only_the_new_requests(demo, make_driver):
    d = make_driver()
    (running,) = d.submit(rows(demo, "hello"), greedy(40))
    events = running.events(timeout=WAIT)
    next(events)  # it holds a slot
    d.fault_hook = once("add", RuntimeError("simulated add failure"))
    new = d.submit(rows(demo, "hi", "hey"), greedy(4))
    for h in new:
        with pytest.raises(GenerationError, match="simulated add failure"):
            h.result(timeout=WAIT)
    assert running.result(timeout=WAIT).completion_tokens == 40
    (h,) = d.submit(rows(demo, "hi"), greedy(4))
    assert h.result(timeout=WAIT).completion_tokens == 4
    assert d.stats()["slots_in_use"] == 0


def test_a_failing_cancel_still_ends_the_request_and_frees_its_slot(demo, make_driver):
    d = make_driver()
    doomed, other = d.submit(rows(demo, "hello", "hi"), [greedy(200), greedy(20)])
    events = doomed.events(timeout=WAIT)
    next(events)
    d.fault_hook = once("cancel", RuntimeError("simulated cancel failure"))
    doomed.cancel()
    with pytest.raises(GenerationError, match="simulated cancel failure"):
        doomed.result(timeout=WAIT)
    assert doomed.output.completion_tokens < 200
    assert other.result(timeout=WAIT).completion_tokens == 20
    wait_until(lambda: d.stats()["slots_in_use"] == 0, "every slot free")


def test_a_failing_result_fails_only_its_request(demo, make_driver):
    d = make_driver(once("finish", RuntimeError("simulated result failure")))
    short, long = d.submit(rows(demo, "hi", "hello"), [greedy(3), greedy(12)])
    with pytest.raises(GenerationError, match="simulated result failure"):
        short.result(timeout=WAIT)
    assert short.output.finish_reason == "error"
    assert long.result(timeout=WAIT).completion_tokens == 12


def test_a_dead_driver_thread_fails_its_requests_and_submit_restarts_it(demo, make_driver):
    class Crash(BaseException):  # not an Exception: the loop's guards let it through
        pass

    d = make_driver(once("step", Crash("simulated crash")))
    (h,) = d.submit(rows(demo, "hello"), greedy(4))
    with pytest.raises(GenerationError, match="simulated crash"):
        h.result(timeout=WAIT)
    dead = d.last_thread
    dead.join(WAIT)
    assert not dead.is_alive() and d.thread is None
    (h,) = d.submit(rows(demo, "hello"), greedy(4))
    assert h.result(timeout=WAIT).completion_tokens == 4
    assert d.last_thread is not dead


def test_an_idle_driver_lets_its_thread_go_and_the_next_submit_starts_one(demo, make_driver):
    d = make_driver(idle_exit=0.05)
    (h,) = d.submit(rows(demo, "hi"), greedy(2))
    assert h.result(timeout=WAIT).completion_tokens == 2
    first = d.last_thread
    first.join(WAIT)
    assert not first.is_alive() and d.thread is None
    (h,) = d.submit(rows(demo, "hi"), greedy(2))
    assert h.result(timeout=WAIT).completion_tokens == 2 and d.last_thread is not first


def test_close_during_traffic(demo, make_driver):
    """close() while threads submit and stream: no exception anywhere, every handle gets
    its final event, and the driver serves later requests. (Threads switch very often
    here, so that close() and the driver thread really interleave.)"""
    before = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        _close_during_traffic(demo, make_driver)
    finally:
        sys.setswitchinterval(before)


def _close_during_traffic(demo, make_driver):
    d = make_driver()
    batch = rows(demo, *["hello"] * 6)  # many handles in flight: close() has much to walk
    ends, errors = [], []

    def worker(i):
        try:
            for k in range(3):
                for j, h in enumerate(d.submit(batch, greedy(20))):
                    if (i + j + k) % 2:
                        last = list(h.events(timeout=WAIT))[-1]
                        assert last.output is h.output
                        ends.append(last.finish_reason)
                    else:
                        ends.append(h.result(timeout=WAIT).finish_reason)
        except Exception as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        d.close(timeout=0)  # as often as possible
    for t in threads:
        t.join(WAIT)
    assert not errors and not any(t.is_alive() for t in threads)
    assert len(ends) == 4 * 3 * 6 and set(ends) <= {"length", "cancelled"} and "cancelled" in ends
    d.close()
    (h,) = d.submit(rows(demo, "hello"), greedy(4))
    assert h.result(timeout=WAIT).completion_tokens == 4
    assert d.stats()["slots_in_use"] == 0


def test_result_after_the_events_were_read_or_the_request_cancelled(demo, make_driver):
    d = make_driver()
    (h,) = d.submit(rows(demo, "hi"), greedy(4))
    streamed = list(h.events(timeout=WAIT))
    assert streamed[-1].finish_reason == "length"
    assert h.result(timeout=0) is h.output is streamed[-1].output  # at once: the queue is empty
    assert list(h.events(timeout=0)) == []

    (c,) = d.submit(rows(demo, "hello"), greedy(200))
    events = c.events(timeout=WAIT)
    next(events)
    c.cancel()
    out = c.result(timeout=WAIT)
    assert out.finish_reason == "cancelled" and out.completion_tokens < 200
    assert c.result(timeout=0) is out

    sink = QueueSink()  # shared: a handle may not read it, but result() works once finished
    shared = d.submit(rows(demo, "hi", "hello"), greedy(200), sink=sink)
    with pytest.raises(TypeError, match="shares a sink"):
        shared[0].result(timeout=WAIT)
    d.cancel(shared)
    finals = 0
    while finals < 2:
        finals += sink.get(WAIT).output is not None
    assert [h.result(timeout=0).finish_reason for h in shared] == ["cancelled", "cancelled"]


def test_timeouts_name_the_request_and_do_not_cancel_it(demo, make_driver):
    d = make_driver()
    (h,) = d.submit(rows(demo, "hello"), greedy(60))
    with pytest.raises(TimeoutError, match=rf"request {h.rid}: no result within 0 s"):
        h.result(timeout=0)
    with pytest.raises(TimeoutError, match=rf"request {h.rid}: no event within 0 s"):
        for _ in h.events(timeout=0):
            pass
    out = h.result(timeout=WAIT)
    assert out.finish_reason == "length" and out.completion_tokens == 60
