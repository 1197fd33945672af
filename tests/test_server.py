"""``dsvl2 serve``: a live uvicorn server on loopback, driven by the official ``openai``
client and by raw HTTP (httpx) for what the client hides.

Conventions of this file:
* Servers run in a background thread of this process on 127.0.0.1 with a port the OS
  picked (``LiveServer``); every wait is bounded. One extra test starts the real
  ``python -m dsvl2 serve`` command in a subprocess. Tests with a live server are marked
  ``slow``; the schema, image-policy and response-builder tests are not.
* The model is the shipped demo checkpoint in the default dtype ("auto": bf16 weights);
  greedy answers of rows decoded together equal the same conversation alone in it. Its
  prefix caching is off: a repeated prompt would reuse the KV blocks its first run left
  and skip the admission work that the concurrency tests are about (and in bf16 an
  answer over reused blocks may differ from a fresh one, see engine/prefix.py). The
  cache and the KV budget are tested with the server in tests/test_server_kv.py.
* "Alone" answers are the server's own answers to one request at a time; the
  concurrency tests compare against them.
* Scripted answers (grounding): a ``use_sampler`` block (``dsvl2/engine/seams.py``) picks
  the tokens, so that the real engine emits chosen token ids; only one request runs then.
* ONE torch thread (the ``one_thread`` fixture): the demo model is tiny.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import http.server
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import openai
import pytest
import torch
import uvicorn
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

import dsvl2
from dsvl2.api import VLModel, make_answer
from dsvl2.engine.engine import GenerationOutput
from dsvl2.engine.seams import use_sampler
from dsvl2.errors import CheckpointError
from dsvl2.grounding import COORD_MAX
from dsvl2.server import create_app
from dsvl2.server.errors import APIError
from dsvl2.server.images import ImagePolicy
from dsvl2.server.responses import message
from dsvl2.server.schema import ImageRef, parse_chat_request
from _paths import IMAGES

pytestmark = pytest.mark.usefixtures("one_thread")
slow = pytest.mark.slow  # a live server (`make test-fast` leaves these out)

KEY = "sk-test-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}
FOOD = IMAGES / "multi_image_2.jpeg"     # 450x308
DOG = IMAGES / "visual_grounding_2.jpg"  # 658x621
WIDE = IMAGES / "synthetic_wide_2000x300.png"
MAX_PIXELS = 3_000_000
CAT = "<|ref|>the cat<|/ref|><|det|>[[100, 200, 500, 800]]<|/det|>"
WAIT_S = 120  # bound of every wait for the server (a hang guard)


class LiveServer:
    """uvicorn serving ``app`` on 127.0.0.1 in a daemon thread, on a port the OS chose."""

    def __init__(self, app):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.app = app
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=1))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        wait_for(lambda: self.server.started, "the server to start")

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(WAIT_S)
        assert not self.thread.is_alive()

    def client(self, **kw) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=kw.pop("api_key", KEY), max_retries=0,
                             timeout=WAIT_S, **kw)

    def metrics(self) -> dict:
        """{(sample name, labels as a tuple): value} of GET /metrics, parsed by prometheus_client."""
        text = httpx.get(self.url + "/metrics", timeout=WAIT_S).text
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for fam in text_string_to_metric_families(text) for s in fam.samples}


def wait_for(cond, what: str, timeout: float = WAIT_S):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = cond()
        if v:
            return v
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def data_url(path: Path) -> str:
    mime = {".jpg": "jpeg", ".jpeg": "jpeg", ".png": "png"}[path.suffix]
    return f"data:image/{mime};base64," + base64.b64encode(path.read_bytes()).decode()


def png_url(img: Image.Image) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def user(text: str, *images: Path) -> dict:
    parts = [{"type": "image_url", "image_url": {"url": data_url(p)}} for p in images]
    return {"role": "user", "content": parts + [{"type": "text", "text": text}] if images else text}


def outcome(m: dict, name: str) -> float:
    return m[("dsvl2_requests_total", (("outcome", name),))]


def gauge(m: dict, name: str) -> float:
    return m[(name, ())]


def post(url: str, body, headers=AUTH, **kw) -> httpx.Response:
    """POST a chat request; Content-Type application/json unless ``headers`` name one."""
    content = body if isinstance(body, (bytes, str)) else json.dumps(body)
    if not any(k.lower() == "content-type" for k in headers):
        headers = {**headers, "Content-Type": "application/json"}
    return httpx.post(url + "/v1/chat/completions", content=content, headers=headers, timeout=WAIT_S, **kw)


def assert_openai_error(r: httpx.Response, status: int, *words: str, param: str | None = "any") -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"], err
    assert "Traceback" not in r.text
    for w in words:
        assert w in err["message"], (w, err["message"])
    if param != "any":
        assert err["param"] == param, err
    return err


async def stream_text(client: httpx.AsyncClient, body: dict, headers=AUTH) -> tuple[str, list[dict]]:
    """Read a streamed completion over raw SSE: (text of choice 0, every chunk)."""
    chunks, text = [], ""
    async with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True},
                             headers=headers) as r:
        assert r.status_code == 200, await r.aread()
        assert r.headers["content-type"].startswith("text/event-stream")
        async for line in r.aiter_lines():
            if not line:
                continue
            assert line.startswith("data: "), line
            if line == "data: [DONE]":
                return text, chunks
            c = json.loads(line[len("data: "):])
            chunks.append(c)
            text += "".join(ch["delta"].get("content", "") for ch in c["choices"])
    raise AssertionError("the stream ended without data: [DONE]")


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def model() -> VLModel:
    return dsvl2.load("demo", prefix_caching=False)  # dtype "auto": bf16 weights


@pytest.fixture(scope="module")
def server(model):
    s = LiveServer(create_app(model, served_model_name="demo", api_key=KEY, max_body_bytes=4 << 20,
                              max_image_pixels=MAX_PIXELS))
    yield s
    s.close()


@pytest.fixture(scope="module")
def small(model, tmp_path_factory):
    """One batch slot and a queue of one, on the same weights; reads files under a folder."""
    folder = tmp_path_factory.mktemp("allowed")
    one = VLModel(model.model, model.processor, model.folder, max_batch_size=1, prefix_caching=False)
    s = LiveServer(create_app(one, served_model_name="demo", max_queue=1, allowed_local_dir=folder))
    s.folder = folder
    yield s
    s.close()
    one.driver.close()


@pytest.fixture
def endless(model):
    """Answers that only max_tokens ends: the random demo model stops by itself after ~100
    tokens, which a fast decode reaches before a test's client has given up."""
    word = model.processor.tokenizer.encode(" a")[-1]
    with use_sampler(lambda logits, params, generators, seen=None: torch.full((logits.shape[0],), word)):
        yield


