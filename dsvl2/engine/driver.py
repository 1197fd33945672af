"""The driver: the ONE loop that owns an engine, shared by any number of callers.

``submit``, ``cancel`` and reading events are safe from any thread, from several
interleaved iterators in one thread, and from asyncio code. Only the driver's own thread
calls ``Engine.step``; it hands every event to the queue ("sink") of the request it
belongs to, so no consumer can drop another's events or its finish.

* The thread starts with the first request and ends after ``idle_exit`` seconds without
  work, so an idle model holds no thread (and can be garbage-collected).
* A request is checked and tokenised in the caller's thread (errors are raised there);
  the engine sees it at the next step boundary. Cancels also take effect at the next
  step: a client that went away frees its slot within one step.
* If a step raises (a bug, or memory), the requests in it finish with ``"error"`` and the
  message; the driver goes on serving the others.
* Sinks: by default each handle has its own queue (``Handle.events`` / ``result``);
  several handles may share one (``QueueSink``: a batch streamed in arrival order) or
  an ``AsyncSink`` that feeds an asyncio queue on the caller's event loop.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import queue
import threading
import time
import weakref
from typing import Iterator, Sequence

from ..errors import GenerationError
from ..processing import BatchInputs
from .engine import Engine, GenerationOutput, StreamEvent
from .request import Request
from .sampling import SamplingParams

log = logging.getLogger("dsvl2.driver")

# How often a blocked reader wakes up to let a KeyboardInterrupt through.
_POLL_S = 0.2
_LIVE: "weakref.WeakSet[Driver]" = weakref.WeakSet()
_THREADS: "weakref.WeakSet[threading.Thread]" = weakref.WeakSet()  # every driver thread not yet gone


@atexit.register
def _stop_all() -> None:
    """At interpreter exit, stop every driver thread and wait for it: a daemon thread killed
    inside torch code aborts the process (std::terminate, SIGABRT). Besides a step, that
    is also a thread that has left its loop and is freeing the last reference to a model
    (its driver, hence no longer in _LIVE): tensor deallocation releases the GIL."""
    for d in list(_LIVE):
        d.close()
    for t in list(_THREADS):
        if t is not threading.current_thread():
            t.join(5.0)


class QueueSink:
    """A thread-safe queue of events (blocking reads)."""

    def __init__(self):
        self.q: queue.SimpleQueue[StreamEvent] = queue.SimpleQueue()

    def put(self, ev: StreamEvent) -> None:
        self.q.put(ev)

    def get(self, timeout: float | None = None) -> StreamEvent:
        """The next event; ``queue.Empty`` after ``timeout`` seconds (None: wait forever)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            wait = _POLL_S if deadline is None else min(_POLL_S, max(deadline - time.monotonic(), 0))
            try:
                return self.q.get(timeout=wait)
            except queue.Empty:
                if deadline is not None and time.monotonic() >= deadline:
                    raise


class AsyncSink:
    """Events delivered into an ``asyncio.Queue`` on ``loop`` (create it in that loop)."""

    def __init__(self, loop: asyncio.AbstractEventLoop | None = None):
        self.loop = loop or asyncio.get_running_loop()
        self.q: asyncio.Queue[StreamEvent] = asyncio.Queue()

    def put(self, ev: StreamEvent) -> None:
        try:
            self.loop.call_soon_threadsafe(self.q.put_nowait, ev)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            pass

    async def get(self) -> StreamEvent:
        return await self.q.get()


class Handle:
    """One request as its caller sees it."""

    def __init__(self, driver: "Driver", req: Request, index: int, sink):
        self.driver = driver
        self.req = req
        self.index = index  # row in the submitted batch
        self.sink = sink
        self.prompt_tokens = req.prompt_len
        self.output: GenerationOutput | None = None

    @property
    def rid(self) -> int:
        return self.req.rid

    @property
    def finished(self) -> bool:
        return self.output is not None

    def cancel(self) -> None:
        self.driver.cancel([self])

    def events(self, timeout: float | None = None) -> Iterator[StreamEvent]:
        """This request's events until its last one (own sink only); cancels it if the
        iteration stops early (e.g. the consumer breaks out or is interrupted)."""
        if not isinstance(self.sink, QueueSink):
            raise TypeError("events() reads the handle's own queue; this handle shares a sink")
        try:
            while True:
                ev = self.sink.get(timeout)
                yield ev
                if ev.finish_reason is not None:
                    return
        finally:
            if self.output is None:
                self.cancel()

    def result(self, timeout: float | None = None) -> GenerationOutput:
        """Wait for the whole answer; raises ``GenerationError`` if the request failed."""
        for ev in self.events(timeout):
            if ev.output is not None:
                return raise_for_error(ev.output)
        raise GenerationError("the request ended without a result")


