"""What every request must pass before it reaches a route: its ``Host`` and its ``Origin``.

A server on 127.0.0.1 is reachable by every web page its owner's browser opens. Two
attacks use that, and this ASGI middleware (``RequestGuard``) stops both, on every route
(``/``, ``/health``, ``/metrics`` and 404s included):

* DNS rebinding: a page of ``http://evil.example:8000`` makes its name resolve to
  127.0.0.1, and the browser, seeing the same origin, lets the page read this server's
  answers. The browser still sends ``Host: evil.example:8000``, so only ``Host`` values
  that name this machine are served: loopback (``localhost``, ``127.x.y.z``, ``[::1]``,
  ``0.0.0.0`` / ``[::]``, which reach this host too), the IP address the connection came
  to (a client on the LAN using ``http://192.168.1.5:8000``), and the names the operator
  lists with ``--allowed-host`` (``*``: any, which gives this protection up). Anything
  else: 421 naming ``--allowed-host``. An IP-literal ``Host`` cannot come from a
  rebinding (that needs a name), but only the ones above are served anyway. Names are
  compared lower-cased, without a trailing dot, port ignored (unless the listed entry
  has one). A missing ``Host`` (HTTP/1.0) is served: browsers always send one, so its
  absence is never a rebinding, and the Origin check below then treats any ``Origin``
  as foreign (an empty ``Host`` is the same). A malformed ``Host`` (bare IPv6, a bad
  port, several Host headers) is a 400.
* Cross-site requests (CSRF): a page of another site can POST to this server (it cannot
  read the answer, but the request runs). A request carrying an ``Origin`` header that
  is neither the server's own (the scheme the request came with and its ``Host``, default
  ports filled in) nor listed with ``--allowed-origin`` is a 403, ``Origin: null``
  (sandboxed frames, ``file:`` pages) included. The chat page at ``/`` is same-origin.
  Bodies a foreign page can send WITHOUT a CORS preflight (``text/plain``, forms) are
  also refused by the chat route (415: only ``application/json`` is accepted).

Both refusals are OpenAI's error shape (``errors.APIError``).
"""

from __future__ import annotations

import ipaddress
import re
from typing import Iterable

from .errors import APIError

_PORT = re.compile(r"[0-9]{1,5}")
_NAME = re.compile(r"[a-z0-9_]([a-z0-9_.-]*[a-z0-9_])?")  # letters, digits, '-', '_', '.' (IDNs come as xn--)
_DEFAULT_PORT = {"http": 80, "https": 443, "ws": 80, "wss": 443}
LOOPBACK_NAMES = frozenset({"localhost"})


def parse_host(value: str) -> tuple[str, int | None] | None:
    """``'Example.COM.:8000'`` -> ``('example.com', 8000)``; ``'[::1]'`` -> ``('::1', None)``
    (IPv6 compressed, without brackets); None when malformed."""
    v = value.strip()
    if v.startswith("["):
        end = v.find("]")
        if end < 0:
            return None
        try:
            host = str(ipaddress.IPv6Address(v[1:end]))
        except ValueError:
            return None
        rest = v[end + 1:]
    else:
        host, sep, port = v.rpartition(":")
        if not sep:
            host, port = v, ""
        if ":" in host:
            return None  # a bare IPv6 address (needs brackets) or junk
        rest = sep + port
        host = host.lower()
        if host.endswith("."):
            host = host[:-1]
        if not _NAME.fullmatch(host):
            return None
    if not rest:
        return host, None
    if not rest.startswith(":") or not _PORT.fullmatch(rest[1:]) or int(rest[1:]) > 65535:
        return None
    return host, int(rest[1:])


def parse_origin(value: str) -> tuple[str, str, int] | None:
    """``'HTTP://Localhost:8000'`` -> ``('http', 'localhost', 8000)``, the default port
    filled in; None when it is not ``scheme://host[:port]`` (``null`` included)."""
    scheme, sep, rest = value.strip().partition("://")
    scheme = scheme.lower()
    if not sep or scheme not in _DEFAULT_PORT or not rest or "/" in rest or "@" in rest:
        return None
    parsed = parse_host(rest)
    if parsed is None:
        return None
    host, port = parsed
    return scheme, host, _DEFAULT_PORT[scheme] if port is None else port