@pytest.fixture
def script():
    """script(text): the engine's next sampled tokens spell ``text`` (then eos); one request at a time."""
    with contextlib.ExitStack() as blocks:

        def install(tok, text: str):
            it = iter(tok.encode(text) + [tok.eos_id])

            def scripted(logits, params, generators, seen=None):
                assert logits.shape[0] == 1, "scripted runs hold one request"
                return torch.tensor([next(it, tok.eos_id)])

            blocks.enter_context(use_sampler(scripted))  # the latest script wins

        yield install


# --------------------------------------------------------------------------- the openai client


@slow
def test_models_health_and_the_demo_flag(server):
    card = server.client().models.list().data
    assert [m.id for m in card] == ["demo"]
    ext = card[0].model_extra["dsvl2"]
    budget = {k: ext.pop(k) for k in ("kv_cache_bytes", "kv_block_size")}  # tests/test_server_kv.py checks them
    assert ext == {"context_window": 4096, "max_batch_size": 16, "demo": True, "max_queue": 64}
    assert budget["kv_cache_bytes"] > 0 and budget["kv_block_size"] > 0
    assert server.client().models.retrieve("demo").id == "demo"
    with pytest.raises(openai.NotFoundError):
        server.client().models.retrieve("gpt-4o")
    r = httpx.get(server.url + "/health", timeout=WAIT_S)
    assert r.status_code == 200 and r.json()["status"] == "ok"


@slow
def test_openai_client_with_an_image_data_url_streaming_and_not(server, model):
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(FOOD)}},
                                             {"type": "text", "text": "What food is this?"}]}]
    client = server.client()
    res = client.chat.completions.create(model="demo", messages=messages, max_tokens=10)
    # the same conversation through the Python API, the image given as a path
    local = [{"role": "user", "content": [{"type": "image", "image": str(FOOD)},
                                          {"type": "text", "text": "What food is this?"}]}]
    ref = model.chat(local, max_new_tokens=10)
    batch, _ = model.process(local)
    choice = res.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == ref.text
    assert choice.finish_reason == ref.finish_reason
    assert res.usage.prompt_tokens == ref.prompt_tokens == batch.seq_lens[0]
    text_tokens = int((batch.attention_mask[0] & ~batch.images_seq_mask[0]).sum())
    assert sum(batch.num_image_tokens[0]) > 400  # image tokens are counted in prompt_tokens
    assert res.usage.prompt_tokens == text_tokens + sum(batch.num_image_tokens[0])
    assert res.usage.completion_tokens == ref.completion_tokens
    assert res.usage.prompt_tokens_details.cached_tokens == 0  # prefix caching is off here
    assert res.model == "demo" and res.id.startswith("chatcmpl-")

    chunks = list(client.chat.completions.create(model="demo", messages=messages, max_tokens=10, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == ref.text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [ref.finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.prompt_tokens == res.usage.prompt_tokens
    assert chunks[-1].usage.completion_tokens == res.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == 0
    assert all(c.usage is None for c in chunks[:-1])


@slow
def test_image_tag_typed_as_text_is_text(server, model):
    """In OpenAI messages images come only from image_url parts: an "<image>" in the text
    is those characters (not a 400 about a tag without an image, not the image token)."""
    literal = "look at <image> here"
    client = server.client()
    tok = model.processor.tokenizer
    for content in ([{"type": "text", "text": literal}], literal):
        msgs = [{"role": "user", "content": content}]
        res = client.chat.completions.create(model="demo", messages=msgs, max_tokens=4)
        batch, _ = model.process(msgs)
        ids = batch.input_ids[0].tolist()
        assert tok.image_id not in ids and tok.decode(ids) == f"{tok.bos_token}<|User|>: {literal}\n\n<|Assistant|>:"
        assert res.usage.prompt_tokens == len(ids)
        assert res.choices[0].message.content == model.chat(msgs, max_new_tokens=4).text
    # beside a real image: one image's tokens, the typed tag still text
    msgs = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(FOOD)}},
                                         {"type": "text", "text": literal}]}]
    res = client.chat.completions.create(model="demo", messages=msgs, max_tokens=2)
    local = [{"role": "user", "content": [{"type": "image", "image": str(FOOD)}, {"type": "text", "text": literal}]}]
    batch, _ = model.process(local)
    assert res.usage.prompt_tokens == batch.seq_lens[0]
    assert batch.input_ids[0].tolist().count(tok.image_id) == sum(batch.num_image_tokens[0])


