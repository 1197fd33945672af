"""The OpenAI-compatible HTTP server: a thin FastAPI layer over the model's driver.

    app = create_app(dsvl2.load("demo"), served_model_name="demo")
    uvicorn.run(app, host="127.0.0.1", port=8000)

Endpoints: ``POST /v1/chat/completions`` (JSON or SSE stream), ``GET /v1/models``
(``/v1/models/{id}``), ``GET /health``, ``GET /metrics``, and the browser chat page at
``/`` (``dsvl2.web``: static files, a client of this same API). The ``/v1`` endpoints
require ``Authorization: Bearer KEY`` when an API key is set; the others never do.

How a chat request flows, and why:

0. Every request, every route: ``Host`` (DNS rebinding, 421) and ``Origin`` (cross-site
   requests, 403), in ``guard.RequestGuard``.
1. On the event loop, cheap checks only: API key (``hmac.compare_digest``), Content-Type
   (``application/json``, else 415: what a foreign page could send without a preflight),
   model loaded (else 503), queue room (else 429 with ``Retry-After``), body size (413,
   read incrementally so an over-long body is never held whole), JSON and schema (400).
1b. ``http(s)`` image URLs (``--allow-fetch``) are fetched in their own pool
   (``FETCH_WORKERS`` threads, each fetch bounded by ``--fetch-timeout`` as a whole, see
   ``fetch.py``), all of a request's at once, so that slow URLs never hold the workers
   of step 2 and a request without fetched images never waits behind them.
2. In a small worker pool (2 threads, so a flood of big images cannot take every core's
   memory at once): images resolved, decoded and tiled, prompt tokenised and checked
   against the context window, then queued on the driver (``submit.py``), which refuses
   (400) a request whose prompt + ``max_tokens`` could never fit the whole KV-cache
   budget (``--kv-cache-bytes``). The request's
   ``AsyncSink`` is created on the loop beforehand, so the driver thread can hand it
   events from then on.
3. The driver (one thread for all requests) admits it at a step boundary, interleaving
   its vision / prefill work with the running streams under the per-step token budget.
4. Events arrive on the loop; a stream sends one SSE chunk per text delta. When the
   client goes away (the stream's send is cancelled, or a non-streaming client is seen
   disconnected while waiting) every handle of the request is cancelled, which frees its
   batch slot and KV-cache blocks at the driver's next step.

Failure isolation: input errors are answered before the request reaches the driver; an
engine step that raises fails only the requests in that step (the driver goes on), and
their clients get a 500 (``error`` event in a stream). Nothing a client sends produces
a traceback in a response; unexpected server faults are logged and answered with a
generic 500.
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import logging
import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Callable, Iterable, Union

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..api import VLModel, make_answer
from ..engine.driver import AsyncSink
from ..errors import DSVL2Error
from ..checkpoint.hub import DEMO
from ..structured import LogprobStream
from .errors import APIError, from_dsvl2
from .fetch import DEFAULT_TIMEOUT_S
from .guard import RequestGuard
from .images import ImagePolicy
from .memory import DEFAULT_TRIM_INTERVAL_S, trim_while_busy
from .metrics import Metrics
from .responses import (SSE_DONE, cached_tokens, chunk, failed_output, finished_completion, grounding_field, new_id,
    sse, stop_ids, usage)
from .schema import ChatRequest, parse_chat_request, parse_json
from .submit import Submission, submit

log = logging.getLogger("dsvl2.server")

DEFAULT_MAX_QUEUE = 64
DEFAULT_MAX_BODY_BYTES = 64 << 20  # base64 inflates images by 4/3: room for a few big photos
PREP_WORKERS = 2
FETCH_WORKERS = 8  # image fetches at once (each holds at most --fetch-timeout and max_image_bytes)
_DISCONNECT_POLL_S = 0.5
_LOADING_RETRY_S = 5

ModelSource = Union[VLModel, Callable[[], VLModel]]


def error_response(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


class ServerState:
    """Settings, the model (once loaded), metrics and the requests in flight of one app."""

    def __init__(self, model: ModelSource, *, served_model_name: str, api_key: str | None, max_queue: int,
                 policy: ImagePolicy, max_body_bytes: int, chunk_size: int | None,
                 on_load_error: Callable[[BaseException], None] | None):
        if max_queue < 1:
            raise ValueError(f"max_queue must be >= 1, got {max_queue}")
        is_model = hasattr(model, "driver")
        self.model: VLModel | None = model if is_model else None
        self.loader = None if is_model else model
        self.load_error: str | None = None
        self.on_load_error = on_load_error
        self.served_model_name = served_model_name
        self.api_key = api_key.encode() if api_key else None
        self.max_queue = max_queue
        self.policy = policy
        self.max_body_bytes = max_body_bytes
        self.chunk_size = chunk_size
        self.metrics = Metrics()
        self.created = int(time.time())
        self.preparing = 0  # requests (choices) in the worker pool, not yet on the driver
        self.runs: set[Run] = set()
        self.pool: ThreadPoolExecutor | None = None
        self.fetch_pool: ThreadPoolExecutor | None = None
        self.load_thread: threading.Thread | None = None
        self.requests_received = 0  # chat requests, any outcome (memory.py: work since the last trim)
        self.trim_interval_s: float | None = DEFAULT_TRIM_INTERVAL_S
        self.trim_task: asyncio.Task | None = None

    # ---- lifecycle ----------------------------------------------------------------------
    def start(self) -> None:
        """Called on the server's event loop (the app's lifespan)."""
        self.pool = ThreadPoolExecutor(PREP_WORKERS, thread_name_prefix="dsvl2-prep")
        self.fetch_pool = ThreadPoolExecutor(FETCH_WORKERS, thread_name_prefix="dsvl2-fetch")
        if self.model is None and self.loader is not None:
            self.load_thread = threading.Thread(target=self._load, name="dsvl2-load", daemon=True)
            self.load_thread.start()
        # freed memory back to the OS while there is work (memory.py)
        activity = lambda: (self.requests_received, bool(self.runs or self.preparing))  # noqa: E731
        self.trim_task = asyncio.get_running_loop().create_task(trim_while_busy(self.trim_interval_s or 0, activity))

    def _load(self) -> None:
        t0 = time.perf_counter()
        try:
            self.model = self.loader()
        except BaseException as e:  # reported through /health and on_load_error
            self.load_error = str(e) or type(e).__name__
            log.error("loading the model failed: %s", self.load_error)
            if self.on_load_error is not None:
                self.on_load_error(e)
            return
        log.info("model loaded in %.1f s; serving it as %r", time.perf_counter() - t0, self.served_model_name)

    def stop(self) -> None:
        if self.trim_task is not None:
            self.trim_task.cancel()
        for run in list(self.runs):
            run.close()
        for pool in (self.pool, self.fetch_pool):
            if pool is not None:
                pool.shutdown(wait=False, cancel_futures=True)

    # ---- checks -------------------------------------------------------------------------
    def check_auth(self, request: Request) -> None:
        if self.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key):
            what = "missing" if not token else "invalid"
            raise APIError(401, f"{what} API key: send the header 'Authorization: Bearer <key>' with the key the "
                           "server was started with (--api-key)", code="invalid_api_key",
                           headers={"WWW-Authenticate": "Bearer"})

    def require_model(self) -> VLModel:
        if self.model is not None:
            return self.model
        if self.load_error is not None:
            raise APIError(503, f"the model could not be loaded: {self.load_error}", code="model_load_failed")
        raise APIError(503, "the model is still loading; retry in a few seconds", code="model_loading",
                       headers={"Retry-After": str(_LOADING_RETRY_S)})

    def check_queue(self, model: VLModel, n: int) -> None:
        """429 if ``n`` more requests would leave more than ``max_queue`` waiting for a slot.
        Requests being prepared count as waiting unless a free slot awaits them, so a burst
        on an idle server is not refused."""
        stats = model.driver.stats()
        free = stats["slots_total"] - stats["slots_in_use"]
        ahead = model.driver.pending() + self.preparing  # they take the free slots first
        if ahead + n - free <= self.max_queue:
            return
        waiting = max(0, ahead - free)
        mean = self.metrics.mean_duration or 1.0
        retry = max(1, min(600, math.ceil(mean * math.ceil((waiting + n) / max(1, stats["slots_total"])))))
        raise APIError(429, f"the server is busy: {waiting} requests are already waiting for a slot (at most "
                       f"{self.max_queue}, --max-queue); retry in about {retry} s", code="queue_full",
                       headers={"Retry-After": str(retry)})

    def is_demo(self) -> bool:
        folder = getattr(self.model, "folder", None)
        return folder is not None and Path(folder).resolve() == DEMO.resolve()


def check_content_type(request: Request) -> None:
    """``application/json`` only (parameters such as charset allowed). A page of any
    origin may POST text/plain, form or multipart bodies without a CORS preflight, and
    curl -d sends a form type; only JSON proves a client that meant to call this API
    (a browser must ask first, and a foreign page is refused then)."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype != "application/json":
        shown = f"Content-Type {ctype!r} is" if ctype else "a body without a Content-Type is"
        raise APIError(415, f"{shown} not accepted; send the JSON body with 'Content-Type: application/json' "
                       "(curl: -H 'Content-Type: application/json')", code="unsupported_media_type")


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 beyond ``limit`` bytes. An over-long body is read on and
    thrown away up to twice the limit, so that the client, still sending, gets to read the
    413 (a connection closed on unread data is reset); beyond that the connection is dropped."""
    declared = request.headers.get("content-length", "")
    parts, size = [], 0
    if not (declared.isdigit() and int(declared) > 2 * limit):
        async for piece in request.stream():
            size += len(piece)
            if size > 2 * limit:
                break
            if size <= limit:
                parts.append(piece)
    if size > limit or (declared.isdigit() and int(declared) > limit):
        shown = declared if declared.isdigit() else f"more than {limit}"
        raise APIError(413, f"the request body has {shown} bytes; at most {limit} are allowed",
                       code="request_too_large")
    return b"".join(parts)


class EventStream(StreamingResponse):
    """A server-sent-event response that always calls ``on_close`` when it ends, however
    it ends (finished, client gone, server shutting down)."""

    def __init__(self, content, on_close: Callable[[], None]):
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


class Run:
    """One accepted chat request: its handles, the events read so far, its metrics."""

    def __init__(self, state: ServerState, model: VLModel, req: ChatRequest, sub: Submission, sink: AsyncSink,
                 received: float):
        self.state, self.model, self.req, self.sub, self.sink = state, model, req, sub, sink
        self.received = received
        self.rid = new_id()
        self.created = int(time.time())
        self.outputs: dict = {}
        self.done = False
        self.next_check = time.monotonic() + _DISCONNECT_POLL_S
        # ids that end an answer without being text (no logprobs entry)
        self.stops = stop_ids(model, req)
        state.runs.add(self)

    # ---- ending -------------------------------------------------------------------------
    def _end(self, outcome: str) -> None:
        if self.done:
            return
        self.done = True
        self.state.runs.discard(self)
        hs = self.sub.handles
        stamps = [list(h.req.timings.token_times) for h in hs]
        firsts = [s[0] for s in stamps if s]
        ends = [h.req.timings.finished for h in hs]
        end = max(ends) if all(e is not None for e in ends) else time.perf_counter()
        self.state.metrics.finished(
            outcome, self.sub.prompt_tokens * len(hs), sum(len(s) for s in stamps),
            min(firsts) - self.received if firsts else None,
            [b - a for s in stamps for a, b in zip(s, s[1:])], end - self.received)

    def close(self) -> None:
        """The response ended before the answer did (client gone, shutdown): free the slots."""
        if not self.done:
            self.model.driver.cancel([h for h in self.sub.handles if not h.finished])
            self._end("cancelled")

    def _outcome(self) -> str:
        return "length" if any(o.finish_reason == "length" for o in self.outputs.values()) else "stop"

    def _failure(self) -> APIError | None:
        bad = failed_output(self.outputs.values())
        if bad is None:
            return None
        self.model.driver.cancel([h for h in self.sub.handles if not h.finished])
        self._end("error")
        if bad.finish_reason == "cancelled":
            return APIError(503, "the request was cancelled because the server is shutting down")
        log.error("generation failed: %s", bad.error)
        return APIError(500, f"generation failed: {bad.error}", code="generation_failed")

    # ---- reading events -----------------------------------------------------------------
    async def _next_or_gone(self, request: Request, pending: list):
        """The next event, or None once the (non-streaming) client has disconnected. The
        connection is looked at every ``_DISCONNECT_POLL_S`` whether events flow or not."""
        while True:
            now = time.monotonic()
            if now >= self.next_check:
                self.next_check = now + _DISCONNECT_POLL_S
                if await request.is_disconnected():
                    return None
            if not pending:
                pending.append(asyncio.ensure_future(self.sink.get()))
            done, _ = await asyncio.wait(pending, timeout=_DISCONNECT_POLL_S)
            if done:
                return pending.pop().result()

    async def collect(self, request: Request) -> Response:
        pending: list = []
        try:
            while len(self.outputs) < self.req.n:
                ev = await self._next_or_gone(request, pending)
                if ev is None:
                    return Response(status_code=499)  # nobody reads it; the slots are freed below
                if ev.output is not None:
                    self.outputs[ev.index] = ev.output
            failure = self._failure()
            if failure is not None:
                return error_response(failure)
            body = finished_completion(self.rid, self.state.served_model_name, self.model, self.sub, self.outputs,
                                       self.stops)
            self._end(self._outcome())
            return JSONResponse(body)
        finally:
            for f in pending:
                f.cancel()
            self.close()

    async def events(self):
        name, extra = self.state.served_model_name, ({"usage": None} if self.req.include_usage else {})

        def piece(index: int, delta: dict, finish: str | None = None, logprobs=None, **more) -> str:
            return sse(chunk(self.rid, name, self.created, index, delta, finish, logprobs, **extra, **more))

        lps = None  # per choice: the logprobs entries to send with each chunk (structured.LogprobStream)
        if self.req.logprobs:
            lps = [LogprobStream(lambda h=h: h.req.logprobs, self.model.processor.tokenizer, self.stops)
                   for h in self.sub.handles]

        first = {} if self.sub.dropped_turns is None else {"dropped_turns": self.sub.dropped_turns}
        for i in range(self.req.n):
            yield piece(i, {"role": "assistant", "content": ""}, **(first if i == 0 else {}))
        while len(self.outputs) < self.req.n:
            ev = await self.sink.get()
            entries = None if lps is None else lps[ev.index].take(ev.delta, ev.output)
            if ev.delta:
                yield piece(ev.index, {"content": ev.delta}, logprobs=entries)
                entries = None
            if ev.output is None:
                continue
            self.outputs[ev.index] = ev.output
            failure = self._failure()
            if failure is not None:
                yield sse(failure.body())
                yield SSE_DONE
                return
            g = grounding_field(make_answer(ev.output, self.sub.images))
            yield piece(ev.index, {} if g is None else {"grounding": g}, ev.output.finish_reason, entries or None)
        self._end(self._outcome())
        if self.req.include_usage:
            done = sum(o.completion_tokens for o in self.outputs.values())
            yield sse({"id": self.rid, "object": "chat.completion.chunk", "created": self.created, "model": name,
                       "choices": [], "usage": usage(self.sub.prompt_tokens, done,
                                                     cached_tokens(self.outputs.values()))})
        yield SSE_DONE


async def _fetch_images(state: ServerState, req: ChatRequest) -> dict:
    """The request's http(s) images, fetched at once in the fetch pool: ``id(ref)`` -> bytes.
    The first failure is the request's answer; the other fetches end by their deadline."""
    refs = [r for r in req.image_refs if state.policy.fetches(r)]
    if not refs:
        return {}
    loop = asyncio.get_running_loop()
    data = await asyncio.gather(*(loop.run_in_executor(state.fetch_pool, state.policy.fetch, r) for r in refs))
    return {id(r): d for r, d in zip(refs, data)}


