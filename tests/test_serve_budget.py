"""The real ``dsvl2 serve`` under a KV budget far below what its clients want at once.

``python -m dsvl2 serve -m demo --dtype float32 --kv-cache-bytes 1.5MiB`` (a subprocess on
127.0.0.1): a one-image prompt of the demo model is ~1.4k tokens and the pool holds ~3.2k,
so of 16 concurrent streaming clients (one or two images each, ``max_tokens`` 64) at most
two hold blocks at a time: the others queue, and running ones are preempted and
recomputed. Every answer must equal the same request sent alone (greedy, float32), the
KV high-water mark must stay within the capacity, nothing may fail; a request larger
than the whole budget is a 400. Then the same photo asked about by 8 clients, one after
another and then 8 at once: every request after the first reuses the image's blocks
(``cached_tokens``) and the vision tower encodes it once.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

import torch
from PIL import Image

from test_server import assert_openai_error, gauge, png_url, post, serve_command, user, wait_for
from _paths import IMAGES

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]
FOOD, DOG = IMAGES / "multi_image_2.jpeg", IMAGES / "visual_grounding_2.jpg"


@pytest.fixture(scope="module")
def server():
    with serve_command("-m", "demo", "--dtype", "float32", "--kv-cache-bytes", "1.5MiB", "--log-level", "warning",
                       what="dsvl2 serve --kv-cache-bytes 1.5MiB") as srv:
        yield srv
    assert srv.rc == 0 and "Traceback" not in srv.err, srv.err


def stream_text(client: openai.OpenAI, messages: list[dict], max_tokens: int = 64) -> tuple[str, str, object]:
    text, finish, usage = "", None, None
    for chunk in client.chat.completions.create(model="demo", messages=messages, max_tokens=max_tokens,
                                                stream=True, stream_options={"include_usage": True}):
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
            finish = chunk.choices[0].finish_reason or finish
        if chunk.usage is not None:
            usage = chunk.usage
    return text, finish, usage


def photo(i: int) -> dict:
    """A photo of its own for client i (no two clients share image blocks)."""
    g = torch.Generator().manual_seed(i)
    img = Image.fromarray((torch.rand(300, 450, 3, generator=g) * 255).to(torch.uint8).numpy())
    return {"type": "image_url", "image_url": {"url": png_url(img)}}


def test_sixteen_clients_on_a_small_budget_answer_as_alone(server):
    requests = [[{"role": "user", "content": [photo(i)] + ([photo(100 + i)] if i % 2 else []) +
                  [{"type": "text", "text": f"Describe picture {i}."}]}] for i in range(16)]
    capacity = gauge(server.metrics(), "dsvl2_kv_cache_bytes_capacity")
    assert 1.4 * 2 ** 20 < capacity <= 1.5 * 2 ** 20
    alone = [server.client.chat.completions.create(model="demo", messages=m, max_tokens=64).choices[0].message.content
             for m in requests]  # one at a time: nothing queues, nothing is preempted
    m0 = server.metrics()
    waiting, done = [], threading.Event()

    def watch():  # how many wait for blocks while the 16 run
        while not done.is_set():
            waiting.append(gauge(server.metrics(), "dsvl2_requests_waiting"))
            time.sleep(0.05)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        with ThreadPoolExecutor(16) as pool:
            got = list(pool.map(lambda m: stream_text(server.client, m), requests))
    finally:
        done.set()
        watcher.join()
    m1 = server.metrics()
    for want, (text, finish, usage) in zip(alone, got):
        assert text == want and finish in ("stop", "length") and usage.completion_tokens > 0
    assert gauge(m1, "dsvl2_kv_cache_bytes_peak") <= capacity
    # the pool holds two of them at a time: the others waited (or were preempted), none failed
    assert max(waiting) >= 8 or gauge(m1, "dsvl2_preemptions_total") > gauge(m0, "dsvl2_preemptions_total")
    assert m1[("dsvl2_requests_total", (("outcome", "error"),))] == m0[("dsvl2_requests_total", (("outcome", "error"),))]
    wait_for(lambda: gauge(server.metrics(), "dsvl2_kv_cache_bytes_used") == 0, "every block to be given back")


def test_a_request_larger_than_the_whole_budget_is_a_400(server):
    r = post(server.url, {"messages": [user("Compare them.", FOOD, DOG)], "max_tokens": 4000})
    err = assert_openai_error(r, 400)
    assert "KV cache" in err["message"] and "max_new_tokens 4000" in err["message"]


def test_one_photo_for_eight_clients_is_encoded_once(server):
    question = [[user(f"What is in this photo? Answer {i}.", DOG)] for i in range(16)]
    m0 = server.metrics()
    first = server.client.chat.completions.create(model="demo", messages=question[0], max_tokens=8)
    tiles = gauge(server.metrics(), "dsvl2_vision_tiles_total") - gauge(m0, "dsvl2_vision_tiles_total")
    assert tiles > 0
    prompt = first.usage.prompt_tokens
    image_end = prompt - 16  # the question and the template's tail after the image: < 16 tokens here
    for m in question[1:8]:  # one after another
        r = server.client.chat.completions.create(model="demo", messages=m, max_tokens=8)
        assert r.usage.prompt_tokens_details.cached_tokens >= image_end
    with ThreadPoolExecutor(8) as pool:  # eight at once
        outs = list(pool.map(lambda m: stream_text(server.client, m, 8), question[8:]))
    for _, _, usage in outs:
        assert usage.prompt_tokens_details.cached_tokens >= image_end
    grown = gauge(server.metrics(), "dsvl2_vision_tiles_total") - gauge(m0, "dsvl2_vision_tiles_total")
    assert grown == tiles  # one image's tiles for 16 requests