@slow
def test_an_empty_prompt_is_a_400(server):
    for content in ("", "  ", [{"type": "text", "text": ""}]):
        r = post(server.url, {"messages": [{"role": "user", "content": content}], "max_tokens": 4})
        assert_openai_error(r, 400, "nothing to answer", param="messages")


@slow
def test_sampling_options_and_n_choices(server, model):
    client = server.client()
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell me a story."}]
    greedy = client.chat.completions.create(model="demo", messages=msgs, max_tokens=6, n=3)
    assert [c.index for c in greedy.choices] == [0, 1, 2]
    assert len({c.message.content for c in greedy.choices}) == 1
    assert greedy.usage.completion_tokens == sum(
        model.chat(msgs, max_new_tokens=6).completion_tokens for _ in range(3))
    # choice i samples with seed + i: reproducible, and choice 1 of seed 7 is choice 0 of seed 8
    opts = dict(model="demo", messages=msgs, max_tokens=8, temperature=1.0, top_p=0.9,
                extra_body={"top_k": 50, "repetition_penalty": 1.1})
    a = client.chat.completions.create(n=2, seed=7, **opts)
    b = client.chat.completions.create(n=2, seed=7, **opts)
    c = client.chat.completions.create(n=1, seed=8, **opts)
    assert [x.message.content for x in a.choices] == [x.message.content for x in b.choices]
    assert a.choices[1].message.content == c.choices[0].message.content
    ref = model.chat(msgs, max_new_tokens=8, temperature=1.0, top_p=0.9, top_k=50, repetition_penalty=1.1, seed=8)
    assert c.choices[0].message.content == ref.text
    # a stop string cuts the answer before it; max_completion_tokens is max_tokens
    full = model.chat(msgs, max_new_tokens=12).text
    stop = full[4:7]
    cut = client.chat.completions.create(model="demo", messages=msgs, max_completion_tokens=12, stop=[stop])
    assert cut.choices[0].message.content == full[:full.index(stop)]
    assert cut.choices[0].finish_reason == "stop"


def test_grounding_field_from_an_answer_with_markup(model):
    img = Image.new("RGB", (640, 480))
    out = GenerationOutput(ids=[], text=f"Here: {CAT}.", finish_reason="stop", prompt_tokens=5, completion_tokens=9)
    msg = message(make_answer(out, [Image.new("RGB", (10, 10)), img]))
    px = [int(100 / COORD_MAX * 640), int(200 / COORD_MAX * 480), int(500 / COORD_MAX * 640), int(800 / COORD_MAX * 480)]
    assert msg == {"role": "assistant", "content": f"Here: {CAT}.",  # the text keeps the markup
                   "grounding": [{"label": "the cat", "box": [100, 200, 500, 800], "box_px": px, "image_index": 1}]}
    no_image = message(make_answer(out, []))
    assert no_image["grounding"] == [{"label": "the cat", "box": [100, 200, 500, 800], "box_px": None,
                                      "image_index": None}]
    plain = GenerationOutput(ids=[], text="no boxes <|ref|>here<|/ref|>", finish_reason="stop", prompt_tokens=1,
                             completion_tokens=1)
    assert "grounding" not in message(make_answer(plain, [img]))