async def _prepare(state: ServerState, model: VLModel, req: ChatRequest, sink: AsyncSink) -> Submission:
    """Fetch (``_fetch_images``), then ``submit`` in the worker pool; if this coroutine is
    cancelled meanwhile, whatever the worker queues is cancelled as soon as it is queued."""
    loop = asyncio.get_running_loop()
    fut = None
    state.preparing += req.n
    try:
        fetched = await _fetch_images(state, req)
        fut = loop.run_in_executor(state.pool, functools.partial(submit, model, req, state.policy, sink,
                                                                 state.chunk_size, fetched))
        return await asyncio.shield(fut)
    except asyncio.CancelledError:
        if fut is not None:
            fut.add_done_callback(lambda f: None if f.cancelled() or f.exception()
                                  else model.driver.cancel(f.result().handles))
        raise
    finally:
        state.preparing -= req.n


async def chat_completions(state: ServerState, request: Request) -> Response:
    received = time.perf_counter()
    state.requests_received += 1
    try:
        state.check_auth(request)
        check_content_type(request)
        model = state.require_model()
        state.check_queue(model, 1)
        req = parse_chat_request(parse_json(await read_body(request, state.max_body_bytes)))
        if req.model is not None and req.model != state.served_model_name:
            raise APIError(404, f"the model {req.model!r} is not served here; this server serves "
                           f"{state.served_model_name!r}", param="model", code="model_not_found")
        state.check_queue(model, req.n)
        sink = AsyncSink()
        sub = await _prepare(state, model, req, sink)
    except APIError as e:
        state.metrics.refused(e.status)
        return error_response(e)
    except DSVL2Error as e:
        err = from_dsvl2(e)
        state.metrics.refused(err.status)
        return error_response(err)
    except Exception:
        log.exception("unexpected error while preparing a request")
        state.metrics.refused(500)
        return error_response(APIError(500, "internal server error (the server log has the details)"))
    run = Run(state, model, req, sub, sink, received)
    if req.stream:
        return EventStream(run.events(), on_close=run.close)
    return await run.collect(request)


