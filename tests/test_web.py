"""The browser chat page, in a real headless Chromium against the real server.

Conventions of this file:
* The browser is Debian's Chromium (``/usr/bin/chromium``, installed by
  ``tests/browser/install.sh``), driven by Playwright for Python; nothing downloads a
  browser build (``playwright install`` is never run).
* ONE server for the module: ``create_app`` over the built-in demo model, run by uvicorn
  in a thread on a free 127.0.0.1 port; each test opens its own browser context(s),
  which is what a new browser tab of a new user is.
* Pace: the demo model answers at hundreds of tokens a second; to watch an answer grow
  (and stop it half-way) the engine's fault hook sleeps ``pace.delay`` seconds before
  each decode forward (``Engine.set_fault_hook``: a slow step, nothing replaced).
* Scripted answers: the ``script`` fixture (tests/conftest.py) gives the engine a sampler
  that emits chosen token ids, so that the real engine, server and page carry them
  (grounding markup, HTML).
* Independent facts: a streamed answer equals ``model.chat`` of the same conversation
  (greedy); a box sits where its 0..999 coordinates put it on the displayed image.
* Every wait is bounded; screenshots go to tests/artifacts/ (the README's one,
  docs/screenshot-web.png, is a copy of web-4-grounding.png).
"""

from __future__ import annotations

import base64
import http.server
import json
import re
import socket
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from PIL import Image

import dsvl2
from dsvl2.engine.sampling import SamplingParams
from dsvl2.server.app import create_app
from _paths import IMAGES

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"

SMALL = IMAGES / "multi_image_2.jpeg"  # 450x308: corn cobs, 633 prompt tokens
WAIT_S = 90  # the longest any single wait may take (a hang guard; generous for a loaded machine)


# ------------------------------------------------------------------------- the server

class Pace:
    """Seconds the engine sleeps before each decode forward (0: full speed)."""

    delay = 0.0


@pytest.fixture(scope="module")
def model():
    m = dsvl2.load("demo", device="cpu")

    def paced(stage, reqs):
        if stage == "decode" and Pace.delay:
            time.sleep(Pace.delay)

    m.engine.set_fault_hook(paced)
    yield m
    m.engine.set_fault_hook(None)
    Pace.delay = 0.0


@pytest.fixture(scope="module")
def base_url(model):
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(model, served_model_name="demo"), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="test-uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + WAIT_S
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(WAIT_S)
    sock.close()


@pytest.fixture(scope="module")
def pics(tmp_path_factory) -> dict[str, Path]:
    """Two more images, downscaled to 384 px (437 prompt tokens each: a fast prefill)."""
    out = {}
    folder = tmp_path_factory.mktemp("pics")
    for name, src in (("photo", "monday.jpg"), ("other", "visual_grounding_2.jpg")):
        with Image.open(IMAGES / src) as im:
            im = im.convert("RGB")
            im.thumbnail((384, 384))
            out[name] = folder / f"{name}.jpg"
            im.save(out[name], quality=90)
    return out


@pytest.fixture
def pace():
    yield Pace
    Pace.delay = 0.0


@pytest.fixture
def script(script, model):
    """script(*answers): the next requests answer these texts, one after the other (each
    ends with eos). One request at a time. (Text over conftest's ``script`` of ids.)"""
    tok = model.processor.tokenizer

    def install(*answers: str):
        ids = []
        for a in answers:
            ids += tok.encode(a) + [tok.eos_id]
        script(ids, tok.eos_id)

    return install


def get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=WAIT_S) as r:
        return r.read().decode()


def cancelled_count(base_url: str) -> int:
    m = re.search(r'^dsvl2_requests_total\{outcome="cancelled"\} (\d+)$', get(base_url + "/metrics"), re.M)
    return int(m.group(1))


def wait_for(predicate, what: str, timeout: float = WAIT_S, every: float = 0.05):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(every)