@slow
def test_grounding_end_to_end_with_a_scripted_answer(server, model, script):
    script(model.processor.tokenizer, f"A {CAT}")
    w, h = Image.open(DOG).size
    px = [int(100 / COORD_MAX * w), int(200 / COORD_MAX * h), int(500 / COORD_MAX * w), int(800 / COORD_MAX * h)]
    want = [{"label": "the cat", "box": [100, 200, 500, 800], "box_px": px, "image_index": 0}]
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(DOG)}},
                                             {"type": "text", "text": "<|grounding|>Find the cat."}]}]
    res = server.client().chat.completions.create(model="demo", messages=messages)
    assert res.choices[0].message.content == f"A {CAT}" and res.choices[0].finish_reason == "stop"
    assert res.choices[0].message.model_extra["grounding"] == want

    script(model.processor.tokenizer, f"A {CAT}")
    chunks = list(server.client().chat.completions.create(model="demo", messages=messages, stream=True))
    last = [c for c in chunks if c.choices and c.choices[0].finish_reason][-1]
    assert last.choices[0].delta.model_extra["grounding"] == want
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == f"A {CAT}"


@slow
def test_error_classes_through_the_openai_client(server):
    msgs = [{"role": "user", "content": "Hi"}]
    with pytest.raises(openai.AuthenticationError):
        server.client(api_key="wrong").chat.completions.create(model="demo", messages=msgs)
    with pytest.raises(openai.NotFoundError) as e:
        server.client().chat.completions.create(model="gpt-4o", messages=msgs)
    assert e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        server.client().chat.completions.create(model="demo", messages=msgs, temperature="hot")
    assert e.value.body["param"] == "temperature" and "hot" in e.value.body["message"]
    huge = png_url(Image.new("RGB", (2000, 2000)))  # 4 MP > MAX_PIXELS, a few kB as PNG
    with pytest.raises(openai.APIStatusError) as e:
        server.client().chat.completions.create(model="demo", messages=[
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": huge}}]}])
    assert e.value.status_code == 413 and e.value.body["code"] == "image_too_large"


BAD_FIELDS = [  # (extra fields, param, words in the message)
    ({"top_p": 0}, "top_p", "0 < top_p <= 1"),
    ({"top_p": 1.5}, "top_p", "1.5"),
    ({"top_k": -2}, "top_k", ">= 0"),
    ({"top_k": 1.5}, "top_k", "integer"),
    ({"temperature": 2.5}, "temperature", "from 0 to 2"),
    ({"temperature": True}, "temperature", "true"),
    ({"repetition_penalty": 0}, "repetition_penalty", "> 0"),
    ({"seed": "x"}, "seed", "integer"),
    ({"stop": [""]}, "stop", "non-empty"),
    ({"stop": ["a"] * 17}, "stop", "at most 16"),
    ({"stop_token_ids": [-1]}, "stop_token_ids", ">= 0"),
    ({"stream": "yes"}, "stream", "true or false"),
    ({"stream_options": {"include_usage": True}}, "stream_options", "stream: true"),
    ({"stream": True, "stream_options": {"include_usage": "y"}}, "stream_options.include_usage", "true or false"),
    ({"max_tokens": 5, "max_completion_tokens": 6}, "max_tokens", "disagree"),
    ({"n": 17}, "n", "from 1 to 16"),
    ({"frequency_penalty": 0.5}, "frequency_penalty", "repetition_penalty"),
    ({"tools": [{"type": "function"}]}, "tools", "tool calling"),
    ({"response_format": {"type": "xml"}}, "response_format.type", "'json_object'"),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs", "from 0 to 20"),
    ({"model": 5}, "model", "string"),
    ({"messages": "hi"}, "messages", "non-empty list"),
    ({"messages": ["hi"]}, "messages[0]", "object"),
    ({"messages": [{"role": "user"}]}, "messages[0].content", "no 'content'"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content", "string or a list"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].role", "tool calling"),
    ({"messages": [{"role": "user", "content": [{"type": "input_audio"}]}]}, "messages[0].content[0].type",
     "'image_url'"),
    ({"messages": [{"role": "user", "content": [{"type": "text"}]}]}, "messages[0].content[0].text", "string"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
     "messages[0].content[0].image_url.url", "URL string"),
]


@pytest.mark.parametrize("extra, param, words", BAD_FIELDS, ids=[p for _, p, _ in BAD_FIELDS])
def test_schema_names_the_bad_field(extra, param, words):
    with pytest.raises(APIError) as e:
        parse_chat_request({"messages": [{"role": "user", "content": "Hi"}], **extra})
    assert e.value.status == 400 and e.value.param == param and words in e.value.message, e.value.message


def test_schema_accepts_openai_variants():
    req = parse_chat_request({
        "model": "demo", "user": "someone", "metadata": {"a": 1}, "frequency_penalty": 0, "logprobs": False,
        "messages": [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                     {"role": "assistant", "content": None},
                     {"role": "user", "content": [{"type": "text", "text": "Look"},
                                                  {"type": "image_url", "image_url": "data:image/png;base64,AA=="}]}],
        "top_k": -1, "stop": "END", "max_completion_tokens": 7, "n": 2, "stream": True,
        "stream_options": {"include_usage": True}, "truncate_history": True})
    assert [m["role"] for m in req.messages] == ["system", "user", "assistant", "user"]
    assert req.messages[2]["content"] == ""
    assert req.sampling == {"top_k": 0, "stop": ("END",), "max_new_tokens": 7}
    assert (req.n, req.stream, req.include_usage, req.truncate_history) == (2, True, True, True)
    assert [r.param for r in req.image_refs] == ["messages[3].content[1].image_url"]


# --------------------------------------------------------------------------- raw HTTP


CONVERSATIONS = [
    [user("Hello, how are you today?")],
    [user("Tell me a story about a cat.")],
    [{"role": "system", "content": "You are terse."}, user("Hi"), {"role": "assistant", "content": "Hello."},
     user("What is the capital of France?")],
    [user("What food is this?", FOOD)],
    [user("Describe this image.", IMAGES / "monday.jpg")],
    [user("Where is the dog?", DOG)],
    [user("Compare the two images.", FOOD, DOG)],
    [user("What differs?", WIDE, FOOD)],
]


@pytest.fixture(scope="module")
def alone(server):
    """Each conversation's greedy answer with nothing else running."""
    texts = []
    for conv in CONVERSATIONS:
        r = post(server.url, {"messages": conv, "max_tokens": 12})
        assert r.status_code == 200, r.text
        texts.append(r.json()["choices"][0]["message"]["content"])
    return texts


@slow
def test_eight_concurrent_clients_get_their_answers_alone(server, alone):
    async def main():
        async with httpx.AsyncClient(base_url=server.url, timeout=WAIT_S) as client:
            return await asyncio.gather(*(stream_text(client, {"messages": c, "max_tokens": 12})
                                          for c in CONVERSATIONS))

    got = asyncio.run(main())
    assert [text for text, _ in got] == alone
    for _, chunks in got:  # one id per stream, role first, one finish
        assert len({c["id"] for c in chunks}) == 1 and chunks[0]["choices"][0]["delta"]["role"] == "assistant"
        assert sum(1 for c in chunks if c["choices"][0]["finish_reason"]) == 1


@slow
def test_bad_requests_get_openai_errors_while_a_good_one_completes(server, alone):
    before = server.metrics()
    hello = CONVERSATIONS[0]
    bad_body = {"messages": hello, "max_tokens": 4}
    cases = [  # (body or raw bytes, headers, status, words in the message, param)
        (b'{"messages": [', AUTH, 400, ("not valid JSON",), None),
        (b"[1, 2]", AUTH, 400, ("JSON object",), None),
        ({**bad_body, "messages": [{"role": "robot", "content": "hi"}]}, AUTH, 400, ("robot", "'user'"),
         "messages[0].role"),
        ({**bad_body, "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,@@not base64@@"}}]}]}, AUTH, 400,
         ("base64",), "messages[0].content[0].image_url.url"),
        ({**bad_body, "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(
                b"just some text, not an image").decode()}}]}]}, AUTH, 400, ("not an image",),
         "messages[0].content[0].image_url.url"),
        ({**bad_body, "messages": [user("hello " * 1500)]}, AUTH, 400, ("4096", "context window"), "messages"),
        ({**bad_body, "temperature": "hot"}, AUTH, 400, ("temperature", "hot"), "temperature"),
        ({**bad_body, "n": 0}, AUTH, 400, ("n must be",), "n"),
        ({**bad_body, "messages": []}, AUTH, 400, ("non-empty",), "messages"),
        ({**bad_body, "messages": [{"role": "assistant", "content": "x"}, {"role": "system", "content": "y"}]},
         AUTH, 400, ("system",), "messages"),
        ({**bad_body, "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}]}]}, AUTH, 400,
         ("--allow-fetch",), "messages[0].content[0].image_url.url"),
        ({**bad_body, "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": str(FOOD)}}]}]}, AUTH, 400, ("--allowed-local-dir",),
         "messages[0].content[0].image_url.url"),
        ({**bad_body, "top_logprobs": 2}, AUTH, 400, ("logprobs",), "top_logprobs"),
        ({**bad_body, "max_tokens": 0}, AUTH, 400, ("max_tokens",), "max_tokens"),
        (bad_body, {}, 401, ("missing API key",), None),
        (bad_body, {"Authorization": "Bearer nope"}, 401, ("invalid API key",), None),
        ({**bad_body, "model": "gpt-4o"}, AUTH, 404, ("gpt-4o",), "model"),
        (b"{" + b" " * (5 << 20) + b"}", AUTH, 413, ("request body",), None),
        ({**bad_body, "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": png_url(Image.new("RGB", (2000, 1600)))}}]}]}, AUTH, 413,
         ("pixels",), "messages[0].content[0].image_url.url"),
    ]

    async def bad(client, body, headers, status, words, param):
        content = body if isinstance(body, bytes) else json.dumps(body)
        r = await client.post("/v1/chat/completions", content=content,
                              headers={**headers, "Content-Type": "application/json"})
        assert_openai_error(r, status, *words, param=param)
        if status == 401:
            assert r.headers["www-authenticate"] == "Bearer"
        return r.json()["error"]

    async def main():
        async with httpx.AsyncClient(base_url=server.url, timeout=WAIT_S) as client:
            good = asyncio.ensure_future(stream_text(client, {"messages": hello, "max_tokens": 12}))
            errors = await asyncio.gather(*(bad(client, *c) for c in cases))
            return (await good)[0], errors

    text, errors = asyncio.run(main())
    assert text == alone[0]
    assert [e["code"] for e in errors if e["code"] == "context_length_exceeded"] == ["context_length_exceeded"]
    after = server.metrics()
    for name, n in (("invalid", 14), ("unauthorized", 2), ("not_found", 1), ("too_large", 2)):
        assert outcome(after, name) - outcome(before, name) == n, name


