"""The server's security defaults, each checked: loopback bind, constant-time API key,
local images only under the allowed folder, no outbound fetch unless enabled (then only
what the test serves on loopback, with allow_fetch_private), 413 limits, model output
never run or parsed as HTML. The fetch guard and the Host, Origin and Content-Type checks:
tests/test_server_security.py.

Live servers run on 127.0.0.1 (daemon threads, ports the OS chose) and are marked slow;
the policy, parser and static checks are not.
"""

from __future__ import annotations

import base64
import hmac
import http.server
import inspect
import io
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from PIL import Image

import dsvl2
import dsvl2.server.app as app_mod
from dsvl2.commands.main import build_parser
from dsvl2.server import create_app
from dsvl2.server.errors import APIError
from dsvl2.server.images import ImagePolicy
from dsvl2.server.schema import ImageRef
from test_hostile_server import WAIT_S, LiveServer, assert_error, post

slow = pytest.mark.slow
KEY = "sk-secret-0123456789abcdef"
WEB = Path(dsvl2.__file__).parent / "web"


def png(w: int = 64, h: int = 48) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (10, 200, 30)).save(buf, "PNG")
    return buf.getvalue()


def chat(url: str) -> dict:
    return {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                      {"type": "text", "text": "x"}]}], "max_tokens": 1}


@pytest.fixture(scope="module")
def model(one_thread):
    return dsvl2.load("demo", prefix_caching=False)


# --------------------------------------------------------------------------- bind address


def test_serve_binds_loopback_by_default():
    args = build_parser().parse_args(["serve"])
    assert args.host == "127.0.0.1"


def _listening(port: int) -> list[str]:
    """Local addresses (hex, as /proc/net/tcp{,6} write them) listening on ``port``."""
    found = []
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not os.path.exists(name):
            continue
        for line in Path(name).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            addr, hexport = local.rsplit(":", 1)
            if state == "0A" and int(hexport, 16) == port:  # 0A: LISTEN
                found.append(addr)
    return found


@slow
def test_the_real_command_listens_on_127_0_0_1_only():
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.Popen([sys.executable, "-m", "dsvl2", "serve", "--port", "0", "--log-level", "warning"],
                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                         env=env)
    try:
        line = ""
        deadline = time.monotonic() + 120
        while " on http://" not in line and time.monotonic() < deadline:
            line = p.stderr.readline()
            assert line or p.poll() is None, "the server exited"
        m = re.search(r"on http://([^:/]+):(\d+)", line)
        assert m, line
        assert m.group(1) == "127.0.0.1"
        port = int(m.group(2))
        while not _listening(port) and time.monotonic() < deadline:  # uvicorn listens once it has started
            time.sleep(0.1)
        assert _listening(port) == ["0100007F"]  # 127.0.0.1, not 00000000 (all interfaces)
        assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=WAIT_S).status_code in (200, 503)
    finally:
        p.terminate()
        p.wait(30)


# --------------------------------------------------------------------------- API key


def test_the_key_is_compared_with_hmac_compare_digest():
    src = inspect.getsource(app_mod.ServerState.check_auth)
    assert "hmac.compare_digest(" in src
    assert not re.search(r"(token|key)\s*[!=]=|[!=]=\s*self\.api_key", src), src


@slow
def test_wrong_keys_of_any_length_are_401_and_go_through_compare_digest(model, monkeypatch):
    calls = []
    real = hmac.compare_digest
    monkeypatch.setattr(app_mod.hmac, "compare_digest", lambda a, b: calls.append((len(a), len(b))) or real(a, b))
    s = LiveServer(create_app(model, served_model_name="demo", api_key=KEY))
    try:
        body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
        same_length = KEY[:-1] + ("x" if KEY[-1] != "x" else "y")
        for key in (same_length, KEY[:5], KEY + "0", "x", "k" * 4096):
            calls.clear()
            r = post(s.url, body, headers={"Authorization": f"Bearer {key}"})
            assert_error(r, 401, "API key")
            assert r.headers["www-authenticate"] == "Bearer"
            assert calls == [(len(key.strip().encode()), len(KEY))], (key, calls)
        assert_error(post(s.url, body), 401, "missing API key")
        assert_error(post(s.url, body, headers={"Authorization": f"Basic {KEY}"}), 401)
        ok = post(s.url, body, headers={"Authorization": f"Bearer {KEY}"})
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 1
        assert httpx.get(s.url + "/v1/models", timeout=WAIT_S).status_code == 401
    finally:
        s.close()


# --------------------------------------------------------------------------- local files