def data_url(path: Path) -> str:
    mime = {".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".png": "image/png"}[path.suffix]
    return f"data:{mime};base64," + base64.b64encode(path.read_bytes()).decode()


def reference(model, turns: list[tuple[str, list[Path], str | None]], max_new_tokens: int) -> str:
    """model.chat's greedy answer to the conversation the page sends (OpenAI-style
    messages, image parts first), without the test's pace."""
    messages = []
    for text, images, answer in turns:
        content = [{"type": "image_url", "image_url": {"url": data_url(p)}} for p in images]
        messages.append({"role": "user", "content": content + [{"type": "text", "text": text}]})
        if answer is not None:
            messages.append({"role": "assistant", "content": answer})
    delay, Pace.delay = Pace.delay, 0.0
    try:
        return model.chat(messages, max_new_tokens=max_new_tokens).text
    finally:
        Pace.delay = delay


# ------------------------------------------------------------------------- the browser

@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True, timeout=WAIT_S * 1000)
        yield b
        b.close()


@pytest.fixture
def open_tab(browser, base_url):
    """open_tab() -> a page in a new browser context (a new user), loaded and ready."""
    contexts = []

    def open_():
        ctx = browser.new_context(viewport={"width": 1280, "height": 960})
        ctx.set_default_timeout(WAIT_S * 1000)
        contexts.append(ctx)
        page = ctx.new_page()
        errors = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.js_errors = errors
        page.goto(base_url + "/")
        page.wait_for_selector("body[data-ready='1']")
        return page

    yield open_
    for ctx in contexts:
        for page in ctx.pages:
            assert not page.js_errors, page.js_errors
        ctx.close()


def attach(page, *paths: Path) -> None:
    before = page.locator("#pending img.thumb").count()
    page.set_input_files("#file-input", [str(p) for p in paths])
    page.wait_for_function(f"() => document.querySelectorAll('#pending img.thumb').length === {before + len(paths)}")


def set_max_tokens(page, n: int) -> None:
    page.fill("#max_new_tokens", str(n))


def ask(page, text: str) -> None:
    page.fill("#prompt", text)
    page.click("#send")


def last(page, selector: str = ""):
    ex = page.locator("#history .exchange").last
    return ex.locator(selector) if selector else ex


def watch(page, timeout: float = WAIT_S) -> tuple[str, list[str]]:
    """Poll the last answer until it ends: (final status, the texts seen while streaming)."""
    seen: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = last(page).get_attribute("data-status")
        text = last(page, ".answer").text_content()
        if status != "streaming":
            return status, seen
        if text and (not seen or seen[-1] != text):
            seen.append(text)
        time.sleep(0.02)
    raise AssertionError("the answer did not end in time")


def wait_done(page, timeout: float = WAIT_S) -> str:
    page.wait_for_function("() => { const e = [...document.querySelectorAll('#history .exchange')].pop();"
                           " return e && e.dataset.status && e.dataset.status !== 'streaming'; }",
                           timeout=timeout * 1000)
    return last(page).get_attribute("data-status")


def shot(page, name: str) -> Path:
    """A full-page screenshot, scrolled to the end (where the composer sits)."""
    page.evaluate("() => window.scrollTo(0, document.documentElement.scrollHeight)")
    path = ARTIFACTS / name
    page.screenshot(path=str(path), full_page=True)
    return path


# ------------------------------------------------------------------------- tests

def test_page_is_served_with_its_files_and_a_strict_policy(base_url):
    with urllib.request.urlopen(base_url + "/", timeout=WAIT_S) as r:
        html = r.read().decode()
        csp = r.headers["Content-Security-Policy"]
    assert "<script src=\"/static/app.js\"" in html and "default-src 'none'" in csp and "script-src 'self'" in csp
    # Everything the page loads is local: no http(s) URL in its files.
    for name in ("app.js", "style.css"):
        assert not re.search(r"https?://", get(f"{base_url}/static/{name}")), name
    assert not re.search(r"(src|href)=\"https?://", html)
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(base_url + "/static/__init__.py", timeout=WAIT_S)
    assert e.value.code == 404 and "error" in json.loads(e.value.read())


