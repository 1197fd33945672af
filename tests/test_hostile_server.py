"""The hostile-input corpus (tests/hostile/make_corpus.py) through a live server, plus what
only HTTP can send: bad JSON, huge or deep bodies, wrong content types, URLs that try to
leave the allowed folder.

Conventions of this file:
* One live uvicorn server on 127.0.0.1 (a daemon thread of this process, a port the OS
  chose) with the demo model; every item is one ``POST /v1/chat/completions`` with its
  images as ``data:`` URLs, every call with a client timeout (no hang can pass).
* The server's outcome per item is derived from the item's declared one (an error ->
  400, ``ImageTooLargeError`` -> 413, ok -> 200 with the item's check) except where the
  HTTP schema documents otherwise (``SERVER_OUTCOME``, each with its reason). Never a 5xx,
  always OpenAI's error shape, never a traceback.
* A bystander thread streams a well-formed request over and over while the items run;
  the last test checks that each of its answers arrived whole and equal to the same
  request alone.
"""

from __future__ import annotations

import base64
import json
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest
import uvicorn

import dsvl2
from dsvl2.server import create_app
from hostile.make_corpus import SMALL, Item, build, items

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

ITEMS = [it for it in items() if it.kind in ("image", "request")]
WAIT_S = 120  # client timeout of every call (a hang guard)
MAX_BODY = 4 << 20

# Where the HTTP schema (dsvl2/server/schema.py) answers differently from the Python API.
SERVER_OUTCOME = {
    "sampling_top_k_-1": (200, "top_k -1 means off over HTTP (vLLM's convention)"),
    "seed_huge": (400, "seed must fit in 64 bits over HTTP (the API reduces it modulo 2^64)"),
    "stop_100_unmatched": (400, "at most 16 stop strings over HTTP"),
    "stop_100_long": (400, "at most 16 stop strings over HTTP"),
    "stop_100_last_matches": (400, "at most 16 stop strings over HTTP"),
    "bare_image_part_without_image": (400, "{'type': 'image'} is not an OpenAI part type"),
    # OpenAI messages take their images from image_url parts only: an <image> typed in the
    # text is text, so the reference format's tag / image mismatch cannot be written over HTTP
    "tags_more_than_images": (200, "the typed <image> tags are text: one image part, answered"),
    "images_more_than_tags": (200, "the typed <image> tag is text: two image parts, answered"),
    "prompt_tag_mismatch": (200, "the typed <image> tag is text: two image parts, answered"),
}


class LiveServer:
    def __init__(self, app):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=1))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + WAIT_S
        while not self.server.started:
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.02)

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(WAIT_S)
        assert not self.thread.is_alive()


def post(url: str, body, headers=None, **kw) -> httpx.Response:
    """POST a chat request; Content-Type application/json unless ``headers`` name one."""
    content = body if isinstance(body, (bytes, str)) else json.dumps(body)  # NaN / Infinity tokens allowed
    headers = dict(headers or {})
    if not any(k.lower() == "content-type" for k in headers):
        headers["Content-Type"] = "application/json"
    r = httpx.post(url + "/v1/chat/completions", content=content, headers=headers, timeout=WAIT_S, **kw)
    assert r.status_code < 500, r.text
    return r


def assert_error(r: httpx.Response, status: int, *words: str) -> dict:
    assert r.status_code == status, r.text
    assert "Traceback" not in r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"], err
    for w in words:
        assert w in err["message"], (w, err["message"])
    return err