def test_local_images_only_under_the_allowed_folder(tmp_path):
    allowed = tmp_path / "allowed"
    (allowed / "sub").mkdir(parents=True)
    (allowed / "sub" / "a.png").write_bytes(png())
    (tmp_path / "secret.png").write_bytes(png())
    (allowed / "link.png").symlink_to(tmp_path / "secret.png")
    (allowed / "up").symlink_to(tmp_path, target_is_directory=True)
    (allowed / "inner.png").symlink_to(allowed / "sub" / "a.png")  # a link that stays inside is fine
    policy = ImagePolicy(allowed_local_dir=allowed)

    for ok in ("sub/a.png", str(allowed / "sub" / "a.png"), (allowed / "sub" / "a.png").as_uri(), "inner.png",
               "sub/../sub/a.png"):
        assert policy.load(ImageRef(ok, "p")) == png(), ok
    for bad in ("../secret.png", "sub/../../secret.png", str(tmp_path / "secret.png"),
                (tmp_path / "secret.png").as_uri(), "link.png", "up/secret.png", "up/allowed/../secret.png",
                "/etc/passwd", "file:///etc/passwd", "file://host/etc/passwd", "sub", "nothing.png"):
        with pytest.raises(APIError) as e:
            policy.load(ImageRef(bad, "p"))
        assert e.value.status == 400 and e.value.code == "invalid_image_url", (bad, e.value.message)
    with pytest.raises(APIError) as e:  # no folder configured: no local file at all
        ImagePolicy().load(ImageRef(str(allowed / "sub" / "a.png"), "p"))
    assert e.value.status == 400 and "--allowed-local-dir" in e.value.message


# --------------------------------------------------------------------------- fetching


class _Serve(http.server.BaseHTTPRequestHandler):
    hits: list = []

    def do_GET(self):
        _Serve.hits.append(self.path)
        data = png()
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def image_host():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Serve)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    _Serve.hits = []
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@slow
def test_no_fetch_unless_enabled_then_fetched_from_loopback(model, image_host):
    url = image_host + "/cat.png"
    off = LiveServer(create_app(model, served_model_name="demo"))
    public = LiveServer(create_app(model, served_model_name="demo", allow_fetch=True))
    on = LiveServer(create_app(model, served_model_name="demo", allow_fetch=True, allow_fetch_private=True))
    try:
        assert_error(post(off.url, chat(url)), 400, "does not fetch remote images", "--allow-fetch")
        assert_error(post(public.url, chat(url)), 400, "loopback", "--allow-fetch-private")
        assert _Serve.hits == []  # not one outbound request
        r = post(on.url, chat(url))
        assert r.status_code == 200, r.text
        assert _Serve.hits == ["/cat.png"]
        data = "data:image/png;base64," + base64.b64encode(png()).decode()
        assert r.json()["usage"] == post(on.url, chat(data)).json()["usage"]  # the same image
    finally:
        off.close()
        public.close()
        on.close()


# --------------------------------------------------------------------------- 413 limits


@slow
def test_body_and_pixel_limits_are_413(model):
    s = LiveServer(create_app(model, served_model_name="demo", max_body_bytes=100_000, max_image_pixels=10_000))
    try:
        assert_error(post(s.url, {"messages": [{"role": "user", "content": "x" * 200_000}]}), 413, "at most 100000")
        ok = "data:image/png;base64," + base64.b64encode(png(100, 100)).decode()  # 10000 pixels: at the limit
        assert post(s.url, chat(ok)).status_code == 200
        big = "data:image/png;base64," + base64.b64encode(png(101, 100)).decode()
        err = assert_error(post(s.url, chat(big)), 413, "101x100 = 10100", "at most 10000")
        assert err["code"] == "image_too_large"
    finally:
        s.close()


# --------------------------------------------------------------------------- the web page


def _code(js: str) -> str:
    """JavaScript without its comments (the page's comments name the APIs it avoids)."""
    js = re.sub(r"/\*.*?\*/", "", js, flags=re.S)
    return re.sub(r"(^|\s)//[^\n]*", r"\1", js)


def test_the_web_page_never_parses_or_runs_model_output():
    files = [p for p in WEB.rglob("*") if p.suffix in (".js", ".html")]
    assert WEB / "app.js" in files
    for f in files:
        code = _code(f.read_text())
        for bad in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function",
                    "setTimeout(\"", "setTimeout('", "DOMParser", "createContextualFragment", "srcdoc"):
            assert bad not in code, (f.name, bad)
    assert "textContent" in _code((WEB / "app.js").read_text())
    assert "// innerHTML" not in _code("// innerHTML here\nx = 1")  # the comment stripper works