@slow
def test_unknown_routes_and_methods_answer_in_the_openai_shape(server):
    assert_openai_error(httpx.get(server.url + "/v1/nothing", timeout=WAIT_S), 404)
    assert_openai_error(httpx.get(server.url + "/v1/chat/completions", timeout=WAIT_S), 405)


@slow
def test_metrics_parse_and_count(server, alone):
    m = server.metrics()
    assert outcome(m, "length") + outcome(m, "stop") >= len(CONVERSATIONS)
    assert m[("dsvl2_prompt_tokens_total", ())] > 0 and m[("dsvl2_generation_tokens_total", ())] > 0
    assert gauge(m, "dsvl2_batch_slots_capacity") == 16 and gauge(m, "dsvl2_model_loaded") == 1
    for hist in ("dsvl2_time_to_first_token_seconds", "dsvl2_inter_token_latency_seconds",
                 "dsvl2_request_duration_seconds"):
        count = m[(hist + "_count", ())]
        assert count > 0 and m[(hist + "_bucket", (("le", "+Inf"),))] == count
    assert m[("dsvl2_inter_token_latency_seconds_count", ())] >= len(CONVERSATIONS) * 11  # 12 tokens: 11 gaps
    for key in ("running", "admitting", "waiting"):
        assert gauge(m, f"dsvl2_requests_{key}") == 0


