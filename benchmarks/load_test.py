"""``dsvl2 serve`` under load and faults: nothing lost, nothing mixed up, no 5xx, flat memory.
Prints ONE JSON object on stdout (progress on stderr); exit status 0 only if the run is clean.

    python benchmarks/load_test.py                        # 32 clients for 300 s, the demo model
    python benchmarks/load_test.py --clients 8 --duration 30
    python benchmarks/load_test.py --clients 16 --duration 60 --mix two-images   # only 2-image requests

The server is the real command (``python -m dsvl2 serve -m demo --dtype float32``) in a
subprocess on a port the OS picks on 127.0.0.1 (read back from its start line); the
clients are asyncio + httpx tasks in this process, loopback only, each bounded in time.

What runs (a fixed set of distinct greedy requests: text, 1 image, 2 images, grounding
prompts; each client picks one at random and streams it or not):

1. Expected answers: every distinct request sent ALONE to the same server (greedy), so
   any later answer can be compared with it. Then a warm-up round (four requests per
   batch slot and queue place, all slots busy at once) so that the KV-cache blocks
   and allocator arenas have been used before the start memory is read.
2. ``--clients`` clients loop for ``--duration`` seconds. Faults, at fixed points of the
   run: a storm of ``--clients`` streams that hang up after their first token (25 %),
   a burst beyond ``--max-queue`` (50 %: 429 with ``Retry-After`` expected; clients honour
   it, capped at 2 s), and slow readers that sleep between SSE lines (70 %).
3. After the run: the server's ``/metrics`` must show 0 running / admitting / waiting, no
   batch slot and no KV-cache block in use (waited for up to 20 s: cancelled requests give
   theirs back at the driver's next step).

``--mix`` picks which of the distinct requests the clients send: ``all`` (default),
``text`` (no image), ``images`` (one or two) or ``two-images`` (only the 2-image one).

Figures: ``completed`` (answers equal to the alone answer), ``errors`` (by HTTP status),
``lost`` (no answer: connection error or timeout, or a stream cut without ``[DONE]``),
``mixed`` (an answer that differs from the alone one), ``status_5xx``, time to first
token (p50 / p99, streaming requests, client side), the server's VmRSS after warm-up and
at the end (``/proc/PID/status``), both read after ``--settle`` idle seconds (the server
hands its allocator's free memory back to the OS while it works and a few seconds after:
``dsvl2 serve --memory-trim-interval``), ``load_max`` (the highest sample while the load
ran), the stuck-slot check, and ``rss_curve``: the server's RSS every ``--rss-every``
seconds from the end of the warm-up to the end reading (``[seconds since the load
started, MiB]``; negative: before it). Exit status 0 iff lost, mixed
and 5xx are 0, the end RSS is within 10 % of the start and no slot is stuck.

Notable choices: float32 weights, so that KV blocks shared between requests hold what a
fresh prefill computes (in bf16 a reused block may differ in the last bits, README
"Memory") and the comparison with the alone answer is exact; ``--max-queue`` defaults to ``--clients`` so
that the main load never waits beyond it but the burst does.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import httpx
import numpy as np
from PIL import Image

REQUEST_TIMEOUT_S = 120.0  # any single read; a request that takes longer counts as lost
RETRY_AFTER_CAP_S = 2.0


def log(msg: str) -> None:
    print(f"[load_test {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- requests


def _png(img: Image.Image) -> dict:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()}}


def _images() -> tuple[dict, dict]:
    rng = np.random.default_rng(0)
    a = Image.fromarray(rng.integers(0, 256, (150, 200, 3), dtype=np.uint8))
    b = Image.new("RGB", (320, 240), (30, 120, 200))
    b.paste((230, 20, 20), (100, 60, 220, 180))
    return _png(a), _png(b)


MIXES = {"all": None, "text": (0, 1, 7), "images": (2, 3, 4, 5, 6), "two-images": (4,)}


def distinct_requests(max_tokens: int, mix: str = "all") -> list[dict]:
    """The distinct request bodies (greedy); ``stream`` is chosen per send."""
    a, b = _images()

    def text(t: str) -> dict:
        return {"type": "text", "text": t}

    convs = [
        [{"role": "user", "content": "Hello! Who are you?"}],
        [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Write a haiku about rivers."}],
        [{"role": "user", "content": [a, text("Describe this image.")]}],
        [{"role": "user", "content": [b, text("What colour is the square?")]}],
        [{"role": "user", "content": [a, b, text("Compare these two images.")]}],
        [{"role": "user", "content": [b, text("<|grounding|>Find <|ref|>the red square<|/ref|>.")]}],
        [{"role": "user", "content": [a, text("<|grounding|>Locate <|ref|>the noise<|/ref|> in the image.")]}],
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
         {"role": "user", "content": "Count to ten."}],
    ]
    keep = MIXES[mix]
    return [{"model": "demo", "messages": m, "temperature": 0, "max_tokens": max(1, max_tokens - max_tokens // 4 * (i % 3))}
            for i, m in enumerate(convs) if keep is None or i in keep]


# ----------------------------------------------------------------------------- the server


class Server:
    """``python -m dsvl2 serve`` on 127.0.0.1, port chosen by the OS."""

    def __init__(self, args):
        cmd = [sys.executable, "-m", "dsvl2", "serve", "-m", "demo", "--host", "127.0.0.1", "--port", "0",
               "--dtype", "float32", "--max-batch-size", str(args.max_batch_size),
               "--max-queue", str(args.max_queue), "--log-level", "warning", *args.server_arg]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True, env=env)
        self.tail: list[str] = []
        found = threading.Event()
        self.url = None

        def drain():  # keep the pipe empty (a full pipe would block the server's logging)
            for line in self.proc.stderr:
                self.tail = (self.tail + [line.rstrip()])[-40:]
                m = re.search(r"on (http://127\.0\.0\.1:\d+)", line)
                if m and self.url is None:
                    self.url = m.group(1)
                    found.set()
            found.set()

        threading.Thread(target=drain, daemon=True).start()
        if not found.wait(120) or self.url is None:
            self.stop()
            raise SystemExit("the server did not start:\n" + "\n".join(self.tail))
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.url + "/health", timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None:
                break
            time.sleep(0.2)
        self.stop()
        raise SystemExit("the server never became healthy:\n" + "\n".join(self.tail))

    def rss_kib(self) -> int:
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        raise RuntimeError("no VmRSS")

    def sample_rss(self, every: float) -> "RSSCurve":
        """Start sampling this server's RSS every ``every`` seconds (in a thread)."""
        return RSSCurve(self, every)

    def metrics(self) -> dict[str, float]:
        text = httpx.get(self.url + "/metrics", timeout=10).text
        out = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                out[name] = float(value)
        return out

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode


