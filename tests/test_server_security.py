"""The server against web pages, DNS tricks and image URLs turned on its owner: each
attack itself, sent to a live server on loopback.

* CSRF: a body that is not ``application/json`` is a 415 (what a foreign page can send
  without a preflight, and curl -d); a request with a foreign ``Origin`` is a 403; the
  server's own origin and ``allowed_origins`` pass.
* DNS rebinding: a ``Host`` that is not loopback, the address the request came to, or in
  ``allowed_hosts`` is a 421 on every route.
* SSRF (``allow_fetch``): URLs naming loopback, private, link-local (cloud metadata) and
  other non-public addresses, directly, by a name, in IPv6 forms or after a redirect, are
  refused before any connection; the address checked is the one connected to; one
  deadline bounds a whole fetch, and a slow-drip URL neither outlives it nor holds up a
  request without fetched images.

Network rule: nothing connects anywhere but loopback. The autouse ``loopback_only``
fixture replaces ``fetch.system_connect`` so that a guard that let a non-loopback address
through would fail the test instead of connecting. Public names are fakes (``public.test``)
that the unit tests' injected resolver maps to a public address, and their injected
connector records that address and connects to a loopback test server instead.

Live servers run on 127.0.0.1 in threads of this process (``LiveServer``) and are marked
slow; the parser, address-class and ``Fetcher`` unit tests are not.
"""

from __future__ import annotations

import datetime
import http.server
import io
import ipaddress
import json
import socket
import ssl
import threading
import time
import urllib.parse

import httpx
import pytest
from PIL import Image

import dsvl2
import dsvl2.server.fetch as fetch_mod
from dsvl2.commands.main import build_parser
from dsvl2.errors import DSVL2Error
from dsvl2.server import create_app
from dsvl2.server.app import PREP_WORKERS
from dsvl2.commands.serve import check_options
from dsvl2.server.errors import APIError
from dsvl2.server.fetch import Fetcher, FetchError, FetchRefused, address_class
from dsvl2.server.guard import RequestGuard, is_loopback_host, parse_host, parse_origin
from dsvl2.server.images import ImagePolicy
from dsvl2.server.schema import ImageRef
from test_server import WAIT_S, LiveServer, assert_openai_error, post, wait_for

slow = pytest.mark.slow
PUBLIC_IP = "93.184.216.34"  # never connected to: the injected connector goes to loopback instead
URL_PARAM = "messages[0].content[0].image_url.url"
JSON = {"Content-Type": "application/json"}


def png(w: int = 32, h: int = 24) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (200, 30, 10)).save(buf, "PNG")
    return buf.getvalue()


PNG = png()


def hello(max_tokens: int = 2) -> dict:
    return {"messages": [{"role": "user", "content": "hi"}], "max_tokens": max_tokens}


def with_image(url: str) -> dict:
    return {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                      {"type": "text", "text": "x"}]}], "max_tokens": 1}


def _is_loopback_ip(ip: str) -> bool:
    a = ipaddress.ip_address(ip.split("%")[0])
    if isinstance(a, ipaddress.IPv6Address) and a.ipv4_mapped is not None:
        a = a.ipv4_mapped
    return a.is_loopback


@pytest.fixture(autouse=True)
def loopback_only(monkeypatch):
    """Every connection the fetcher's default connector makes, recorded; any that is not
    to loopback fails instead of being made."""
    attempts: list[tuple[str, int]] = []
    real = fetch_mod.system_connect

    def guarded(ip: str, port: int, timeout: float):
        attempts.append((ip, port))
        if not _is_loopback_ip(ip):
            raise AssertionError(f"the fetcher tried to connect to {ip}:{port}")
        return real(ip, port, timeout)

    monkeypatch.setattr(fetch_mod, "system_connect", guarded)
    return attempts


# --------------------------------------------------------------------------- a loopback image server


