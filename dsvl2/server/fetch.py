"""Fetching an image URL (``--allow-fetch``) without letting the URL choose where the
server connects (server-side request forgery).

A URL a client sends could name the server's own loopback services, the private network
behind it, or a cloud's metadata service (``http://169.254.169.254/``). So ``Fetcher``:

1. accepts ``http``/``https`` only, and resolves the host name ONCE (``resolve``,
   ``socket.getaddrinfo`` by default);
2. refuses the URL (``FetchRefused``, a 400 naming the address class) if ANY of its
   addresses is not public: ``loopback`` (127/8, ::1), ``private`` (10/8, 172.16/12,
   192.168/16, 100.64/10 shared, fc00::/7, fec0::/10), ``link-local`` (169.254/16 with the
   cloud metadata address, fe80::/10), ``multicast``, ``unspecified`` (0.0.0.0, ::),
   ``reserved`` (every other special-purpose range: 0/8, 240/4, documentation, ...), and
   those hidden in IPv6 forms (IPv4-mapped ``::ffff:127.0.0.1``, IPv4-compatible, 6to4
   ``2002::/16``, NAT64 ``64:ff9b::/96``) by the class of the IPv4 address inside.
   ``allow_private`` (``--allow-fetch-private``) opens ``loopback`` and ``private`` only:
   link-local stays refused (it is where cloud metadata services answer, and nobody
   serves images there), and so do the cloud metadata addresses that sit in private
   ranges (AWS's ``fd00:ec2::254``, Alibaba's ``100.100.100.200``);
3. connects to an address it checked (``connect``; no second lookup, so a name cannot
   resolve to a public address for the check and to 127.0.0.1 for the connection),
   sending the URL's host name as ``Host`` and, for https, as SNI and for the
   certificate check;
4. holds ONE deadline for the whole image (``timeout_s``, ``--fetch-timeout``): the
   lookup, every connection, TLS handshake, header and body read of every hop. A
   watchdog shuts the socket down when it passes, whatever read is under way, so a
   server that drips a byte at a time frees the thread at the deadline;
5. reads at most ``max_bytes`` (more: 413), and follows at most ``max_redirects``
   redirects, each target checked like the first URL (scheme, addresses).

Proxy environment variables (``http_proxy``, ...) are not used: a proxy would make the
connection on the server's behalf to an address this module never saw.
"""

from __future__ import annotations

import http.client
import ipaddress
import socket
import ssl
import threading
import time
import urllib.parse
from dataclasses import dataclass
from typing import Callable

DEFAULT_TIMEOUT_S = 10.0
MAX_REDIRECTS = 3
REDIRECTS = (301, 302, 303, 307, 308)
PRIVATE_CLASSES = frozenset({"loopback", "private"})  # what --allow-fetch-private opens
_READ = 1 << 16

_PRIVATE_NETS = [ipaddress.ip_network(n) for n in (
    "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10", "fc00::/7", "fec0::/10")]
_NAT64 = [ipaddress.ip_network(n) for n in ("64:ff9b::/96", "64:ff9b:1::/48")]
_COMPAT = ipaddress.ip_network("::/96")
# Cloud metadata services outside link-local: refused even with --allow-fetch-private.
METADATA = frozenset(ipaddress.ip_address(a) for a in ("fd00:ec2::254", "100.100.100.200"))

Resolver = Callable[[str, int], "list[str]"]            # (host, port) -> IP address strings
Connector = Callable[[str, int, float], socket.socket]   # (ip, port, timeout) -> connected socket


class FetchError(Exception):
    """Fetching failed; ``status`` and ``code`` for the HTTP answer."""

    def __init__(self, message: str, *, status: int = 400, code: str = "image_fetch_failed"):
        super().__init__(message)
        self.status, self.code = status, code


class FetchRefused(FetchError):
    """The URL names an address the server may not connect to; nothing was connected."""

    def __init__(self, message: str, address_class: str):
        super().__init__(message, code="image_url_not_allowed")
        self.address_class = address_class