class RSSCurve:
    """The server's VmRSS every ``every`` seconds: ``points`` = [(monotonic time, KiB)]."""

    def __init__(self, server: Server, every: float):
        self.server, self.every = server, every
        self.points: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            try:
                self.points.append((time.monotonic(), self.server.rss_kib()))
            except (OSError, RuntimeError):  # the server has gone
                return
            if self._stop.wait(self.every):
                return

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def curve(self, t0: float) -> list[list[float]]:
        """[[seconds since t0, MiB], ...]."""
        return [[round(t - t0, 1), round(k / 1024, 1)] for t, k in self.points]


# ----------------------------------------------------------------------------- clients


@dataclass
class Tally:
    completed: int = 0
    mixed: int = 0
    lost: int = 0
    errors: Counter = field(default_factory=Counter)
    retry_after_missing: int = 0
    ttft: list = field(default_factory=list)
    by_phase: Counter = field(default_factory=Counter)
    disconnects: int = 0
    mixed_examples: list = field(default_factory=list)
    lost_examples: list = field(default_factory=list)


async def send(client: httpx.AsyncClient, body: dict, stream: bool, *, slow_s: float = 0.0,
               hang_up_after: int | None = None) -> tuple[str, object, float | None]:
    """One request -> (kind, value, ttft): ("ok", text) | ("status", (code, headers)) |
    ("lost", why) | ("hung_up", None)."""
    t0 = time.perf_counter()
    if not stream:
        try:
            r = await client.post("/v1/chat/completions", json=body)
        except (httpx.HTTPError, OSError) as e:
            return "lost", f"{type(e).__name__}: {e}", None
        if r.status_code != 200:
            return "status", (r.status_code, r.headers), None
        try:
            return "ok", r.json()["choices"][0]["message"]["content"], None
        except (ValueError, KeyError, IndexError) as e:
            return "lost", f"bad body {e}: {r.text[:200]}", None
    text, ttft, seen = "", None, 0
    try:
        async with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
            if r.status_code != 200:
                await r.aread()
                return "status", (r.status_code, r.headers), None
            async for line in r.aiter_lines():
                if not line:
                    continue
                if line == "data: [DONE]":
                    return "ok", text, ttft
                if not line.startswith("data: "):
                    return "lost", f"not an SSE line: {line[:100]!r}", ttft
                c = json.loads(line[6:])
                if "error" in c:
                    return "status", (500, {}), ttft
                delta = "".join(ch["delta"].get("content", "") for ch in c["choices"])
                if delta:
                    text += delta
                    seen += 1
                    if ttft is None:
                        ttft = time.perf_counter() - t0
                    if hang_up_after is not None and seen >= hang_up_after:
                        return "hung_up", None, ttft  # leaving the block closes the connection
                if slow_s:
                    await asyncio.sleep(slow_s)
        return "lost", "the stream ended without [DONE]", ttft
    except (httpx.HTTPError, OSError, ValueError) as e:
        return "lost", f"{type(e).__name__}: {e}", ttft