class _Images(http.server.BaseHTTPRequestHandler):
    """/img.png; /to?u=URL (302 to URL); /redirects/N (a chain of N redirects to the
    image); /drip (headers, then the body a byte every 0.5 s); /header-drip (a header
    line that never ends, a byte every 0.5 s)."""

    protocol_version = "HTTP/1.1"
    hits: list = []       # (path, Host header)
    drips_ended: list = []

    def do_GET(self):
        _Images.hits.append((self.path, self.headers.get("Host")))
        path, _, query = self.path.partition("?")
        if path == "/img.png":
            self._send(PNG)
        elif path == "/to":
            self._redirect(urllib.parse.parse_qs(query)["u"][0])
        elif path.startswith("/redirects/"):
            n = int(path.rsplit("/", 1)[1])  # n redirects in all
            self._redirect(f"/redirects/{n - 1}" if n > 1 else "/img.png")
        elif path in ("/drip", "/header-drip"):
            self._drip(path == "/drip")
        else:
            self.send_error(404)

    def _send(self, data: bytes) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _redirect(self, to: str) -> None:
        self.send_response(302)
        self.send_header("Location", to)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _drip(self, body: bool) -> None:
        if body:
            head = f"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nContent-Length: {len(PNG)}\r\n\r\n"
        else:
            head = "HTTP/1.1 200 OK\r\nX-Slow: "
        try:
            self.wfile.write(head.encode())
            for i in range(120):  # at most 60 s
                self.wfile.write(PNG[i:i + 1] if body else b"x")
                self.wfile.flush()
                time.sleep(0.5)
        except OSError:
            pass
        finally:
            _Images.drips_ended.append(time.monotonic())
            self.close_connection = True

    def log_message(self, *args):
        pass


class _ImageServer:
    def __init__(self):
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Images)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.base = f"http://127.0.0.1:{self.port}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def images():
    s = _ImageServer()
    yield s
    s.close()


@pytest.fixture(autouse=True)
def _fresh_hits():
    _Images.hits = []
    _Images.drips_ended = []


def fake_net(images: _ImageServer, names: dict[str, list[str]]):
    """(resolver, connector, lookups, connects): the resolver answers from ``names``; the
    connector records the address it is given and connects to the loopback image server."""
    lookups, connects = [], []

    def resolve(host: str, port: int) -> list[str]:
        lookups.append(host)
        if host not in names:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return list(names[host])

    def connect(ip: str, port: int, timeout: float) -> socket.socket:
        connects.append((ip, port))
        return socket.create_connection(("127.0.0.1", images.port), timeout)

    return resolve, connect, lookups, connects


# --------------------------------------------------------------------------- unit: Host and Origin


def test_host_values_are_parsed_strictly():
    assert parse_host("LOCALHOST.:8000") == ("localhost", 8000)
    assert parse_host("evil.example") == ("evil.example", None)
    assert parse_host("[::1]:8000") == ("::1", 8000)
    assert parse_host("[0:0::1]") == ("::1", None)  # IPv6 compared compressed
    for bad in ("::1", "[::1", "localhost:99999", "localhost:http", "a b", "", ":80", "x:1:2", "localhost:+80"):
        assert parse_host(bad) is None, bad
    for ok in ("localhost", "127.0.0.1", "127.255.0.9", "[::1]", "::ffff:127.0.0.1", "0.0.0.0", "::"):
        assert is_loopback_host(parse_host(ok)[0] if parse_host(ok) else str(ipaddress.ip_address(ok))), ok
    for no in ("evil.example", "localhost.evil.example", "127.0.0.1.nip.io", "10.0.0.1", "::2", "localhostx"):
        assert not is_loopback_host(no), no
    assert parse_origin("HTTP://LocalHost:80") == ("http", "localhost", 80)
    assert parse_origin("https://[::1]") == ("https", "::1", 443)
    for bad in ("null", "http://a.b/", "http://u@a.b", "ftp://a.b", "a.b", "http://"):
        assert parse_origin(bad) is None, bad


def _scope(host: str | None, origin: str | None = None, server=("127.0.0.1", 8000), scheme="http") -> dict:
    headers = [] if host is None else [(b"host", host.encode())]
    if origin is not None:
        headers.append((b"origin", origin.encode()))
    return {"type": "http", "headers": headers, "server": server, "scheme": scheme}


def _status(guard: RequestGuard, scope: dict) -> int:
    try:
        guard.check(scope)
    except APIError as e:
        return e.status
    return 200