def test_upload_ask_and_watch_the_answer_stream(open_tab, model, pace):
    page = open_tab()
    banner = page.locator("#demo-banner")
    assert banner.is_visible() and "random" in banner.text_content()
    d = SamplingParams()
    for name, value in (("temperature", d.temperature), ("top_p", d.top_p), ("max_new_tokens", d.max_new_tokens)):
        assert float(page.input_value(f"#{name}")) == value
        assert float(page.text_content(f"#{name}-default").removeprefix("default ")) == value

    attach(page, SMALL)
    set_max_tokens(page, 60)
    pace.delay = 0.03  # about 2 s of streaming
    ask(page, "Describe this image.")
    page.wait_for_function("() => { const a = [...document.querySelectorAll('#history .answer')].pop();"
                           " return a && a.textContent.length > 16; }")
    shot(page, "web-1-streaming.png")
    status, seen = watch(page)
    final = last(page, ".answer").text_content()
    assert status == "stop" or status == "length", status
    partial = [t for t in seen if t != final]
    assert len(set(partial)) >= 2, seen  # it grew in front of us
    assert all(final.startswith(t) for t in seen)
    assert final == reference(model, [("Describe this image.", [SMALL], None)], 60)
    thumbs = last(page, ".msg.user img.thumb")
    assert thumbs.count() == 1 and thumbs.get_attribute("src") == data_url(SMALL)
    assert page.locator("#pending img").count() == 0 and page.input_value("#prompt") == ""
    shot(page, "web-2-streamed.png")


def test_stop_frees_the_slot_and_regenerate_answers_again(open_tab, model, base_url, pace):
    page = open_tab()
    cancelled = cancelled_count(base_url)
    attach(page, SMALL)
    set_max_tokens(page, 3000)
    pace.delay = 0.03
    ask(page, "Tell me everything about it.")
    wait_for(lambda: len(last(page, ".answer").text_content()) > 8, "the answer to start")
    assert model.driver.stats()["slots_in_use"] == 1
    page.click("#stop")
    assert wait_done(page) == "stopped"
    stopped = last(page, ".answer").text_content()
    wait_for(lambda: model.driver.stats()["slots_in_use"] == 0 and model.driver.stats()["running"] == 0,
             "the server to free the slot")
    assert cancelled_count(base_url) == cancelled + 1
    time.sleep(0.5)  # a few paced steps: nothing more arrives
    assert last(page, ".answer").text_content() == stopped
    assert 0 < len(stopped) and "stopped" in last(page, ".meta").text_content()
    shot(page, "web-3-stopped.png")

    pace.delay = 0.0
    set_max_tokens(page, 12)
    page.click("#regenerate")
    assert wait_done(page) in ("stop", "length")
    assert page.locator("#history .exchange").count() == 1
    assert last(page, ".answer").text_content() == reference(model, [("Tell me everything about it.", [SMALL], None)], 12)