def record(t: Tally, phase: str, expected: str, kind: str, value, ttft) -> float:
    """Count one outcome; returns how long the client should wait before its next request."""
    t.by_phase[phase] += 1
    if ttft is not None:
        t.ttft.append(ttft)
    if kind == "ok":
        if value == expected:
            t.completed += 1
        else:
            t.mixed += 1
            t.mixed_examples = (t.mixed_examples + [{"expected": expected[:80], "got": value[:80]}])[:5]
    elif kind == "status":
        code, headers = value
        t.errors[str(code)] += 1
        if code == 429:
            ra = headers.get("retry-after", "")
            if not ra.isdigit():
                t.retry_after_missing += 1
                return RETRY_AFTER_CAP_S
            return min(int(ra), RETRY_AFTER_CAP_S)
    elif kind == "hung_up":
        t.disconnects += 1
    else:
        t.lost += 1
        t.lost_examples = (t.lost_examples + [f"{phase}: {value}"])[:5]
    return 0.0


async def client_loop(client, reqs, expected, t: Tally, end: float, seed: int, phase: str = "main",
                      slow_s: float = 0.0) -> None:
    rng = random.Random(seed)
    while time.monotonic() < end:
        i = rng.randrange(len(reqs))
        kind, value, ttft = await send(client, reqs[i], rng.random() < 0.6, slow_s=slow_s)
        wait = record(t, phase, expected[i], kind, value, ttft)
        if wait:
            await asyncio.sleep(wait)


async def storm(client, reqs, expected, t: Tally, n: int, seed: int) -> None:
    rng = random.Random(seed)
    picks = [rng.randrange(len(reqs)) for _ in range(n)]
    outs = await asyncio.gather(*(send(client, reqs[i], True, hang_up_after=1 + k % 3) for k, i in enumerate(picks)))
    for i, (kind, value, ttft) in zip(picks, outs):
        # a storm client that got its whole answer before hanging up is checked like any other
        record(t, "storm", expected[i], kind, value, None)


async def burst(client, reqs, expected, t: Tally, n: int, seed: int) -> None:
    rng = random.Random(seed)
    picks = [rng.randrange(len(reqs)) for _ in range(n)]
    outs = await asyncio.gather(*(send(client, reqs[i], False) for i in picks))
    for i, (kind, value, ttft) in zip(picks, outs):
        record(t, "burst", expected[i], kind, value, ttft)