def test_the_guard_decides_by_host_origin_and_the_address_the_request_came_to():
    g = RequestGuard(None)
    assert _status(g, _scope("evil.example:8000")) == 421
    assert _status(g, _scope("localhost:8000")) == 200
    assert _status(g, _scope(None)) == 200  # HTTP/1.0 without Host: served (browsers always send one)
    assert _status(g, _scope(None, "http://127.0.0.1:8000")) == 403  # ... but any Origin is then foreign
    # bound to every interface: a LAN client using the address it connected to is served, names are not
    lan = ("192.168.1.5", 8000)
    assert _status(g, _scope("192.168.1.5:8000", server=lan)) == 200
    assert _status(g, _scope("192.168.1.6:8000", server=lan)) == 421
    assert _status(g, _scope("192.168.1.5:8000", server=("::ffff:192.168.1.5", 8000))) == 200  # dual stack
    assert _status(g, _scope("gpu.lan:8000", server=lan)) == 421
    assert _status(RequestGuard(None, allowed_hosts=["GPU.lan."]), _scope("gpu.lan:8000", server=lan)) == 200
    assert _status(RequestGuard(None, allowed_hosts=["gpu.lan:9000"]), _scope("gpu.lan:8000", server=lan)) == 421
    assert _status(RequestGuard(None, allowed_hosts=["::5"]), _scope("[::5]:8000")) == 200
    assert _status(RequestGuard(None, allowed_hosts=["*"]), _scope("evil.example")) == 200
    # Origin: the scheme and Host the request came with, default ports filled in
    assert _status(g, _scope("localhost:8000", "http://localhost:8000")) == 200
    assert _status(g, _scope("localhost", "http://localhost:80")) == 200
    assert _status(g, _scope("localhost:8000", "http://127.0.0.1:8000")) == 403
    assert _status(g, _scope("localhost:8000", "https://localhost:8000")) == 403
    assert _status(g, _scope("localhost:443", "https://localhost", scheme="https")) == 200
    allowed = RequestGuard(None, allowed_origins=["https://chat.example.com"])
    assert _status(allowed, _scope("localhost:8000", "https://chat.example.com:443")) == 200
    assert _status(allowed, _scope("localhost:8000", "https://evil.example")) == 403
    with pytest.raises(ValueError, match="--allowed-host"):
        RequestGuard(None, allowed_hosts=["bad host"])
    with pytest.raises(ValueError, match="--allowed-origin"):
        RequestGuard(None, allowed_origins=["https://chat.example.com/"])


def test_serve_checks_the_security_options_before_loading():
    def check(*argv):
        check_options(build_parser().parse_args(["serve", *argv]))

    check("--allowed-host", "vl.example", "--allowed-host", "[::1]", "--allowed-origin", "https://a.example",
          "--allow-fetch", "--allow-fetch-private", "--fetch-timeout", "2.5")
    for argv, words in ((["--allowed-host", "a b"], "--allowed-host"),
                        (["--allowed-origin", "a.example"], "--allowed-origin"),
                        (["--allow-fetch-private"], "needs --allow-fetch"),
                        (["--allow-fetch", "--fetch-timeout", "0"], "--fetch-timeout")):
        with pytest.raises(DSVL2Error, match=words):
            check(*argv)


# --------------------------------------------------------------------------- unit: address classes