@slow
def test_truncate_history_drops_the_oldest_turns(server, model, request):
    previous = model.engine.set_context_window(120)
    request.addfinalizer(lambda: model.engine.set_context_window(previous))
    long = "Tell me more about the history of this place. " * 3  # ~45 tokens
    conv = [{"role": "system", "content": "You are a guide."}]
    for k in range(3):
        conv += [{"role": "user", "content": f"{k}: {long}"}, {"role": "assistant", "content": f"Answer {k}."}]
    conv.append({"role": "user", "content": "And now?"})

    r = post(server.url, {"messages": conv, "max_tokens": 4})
    assert_openai_error(r, 400, "context window is 120", "truncate_history", param="messages")
    assert r.json()["error"]["code"] == "context_length_exceeded"

    r = post(server.url, {"messages": conv, "max_tokens": 4, "truncate_history": True})
    assert r.status_code == 200, r.text
    body = r.json()
    dropped = body["dropped_turns"]
    kept = conv[:1] + conv[1 + dropped:]
    assert dropped % 2 == 0 and dropped > 0 and kept[1]["role"] == "user"
    fits = model.process(kept)[0].seq_lens[0]
    assert body["usage"]["prompt_tokens"] == fits and fits + 16 <= 120
    assert model.process(conv[:1] + conv[1 + dropped - 2:])[0].seq_lens[0] + 16 > 120  # one exchange fewer: too long
    assert body["choices"][0]["message"]["content"] == model.chat(kept, max_new_tokens=4).text

    async def first_chunk():
        async with httpx.AsyncClient(base_url=server.url, timeout=WAIT_S) as client:
            return (await stream_text(client, {"messages": conv, "max_tokens": 4, "truncate_history": True}))[1][0]

    assert asyncio.run(first_chunk())["dropped_turns"] == dropped

    too_long = conv[:1] + [{"role": "user", "content": long * 3}]
    r = post(server.url, {"messages": too_long, "max_tokens": 4, "truncate_history": True})
    assert_openai_error(r, 400, "last user message", param="messages")
    assert r.json()["error"]["code"] == "context_length_exceeded"