def raise_for_error(out: GenerationOutput) -> GenerationOutput:
    if out.finish_reason == "error":
        raise GenerationError(f"generation failed: {out.error}")
    return out


class Driver:
    def __init__(self, engine: Engine, idle_exit: float = 2.0):
        self.engine = engine
        self.idle_exit = idle_exit
        self._cv = threading.Condition()
        self._inbox: list[Request] = []
        self._cancels: list[Request] = []
        self._handles: dict[int, Handle] = {}
        self._thread: threading.Thread | None = None
        self._last_thread: threading.Thread | None = None
        self.steps = 0
        self._closing = False
        _LIVE.add(self)

    # ---- callers (any thread) ----------------------------------------------------------
    def submit(self, batch: BatchInputs, params: SamplingParams | Sequence[SamplingParams] = SamplingParams(),
               chunk_size: int | None = None, output_scores: bool = False, sink=None) -> list[Handle]:
        """Queue every row of ``batch``; returns one handle per row. Without ``sink`` each
        handle has its own queue; with one, all rows' events go there (they carry ``index``)."""
        reqs = self.engine.make_requests(batch, params, chunk_size, output_scores)
        handles = [Handle(self, r, i, sink if sink is not None else QueueSink()) for i, r in enumerate(reqs)]
        with self._cv:
            for h in handles:
                self._handles[h.rid] = h
            self._inbox.extend(reqs)
            self._wake()
        return handles

    def cancel(self, handles: Sequence[Handle]) -> None:
        with self._cv:
            self._cancels.extend(h.req for h in handles if h.output is None)
            self._wake()

    def stats(self) -> dict:
        """A consistent-enough snapshot for metrics (read without stopping the loop)."""
        s = self.engine.scheduler
        with self._cv:
            inbox = len(self._inbox)
        return {"running": len(s.running), "admitting": len(s.admitting), "waiting": len(s.waiting) + inbox,
                "slots_in_use": len(s.running) + len(s.admitting), "slots_total": s.max_batch_size,
                "prefix_rows": len(s.prefix.rows), "prefix_hits": s.prefix.hits, "steps": self.steps}

    def pending(self) -> int:
        """Requests not yet holding a cache row."""
        with self._cv:
            return len(self._inbox) + len(self.engine.scheduler.waiting)

    def close(self, timeout: float = 5.0) -> None:
        """Cancel everything and stop the thread (a later ``submit`` starts it again)."""
        with self._cv:
            self._cancels.extend(h.req for h in self._handles.values())
            # the thread, or the last one: one that has just gone idle is still returning
            # and must be joined too (at interpreter exit a daemon thread still inside
            # native code is killed, and torch then aborts the process)
            t = self._last_thread  # the running thread, if any, is also the last one
            if self._thread is not None:
                self._closing = True
                self._cv.notify()
        if t is not None and t is not threading.current_thread():
            t.join(timeout)

    # ---- the loop (driver thread only) -------------------------------------------------
    def _wake(self) -> None:
        if self._thread is None:
            self._thread = self._last_thread = threading.Thread(target=self._run, name="dsvl2-driver", daemon=True)
            _THREADS.add(self._thread)
            self._thread.start()
        self._cv.notify()

    def _run(self) -> None:
        eng = self.engine
        while True:
            with self._cv:
                idle_since = time.monotonic()
                while not (self._inbox or self._cancels or eng.has_work()):
                    left = self.idle_exit - (time.monotonic() - idle_since)
                    if left <= 0 or self._closing:
                        self._thread = None
                        self._closing = False
                        return
                    self._cv.wait(left)
                new, self._inbox = self._inbox, []
                cancels, self._cancels = self._cancels, []
            eng.add(new)
            if cancels:
                eng.cancel(cancels)
                for r in cancels:
                    self._finish(r)
            try:
                events = eng.step()
            except Exception as e:  # keep serving the others
                log.exception("engine step failed")
                self._fail(e)
                continue
            self.steps += 1
            for r, tok, delta in events:
                h = self._handles.get(r.rid)
                if h is None:
                    continue
                if r.finished:
                    self._finish(r, tok, delta)
                elif delta:
                    h.sink.put(StreamEvent(h.index, delta, tok))

    def _finish(self, r: Request, tok: int | None = None, delta: str = "") -> None:
        h = self._handles.pop(r.rid, None)
        if h is None:
            return
        h.output = self.engine.result(r)
        h.sink.put(StreamEvent(h.index, delta, tok, h.output.finish_reason, h.output))

    def _fail(self, exc: Exception) -> None:
        """A step raised: the requests that were in it (holding a slot) end with an error."""
        eng = self.engine
        msg = f"{type(exc).__name__}: {exc}"
        for r in list(eng.active):
            r.error = msg
            eng.cancel([r], reason="error")
            self._finish(r)