@pytest.mark.parametrize("ip, kind", [
    ("127.0.0.1", "loopback"), ("127.9.9.9", "loopback"), ("::1", "loopback"),
    ("10.1.2.3", "private"), ("172.16.0.1", "private"), ("172.31.255.254", "private"), ("192.168.0.10", "private"),
    ("100.64.0.1", "private"), ("fc00::1", "private"), ("fd12:3456::1", "private"),
    ("169.254.169.254", "link-local"), ("169.254.0.1", "link-local"), ("fe80::1", "link-local"),
    ("224.0.0.1", "multicast"), ("239.255.255.250", "multicast"), ("ff02::1", "multicast"),
    ("0.0.0.0", "unspecified"), ("::", "unspecified"),
    ("240.0.0.1", "reserved"), ("255.255.255.255", "reserved"), ("0.1.2.3", "reserved"), ("192.0.2.1", "reserved"),
    ("2001:db8::1", "reserved"),
    ("::ffff:127.0.0.1", "loopback"), ("::ffff:10.0.0.1", "private"), ("::ffff:169.254.169.254", "link-local"),
    ("::ffff:0.0.0.0", "unspecified"), ("::7f00:1", "loopback"), ("2002:7f00:1::1", "loopback"),
    ("2002:a9fe:a9fe::", "link-local"), ("64:ff9b::a9fe:a9fe", "link-local"), ("64:ff9b::a00:1", "private"),
    ("fd00:ec2::254", "cloud metadata"), ("100.100.100.200", "cloud metadata"),
    (PUBLIC_IP, None), ("8.8.8.8", None), ("2606:4700:4700::1111", None), ("::ffff:8.8.8.8", None),
    ("64:ff9b::808:808", None), ("172.32.0.1", None),
])
def test_address_classes(ip, kind):
    assert address_class(ipaddress.ip_address(ip)) == kind


# --------------------------------------------------------------------------- unit: the fetcher


def test_the_checked_address_is_the_one_connected_to_with_the_host_name_sent(images):
    resolve, connect, lookups, connects = fake_net(images, {"public.test": [PUBLIC_IP]})
    assert Fetcher(resolve=resolve, connect=connect).fetch("http://public.test/img.png?x=1") == PNG
    assert lookups == ["public.test"] and connects == [(PUBLIC_IP, 80)]
    assert _Images.hits == [("/img.png?x=1", "public.test")]


def test_a_name_is_looked_up_once_so_it_cannot_rebind_between_check_and_connect(images):
    answers = iter([[PUBLIC_IP], ["127.0.0.1"], ["127.0.0.1"]])
    lookups, connects = [], []

    def resolve(host, port):
        lookups.append(host)
        return next(answers)

    def connect(ip, port, timeout):
        connects.append(ip)
        return socket.create_connection(("127.0.0.1", images.port), timeout)

    assert Fetcher(resolve=resolve, connect=connect).fetch("http://rebind.test/img.png") == PNG
    assert lookups == ["rebind.test"] and connects == [PUBLIC_IP]


@pytest.mark.parametrize("names, kind", [
    (["127.0.0.1"], "loopback"), (["10.0.0.5"], "private"), (["169.254.169.254"], "link-local"),
    (["::ffff:127.0.0.1"], "loopback"), ([PUBLIC_IP, "192.168.1.1"], "private"),  # any bad address: refused
    (["0.0.0.0"], "unspecified"), (["ff02::1"], "multicast"),
])
def test_names_resolving_to_non_public_addresses_are_refused_before_connecting(images, names, kind):
    resolve, connect, _, connects = fake_net(images, {"sneaky.test": names})
    with pytest.raises(FetchRefused) as e:
        Fetcher(resolve=resolve, connect=connect).fetch("http://sneaky.test/img.png")
    assert e.value.address_class == kind and kind in str(e.value) and "sneaky.test" in str(e.value)
    assert connects == [] and _Images.hits == []


def test_redirects_are_checked_like_the_first_url(images):
    names = {"public.test": [PUBLIC_IP], "internal.test": ["10.0.0.5"]}
    resolve, connect, lookups, connects = fake_net(images, names)
    f = Fetcher(resolve=resolve, connect=connect)
    to = "http://public.test/to?u=" + urllib.parse.quote("http://internal.test/img.png", safe="")
    with pytest.raises(FetchRefused) as e:
        f.fetch(to)
    assert e.value.address_class == "private" and "redirect" in str(e.value)
    assert connects == [(PUBLIC_IP, 80)]  # the first hop only
    # allow_private opens private networks: the same redirect is followed (to the fake 10.0.0.5)
    connects.clear()
    assert Fetcher(allow_private=True, resolve=resolve, connect=connect).fetch(to) == PNG
    assert connects == [(PUBLIC_IP, 80), ("10.0.0.5", 80)]
    assert _Images.hits[-1] == ("/img.png", "internal.test")
    # ... but never link-local (cloud metadata), nor an IPv4-mapped loopback without it, nor ftp
    for target, words in (("http://169.254.169.254/latest/meta-data/", "link-local"),
                          ("http://[fd00:ec2::254]/latest/", "cloud metadata"),
                          ("http://[::ffff:169.254.169.254]/", "link-local"),
                          ("ftp://public.test/img.png", "only http and https"),
                          ("file:///etc/passwd", "only http and https")):
        connects.clear()
        with pytest.raises(FetchError, match=words):
            Fetcher(allow_private=True, resolve=resolve, connect=connect).fetch(
                "http://public.test/to?u=" + urllib.parse.quote(target, safe=""))
        assert connects == [(PUBLIC_IP, 80)], target
    with pytest.raises(FetchRefused, match="loopback"):
        f.fetch("http://public.test/to?u=" + urllib.parse.quote("http://[::ffff:127.0.0.1]/", safe=""))