def test_grounding_draws_labelled_boxes_on_the_image_they_name(open_tab, model, script, pics):
    photo, other = pics["photo"], pics["other"]
    page = open_tab()
    attach(page, SMALL)
    set_max_tokens(page, 16)
    ask(page, "Describe this image.")  # the demo model's own (random) answer
    assert wait_done(page) in ("stop", "length")

    x1, y1, x2, y2 = 140, 25, 820, 350
    script(f"Here: <|ref|>the speech bubble<|/ref|><|det|>[[{x1},{y1},{x2},{y2}]]<|/det|>",
           "<|ref|>the yellow cob<|/ref|><|det|>[[300,80,700,920]]<|/det|> and "
           "<|ref|>the husks<|/ref|><|det|>[[60,100,980,930]]<|/det|>")
    set_max_tokens(page, 200)
    attach(page, photo, other)
    ask(page, "<|grounding|>Find <|ref|>the speech bubble<|/ref|>.")
    assert wait_done(page) == "stop"
    assert last(page, ".answer").text_content().startswith("Here: <|ref|>the speech bubble<|/ref|>")  # markup stays
    # The server names the conversation's last image (index 2: SMALL, photo, other).
    fig = last(page, "figure.annotated")
    assert fig.count() == 1 and fig.get_attribute("data-image-index") == "2"
    assert fig.locator("img").get_attribute("src") == data_url(other)
    label = fig.locator(".box .box-label")
    assert label.count() == 1 and label.text_content() == "the speech bubble"
    img, box = fig.locator("img").bounding_box(), fig.locator(".box").bounding_box()
    for got, want in ((box["x"], img["x"] + x1 / 999 * img["width"]), (box["y"], img["y"] + y1 / 999 * img["height"]),
                      (box["width"], (x2 - x1) / 999 * img["width"]), (box["height"], (y2 - y1) / 999 * img["height"])):
        assert abs(got - want) < 1.5, (box, img)
    copied = json.loads(last(page, "textarea.boxes-text").input_value())
    w, h = Image.open(other).size
    assert copied == [{"label": "the speech bubble", "box": [x1, y1, x2, y2],
                       "box_px": [int(x1 / 999 * w), int(y1 / 999 * h), int(x2 / 999 * w), int(y2 / 999 * h)],
                       "image": 3}]

    attach(page, SMALL)
    ask(page, "<|grounding|>Find <|ref|>the yellow cob<|/ref|> and <|ref|>the husks<|/ref|>.")
    assert wait_done(page) == "stop"
    figs = page.locator("#history figure.annotated")
    assert figs.count() == 2  # the first answer's drawing stays on its own image
    assert figs.nth(0).locator("img").get_attribute("src") == data_url(other)
    assert figs.nth(1).get_attribute("data-image-index") == "3"
    assert figs.nth(1).locator("img").get_attribute("src") == data_url(SMALL)
    assert figs.nth(1).locator(".box-label").all_text_contents() == ["the yellow cob", "the husks"]
    path = shot(page, "web-4-grounding.png")
    assert path.stat().st_size > 10_000


def test_two_users_at_once_each_keep_their_own_conversation(open_tab, pace, pics):
    photo = pics["photo"]
    a, b = open_tab(), open_tab()
    sent = {"a": [], "b": []}
    for name, page in (("a", a), ("b", b)):
        page.on("request", lambda r, name=name: sent[name].append(r.post_data)
                if r.url.endswith("/v1/chat/completions") else None)
    attach(a, SMALL)
    attach(b, photo)
    for page in (a, b):
        set_max_tokens(page, 30)
    pace.delay = 0.03
    ask(a, "Question of apricot-user: what is this?")
    ask(b, "Question of blueberry-user: what is this?")
    # Both stream at the same time (one batch on the server).
    wait_for(lambda: all(last(p).get_attribute("data-status") == "streaming" and last(p, ".answer").text_content()
                         for p in (a, b)), "both answers to stream at once", every=0.02)
    assert wait_done(a) in ("stop", "length") and wait_done(b) in ("stop", "length")
    pace.delay = 0.0
    set_max_tokens(a, 4)
    set_max_tokens(b, 4)
    ask(a, "And the apricot-follow-up?")
    ask(b, "And the blueberry-follow-up?")
    wait_done(a)
    wait_done(b)
    text_a, text_b = a.text_content("#history"), b.text_content("#history")
    assert "apricot-user" in text_a and "apricot-follow-up" in text_a and "blueberry" not in text_a
    assert "blueberry-user" in text_b and "blueberry-follow-up" in text_b and "apricot" not in text_b
    assert [i.get_attribute("src") for i in a.locator("#history img.thumb").all()] == [data_url(SMALL)]
    assert [i.get_attribute("src") for i in b.locator("#history img.thumb").all()] == [data_url(photo)]
    # What each tab sent: its own history (user, its answer, user), nothing of the other's.
    second_a, second_b = json.loads(sent["a"][-1]), json.loads(sent["b"][-1])
    for body, mine, theirs in ((second_a, "apricot", "blueberry"), (second_b, "blueberry", "apricot")):
        assert [m["role"] for m in body["messages"]] == ["user", "assistant", "user"]
        assert f"{mine}-user" in json.dumps(body) and theirs not in json.dumps(body)
        assert body["truncate_history"] is True and body["stream"] is True
    shot(a, "web-5-two-users-a.png")
    shot(b, "web-5-two-users-b.png")