def create_app(model: ModelSource, *, served_model_name: str, api_key: str | None = None,
               max_queue: int = DEFAULT_MAX_QUEUE, allow_fetch: bool = False, allow_fetch_private: bool = False,
               fetch_timeout_s: float = DEFAULT_TIMEOUT_S,
               allowed_local_dir: str | Path | None = None, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
               max_image_pixels: int | None = None, chunk_size: int | None = None,
               allowed_hosts: Iterable[str] = (), allowed_origins: Iterable[str] = (),
               on_load_error: Callable[[BaseException], None] | None = None,
               memory_trim_s: float | None = DEFAULT_TRIM_INTERVAL_S) -> FastAPI:
    """The server for ``model``: a loaded ``VLModel``, or a function that loads one (called
    in a background thread at startup; requests get 503 until it returns).
    ``memory_trim_s``: seconds between two returns of freed memory to the OS while there is
    work (``memory.py``; 0 / None: never).
    ``allowed_hosts`` / ``allowed_origins``: beyond loopback names and the server's own
    origin (``guard.py``); ``allow_fetch_private``, ``fetch_timeout_s``: ``fetch.py``."""
    if not fetch_timeout_s > 0:
        raise ValueError(f"fetch_timeout_s must be > 0, got {fetch_timeout_s}")
    policy = ImagePolicy(allow_fetch=allow_fetch, allow_fetch_private=allow_fetch_private,
                         fetch_timeout_s=fetch_timeout_s,
                         allowed_local_dir=None if allowed_local_dir is None else Path(allowed_local_dir))
    if max_image_pixels is not None:
        policy.max_image_pixels = max_image_pixels
    state = ServerState(model, served_model_name=served_model_name, api_key=api_key, max_queue=max_queue,
                        policy=policy, max_body_bytes=max_body_bytes, chunk_size=chunk_size,
                        on_load_error=on_load_error)
    state.trim_interval_s = memory_trim_s

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state.start()
        yield
        state.stop()

    app = FastAPI(title="dsvl2", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.dsvl2 = state
    allowed_hosts, allowed_origins = list(allowed_hosts), list(allowed_origins)
    RequestGuard(None, allowed_hosts=allowed_hosts, allowed_origins=allowed_origins)  # a bad entry: ValueError now
    app.add_middleware(RequestGuard, allowed_hosts=allowed_hosts, allowed_origins=allowed_origins)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(APIError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}",
                                       headers=getattr(exc, "headers", None)))

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        return error_response(exc)

    @app.post("/v1/chat/completions")
    async def _chat(request: Request) -> Response:
        return await chat_completions(state, request)

    def model_card() -> dict:
        m = state.model
        stats = m.driver.stats()  # the KV budget: its capacity in bytes and tokens per block
        return {"id": state.served_model_name, "object": "model", "created": state.created, "owned_by": "dsvl2",
                "max_model_len": m.engine.context_window,
                "dsvl2": {"context_window": m.engine.context_window, "max_batch_size": m.engine.max_batch_size,
                          "demo": state.is_demo(), "max_queue": state.max_queue,
                          "kv_cache_bytes": stats.get("kv_cache_bytes_capacity"),
                          "kv_block_size": stats.get("kv_block_size")}}

    @app.get("/v1/models")
    async def _models(request: Request) -> dict:
        state.check_auth(request)
        state.require_model()
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def _model(model_id: str, request: Request) -> dict:
        state.check_auth(request)
        state.require_model()
        if model_id != state.served_model_name:
            raise APIError(404, f"the model {model_id!r} is not served here; this server serves "
                           f"{state.served_model_name!r}", param="model", code="model_not_found")
        return model_card()

    @app.get("/health")
    async def _health() -> JSONResponse:
        if state.model is not None:
            return JSONResponse({"status": "ok", "model": state.served_model_name})
        if state.load_error is not None:
            return JSONResponse({"status": "error", "error": state.load_error}, status_code=503)
        return JSONResponse({"status": "loading"}, status_code=503, headers={"Retry-After": str(_LOADING_RETRY_S)})

    @app.get("/metrics")
    async def _metrics() -> PlainTextResponse:
        stats = state.model.driver.stats() if state.model is not None else None
        return PlainTextResponse(state.metrics.render(stats), media_type="text/plain; version=0.0.4; charset=utf-8")

    from ..web import mount as mount_web  # the browser chat page at /: a client of this same API

    mount_web(app)
    return app