def test_at_most_three_redirects(images):
    resolve, connect, _, connects = fake_net(images, {"public.test": [PUBLIC_IP]})
    f = Fetcher(resolve=resolve, connect=connect)
    assert f.fetch("http://public.test/redirects/3") == PNG
    connects.clear()
    with pytest.raises(FetchError, match="more than 3 redirects"):
        f.fetch("http://public.test/redirects/4")
    assert len(connects) == 4


def test_size_cap_lookup_failure_and_a_slow_lookup_within_the_deadline(images):
    resolve, connect, _, _ = fake_net(images, {"public.test": [PUBLIC_IP]})
    with pytest.raises(FetchError) as e:
        Fetcher(resolve=resolve, connect=connect, max_bytes=len(PNG) - 1).fetch("http://public.test/img.png")
    assert e.value.status == 413
    with pytest.raises(FetchError, match="does not resolve"):
        Fetcher(resolve=resolve, connect=connect).fetch("http://nowhere.test/img.png")

    def stuck(host, port):
        time.sleep(5)
        return [PUBLIC_IP]

    t0 = time.monotonic()
    with pytest.raises(FetchError, match="0.5 s deadline") as e:
        Fetcher(resolve=stuck, connect=connect, timeout_s=0.5).fetch("http://slow-dns.test/img.png")
    assert e.value.code == "image_fetch_timeout" and time.monotonic() - t0 < 2


@pytest.mark.parametrize("path", ["/drip", "/header-drip"])
def test_one_deadline_for_the_whole_fetch_not_per_read(images, path):
    """The server sends a byte every 0.5 s, so no single read ever waits long."""
    resolve, connect, _, _ = fake_net(images, {"public.test": [PUBLIC_IP]})
    t0 = time.monotonic()
    with pytest.raises(FetchError, match="1.5 s deadline") as e:
        Fetcher(resolve=resolve, connect=connect, timeout_s=1.5).fetch("http://public.test" + path)
    took = time.monotonic() - t0
    assert e.value.code == "image_fetch_timeout" and 1.4 <= took < 3, took
    wait_for(lambda: _Images.drips_ended, "the drip server to see the connection closed", 5)


def _tls_files(tmp_path, name: str):
    """A test CA (its PEM path) and a cert + key for ``name`` signed by it."""
    x509 = pytest.importorskip("cryptography.x509")
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def cert(subject, key, issuer, issuer_key, ca: bool, san=None):
        b = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
             .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
             .public_key(key.public_key()).serial_number(x509.random_serial_number())
             .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=1))
             .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if ca:
            b = b.add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                              content_commitment=False, key_encipherment=False,
                                              data_encipherment=False, key_agreement=False,
                                              encipher_only=False, decipher_only=False), critical=True)
            b = b.add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        else:
            b = b.add_extension(x509.SubjectAlternativeName([x509.DNSName(san)]), critical=False)
            b = b.add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
                                critical=False)
        return b.sign(issuer_key, hashes.SHA256())

    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = cert("dsvl2 test CA", ca_key, "dsvl2 test CA", ca_key, True)
    leaf = cert(name, key, "dsvl2 test CA", ca_key, False, san=name)
    pem = serialization.Encoding.PEM
    (tmp_path / "ca.pem").write_bytes(ca.public_bytes(pem))
    (tmp_path / "leaf.pem").write_bytes(leaf.public_bytes(pem))
    (tmp_path / "leaf.key").write_bytes(key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                                          serialization.NoEncryption()))
    return tmp_path / "ca.pem", tmp_path / "leaf.pem", tmp_path / "leaf.key"