def data_url(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()  # the type is sniffed


def to_http(item: Item, corpus: Path) -> dict:
    """The item as a chat-completions body: corpus files as data: URLs, sampling renamed."""
    if item.kind == "image":
        body = {"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": data_url(corpus / item.file)}},
            {"type": "text", "text": "Describe this image."}]}], "max_tokens": 2}
        return body
    req = item.request

    def part(p):
        if isinstance(p, dict) and p.get("type") == "image" and isinstance(p.get("image"), str):
            return {"type": "image_url", "image_url": {"url": data_url(corpus / p["image"])}}
        return p

    def message(m):
        if not isinstance(m, dict):
            return m
        m = dict(m)
        images = m.pop("images", None)
        if isinstance(m.get("content"), list):
            m["content"] = [part(p) for p in m["content"]]
        if images:  # reference style: the images, then the text (an <image> in it is text over HTTP)
            m["content"] = [part({"type": "image", "image": n}) for n in images] + [
                {"type": "text", "text": m["content"]}]
        return m

    if "prompt" in req:
        messages = [message({"role": "user", "content": req["prompt"], "images": req.get("images")})]
    else:
        messages = [message(m) for m in req["messages"]]
    sampling = dict(req["sampling"])
    if "max_new_tokens" in sampling:
        sampling["max_tokens"] = sampling.pop("max_new_tokens")
    return {"messages": messages, **sampling}


def expected_status(item: Item) -> int:
    if item.name in SERVER_OUTCOME:
        return SERVER_OUTCOME[item.name][0]
    return {"ok": 200, "ImageTooLargeError": 413}.get(item.expect, 400)


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("allowed") / "corpus"
    build(d)
    return d


@pytest.fixture(scope="module")
def model():
    return dsvl2.load("demo", prefix_caching=False)


@pytest.fixture(scope="module")
def server(model, corpus):
    s = LiveServer(create_app(model, served_model_name="demo", max_body_bytes=MAX_BODY, allowed_local_dir=corpus))
    s.folder = corpus
    yield s
    s.close()


def _good(corpus: Path) -> dict:
    return {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_url(corpus / SMALL)}},
        {"type": "text", "text": "Describe this image."}]}], "max_tokens": 8, "stream": True}


def _stream(url: str, body: dict) -> str | None:
    """The streamed text, or None when the stream ended without [DONE]."""
    text = ""
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=WAIT_S) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if line == "data: [DONE]":
                return text
            if line.startswith("data: "):
                c = json.loads(line[6:])
                text += "".join(ch["delta"].get("content", "") for ch in c["choices"])
    return None


@pytest.fixture(scope="module")
def bystander(server, corpus):
    """A well-formed streaming request sent again and again while the items run."""
    body = _good(corpus)
    alone = _stream(server.url, body)
    stop, answers = threading.Event(), []

    def loop():
        for _ in range(10_000):  # bounded; ended by ``stop`` long before
            if stop.is_set():
                return
            try:
                answers.append(_stream(server.url, body))
            except Exception as e:  # recorded, asserted by the last test
                answers.append(repr(e))

    t = threading.Thread(target=loop, daemon=True)
    t.start()
    yield {"alone": alone, "answers": answers, "stop": stop, "thread": t}
    stop.set()
    t.join(WAIT_S)


# --------------------------------------------------------------------------- the corpus


def test_the_server_outcomes_are_for_real_items():
    assert set(SERVER_OUTCOME) <= {it.name for it in ITEMS}


@pytest.mark.parametrize("item", ITEMS, ids=lambda it: it.name)
def test_corpus_item_through_the_server(item, server, corpus, model, bystander, monkeypatch, request):
    body = to_http(item, corpus)
    status = expected_status(item)
    if item.check == "context_capped" and status == 200:
        window = model.engine.context_window
        model.engine.set_context_window(470)  # 10^9 tokens end at a small window
        request.addfinalizer(lambda: model.engine.set_context_window(window))
    r = post(server.url, body)
    if status != 200:
        assert_error(r, status)
        return
    assert r.status_code == 200, r.text
    out = r.json()
    choice, use = out["choices"][0], out["usage"]
    assert choice["finish_reason"] in ("stop", "length") and use["completion_tokens"] >= 1
    if item.kind == "image":  # the server processed the image as the Python API does
        batch, _ = model.process("Describe this image.", images=[corpus / item.file])
        assert use["prompt_tokens"] == batch.seq_lens[0]
    elif item.check == "one_token":
        assert use["completion_tokens"] == 1
    elif item.check == "context_capped":
        assert window > 470 and choice["finish_reason"] == "length"
        assert use["prompt_tokens"] + use["completion_tokens"] <= 470
    elif item.check == "same_as_greedy":
        greedy = post(server.url, {**body, "temperature": 0, "seed": None}).json()
        assert choice["message"] == greedy["choices"][0]["message"]
    elif item.check == "same_as_top_k_off":
        off = post(server.url, {**body, "top_k": 0}).json()
        assert choice["message"] == off["choices"][0]["message"]