def test_bad_input_is_a_plain_message_and_the_conversation_goes_on(open_tab, tmp_path):
    page = open_tab()
    notice = page.locator("#notice")

    def said(*words: str) -> str:
        wait_for(lambda: notice.is_visible() and all(w in notice.text_content() for w in words),
                 f"a notice saying {words} (it says {notice.text_content()!r})")
        assert "Traceback" not in page.text_content("body")
        return notice.text_content()

    page.click("#send")
    said("empty")
    fake = tmp_path / "notes.png"
    fake.write_text("these are my notes, not a picture\n")
    page.set_input_files("#file-input", str(fake))
    said("notes.png", "not an image")
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 64)
    page.set_input_files("#file-input", str(broken))
    said("broken.png", "could not be read")
    huge = tmp_path / "huge.png"
    Image.new("1", (8000, 6000)).save(huge)  # 48 megapixels in a few kB
    page.set_input_files("#file-input", str(huge))
    said("huge.png", "8000×6000", "megapixels")
    assert page.locator("#pending img").count() == 0

    # A value the server refuses: its message, the message given back to fix and resend.
    page.fill("#temperature", "5")
    set_max_tokens(page, 4)
    ask(page, "Hello?")
    said("temperature", "0 to 2")
    assert page.locator("#history .exchange").count() == 0 and page.input_value("#prompt") == "Hello?"
    shot(page, "web-6-bad-input.png")

    page.click("#reset-settings")
    set_max_tokens(page, 4)
    attach(page, SMALL)
    page.click("#send")
    assert wait_done(page) in ("stop", "length")
    assert not notice.is_visible() and page.locator("#history .exchange").count() == 1


def test_long_conversation_drops_old_turns_says_so_and_boxes_stay_on_the_right_image(open_tab, model, script, pics):
    photo = pics["photo"]
    page = open_tab()
    hostile = '<img src=x onerror="document.title=\'pwned\'"><b>one</b>'
    script(hostile, "two", "<|ref|>corn<|/ref|><|det|>[[10,20,600,700]]<|/det|>")
    attach(page, photo)
    ask(page, "First?")
    assert wait_done(page) == "stop"
    answer = last(page, ".answer")  # model output is text, never HTML
    assert answer.text_content() == hostile and answer.locator("img, b").count() == 0
    assert page.title() == "dsvl2 chat"
    attach(page, SMALL)
    ask(page, "Second?")
    assert wait_done(page) == "stop"
    # A window that holds the second exchange and the question, not the first exchange.
    kept = [{"role": "user", "content": [{"type": "image", "image": SMALL.read_bytes()},
                                         {"type": "text", "text": "Second?"}]},
            {"role": "assistant", "content": "two"}, {"role": "user", "content": "Where is the corn?"}]
    need = model.process(kept)[0].seq_lens[0]
    whole = model.process([{"role": "user", "content": [{"type": "image", "image": photo.read_bytes()},
                                                        {"type": "text", "text": "First?"}]},
                           {"role": "assistant", "content": hostile}] + kept)[0].seq_lens[0]
    assert whole > need + 16 + 40
    window = model.engine.set_context_window(need + 16 + 40)
    try:
        ask(page, "Where is the corn?")
        assert wait_done(page) == "stop"
    finally:
        model.engine.set_context_window(window)
    note = last(page, ".dropped")
    assert note.is_visible() and "oldest 2 messages were left out" in note.text_content()
    # image_index 0 of what the server kept is SMALL (photo was in the dropped turn).
    fig = last(page, "figure.annotated")
    assert fig.locator("img").get_attribute("src") == data_url(SMALL)
    assert fig.get_attribute("data-image-index") == "0" and fig.locator(".box-label").text_content() == "corn"
    assert "Image 2 of the conversation" in fig.text_content()
    assert json.loads(last(page, "textarea.boxes-text").input_value())[0]["image"] == 2
    shot(page, "web-7-history-trimmed.png")