def test_https_sends_the_host_name_as_sni_and_checks_the_certificate_against_it(tmp_path):
    ca, leaf, key = _tls_files(tmp_path, "public.test")
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(leaf, key)
    sni: list = []
    server_ctx.sni_callback = lambda sock, name, ctx: sni.append(name)
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Images)
    httpd.daemon_threads = True
    httpd.socket = server_ctx.wrap_socket(httpd.socket, server_side=True)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    port = httpd.server_address[1]
    connects = []

    def connect(ip, p, timeout):
        connects.append((ip, p))
        return socket.create_connection(("127.0.0.1", port), timeout)

    names = {"public.test": [PUBLIC_IP], "other.test": ["203.0.113.9"]}
    client_ctx = ssl.create_default_context(cafile=str(ca))
    try:
        f = Fetcher(resolve=lambda h, p: names[h], connect=connect, ssl_context=client_ctx)
        assert f.fetch("https://public.test/img.png") == PNG
        assert connects == [(PUBLIC_IP, 443)] and sni == ["public.test"]
        assert _Images.hits == [("/img.png", "public.test")]
        names["other.test"] = [PUBLIC_IP]
        with pytest.raises(FetchError, match="certificate"):  # the cert names public.test only
            f.fetch("https://other.test/img.png")
        with pytest.raises(FetchError, match="certificate"):  # the system CAs do not know the test CA
            Fetcher(resolve=lambda h, p: names[h], connect=connect).fetch("https://public.test/img.png")
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_the_image_policy_names_the_field_and_the_class(images):
    ref = ImageRef(f"{images.base}/img.png", URL_PARAM)
    with pytest.raises(APIError) as e:
        ImagePolicy(allow_fetch=True).load(ref)
    err = e.value
    assert err.status == 400 and err.param == URL_PARAM and err.code == "image_url_not_allowed"
    assert "loopback" in err.message and "--allow-fetch-private" in err.message
    assert ImagePolicy(allow_fetch=True, allow_fetch_private=True).load(ref) == PNG


# --------------------------------------------------------------------------- live: CSRF


@pytest.fixture(scope="module")
def model(one_thread):
    return dsvl2.load("demo", prefix_caching=False)


@pytest.fixture(scope="module")
def server(model):
    s = LiveServer(create_app(model, served_model_name="demo", allowed_origins=["https://chat.example.com"]))
    yield s
    s.close()


def raw_post(url: str, body: str, headers: dict) -> httpx.Response:
    return httpx.post(url + "/v1/chat/completions", content=body, headers=headers, timeout=WAIT_S)


@slow
def test_bodies_a_foreign_page_or_curl_d_can_send_are_415(server):
    body = json.dumps(hello())
    r = raw_post(server.url, body, {})
    assert "content-type" not in r.request.headers
    err = assert_openai_error(r, 415, "without a Content-Type", "application/json")
    assert err["code"] == "unsupported_media_type"
    for ctype in ("text/plain", "text/plain;charset=UTF-8", "application/x-www-form-urlencoded",
                  "multipart/form-data; boundary=x", "application/xml"):
        assert_openai_error(raw_post(server.url, body, {"Content-Type": ctype}), 415, "application/json")
    assert raw_post(server.url, body, {"Content-Type": "application/json; charset=utf-8"}).status_code == 200


