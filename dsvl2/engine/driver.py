"""The driver: the ONE loop that owns an engine, shared by any number of callers.

``submit``, ``cancel`` and reading events are safe from any thread, from several
interleaved iterators in one thread, and from asyncio code. Only the driver's own thread
calls into the engine (``add``, ``cancel``, ``step``, ``result``); it hands every event to
the queue ("sink") of the request it belongs to, so no consumer can drop another's events
or its finish.

* The thread starts with the first request and ends after ``idle_exit`` seconds without
  work, so an idle model holds no thread (and can be garbage-collected).
* A request is checked and tokenised in the caller's thread (errors are raised there);
  the engine sees it at the next step boundary. Cancels also take effect at the next
  step: a client that went away frees its slot within one step.

Failure isolation: one loop serves every caller, so nothing one request or one consumer
does may stop it, and no handle may be left without its final event (its reader would
wait forever).

* A sink whose ``put`` raises is a broken consumer: its request is cancelled, the error
  is logged once, the others go on. (Sinks must not block: the loop waits in ``put``.)
* An error in the engine (``step``, ``add``, ``cancel``, ``result``) or in the loop
  itself finishes the requests it touched with ``finish_reason="error"`` and the message
  in ``output.error``; the loop goes on. After a failed step that means every request
  that held a slot, while one that had already finished (in that step or before) still
  gets its own result; those merely waiting for a slot are not affected.
* Should the thread die anyway (a ``BaseException``), every request in flight ends with
  an error and the next ``submit`` starts a fresh thread.

Fault injection for tests (a seam, not a patch: tests never replace engine methods),
like the engine's own (``Engine.set_fault_hook``): ``Driver(engine, fault_hook=f)`` (or
``driver.fault_hook = f``) calls ``f(point, requests)`` at these points of the loop, and
whatever it raises is handled exactly like an error of the code that follows the point:

* ``"add"``     before the new requests are handed to ``Engine.add``;
* ``"cancel"``  before ``Engine.cancel`` of the requests cancelled since the last step;
* ``"step"``    before ``Engine.step`` (requests: none; the engine picks them);
* ``"deliver"`` after a step returned its events, before any of them is delivered (the
  requests of those events: one may have finished in that step);
* ``"finish"``  before ``Engine.result`` builds the output of the one request given.

Sinks: by default each handle has its own queue (``Handle.events`` / ``result``);
several handles may share one (``QueueSink``: a batch streamed in arrival order) or an
``AsyncSink`` that feeds an asyncio queue on the caller's event loop.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import queue
import threading
import time
import weakref
from typing import Any, Callable, Iterator, Sequence

from ..errors import GenerationError
from ..processing import BatchInputs
from . import heap
from .engine import Engine, GenerationOutput, StreamEvent
from .request import Request
from .sampling import SamplingParams

log = logging.getLogger("dsvl2.driver")

# How often a blocked reader wakes up to let a KeyboardInterrupt through.
_POLL_S = 0.2
# Longest pause after repeated unexpected failures of the loop itself (not of a step):
# a persistent bug must not turn the thread into a busy loop that floods the log.
_MAX_BACKOFF_S = 1.0
_LIVE: "weakref.WeakSet[Driver]" = weakref.WeakSet()
_THREADS: "weakref.WeakSet[threading.Thread]" = weakref.WeakSet()  # every driver thread not yet gone
_ARENA_WARNED = False


def _check_arena() -> None:
    """Warn (once a process) where this driver thread does not allocate from glibc's main
    arena: threads that allocated before ``import dsvl2`` have arenas of their own, which may
    be handed on, and there the steps' big tensors fault their pages anew (engine/heap.py)."""
    global _ARENA_WARNED
    try:
        if _ARENA_WARNED or not heap.wanted() or heap.in_main_arena() is not False:
            return
        arenas = heap.arenas()
    except Exception:  # a diagnosis only: never in the way of the loop
        log.debug("malloc arena check failed", exc_info=True)
        return
    _ARENA_WARNED = True
    log.warning("the engine's thread allocates from a malloc arena other than glibc's main one (%s arenas, "
                "made by threads that allocated before dsvl2 was imported), so its steps may fault their "
                "memory anew: import dsvl2 before other work starts threads, or set "
                "GLIBC_TUNABLES=glibc.malloc.arena_max=1", arenas)


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
    """One request as its caller sees it.

    ``output`` is set (by the driver thread) just before the final event is put, and stays:
    a caller who already read that event, or only wants the answer, need not read the
    queue again. It is always the engine's ``GenerationOutput``; ``result()`` returns
    ``make_result(output)`` when the submitter set one (``VLModel.submit`` does: an
    ``api.Answer``), else that output itself."""

    def __init__(self, driver: "Driver", req: Request, index: int, sink, own_sink: bool = True,
                 make_result: Callable[[GenerationOutput], Any] | None = None):
        self.driver = driver
        self.make_result = make_result
        self._result = None  # make_result's value, made once
        self.req = req
        self.index = index  # row in the submitted batch
        self.sink = sink
        # events() / result() may read the sink only if it is this handle's alone: reading
        # a shared one would swallow the other requests' events
        self.own_sink = own_sink and isinstance(sink, QueueSink)
        self.prompt_tokens = req.prompt_len
        self.output: GenerationOutput | None = None
        self._final_read = False  # a reader of this handle's own queue took the final event
        self._streamed = 0        # characters of text delivered in deltas (driver thread)
        self._sink_broken = False  # its sink's put raised (logged once)

    @property
    def rid(self) -> int:
        return self.req.rid

    @property
    def finished(self) -> bool:
        return self.output is not None

    def cancel(self) -> None:
        self.driver.cancel([self])

    def events(self, timeout: float | None = None) -> Iterator[StreamEvent]:
        """This request's events until its last one (own sink only); ends at once if the
        last one was already read. Cancels the request if the iteration stops early (the
        consumer breaks out or is interrupted), but not when ``timeout`` seconds pass
        without an event: that raises ``TimeoutError`` and the request goes on, like a
        future's ``result(timeout)`` (read on with a new ``events()``)."""
        return self._read(timeout, per_event=True)

    def result(self, timeout: float | None = None):
        """The whole answer, waiting at most ``timeout`` seconds in all (``TimeoutError``;
        the request goes on): the ``GenerationOutput``, or what ``make_result`` makes of it
        (the same object on every call). Raises ``GenerationError`` if the request failed.
        Returns at once once the request has finished, however its events were read."""
        if self.output is None:
            for _ in self._read(timeout, per_event=False):
                pass
        if self.output is None:  # cannot happen: the final event comes after output is set
            raise GenerationError(f"request {self.rid} ended without a result")
        out = raise_for_error(self.output)
        if self.make_result is None:
            return out
        if self._result is None:
            self._result = self.make_result(out)
        return self._result

    def _read(self, timeout: float | None, per_event: bool) -> Iterator[StreamEvent]:
        if not self.own_sink:
            raise TypeError("events() / result() read the handle's own queue; this handle shares a sink "
                            "(read the shared sink; result() works once the request has finished)")
        deadline = None if timeout is None else time.monotonic() + timeout
        timed_out = False
        try:
            while not self._final_read:
                wait = timeout if per_event or deadline is None else max(deadline - time.monotonic(), 0.0)
                try:
                    ev = self.sink.get(wait)
                except queue.Empty:
                    timed_out = True
                    what = "no event" if per_event else "no result"
                    raise TimeoutError(f"request {self.rid}: {what} within {timeout} s (it goes on; "
                                       "cancel() it to stop it)") from None
                if ev.finish_reason is not None:
                    self._final_read = True
                yield ev
        finally:
            if self.output is None and not timed_out:
                self.cancel()