@slow
def test_queue_full_disconnect_frees_the_slot_and_metrics_show_it(small, endless):
    """One row, a queue of one: A streams; B waits; C is refused with 429; A's client
    goes away mid-stream; B is admitted on the freed row and completes."""
    before = small.metrics()
    long_body = {"messages": [user("Tell me a very long story.")], "max_tokens": 3000, "stream": True}
    short = {"messages": [user("Hello, how are you today?")], "max_tokens": 6}
    with httpx.Client(base_url=small.url, timeout=WAIT_S) as a:
        with a.stream("POST", "/v1/chat/completions", json=long_body) as stream:
            lines = stream.iter_lines()
            assert next(l for l in lines if '"content": "' in l and '"role"' not in l)  # a token arrived
            assert small.metrics()[("dsvl2_batch_slots_in_use", ())] == 1
            result = {}
            waiter = threading.Thread(target=lambda: result.update(r=post(small.url, short, headers={})))
            waiter.start()
            wait_for(lambda: gauge(small.metrics(), "dsvl2_requests_waiting") == 1, "B to wait")
            r = post(small.url, short, headers={})
            err = assert_openai_error(r, 429, "--max-queue")
            assert err["type"] == "rate_limit_error" and int(r.headers["retry-after"]) >= 1
            with pytest.raises(openai.RateLimitError):
                openai.OpenAI(base_url=small.url + "/v1", api_key="x", max_retries=0).chat.completions.create(
                    model="demo", messages=short["messages"], max_tokens=1)
        # A's connection is closed here, mid-stream
    waiter.join(WAIT_S)
    assert not waiter.is_alive() and result["r"].status_code == 200, result
    assert result["r"].json()["usage"]["completion_tokens"] == 6
    m = wait_for(lambda: (lambda m: m if gauge(m, "dsvl2_batch_slots_in_use") == 0 else None)(small.metrics()),
                 "the slots to be free")
    assert outcome(m, "cancelled") - outcome(before, "cancelled") == 1
    assert outcome(m, "queue_full") - outcome(before, "queue_full") == 2
    assert m[("dsvl2_generation_tokens_total", ())] - before[("dsvl2_generation_tokens_total", ())] < 3000
    assert gauge(m, "dsvl2_requests_running") == 0 and gauge(m, "dsvl2_requests_waiting") == 0


@slow
def test_a_non_streaming_client_that_goes_away_frees_its_slot(small, endless):
    before = small.metrics()
    with pytest.raises(httpx.ReadTimeout):  # the client gives up waiting and closes the connection
        httpx.post(small.url + "/v1/chat/completions", json={"messages": [user("Tell me a very long story.")],
                                                             "max_tokens": 3000}, timeout=httpx.Timeout(WAIT_S, read=1))
    m = wait_for(lambda: (lambda m: m if outcome(m, "cancelled") > outcome(before, "cancelled") else None)(
        small.metrics()), "the request to be cancelled")
    assert outcome(m, "cancelled") - outcome(before, "cancelled") == 1
    r = post(small.url, {"messages": [user("Hi")], "max_tokens": 3}, headers={})  # the only row is free again
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
    m = small.metrics()
    assert gauge(m, "dsvl2_batch_slots_in_use") == 0
    assert m[("dsvl2_generation_tokens_total", ())] - before[("dsvl2_generation_tokens_total", ())] < 3000


@slow
def test_local_files_only_under_the_allowed_folder(small):
    (small.folder / "sub").mkdir(exist_ok=True)
    inside = small.folder / "sub" / "food.jpg"
    inside.write_bytes(FOOD.read_bytes())
    outside = small.folder.parent / "secret.jpg"  # an existing file next to the allowed folder
    outside.write_bytes(FOOD.read_bytes())
    (small.folder / "link.jpg").unlink(missing_ok=True)
    (small.folder / "link.jpg").symlink_to(outside)

    def ask(url):
        return post(small.url, {"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "What food?"}]}],
            "max_tokens": 4}, headers={})

    same = post(small.url, {"messages": [user("What food?", FOOD)], "max_tokens": 4}, headers={}).json()
    for url in (str(inside), "sub/food.jpg", inside.as_uri()):
        r = ask(url)
        assert r.status_code == 200, r.text
        assert r.json()["choices"] == same["choices"]
    for url in (str(outside), "sub/../../" + outside.name, "link.jpg", outside.as_uri(), "missing.jpg"):
        assert_openai_error(ask(url), 400, "not a file under the allowed directory",
                            param="messages[0].content[0].image_url.url")
    assert_openai_error(ask("ftp://example.com/a.png"), 400, "scheme 'ftp'")