async def at(delay: float, coro) -> None:
    await asyncio.sleep(delay)
    await coro


async def load(url: str, args, reqs: list[dict], expected: list[str]) -> Tally:
    t = Tally()
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=0)
    timeout = httpx.Timeout(REQUEST_TIMEOUT_S, connect=30.0)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=timeout) as client:
        t0 = time.monotonic()
        end = t0 + args.duration
        d = args.duration
        n_burst = args.max_batch_size + args.max_queue + args.clients
        tasks = [client_loop(client, reqs, expected, t, end, seed=k) for k in range(args.clients)]
        tasks += [at(0.25 * d, storm(client, reqs, expected, t, args.clients, seed=1001)),
                  at(0.5 * d, burst(client, reqs, expected, t, n_burst, seed=1002))]
        slow_end = t0 + min(d, 0.7 * d + max(10.0, 0.15 * d))
        tasks += [at(0.7 * d, client_loop(client, reqs, expected, t, slow_end, seed=2000 + k, phase="slow",
                                          slow_s=0.05)) for k in range(max(2, args.clients // 4))]
        # a hard bound: every task ends by itself (timeouts), this only guards against a bug
        await asyncio.wait_for(asyncio.gather(*tasks), d + 4 * REQUEST_TIMEOUT_S)
    return t


def alone(url: str, reqs: list[dict]) -> list[str]:
    out = []
    with httpx.Client(base_url=url, timeout=REQUEST_TIMEOUT_S) as c:
        for body in reqs:
            r = c.post("/v1/chat/completions", json=body)
            if r.status_code != 200:
                raise SystemExit(f"a request alone was refused ({r.status_code}): {r.text[:300]}")
            out.append(r.json()["choices"][0]["message"]["content"])
    return out


def pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return round(xs[min(len(xs) - 1, int(q * len(xs)))], 4)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=float, default=300.0, help="seconds of load (default 300)")
    p.add_argument("--clients", type=int, default=32, help="concurrent clients (default 32)")
    p.add_argument("--max-batch-size", type=int, default=16, help="the server's batch slots (default 16)")
    p.add_argument("--max-queue", type=int, default=None, help="the server's --max-queue (default: --clients)")
    p.add_argument("--max-tokens", type=int, default=32, help="max_tokens of the longest requests (default 32)")
    p.add_argument("--warm-up", type=int, default=0, metavar="N",
                   help="requests of the warm-up round (default 4 x (max batch size + max queue))")
    p.add_argument("--mix", choices=list(MIXES), default="all",
                   help="which requests the clients send: all, text (no image), images (1 or 2), two-images")
    p.add_argument("--rss-every", type=float, default=5.0, metavar="S",
                   help="sample the server's RSS every S seconds for rss_curve (default 5)")
    p.add_argument("--server-arg", action="append", default=[], metavar="ARG",
                   help="one more argument for dsvl2 serve, e.g. --server-arg=--memory-trim-interval=0 (repeatable)")
    p.add_argument("--settle", type=float, default=8.0, metavar="S",
                   help="idle seconds before the start and the end RSS are read (default 8)")
    args = p.parse_args(argv)
    if args.duration <= 0 or args.clients < 1 or args.rss_every <= 0 or args.settle < 0:
        p.error("--duration and --rss-every must be > 0, --settle >= 0 and --clients >= 1")
    args.max_queue = args.max_queue or args.clients

    log(f"starting the server (max batch {args.max_batch_size}, max queue {args.max_queue})")
    server = Server(args)
    try:
        reqs = distinct_requests(args.max_tokens, args.mix)
        t = time.perf_counter()
        expected = alone(server.url, reqs)
        log(f"{len(reqs)} expected answers, alone, in {time.perf_counter() - t:.1f} s")
        again = alone(server.url, reqs)  # the same server, once more: the answer must be stable
        if again != expected:
            log("WARNING: the alone answers are not reproducible")
        warm = Tally()

        async def warm_up():
            # every row busy at once (rows + queue in flight: no 429), twice over
            gate = asyncio.Semaphore(args.max_batch_size + args.max_queue - 1)

            async def one(c, k):
                async with gate:
                    out = await send(c, reqs[k % len(reqs)], k % 2 == 0)
                record(warm, "warm", expected[k % len(reqs)], *out[:2], None)

            n = args.warm_up or 4 * (args.max_batch_size + args.max_queue)
            async with httpx.AsyncClient(base_url=server.url, timeout=REQUEST_TIMEOUT_S,
                                         limits=httpx.Limits(max_connections=None)) as c:
                await asyncio.gather(*(one(c, k) for k in range(n)))

        asyncio.run(warm_up())
        sampler = server.sample_rss(args.rss_every)
        time.sleep(args.settle)  # idle, as at the end: the server trims its heap a few seconds after work
        rss_start = server.rss_kib()
        log(f"warm-up done ({dict(warm.by_phase)}, {warm.completed} equal, errors {dict(warm.errors)}); RSS {rss_start / 1024:.0f} MiB; "
            f"{args.clients} clients for {args.duration:.0f} s")
        t0, t0_mono = time.perf_counter(), time.monotonic()
        tally = asyncio.run(load(server.url, args, reqs, expected))
        wall = time.perf_counter() - t0
        keys = ("dsvl2_requests_running", "dsvl2_requests_admitting", "dsvl2_requests_waiting",
                "dsvl2_batch_slots_in_use", "dsvl2_kv_cache_bytes_used")
        deadline = time.monotonic() + 20
        while True:
            m = server.metrics()
            left = {k: m.get(k, -1) for k in keys}
            if all(v == 0 for v in left.values()) or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        t_drained = time.monotonic()
        time.sleep(args.settle)
        rss_end = server.rss_kib()
        sampler.stop()
        sampler.points.append((time.monotonic(), rss_end))
        outcomes = {k.split('"')[1]: int(v) for k, v in m.items() if k.startswith("dsvl2_requests_total")}
    finally:
        rc_server = server.stop()
    n5xx = sum(n for tl in (tally, warm) for code, n in tl.errors.items() if code.startswith("5"))
    growth = (rss_end - rss_start) / rss_start
    stuck = any(v != 0 for v in left.values())
    report = {
        "clients": args.clients, "duration_s": args.duration, "wall_s": round(wall, 1),
        "max_batch_size": args.max_batch_size, "max_queue": args.max_queue, "mix": args.mix,
        "server_args": args.server_arg,
        "distinct_requests": len(reqs),
        "alone_reproducible": again == expected,
        "requests_sent": sum(tally.by_phase.values()), "by_phase": dict(tally.by_phase),
        "warm_up": {"sent": warm.by_phase["warm"], "completed": warm.completed, "mixed": warm.mixed,
                    "lost": warm.lost, "errors": dict(warm.errors)},
        "completed": tally.completed, "errors": dict(tally.errors), "lost": tally.lost, "mixed": tally.mixed,
        "status_5xx": n5xx, "disconnects": tally.disconnects,
        "retry_after_missing": tally.retry_after_missing,
        "ttft_s": {"p50": pct(tally.ttft, 0.5), "p99": pct(tally.ttft, 0.99), "n": len(tally.ttft)},
        "rss_mib": {"start": round(rss_start / 1024, 1), "end": round(rss_end / 1024, 1),
                    "growth_pct": round(100 * growth, 2), "settle_s": args.settle,
                    "load_max": round(max((k for t, k in sampler.points if t0_mono <= t <= t_drained), default=0) / 1024, 1)},
        "rss_curve": sampler.curve(t0_mono), "rss_every_s": args.rss_every,
        "after": {k.replace("dsvl2_", ""): v for k, v in left.items()}, "stuck_slots": stuck,
        "server_outcomes": outcomes, "server_exit_status": rc_server,
        "mixed_examples": tally.mixed_examples, "lost_examples": tally.lost_examples,
    }
    report["ok"] = (tally.lost + warm.lost == 0 and tally.mixed + warm.mixed == 0 and n5xx == 0 and abs(growth) <= 0.10 and not stuck)
    print(json.dumps(report, indent=1))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
