"""``dsvl2 serve`` under load: tokens/s of 1, 4, 16 concurrent streaming clients. Prints ONE
JSON object on stdout (progress on stderr). Never asserted by a test.

    python benchmarks/bench_server.py                          # the demo model
    python benchmarks/bench_server.py -m /tmp/dsvl2-tiny --max-tokens 32 --clients 1,4,16

The server is the real command (``python -m dsvl2 serve``) in a subprocess on a free
loopback port, with ``--max-batch-size`` = the largest client count; the clients are
asyncio + httpx streams in this process (raw SSE, ``stream_options.include_usage`` for
the token counts). Each client sends its own text conversation (greedy, ``max_tokens``);
a warm-up request runs first. Per concurrency level:

* ``tokens_per_s``: completion tokens of all clients / wall time from the first request
  sent to the last ``[DONE]`` (admission included): the server's throughput.
* ``per_client_tokens_per_s``: mean over clients of (tokens - 1) / (last token time -
  first token time): the decode rate one user sees.
* ``ttft_s`` (p50, max): request sent -> first content chunk, client side.
* ``max_gap_s``: longest pause between two content chunks of one stream.

``stall`` (skip with ``--no-stall``): one text stream runs while a second client sends a
request with a big image (``--stall-image``, default a 1152x768 picture: 7 tiles); the
running stream's longest chunk gap after the image request is sent, against its mean
gap before (both client side). That is what the scheduler's per-step token budget and the server's off-loop image
processing keep short.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import socket
import statistics
import subprocess
import sys
import time

import httpx
from PIL import Image

PROMPTS = [
    "Tell me a story about a lighthouse keeper.", "Explain how a bicycle works.", "What is the capital of France?",
    "Describe a sunset over the sea.", "Write a poem about autumn leaves.", "How do bees make honey?",
    "Summarise the plot of a detective novel.", "What should I pack for a hiking trip?",
    "Why is the sky blue?", "Give me three ideas for dinner.", "How does a refrigerator keep food cold?",
    "Describe your favourite city.", "What makes a good friend?", "Explain rain to a child.",
    "List some uses of a paperclip.", "What happens in a volcano?",
]


def log(msg: str) -> None:
    print(f"[bench_server] {msg}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args, port: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "dsvl2", "serve", "-m", args.model, "--port", str(port), "--dtype", args.dtype,
           "--max-batch-size", str(max(args.clients)), "--max-queue", "256", "--log-level", "warning"]
    log("starting: " + " ".join(cmd))
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def wait_ready(proc: subprocess.Popen, url: str, timeout: float) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited: {proc.stderr.read()}")
        try:
            if httpx.get(url + "/health", timeout=5).status_code == 200:
                return time.monotonic() - t0
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"the server was not ready within {timeout} s")


async def one_stream(client: httpx.AsyncClient, messages: list, max_tokens: int, marks: dict | None = None) -> dict:
    body = {"messages": messages, "max_tokens": max_tokens, "stream": True, "stream_options": {"include_usage": True}}
    sent = time.perf_counter()
    stamps, tokens = [], 0
    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread())[:300]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            c = json.loads(line[6:])
            if c.get("usage"):
                tokens = c["usage"]["completion_tokens"]
            if any(ch["delta"].get("content") for ch in c["choices"]):
                stamps.append(time.perf_counter())
                if marks is not None and "first" in marks and not marks["first"].is_set():
                    marks["seen"] = len(stamps)
                    if len(stamps) >= marks["after"]:
                        marks["first"].set()
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    return {"sent": sent, "stamps": stamps, "tokens": tokens, "ttft": stamps[0] - sent if stamps else None,
            "gaps": gaps, "end": time.perf_counter()}


async def level(url: str, n: int, max_tokens: int) -> dict:
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=httpx.Limits(max_connections=n + 4)) as client:
        t0 = time.perf_counter()
        runs = await asyncio.gather(*(one_stream(client, [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
                                                 max_tokens) for i in range(n)))
        wall = time.perf_counter() - t0
    tokens = sum(r["tokens"] for r in runs)
    rates = [(r["tokens"] - 1) / (r["stamps"][-1] - r["stamps"][0]) for r in runs
             if len(r["stamps"]) > 1 and r["stamps"][-1] > r["stamps"][0]]
    ttfts = [r["ttft"] for r in runs if r["ttft"] is not None]
    return {"clients": n, "completion_tokens": tokens, "wall_s": round(wall, 3),
            "tokens_per_s": round(tokens / wall, 2),
            "per_client_tokens_per_s": round(statistics.mean(rates), 2) if rates else None,
            "ttft_s": {"p50": round(statistics.median(ttfts), 3), "max": round(max(ttfts), 3)} if ttfts else None,
            "max_gap_s": round(max((g for r in runs for g in r["gaps"]), default=0.0), 3)}


def image_url(path: str | None) -> tuple[str, tuple[int, int]]:
    if path:
        with Image.open(path) as im:
            size = im.size
        data = open(path, "rb").read()
        mime = "png" if path.lower().endswith(".png") else "jpeg"
    else:  # a 1152x768 picture: 3x2 local tiles + the global view = 7 tiles
        img = Image.radial_gradient("L").resize((1152, 768)).convert("RGB")
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=90)
        data, size, mime = buf.getvalue(), img.size, "jpeg"
    return f"data:image/{mime};base64," + base64.b64encode(data).decode(), size


async def warm_image(url: str, image: str | None) -> None:
    data, _ = image_url(image)
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        await one_stream(client, [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": data}}, {"type": "text", "text": "Warm up."}]}], 2)


async def stall(url: str, max_tokens: int, image: str | None) -> dict:
    data, size = image_url(image)
    marks = {"first": asyncio.Event(), "after": 5}
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        running = asyncio.ensure_future(one_stream(client, [{"role": "user", "content": PROMPTS[0]}], max_tokens,
                                                   marks))
        await marks["first"].wait()
        sent = time.perf_counter()
        big = await one_stream(client, [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": data}}, {"type": "text", "text": "Describe this image."}]}], 4)
        run = await running
    st = run["stamps"]
    before = [t for t in st if t < sent]
    during = [b - a for a, b in zip(st, st[1:]) if sent <= b <= big["stamps"][0]]
    # the mean, not the median: chunks read in one TCP read have ~0 gaps between them
    return {"image_px": list(size), "running_stream_tokens": run["tokens"],
            "mean_gap_before_s": round((before[-1] - before[0]) / (len(before) - 1), 4) if len(before) > 1 else None,
            "max_gap_while_image_admitted_s": round(max(during), 4) if during else None,
            "gaps_while_image_admitted": len(during),
            "image_request_ttft_s": round(big["ttft"], 3) if big["ttft"] is not None else None}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("-m", "--model", default="demo")
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    ap.add_argument("--clients", default="1,4,16", help="comma-separated concurrency levels")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--no-stall", action="store_true", help="skip the big-image stall measurement")
    ap.add_argument("--stall-image", default=None, help="image for the stall measurement (default: 1152x768)")
    ap.add_argument("--ready-timeout", type=float, default=900.0, help="seconds to wait for the model to load")
    args = ap.parse_args(argv)
    args.clients = [int(c) for c in args.clients.split(",")]
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start_server(args, port)
    try:
        ready = wait_ready(proc, url, args.ready_timeout)
        log(f"ready after {ready:.1f} s; warming up (text, then an image: the first vision call is slow)")
        asyncio.run(level(url, 1, 4))
        asyncio.run(warm_image(url, args.stall_image))
        results = []
        for n in args.clients:
            log(f"{n} concurrent client(s), {args.max_tokens} tokens each")
            results.append(asyncio.run(level(url, n, args.max_tokens)))
            log(json.dumps(results[-1]))
        out = {"model": args.model, "dtype": args.dtype, "max_tokens": args.max_tokens, "cpu_count": os.cpu_count(),
               "torch_threads_env": os.environ.get("OMP_NUM_THREADS"), "ready_s": round(ready, 1),
               "levels": results}
        if not args.no_stall:
            log("stall: a running stream while a big image request is admitted")
            out["stall"] = asyncio.run(stall(url, max(args.max_tokens, 48), args.stall_image))
        print(json.dumps(out, indent=2))
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


if __name__ == "__main__":
    main()