# --------------------------------------------------------------------------- HTTP only


@pytest.mark.parametrize("body, words", [
    (b'{"messages": [', "not valid JSON"),
    (b"\xff\xfe\x00garbage", "not valid JSON"),
    (b"[1, 2, 3]", "must be a JSON object"),
    (b"", "not valid JSON"),
    (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),  # was a 500 (RecursionError in json)
    (b'{"messages":' * 50_000 + b"1" + b"}" * 50_000, "nested too deeply"),
])
def test_malformed_json_is_a_400(server, body, words, bystander):
    assert_error(post(server.url, body, headers={"Content-Type": "application/json"}), 400, *words)


def test_huge_bodies_are_413(server, bystander):
    big = json.dumps({"messages": [{"role": "user", "content": "x" * (MAX_BODY + 1000)}]})
    assert_error(post(server.url, big), 413, "at most")
    # far beyond the limit: refused from Content-Length, unread (the client may see the
    # connection close while it still sends); either way no 5xx and the server serves on
    try:
        r = post(server.url, b"x" * (6 * MAX_BODY))
        assert_error(r, 413)
    except httpx.TransportError:
        pass
    assert httpx.get(server.url + "/health", timeout=WAIT_S).status_code == 200


@pytest.mark.parametrize("ctype", ["text/plain", "text/plain;charset=UTF-8", "application/x-www-form-urlencoded",
                                   "multipart/form-data; boundary=x"])
def test_content_types_a_foreign_page_can_send_are_415(server, ctype, bystander):
    ok = json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1})
    assert_error(post(server.url, ok, headers={"Content-Type": ctype}), 415, "application/json")


def test_only_application_json_is_read(server, bystander):
    ok = json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1})
    assert post(server.url, ok, headers={"Content-Type": "application/json; charset=utf-8"}).status_code == 200
    assert post(server.url, ok, headers={"Content-Type": "Application/JSON"}).status_code == 200
    # none given (httpx content=; curl -d sends a form type): 415, as any other type
    r = httpx.post(server.url + "/v1/chat/completions", content=ok, timeout=WAIT_S)
    assert "content-type" not in r.request.headers
    assert_error(r, 415, "without a Content-Type", "application/json")
    for ctype in ("application/xml", "application/json-seq", "text/json", "*/*"):
        assert_error(post(server.url, ok, headers={"Content-Type": ctype}), 415, "application/json")


def test_a_million_character_prompt_is_a_400(server, bystander):
    r = post(server.url, {"messages": [{"role": "user", "content": "word " * 200_000}]})
    err = assert_error(r, 400, "context window is 4096")
    assert err["code"] == "context_length_exceeded"


def _image_body(url: str) -> dict:
    return {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                      {"type": "text", "text": "x"}]}], "max_tokens": 1}


def test_http_image_urls_are_not_fetched(server, bystander):
    for url in ("http://127.0.0.1:9/cat.png", "https://example.com/cat.png", "HTTP://10.0.0.1/a.png"):
        assert_error(post(server.url, _image_body(url)), 400, "does not fetch remote images", "--allow-fetch")