def is_loopback_host(host: str) -> bool:
    """``localhost``, 127.0.0.0/8, ::1 (and their IPv4-mapped forms), 0.0.0.0 and ::."""
    if host in LOOPBACK_NAMES:
        return True
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback or ip.is_unspecified


def _same_ip(host: str, local: str | None) -> bool:
    if not local:
        return False
    try:
        a, b = ipaddress.ip_address(host), ipaddress.ip_address(local.split("%")[0])
    except ValueError:
        return False
    if isinstance(b, ipaddress.IPv6Address) and b.ipv4_mapped is not None:
        b = b.ipv4_mapped  # a dual-stack socket reports IPv4 clients as ::ffff:a.b.c.d
    return a == b


class RequestGuard:
    """ASGI middleware: the Host allow-list and the Origin check (module docstring)."""

    def __init__(self, app, *, allowed_hosts: Iterable[str] = (), allowed_origins: Iterable[str] = ()):
        self.app = app
        self.any_host = False
        self.hosts: set[tuple[str, int | None]] = set()
        for h in allowed_hosts:
            if h.strip() == "*":
                self.any_host = True
                continue
            parsed = parse_host(h)
            if parsed is None and ":" in h.strip():  # an unbracketed IPv6 address
                parsed = parse_host(f"[{h.strip()}]")
            if parsed is None:
                raise ValueError(f"--allowed-host {h!r} is not a host name or address (NAME, NAME:PORT, "
                                 "an IPv4 address or a [bracketed] IPv6 one)")
            self.hosts.add(parsed)
        self.origins: set[tuple[str, str, int]] = set()
        for o in allowed_origins:
            parsed = parse_origin(o)
            if parsed is None:
                raise ValueError(f"--allowed-origin {o!r} is not an origin: scheme://host[:port], e.g. "
                                 "https://chat.example.com (no path, no trailing slash)")
            self.origins.add(parsed)

    def host_allowed(self, host: str, port: int | None, local_ip: str | None) -> bool:
        return (self.any_host or is_loopback_host(host) or _same_ip(host, local_ip)
                or (host, None) in self.hosts or (host, port) in self.hosts)

    def check(self, scope) -> None:
        hosts = [v for k, v in scope.get("headers", ()) if k == b"host"]
        if hosts == [b""]:
            hosts = []  # an empty Host is HTTP/1.1's "no authority": as if there were none
        if len(hosts) > 1:
            raise APIError(400, "the request has several Host headers", code="invalid_host")
        server = scope.get("server") or (None, None)
        local_ip = server[0] if isinstance(server[0], str) else None
        scheme = scope.get("scheme", "http")
        own = None
        if hosts:
            raw = hosts[0].decode("latin-1")
            parsed = parse_host(raw)
            if parsed is None:
                raise APIError(400, f"the Host header {raw[:100]!r} is malformed", code="invalid_host")
            host, port = parsed
            if not self.host_allowed(host, port, local_ip):
                raise APIError(421, f"this server does not answer to the host name {raw[:100]!r}: only loopback "
                               "names and its own addresses are served, so that a web page cannot reach it by "
                               "pointing its own name at this machine (DNS rebinding); start the server with "
                               f"--allowed-host {host if ':' not in host else '[' + host + ']'} if clients "
                               "use that name", code="host_not_allowed")
            own = (scheme, host, _DEFAULT_PORT.get(scheme, 80) if port is None else port)
        origins = [v for k, v in scope.get("headers", ()) if k == b"origin"]
        if not origins:
            return
        raw = origins[0].decode("latin-1")
        parsed = parse_origin(raw) if len(origins) == 1 else None
        if parsed is None or (parsed != own and parsed not in self.origins):
            raise APIError(403, f"requests from the web page origin {raw[:100]!r} are not accepted: only the "
                           "server's own pages may call it from a browser; start the server with "
                           "--allowed-origin ORIGIN to let another site's pages use it", code="origin_not_allowed")

    async def __call__(self, scope, receive, send):
        if scope["type"] in ("http", "websocket"):
            try:
                self.check(scope)
            except APIError as e:
                if scope["type"] == "websocket":
                    await send({"type": "websocket.close", "code": 1008})
                    return
                from starlette.responses import JSONResponse

                response = JSONResponse(e.body(), status_code=e.status, headers=e.headers)
                return await response(scope, receive, send)
        return await self.app(scope, receive, send)