@slow
def test_a_foreign_origin_is_403_the_own_and_allowed_ones_pass(server):
    body = json.dumps(hello())
    port = server.url.rsplit(":", 1)[1]
    for origin in ("http://evil.example", "null", f"http://localhost:{port}", f"https://127.0.0.1:{port}",
                   "http://127.0.0.1", "https://chat.example.com.evil.example"):
        err = assert_openai_error(raw_post(server.url, body, {**JSON, "Origin": origin}), 403, "--allowed-origin")
        assert err["code"] == "origin_not_allowed" and err["type"] == "permission_error"
    # the classic CSRF form post: refused whatever its type
    assert_openai_error(raw_post(server.url, body, {"Content-Type": "text/plain", "Origin": "http://evil.example"}),
                        403)
    # a cross-origin read of the other routes too
    for path in ("/v1/models", "/metrics", "/"):
        r = httpx.get(server.url + path, headers={"Origin": "http://evil.example"}, timeout=WAIT_S)
        assert_openai_error(r, 403)
    for origin in (server.url, f"HTTP://127.0.0.1:{port}", "https://chat.example.com"):
        r = raw_post(server.url, body, {**JSON, "Origin": origin})
        assert r.status_code == 200, (origin, r.text)
    # the page opened as http://localhost:PORT calls the API as that origin
    r = raw_post(server.url, body, {**JSON, "Host": f"localhost:{port}", "Origin": f"http://localhost:{port}"})
    assert r.status_code == 200, r.text


# --------------------------------------------------------------------------- live: DNS rebinding


def _raw_http(port: int, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT_S) as s:
        s.sendall(request)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
        return out