def test_images_come_by_drop_paste_and_examples_and_clear_starts_over(open_tab, pics):
    page = open_tab()
    payload = base64.b64encode(pics["photo"].read_bytes()).decode()
    # What the browser hands the page for a file dropped from the desktop / pasted from the clipboard.
    for event in ("drop", "paste"):
        page.evaluate("""([kind, b64]) => {
            const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
            const dt = new DataTransfer();
            dt.items.add(new File([bytes], kind + ".jpg", {type: "image/jpeg"}));
            const init = {bubbles: true, cancelable: true};
            const ev = kind === "drop" ? new DragEvent("drop", {...init, dataTransfer: dt})
                                       : new ClipboardEvent("paste", {...init, clipboardData: dt});
            document.getElementById("prompt").dispatchEvent(ev);
        }""", [event, payload])
    page.wait_for_function("() => document.querySelectorAll('#pending img.thumb').length === 2")
    assert [i.get_attribute("alt") for i in page.locator("#pending img.thumb").all()] == ["drop.jpg", "paste.jpg"]
    page.locator("#pending .remove").first.click()
    page.locator(".example", has_text="Describe a photo").click()
    page.wait_for_function("() => document.querySelectorAll('#pending img.thumb').length === 2")
    assert page.input_value("#prompt") == "Describe this image."
    thumbs = page.locator("#pending img.thumb")
    assert thumbs.nth(0).get_attribute("alt") == "paste.jpg" and thumbs.nth(1).get_attribute("alt") == "monday.jpg"
    set_max_tokens(page, 2)
    page.click("#send")
    assert wait_done(page) in ("stop", "length")
    assert page.locator("#history .exchange img.thumb").count() == 2
    page.click("#clear")
    assert page.locator("#history .exchange").count() == 0 and page.locator("#empty-hint").is_visible()
    assert page.is_disabled("#regenerate")


class _Foreign(http.server.BaseHTTPRequestHandler):
    """A page of another origin (another port of 127.0.0.1), as a site the user visits."""

    def do_GET(self):
        body = b"<!doctype html><title>another site</title><p>nothing to see"
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def completed_count(base_url: str) -> int:
    text = get(base_url + "/metrics")
    return sum(int(n) for n in re.findall(r'^dsvl2_requests_total\{outcome="(?:stop|length)"\} (\d+)$', text, re.M))


def test_a_page_of_another_origin_cannot_drive_the_api(browser, base_url):
    """CSRF in the real browser: a page on another origin POSTs to the API the two ways a
    page can, a body a page may send without asking (text/plain, no-cors) and JSON (which
    needs a CORS preflight). The server refuses both (403: a foreign Origin), nothing runs,
    and the page reads nothing."""
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Foreign)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    ctx = browser.new_context()
    ctx.set_default_timeout(WAIT_S * 1000)
    statuses = []
    try:
        page = ctx.new_page()
        page.on("response", lambda r: statuses.append((r.request.method, r.status))
                if r.url.endswith("/v1/chat/completions") else None)
        page.goto(f"http://127.0.0.1:{httpd.server_address[1]}/")
        before = completed_count(base_url)
        out = page.evaluate("""async (api) => {
            const body = JSON.stringify({messages: [{role: "user", content: "hi"}], max_tokens: 2});
            const out = {};
            const simple = await fetch(api, {method: "POST", mode: "no-cors", body,
                                             headers: {"Content-Type": "text/plain"}});
            out.simple = simple.type;  // opaque: the page cannot read it either way
            try {
              const r = await fetch(api, {method: "POST", body, headers: {"Content-Type": "application/json"}});
              out.json = r.status;
            } catch (e) { out.json = "blocked"; }
            return out;
        }""", base_url + "/v1/chat/completions")
        assert out == {"simple": "opaque", "json": "blocked"}, out
        assert ("POST", 403) in statuses, statuses  # the no-cors POST reached the server and was refused
        assert ("POST", 200) not in statuses, statuses
        assert completed_count(base_url) == before
    finally:
        ctx.close()
        httpd.shutdown()
        httpd.server_close()