class _Images(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        if self.path == "/food.jpg":
            data = FOOD.read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        elif self.path in ("/to-file", "/to-ftp"):
            self.send_response(302)
            self.send_header("Location", f"file://{FOOD}" if self.path == "/to-file" else "ftp://127.0.0.1/a.png")
            self.end_headers()
        else:
            self.send_error(404)

    def log_message(self, *args):
        pass


def test_fetching_follows_the_policy():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Images)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{httpd.server_address[1]}"
    try:
        ref = ImageRef(base + "/food.jpg", "messages[0].content[0].image_url.url")
        with pytest.raises(APIError) as e:
            ImagePolicy().load(ref)
        assert e.value.status == 400 and "--allow-fetch" in e.value.message
        with pytest.raises(APIError) as e:  # loopback: only with allow_fetch_private (tests/test_server_security.py)
            ImagePolicy(allow_fetch=True).load(ref)
        assert e.value.status == 400 and "loopback" in e.value.message
        assert ImagePolicy(allow_fetch=True, allow_fetch_private=True).load(ref) == FOOD.read_bytes()
        with pytest.raises(APIError) as e:
            ImagePolicy(allow_fetch=True, allow_fetch_private=True, max_image_bytes=1000).load(ref)
        assert e.value.status == 413
        for path, words in (("/missing.png", "HTTP 404"), ("/to-file", "only http and https"),
                            ("/to-ftp", "only http and https")):
            with pytest.raises(APIError) as e:
                ImagePolicy(allow_fetch=True, allow_fetch_private=True).load(ImageRef(base + path, "p"))
            assert e.value.status == 400 and words in e.value.message, e.value.message
    finally:
        httpd.shutdown()
        httpd.server_close()


@slow
def test_503_while_the_model_loads_then_serves(model):
    gate = threading.Event()

    def load():
        assert gate.wait(WAIT_S)
        return model

    s = LiveServer(create_app(load, served_model_name="demo"))
    try:
        r = httpx.get(s.url + "/health", timeout=WAIT_S)
        assert r.status_code == 503 and r.json() == {"status": "loading"}
        r = post(s.url, {"messages": [user("Hi")]}, headers={})
        assert_openai_error(r, 503, "loading")
        assert r.headers["retry-after"] == "5"
        with pytest.raises(openai.InternalServerError):
            s.client().models.list()
        assert s.metrics()[("dsvl2_model_loaded", ())] == 0
        gate.set()
        wait_for(lambda: httpx.get(s.url + "/health", timeout=WAIT_S).status_code == 200, "the model to load")
        res = s.client().chat.completions.create(model="demo", messages=[user("Hi")], max_tokens=3)
        assert res.usage.completion_tokens == 3
    finally:
        s.close()


@slow
def test_a_failed_load_is_reported(model):
    failed = []

    def load():
        raise CheckpointError("model folder not found: /nowhere")

    s = LiveServer(create_app(load, served_model_name="x", on_load_error=failed.append))
    try:
        wait_for(lambda: failed, "the load to fail")
        r = httpx.get(s.url + "/health", timeout=WAIT_S)
        assert r.status_code == 503 and "/nowhere" in r.json()["error"]
        assert_openai_error(post(s.url, {"messages": [user("Hi")]}, headers={}), 503, "could not be loaded")
    finally:
        s.close()


# --------------------------------------------------------------------------- the command


@contextlib.contextmanager
def serve_command(*args: str, what: str = "dsvl2 serve"):
    """The real ``python -m dsvl2 serve ARGS`` on a free loopback port, ready (``/health``):
    yields its url, port, an ``openai`` client and ``metrics()``; stopped with SIGINT after,
    its exit status, stdout and stderr then in ``.rc``, ``.out``, ``.err``."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DSVL2_API_KEY": KEY}
    proc = subprocess.Popen([sys.executable, "-m", "dsvl2", "serve", "--port", str(port), *args],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    run = SimpleNamespace(url=url, port=port, proc=proc,
                          client=openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=600),
                          metrics=lambda: LiveServer.metrics(SimpleNamespace(url=url)))

    def up():
        try:
            return httpx.get(url + "/health", timeout=5).status_code == 200
        except httpx.TransportError:
            assert proc.poll() is None, proc.communicate()
            return False

    try:
        wait_for(up, f"{what} to be ready", timeout=120)
        yield run
    finally:
        proc.send_signal(signal.SIGINT)
        run.out, run.err = proc.communicate(timeout=WAIT_S)
        run.rc = proc.returncode


@slow
def test_dsvl2_serve_command(model, tmp_path):
    with serve_command("--log-level", "info") as srv:
        client = srv.client
        # two different prompts: a repeated one would be answered from shared KV blocks
        image, text = [user("What food is this?", FOOD)], [user("Hello, how are you today?")]
        res = client.chat.completions.create(model="demo", messages=image, max_tokens=8)
        assert res.choices[0].message.content == model.chat(image, max_new_tokens=8).text
        streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
            model="demo", messages=text, max_tokens=8, stream=True) if c.choices)
        assert streamed == model.chat(text, max_new_tokens=8).text
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=srv.url + "/v1", api_key="wrong", max_retries=0).models.list()
    port, err = srv.port, srv.err
    assert srv.rc == 0, err
    assert f"on http://127.0.0.1:{port}" in err  # the default host is loopback
    assert "RANDOM" in err and "Traceback" not in err