@slow
def test_a_foreign_host_name_is_421_on_every_route(server):
    port = int(server.url.rsplit(":", 1)[1])
    for host in (f"evil.example:{port}", "evil.example", f"EVIL.example.:{port}", f"localhost.evil.example:{port}",
                 f"127.0.0.1.nip.io:{port}", f"10.0.0.1:{port}", f"[::2]:{port}"):
        for path in ("/", "/health", "/metrics", "/v1/models", "/static/app.js", "/web/config", "/nothing"):
            r = httpx.get(server.url + path, headers={"Host": host}, timeout=WAIT_S)
            err = assert_openai_error(r, 421, "--allowed-host")
            assert err["code"] == "host_not_allowed", (host, path)
        r = post(server.url, hello(), headers={"Host": host})
        assert_openai_error(r, 421, "DNS rebinding")
    for host in ("::1", "localhost:99999", "localhost:http"):
        assert_openai_error(httpx.get(server.url + "/health", headers={"Host": host}, timeout=WAIT_S), 400, "Host")
    for host in (f"localhost:{port}", f"LOCALHOST.:{port}", "localhost", f"127.0.0.1:{port}", f"127.3.2.1:{port}",
                 f"[::1]:{port}", f"[::ffff:127.0.0.1]:{port}", f"0.0.0.0:{port}"):
        assert httpx.get(server.url + "/health", headers={"Host": host}, timeout=WAIT_S).status_code == 200, host
    assert post(server.url, hello(), headers={"Host": f"localhost:{port}"}).status_code == 200
    # HTTP/1.0 without a Host: served; two Host headers: 400
    assert _raw_http(port, b"GET /health HTTP/1.0\r\n\r\n").startswith(b"HTTP/1.1 200")
    two = _raw_http(port, b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nHost: evil.example\r\nConnection: close\r\n\r\n")
    assert two.startswith(b"HTTP/1.1 400"), two[:100]


@slow
def test_allowed_hosts_open_the_names_listed(model):
    s = LiveServer(create_app(model, served_model_name="demo", allowed_hosts=["vl.example"]))
    star = LiveServer(create_app(model, served_model_name="demo", allowed_hosts=["*"]))
    try:
        port = s.url.rsplit(":", 1)[1]
        for host, status in ((f"vl.example:{port}", 200), ("VL.Example.", 200), (f"other.example:{port}", 421)):
            assert httpx.get(s.url + "/health", headers={"Host": host}, timeout=WAIT_S).status_code == status, host
        r = post(s.url, hello(), headers={"Host": f"vl.example:{port}", "Origin": f"http://vl.example:{port}"})
        assert r.status_code == 200, r.text
        assert httpx.get(star.url + "/health", headers={"Host": "evil.example"}, timeout=WAIT_S).status_code == 200
    finally:
        s.close()
        star.close()


# --------------------------------------------------------------------------- live: SSRF


@slow
def test_image_urls_naming_loopback_or_internal_addresses_are_400_before_any_connection(model, images,
                                                                                      loopback_only):
    s = LiveServer(create_app(model, served_model_name="demo", allow_fetch=True))
    p = images.port
    try:
        for url, kind in ((f"http://127.0.0.1:{p}/img.png", "loopback"), (f"http://[::1]:{p}/img.png", "loopback"),
                          (f"http://localhost:{p}/img.png", "loopback"), (f"http://LocalHost:{p}/img.png", "loopback"),
                          (f"http://2130706433:{p}/img.png", "loopback"), (f"http://127.1:{p}/img.png", "loopback"),
                          (f"http://[::ffff:127.0.0.1]:{p}/img.png", "loopback"),
                          (f"http://0.0.0.0:{p}/img.png", "unspecified"),
                          ("http://169.254.169.254/latest/meta-data/", "link-local"),
                          ("http://[fe80::1]/x.png", "link-local"), ("http://10.0.0.1/x.png", "private"),
                          ("http://192.168.1.1/x.png", "private"), ("https://[fd00::1]/x.png", "private"),
                          ("http://224.0.0.1/x.png", "multicast")):
            err = assert_openai_error(post(s.url, with_image(url)), 400, kind, param=URL_PARAM)
            assert err["code"] == "image_url_not_allowed", url
        assert _Images.hits == [] and loopback_only == []  # not one connection was attempted
    finally:
        s.close()


@slow
def test_redirects_to_metadata_are_refused_even_with_allow_fetch_private(model, images, loopback_only):
    s = LiveServer(create_app(model, served_model_name="demo", allow_fetch=True, allow_fetch_private=True))
    try:
        assert post(s.url, with_image(images.base + "/img.png")).status_code == 200
        for target, words in (("http://169.254.169.254/latest/meta-data/", "link-local"),
                              ("http://[fe80::a9fe:a9fe]/", "link-local"),
                              ("http://[fd00:ec2::254]/latest/meta-data/", "cloud metadata"),
                              ("ftp://127.0.0.1/x.png", "only http and https")):
            url = images.base + "/to?u=" + urllib.parse.quote(target, safe="")
            assert_openai_error(post(s.url, with_image(url)), 400, "redirect", words, param=URL_PARAM)
        assert post(s.url, with_image(images.base + "/redirects/3")).status_code == 200
        assert_openai_error(post(s.url, with_image(images.base + "/redirects/4")), 400, "more than 3 redirects")
        assert {ip for ip, _ in loopback_only} == {"127.0.0.1"}
    finally:
        s.close()


@slow
def test_slow_drip_urls_end_at_the_deadline_and_hold_nobody_else(model, images):
    """More slow-drip fetches than there are preparation workers: each ends at the
    deadline with a 400 naming it, and a text-only request completes meanwhile."""
    deadline = 4.0
    s = LiveServer(create_app(model, served_model_name="demo", allow_fetch=True, allow_fetch_private=True,
                              fetch_timeout_s=deadline))
    try:
        assert post(s.url, hello()).status_code == 200  # warm
        paths = ["/drip"] * (PREP_WORKERS + 1) + ["/header-drip"]
        results: dict[int, tuple[httpx.Response, float, float]] = {}

        def slow_client(i: int, path: str):
            t0 = time.monotonic()
            r = post(s.url, with_image(images.base + path))
            results[i] = (r, t0, time.monotonic())

        threads = [threading.Thread(target=slow_client, args=(i, p), daemon=True) for i, p in enumerate(paths)]
        for t in threads:
            t.start()
        wait_for(lambda: len(_Images.hits) == len(paths), "every slow fetch to have started", WAIT_S)
        t0 = time.monotonic()
        r = post(s.url, hello())
        bystander_done = time.monotonic()
        assert r.status_code == 200, r.text
        assert not results, "the bystander waited for the slow fetches"
        assert bystander_done - t0 < deadline
        for t in threads:
            t.join(WAIT_S)
        assert len(results) == len(paths)
        for r, start, end in results.values():
            err = assert_openai_error(r, 400, f"{deadline:g} s deadline", "--fetch-timeout", param=URL_PARAM)
            assert err["code"] == "image_fetch_timeout"
            assert deadline - 0.1 <= end - start < deadline + 3, end - start
        # the fetch threads let go of the connections: the drip server sees them closed
        wait_for(lambda: len(_Images.drips_ended) == len(paths), "the slow connections to be closed", 5)
        assert post(s.url, with_image(images.base + "/img.png")).status_code == 200
    finally:
        s.close()