def address_class(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    """The class of a non-public address (``"loopback"``, ``"private"``, ``"link-local"``,
    ``"multicast"``, ``"unspecified"``, ``"reserved"``, ``"cloud metadata"``), None for
    a public one. IPv6 forms that carry an IPv4 address take that address's class; a zone
    (``fe80::1%eth0``) does not change the class."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.scope_id:
        ip = ipaddress.IPv6Address(int(ip))  # compared without its zone (fd00:ec2::254%eth0 is metadata)
    if ip in METADATA:
        return "cloud metadata"
    if isinstance(ip, ipaddress.IPv6Address):
        inner = None
        if ip.ipv4_mapped is not None:
            inner = ip.ipv4_mapped
        elif ip.sixtofour is not None:
            inner = ip.sixtofour
        elif any(ip in n for n in _NAT64) or (ip in _COMPAT and int(ip) > 1):
            inner = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if inner is not None:
            return address_class(inner) or ("reserved" if ip in _COMPAT else None)
    if ip.is_unspecified:
        return "unspecified"
    if ip.is_loopback:
        return "loopback"
    if ip.is_link_local:
        return "link-local"
    if ip.is_multicast:
        return "multicast"
    if any(ip in n for n in _PRIVATE_NETS if n.version == ip.version):
        return "private"
    if ip.is_reserved or not ip.is_global:
        return "reserved"
    return None


def system_resolve(host: str, port: int) -> list[str]:
    return [info[4][0] for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)]


def system_connect(ip: str, port: int, timeout: float) -> socket.socket:
    return socket.create_connection((ip, port), timeout)


class _Watchdog:
    """Shuts the connection's socket down at the deadline, whatever ``http.client`` is
    blocked in (a header line that never ends, a TLS handshake or body one byte at a time)."""

    def __init__(self, deadline: float):
        self.lock = threading.Lock()
        self.fd: int | None = None
        self.fired = self.ended = False
        self.timer = threading.Timer(max(0.0, deadline - time.monotonic()), self._fire)
        self.timer.daemon = True
        self.timer.start()

    def watch(self, sock: socket.socket) -> None:
        with self.lock:
            self.fd = sock.fileno()
        if self.fired:
            self._fire()

    def _fire(self) -> None:
        with self.lock:
            self.fired = True
            if self.fd is None or self.ended:
                return
            s = socket.socket(fileno=self.fd)  # the same descriptor (an ssl socket's too)
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            finally:
                s.detach()

    def end(self) -> None:
        """Before the socket is closed: the descriptor is never touched afterwards."""
        with self.lock:
            self.ended = True
        self.timer.cancel()


def _pinned(cls, open_socket):
    """An ``http.client`` connection class whose socket comes from ``open_socket``
    instead of a lookup of its host (which still goes into Host, SNI and the cert check)."""

    class Pinned(cls):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            self._create_connection = lambda address, timeout=None, source_address=None: open_socket()

    return Pinned


@dataclass
class Fetcher:
    allow_private: bool = False
    timeout_s: float = DEFAULT_TIMEOUT_S
    max_bytes: int = 32 << 20
    max_redirects: int = MAX_REDIRECTS
    resolve: Resolver | None = None    # None: system_resolve (looked up at call time)
    connect: Connector | None = None   # None: system_connect
    ssl_context: ssl.SSLContext | None = None  # None: the system's CAs, host name checked
    user_agent: str = "dsvl2-server"

    def fetch(self, url: str) -> bytes:
        deadline = time.monotonic() + self.timeout_s
        for hop in range(self.max_redirects + 1):
            scheme, host, port, target = self._split(url, hop)
            ips = self._addresses(host, port, deadline, url, hop)
            status, location, body = self._get(scheme, host, port, target, ips, deadline)
            if status in REDIRECTS:
                if not location:
                    raise FetchError(f"HTTP {status} without a Location header")
                try:
                    url = urllib.parse.urljoin(url, location)
                except ValueError as e:  # e.g. "http://[::1" (an unclosed bracket)
                    raise FetchError(f"HTTP {status} to a malformed Location ({e})") from None
                continue
            if status != 200:
                raise FetchError(f"HTTP {status}")
            return body
        raise FetchError(f"more than {self.max_redirects} redirects")

    # ---- the URL and its addresses ------------------------------------------------------
    def _split(self, url: str, hop: int) -> tuple[str, str, int, str]:
        where = "a redirect to " if hop else ""
        try:
            parts = urllib.parse.urlsplit(url)
            port = parts.port
        except ValueError as e:
            raise FetchError(f"{where}a malformed URL ({e})") from None
        scheme = parts.scheme.lower()
        if scheme not in ("http", "https"):
            raise FetchError(f"{where}{url[:80]!r} is not fetched: only http and https URLs are")
        if not parts.hostname:
            raise FetchError(f"{where}a URL without a host ({url[:80]!r})")
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        return scheme, parts.hostname, port or (443 if scheme == "https" else 80), target

    def _addresses(self, host: str, port: int, deadline: float, url: str, hop: int) -> list[str]:
        try:
            ipaddress.ip_address(host)
            ips = [host]
        except ValueError:
            ips = self._lookup(host, port, deadline)
        where = f"the redirect to {url[:80]!r}" if hop else repr(host)
        for ip in ips:
            try:
                kind = address_class(ipaddress.ip_address(ip))
            except ValueError:
                kind = "reserved"
            if kind is None or (self.allow_private and kind in PRIVATE_CLASSES):
                continue
            if kind in PRIVATE_CLASSES:
                how = "; start the server with --allow-fetch-private to fetch from loopback and private networks"
            else:
                how = f"; {kind} addresses are never fetched"
            named = f" ({host!r} resolves to {ip})" if ip != host else ""
            article = "an" if kind[0] in "aeiou" else "a"
            raise FetchRefused(f"{where} is {article} {kind} address{named}: the server fetches images from public "
                               f"addresses only{how}", kind)
        return ips

    def _lookup(self, host: str, port: int, deadline: float) -> list[str]:
        """``resolve`` within the deadline (in a helper thread: getaddrinfo has no timeout)."""
        resolve = self.resolve or system_resolve
        out: dict = {}

        def work():
            try:
                out["ips"] = list(resolve(host, port))
            except Exception as e:
                out["error"] = e

        t = threading.Thread(target=work, name="dsvl2-resolve", daemon=True)
        t.start()
        t.join(max(0.0, deadline - time.monotonic()))
        if t.is_alive():
            raise self._late()
        if "error" in out:
            e = out["error"]
            raise FetchError(f"the host name {host!r} does not resolve ({getattr(e, 'strerror', None) or e})")
        if not out["ips"]:
            raise FetchError(f"the host name {host!r} has no address")
        return out["ips"]

    def _late(self) -> FetchError:
        return FetchError(f"fetching took longer than the {self.timeout_s:g} s deadline (--fetch-timeout)",
                          code="image_fetch_timeout")

    # ---- one GET -------------------------------------------------------------------------
    def _get(self, scheme: str, host: str, port: int, target: str, ips: list[str],
             deadline: float) -> tuple[int, str | None, bytes]:
        if any(c.isspace() or not c.isprintable() for c in host):  # http.client would raise InvalidURL
            raise FetchError(f"a URL whose host has a space or a control character ({host[:80]!r})")
        connect = self.connect or system_connect
        dog = _Watchdog(deadline)

        def open_socket() -> socket.socket:
            error: Exception | None = None
            for ip in ips:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                try:
                    sock = connect(ip, port, left)
                except OSError as e:
                    error = e
                    continue
                dog.watch(sock)
                return sock
            if error is None:
                raise TimeoutError("deadline")
            raise error

        left = max(0.001, deadline - time.monotonic())
        if scheme == "https":
            conn = _pinned(http.client.HTTPSConnection, open_socket)(
                host, port, timeout=left, context=self.ssl_context or ssl.create_default_context())
        else:
            conn = _pinned(http.client.HTTPConnection, open_socket)(host, port, timeout=left)
        try:
            conn.request("GET", target, headers={"User-Agent": self.user_agent, "Accept": "image/*",
                                                 "Connection": "close"})
            resp = conn.getresponse()
            if resp.status in REDIRECTS:
                return resp.status, resp.getheader("Location"), b""
            if resp.status != 200:
                return resp.status, None, b""
            declared = resp.getheader("Content-Length", "")
            if declared.isdigit() and int(declared) > self.max_bytes:
                raise self._too_big(int(declared))
            parts, size = [], 0
            while True:
                if time.monotonic() >= deadline:
                    raise self._late()
                piece = resp.read(_READ)
                if not piece:
                    break
                size += len(piece)
                if size > self.max_bytes:
                    raise self._too_big(None)
                parts.append(piece)
            if dog.fired:  # the watchdog ended the body early: it is cut, not complete
                raise self._late()
            return 200, None, b"".join(parts)
        except FetchError:
            raise
        except (OSError, http.client.HTTPException, ValueError) as e:
            if dog.fired or time.monotonic() >= deadline:
                raise self._late() from None
            if isinstance(e, ssl.SSLCertVerificationError):
                raise FetchError(f"the https certificate of {host!r} is not valid ({e.verify_message})") from None
            raise FetchError(getattr(e, "strerror", None) or str(e) or type(e).__name__) from None
        finally:
            dog.end()
            conn.close()

    def _too_big(self, size: int | None) -> FetchError:
        shown = f"{size} bytes" if size is not None else f"more than {self.max_bytes} bytes"
        return FetchError(f"the image file has {shown}; at most {self.max_bytes} are allowed", status=413,
                          code="image_too_large")