def test_local_paths_never_leave_the_allowed_folder(server, bystander, tmp_path):
    folder = server.folder
    secret = folder.parent / "secret.png"  # exists, just outside
    secret.write_bytes((folder / SMALL).read_bytes())
    (folder / "escape.png").unlink(missing_ok=True)
    (folder / "escape.png").symlink_to(secret)
    (folder / "escape_dir").unlink(missing_ok=True)
    (folder / "escape_dir").symlink_to(folder.parent, target_is_directory=True)
    inside = post(server.url, _image_body(str(folder / SMALL)))
    assert inside.status_code == 200, inside.text
    for url in (str(secret), secret.as_uri(), "../secret.png", f"{SMALL}/../../secret.png",
                "escape.png", "escape_dir/secret.png", "file:///etc/passwd", "/etc/passwd",
                "file://localhost/etc/passwd", "file://evil.example/etc/passwd", "%2e%2e/secret.png"):
        err = assert_error(post(server.url, _image_body(url)), 400)
        assert err["code"] == "invalid_image_url", (url, err)
        # one answer for "outside" and "missing": the reply tells nothing of what exists elsewhere
        assert "is not a file under the allowed directory" in err["message"] or "must name a local path" in err[
            "message"], (url, err)
    missing = assert_error(post(server.url, _image_body(str(folder.parent / "nothere.png"))), 400)["message"]
    there = assert_error(post(server.url, _image_body(str(secret))), 400)["message"]
    assert there.replace("secret", "nothere") == missing


@pytest.mark.parametrize("field, value", [
    ("temperature", float("nan")), ("temperature", float("inf")), ("temperature", -0.5), ("temperature", 2.5),
    ("temperature", "0"), ("top_p", float("-inf")), ("top_p", -1), ("top_k", "1"), ("top_k", float("nan")),
    ("repetition_penalty", float("inf")), ("repetition_penalty", -1), ("seed", float("nan")),
    ("max_tokens", 0), ("max_tokens", -1), ("max_tokens", "10"), ("max_tokens", 1.5), ("n", 0), ("n", 10**6),
    ("stop", [f"s{i}" for i in range(100)]), ("stop", ""), ("stop_token_ids", [float("nan")]),
])
def test_bad_sampling_values_are_400_naming_the_field(server, field, value, bystander):
    err = assert_error(post(server.url, {"messages": [{"role": "user", "content": "hi"}], field: value}), 400, field)
    assert err["param"] == field


def test_max_tokens_1_and_huge(server, model, monkeypatch, bystander, request):
    msgs = [{"role": "user", "content": "hi"}]
    one = post(server.url, {"messages": msgs, "max_tokens": 1}).json()
    assert one["usage"]["completion_tokens"] == 1 and one["choices"][0]["finish_reason"] == "length"
    # a window just above the bystander's (437 prompt + 8 tokens) keeps 10^9 to a few hundred
    previous = model.engine.set_context_window(460)
    request.addfinalizer(lambda: model.engine.set_context_window(previous))
    huge = post(server.url, {"messages": msgs, "max_tokens": 10**9}).json()
    assert huge["choices"][0]["finish_reason"] == "length"
    assert huge["usage"]["prompt_tokens"] + huge["usage"]["completion_tokens"] == 460


# --------------------------------------------------------------------------- afterwards


def test_the_bystander_got_every_answer_whole_and_unchanged(server, bystander):
    bystander["stop"].set()
    bystander["thread"].join(WAIT_S)
    answers = bystander["answers"]
    assert bystander["alone"] and len(answers) >= 3, answers
    assert all(a == bystander["alone"] for a in answers), [a for a in answers if a != bystander["alone"]][:3]
    text = httpx.get(server.url + "/metrics", timeout=WAIT_S).text
    gauges = {line.split()[0]: float(line.split()[1]) for line in text.splitlines()
              if line.startswith(("dsvl2_requests_running", "dsvl2_requests_waiting", "dsvl2_requests_admitting",
                                  "dsvl2_batch_slots_in_use"))}
    assert gauges and all(v == 0 for v in gauges.values()), gauges
    assert 'dsvl2_requests_total{outcome="error"} 0' in text