def raise_for_error(out: GenerationOutput) -> GenerationOutput:
    if out.finish_reason == "error":
        raise GenerationError(f"generation failed: {out.error}")
    return out


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


class Driver:
    """Owns ``engine`` and runs its loop in a thread of its own (see the module docstring).

    ``fault_hook``: for tests, called as ``fault_hook(point, requests)`` at the named
    points of the loop (module docstring)."""

    def __init__(self, engine: Engine, idle_exit: float = 2.0,
                 fault_hook: Callable[[str, list[Request]], None] | None = None):
        self.engine = engine
        self.idle_exit = idle_exit
        self.fault_hook = fault_hook
        self._cv = threading.Condition()
        # everything below is guarded by _cv
        self._inbox: list[Request] = []
        # rid -> request; a dict, so that cancelling again (close() in a loop, a consumer
        # that cancels twice) costs nothing
        self._cancels: dict[int, Request] = {}
        self._handles: dict[int, Handle] = {}  # requests without their final event yet
        self._thread: threading.Thread | None = None
        self._last_thread: threading.Thread | None = None
        self._closing = False
        self.steps = 0  # written by the driver thread only
        _LIVE.add(self)

    # ---- callers (any thread) ----------------------------------------------------------
    def submit(self, batch: BatchInputs, params: SamplingParams | Sequence[SamplingParams] = SamplingParams(),
               chunk_size: int | None = None, output_scores: bool = False, sink=None) -> list[Handle]:
        """Queue every row of ``batch``; returns one handle per row. Without ``sink`` each
        handle has its own queue; with one, all rows' events go there (they carry ``index``)."""
        reqs = self.engine.make_requests(batch, params, chunk_size, output_scores)
        handles = [Handle(self, r, i, QueueSink() if sink is None else sink, own_sink=sink is None)
                   for i, r in enumerate(reqs)]
        with self._cv:
            for h in handles:
                self._handles[h.rid] = h
            self._inbox.extend(reqs)
            self._wake()
        return handles

    def cancel(self, handles: Sequence[Handle]) -> None:
        with self._cv:
            self._cancels.update((h.rid, h.req) for h in handles if h.output is None)
            self._wake()

    def stats(self) -> dict:
        """A consistent-enough snapshot for metrics (read without stopping the loop)."""
        s = self.engine.scheduler
        with self._cv:
            inbox = len(self._inbox)
        return {"running": len(s.running), "admitting": len(s.admitting), "waiting": len(s.waiting) + inbox,
                "slots_in_use": len(s.running) + len(s.admitting), "slots_total": s.max_batch_size,
                "steps": self.steps, **self.engine.kv_stats()}

    @property
    def thread(self) -> threading.Thread | None:
        """The loop's thread while it has one (None once it went idle or died)."""
        with self._cv:
            return self._thread

    @property
    def last_thread(self) -> threading.Thread | None:
        """The last thread the loop ran in: the running one, or one that has gone idle or
        died (it may still be returning; join it to wait for that)."""
        with self._cv:
            return self._last_thread

    def pending(self) -> int:
        """Requests not yet holding a seat and KV blocks."""
        with self._cv:
            return len(self._inbox) + len(self.engine.scheduler.waiting)

    def close(self, timeout: float = 5.0) -> None:
        """Cancel everything and stop the thread (a later ``submit`` starts it again).

        Requests submitted while it runs are served as usual; the thread then stops at the
        first moment without work, and ``close`` waits at most ``timeout`` for that."""
        with self._cv:
            self._cancels.update((rid, h.req) for rid, h in self._handles.items())
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
        """(under _cv) Start the thread if there is none, else wake it."""
        if self._thread is None:
            self._thread = self._last_thread = threading.Thread(target=self._run, name="dsvl2-driver", daemon=True)
            _THREADS.add(self._thread)
            self._thread.start()
        self._cv.notify()

    def _fault(self, point: str, reqs: list[Request]) -> None:
        hook = self.fault_hook
        if hook is not None:
            hook(point, reqs)

    def _run(self) -> None:
        """The thread: turns until idle. Each turn is guarded, so an error the turn did not
        attribute itself fails the requests in flight in the engine and the loop goes on;
        only a BaseException ends the thread, and then nobody is left waiting."""
        failures = 0
        _check_arena()
        try:
            while True:
                try:
                    if not self._turn():
                        return
                    failures = 0
                except Exception as e:
                    log.exception("driver loop failed")
                    self._fail(e)
                    failures += 1
                    if failures > 1:
                        time.sleep(min(0.01 * 2 ** failures, _MAX_BACKOFF_S))
        except BaseException as e:  # noqa: BLE001 - the thread ends here; re-raising helps nobody
            log.critical("driver thread died; failing every request in flight", exc_info=True)
            self._died(e)

    def _turn(self) -> bool:
        """One step boundary: take new requests and cancels, step, deliver. False: the
        thread has gone idle and is forgotten (under the lock, so the next ``submit``
        starts a new one)."""
        eng = self.engine
        with self._cv:
            idle_since = time.monotonic()
            while not (self._inbox or self._cancels or eng.has_work()):
                left = self.idle_exit - (time.monotonic() - idle_since)
                if left <= 0 or self._closing:
                    self._thread = None
                    self._closing = False
                    return False
                self._cv.wait(left)
            new, self._inbox = self._inbox, []
            cancels, self._cancels = list(self._cancels.values()), {}
        if new:
            self._add(new)
        if cancels:
            self._cancel(cancels)
        try:
            self._fault("step", [])
            events = eng.step()
            self.steps += 1
            self._fault("deliver", [r for r, _, _ in events])
        except Exception as e:  # keep serving the others
            log.exception("engine step failed")
            self._fail(e)
            return True
        self._deliver(events)
        return True

    def _add(self, new: list[Request]) -> None:
        try:
            self._fault("add", new)
            self.engine.add(new)
        except Exception as e:
            log.exception("adding %d request(s) to the engine failed", len(new))
            self._fail_requests(new, e)

    def _cancel(self, cancels: list[Request]) -> None:
        try:
            self._fault("cancel", cancels)
            self.engine.cancel(cancels)
        except Exception as e:
            # one by one, so that one bad request does not keep the others' slots
            log.exception("cancelling %d request(s) failed", len(cancels))
            self._fail_requests([r for r in cancels if not r.finished], e)
        for r in cancels:
            self._finish(r)

    def _deliver(self, events: list[tuple[Request, int, str]]) -> None:
        with self._cv:
            owned = [(self._handles.get(r.rid), r, tok, delta) for r, tok, delta in events]
        for h, r, tok, delta in owned:
            if h is None:  # finished already (e.g. cancelled, or failed in an earlier turn)
                continue
            try:
                if r.finished:
                    self._finish(r, tok, delta)
                elif delta:
                    h._streamed += len(delta)
                    self._put(h, StreamEvent(h.index, delta, tok))
            except Exception as e:  # a bug about this request only
                log.exception("delivering an event of request %d failed", r.rid)
                self._fail_requests([r], e)

    def _put(self, h: Handle, ev: StreamEvent) -> None:
        """Hand ``ev`` to the caller's sink; never raises. A sink that raises is a broken
        consumer: its request is cancelled (at the next step boundary) and logged once."""
        try:
            h.sink.put(ev)
        except Exception:
            if h._sink_broken:
                return
            h._sink_broken = True
            if ev.finish_reason is not None:
                log.exception("request %d: its sink's put() raised; its final event is lost", h.rid)
                return
            log.exception("request %d: its sink's put() raised; the request is cancelled", h.rid)
            with self._cv:
                self._cancels[h.rid] = h.req

    def _finish(self, r: Request, tok: int | None = None, delta: str | None = None, error: str | None = None) -> None:
        """Give ``r``'s handle its final event (once: the handle leaves ``_handles``).

        ``delta`` None (the final token's delta is unknown, e.g. after a failure): the text
        not streamed yet, so that the deltas still add up to ``output.text``. ``error``:
        the request failed although the engine could not finish it; the output says so."""
        with self._cv:
            h = self._handles.pop(r.rid, None)
        if h is None:
            return
        out = self._output(r)
        if error is not None and not r.finished:  # the engine could not mark it finished
            out.finish_reason, out.error = "error", error
        if delta is None:
            delta = out.text[h._streamed:]
        h.output = out
        self._put(h, StreamEvent(h.index, delta, tok, out.finish_reason, out))

    def _output(self, r: Request) -> GenerationOutput:
        """The engine's result for ``r``; if building it fails, an error output made from
        what the request holds (the handle must get a final event all the same)."""
        try:
            self._fault("finish", [r])
            return self.engine.result(r)
        except Exception as e:
            log.exception("the result of request %d could not be built", r.rid)
            ids = list(getattr(r, "output_ids", []) or [])
            return GenerationOutput(ids, getattr(r, "text", "") or "", "error", r.prompt_len, len(ids),
                                    error=_describe(e))

    def _fail_requests(self, reqs: Sequence[Request], exc: BaseException) -> None:
        """End ``reqs`` with an error: out of the engine (their slots freed; rows not kept)
        and their handles finished. A request that had already finished keeps its result."""
        msg = _describe(exc)
        for r in reqs:
            lost = None
            if not r.finished:
                r.error = msg
            try:
                self.engine.cancel([r], reason="error")
            except Exception as e:
                log.exception("request %d could not be taken out of the engine (its slot may be lost)", r.rid)
                lost = f"{msg}; then cancelling it: {_describe(e)}"
            self._finish(r, error=lost)

    def _fail(self, exc: BaseException) -> None:
        """A step (or the loop) raised: end every request it may have touched. Those holding
        a slot end with the error; those already finished (in that step or earlier, even
        if the engine lost track of them) get their own result; those still waiting for a
        slot go on. If the engine cannot even say which requests hold a slot, every
        request it has been given ends with the error."""
        try:
            active = {r.rid for r in self.engine.active}
        except Exception:
            log.exception("the engine cannot list its active requests")
            active = None
        with self._cv:
            handles = list(self._handles.values())
            queued = {r.rid for r in self._inbox}
        done, failed = [], []
        for h in handles:
            r = h.req
            if r.finished:
                done.append(r)
            elif r.rid in queued:
                continue
            elif active is None or r.rid in active:
                failed.append(r)
        for r in done:
            self._finish(r)
        self._fail_requests(failed, exc)

    def _died(self, exc: BaseException) -> None:
        """The thread is ending abnormally: no request in flight may wait for it. They all
        end with the error; then the thread is forgotten, so that ``submit`` starts a new
        one (at once if work came in meanwhile)."""
        me = threading.current_thread()
        try:
            with self._cv:
                handles = list(self._handles.values())
                self._inbox, self._cancels = [], {}
            for h in handles:
                try:
                    self._fail_requests([h.req], exc)
                except BaseException:  # noqa: BLE001 - go on with the others
                    log.exception("request %d could not be failed", h.rid)
        finally:
            with self._cv:
                if self._thread is me:
                    self._thread = None
                    self._closing = False
                    if self._inbox or self._cancels:
                        self._wake()
