"""``dsvl2 serve``: run the OpenAI-compatible server (FastAPI + uvicorn, the ``server`` extra).

The HTTP server binds first and the model loads in a background thread: ``/health`` and
every ``/v1`` request answer 503 (with ``Retry-After``) until it is ready, so an
orchestrator sees the process alive at once and knows when to send traffic. If loading
fails the server stops and the command exits with status 1 and the reason.

Options, a local model folder and the port are checked before anything loads (one
``dsvl2: error:`` line, status 1); Ctrl-C stops the server gracefully (status 0), even
while the weights are still loading. The API key may come from the
``DSVL2_API_KEY`` environment variable instead of ``--api-key`` (a command line is
visible to every user of the machine in ``ps``).
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import socket
import sys
from pathlib import Path

from ..errors import DSVL2Error
from ..sizes import KV_CACHE_HELP, size_argument
from .common import HelpFormatter

EPILOG = """examples:
  dsvl2 serve                                    (the built-in demo model, http://127.0.0.1:8000)
  dsvl2 serve -m deepseek-ai/deepseek-vl2-tiny --api-key s3cret --max-batch-size 8
  dsvl2 serve -m ./deepseek-vl2-tiny --kv-cache-bytes 4GiB      (a fixed KV-cache budget)
  dsvl2 serve -m ./deepseek-vl2-tiny --host 0.0.0.0 --port 8080 --allowed-host vl.lan --allowed-local-dir ./photos

then, e.g.:
  curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
       -d '{"messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 32}'

Endpoints: POST /v1/chat/completions (Content-Type: application/json only), GET /v1/models,
GET /health, GET /metrics, and the chat page at /."""

LOG_LEVELS = ("critical", "error", "warning", "info", "debug")


def add_parser(sub) -> None:
    """Register ``serve`` on the ``dsvl2`` command's subparsers (imports nothing heavy)."""
    p = sub.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API",
                       description="Serve one model to many clients at once through an OpenAI-compatible API "
                       "(chat completions with images, streaming, grounding boxes).",
                       epilog=EPILOG, formatter_class=HelpFormatter)
    p.add_argument("-m", "--model", default="demo",
                   help="checkpoint folder or Hugging Face id (default: the built-in demo, random weights)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind; 0.0.0.0 serves other machines too")
    p.add_argument("--port", type=int, default=8000, help="TCP port to listen on")
    p.add_argument("--api-key", default=os.environ.get("DSVL2_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1 (default: $DSVL2_API_KEY; none if unset)")
    p.add_argument("--served-model-name", metavar="NAME",
                   help="the model name clients send and /v1/models shows (default: the -m value)")
    r = p.add_argument_group("capacity")
    r.add_argument("--max-batch-size", type=int, default=16, metavar="N",
                   help="conversations decoded together (batch slots)")
    r.add_argument("--max-queue", type=int, default=64, metavar="N",
                   help="requests allowed to wait for a slot; beyond it: 429 with Retry-After")
    r.add_argument("--kv-cache-bytes", type=size_argument, default=None, metavar="SIZE",
                   help=KV_CACHE_HELP)
    r.add_argument("--no-prefix-caching", dest="prefix_caching", action="store_false",
                   help="do not reuse the KV blocks of a prompt's start that an earlier request computed "
                   "(default: reuse them; usage.prompt_tokens_details.cached_tokens counts them)")
    r.add_argument("--chunk-size", type=int, default=None, metavar="N",
                   help="prefill prompts in chunks of at most N tokens (default: as the per-step budget allows)")
    r.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="auto = bf16 weights, fp32 compute on CPU")
    r.add_argument("--device", default="auto", help="auto, cpu, cuda or mps")
    r.add_argument("--quantize", choices=["int8", "int4"], default=None,
                   help="quantise the weights while loading (int8: LM linears; int4: routed experts)")
    r.add_argument("--memory-trim-interval", type=float, default=2.0, metavar="S",
                   help="while requests run, give the allocator's freed memory back to the OS every S seconds "
                   "(glibc malloc_trim; 0: never)")
    a = p.add_argument_group("browsers and host names (every request's Host and Origin are checked)")
    a.add_argument("--allowed-host", dest="allowed_hosts", action="append", default=[], metavar="NAME",
                   help="also answer requests whose Host header is NAME (or NAME:PORT); repeatable. Loopback "
                   "names and the address a request came to are always answered; others get 421, which "
                   "stops DNS rebinding (a web page pointing its own name at this server). '*' answers any "
                   "Host: UNSAFE, any web page the user visits can then read this server")
    a.add_argument("--allowed-origin", dest="allowed_origins", action="append", default=[], metavar="ORIGIN",
                   help="also accept browser requests from pages of ORIGIN (scheme://host[:port]); repeatable. "
                   "Others carrying an Origin header get 403; the server's own chat page is always accepted")
    i = p.add_argument_group("images")
    i.add_argument("--allow-fetch", action="store_true",
                   help="fetch http(s) image URLs, from public addresses only (off: only data: URLs). The "
                   "server then requests URLs its clients choose")
    i.add_argument("--allow-fetch-private", action="store_true",
                   help="with --allow-fetch, also fetch from loopback and private networks (10/8, 172.16/12, "
                   "192.168/16, fc00::/7): a client can then make the server request this machine's and its "
                   "network's services. Link-local and cloud metadata addresses stay refused")
    i.add_argument("--fetch-timeout", type=float, default=10.0, metavar="S",
                   help="the most seconds one fetched image may take in all (lookup, connects, redirects, "
                   "every read)")
    i.add_argument("--allowed-local-dir", metavar="DIR",
                   help="allow image_url paths / file:// URLs of files under DIR (symlinks resolved)")
    i.add_argument("--max-image-pixels", type=int, default=None, metavar="N",
                   help="refuse (413) an image of more than N pixels (default: about 179 million)")
    i.add_argument("--max-body-bytes", type=int, default=64 << 20, metavar="N",
                   help="refuse (413) a request body of more than N bytes")
    p.add_argument("--log-level", default="info", choices=LOG_LEVELS)
    g = p.add_argument_group("Ray Serve (replicas; needs the ray extra)")
    g.add_argument("--ray", action="store_true", help="serve --replicas copies of the model on Ray Serve, one endpoint")
    g.add_argument("--replicas", type=int, default=2, help="copies of the model behind the one endpoint")
    g.add_argument("--address", help="join this Ray cluster (auto, HOST:PORT); default: a local Ray instance")
    g.add_argument("--cpus-per-replica", type=float, default=1.0, help="CPUs (and torch threads) per replica")
    g.add_argument("--gpus-per-replica", type=float, default=0.0, help="GPUs per replica")
    p.set_defaults(func=cmd_serve)


def check_options(args: argparse.Namespace) -> None:
    """Refuse bad ``serve`` options with a one-line ``DSVL2Error`` before anything loads or binds."""
    for name, lo in (("max_batch_size", 1), ("max_queue", 1), ("chunk_size", 1), ("max_image_pixels", 1),
                     ("max_body_bytes", 1)):
        v = getattr(args, name)
        if v is not None and v < lo:
            raise DSVL2Error(f"--{name.replace('_', '-')} must be >= {lo}, got {v}")
    if not 0 <= args.memory_trim_interval <= 3600:
        raise DSVL2Error(f"--memory-trim-interval must be from 0 to 3600 seconds, got {args.memory_trim_interval}")
    if not 0 <= args.port <= 65535:
        raise DSVL2Error(f"--port must be from 0 to 65535, got {args.port}")
    if not 0 < args.fetch_timeout <= 600:
        raise DSVL2Error(f"--fetch-timeout must be more than 0 and at most 600 seconds, got {args.fetch_timeout}")
    if args.allow_fetch_private and not args.allow_fetch:
        raise DSVL2Error("--allow-fetch-private needs --allow-fetch")
    from ..server.guard import RequestGuard

    try:
        RequestGuard(None, allowed_hosts=args.allowed_hosts, allowed_origins=args.allowed_origins)
    except ValueError as e:
        raise DSVL2Error(str(e)) from None
    if args.allowed_local_dir is not None and not Path(args.allowed_local_dir).expanduser().is_dir():
        raise DSVL2Error(f"--allowed-local-dir {args.allowed_local_dir!r} is not a directory")
    if args.api_key is not None and not args.api_key.strip():
        raise DSVL2Error("--api-key is empty; give a key or leave the option out")
    name = args.model
    if name == "demo" or name.startswith((".", "/", "~")) or Path(name).expanduser().exists():
        from ..checkpoint.hub import resolve_model

        resolve_model(name)  # a local folder: checked now (no network); a hub id is fetched while serving


def _bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound here so that a busy port is a one-line error before
    anything starts (uvicorn would exit from inside its startup)."""
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                          flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # restart at once after a stop
        sock.bind(addr)
    except OSError as e:
        raise DSVL2Error(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock


def _is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address.split("%")[0]).is_loopback
    except ValueError:
        return False


def cmd_serve(args: argparse.Namespace) -> int:
    if getattr(args, "ray", False):
        try:
            from ..server.ray_serve import run
        except ImportError as e:
            raise DSVL2Error(f"--ray needs Ray Serve: pip install 'dsvl2[ray]' ({e})") from None
        return run(args)
    check_options(args)
    try:
        import uvicorn

        from ..server.app import create_app
    except ImportError as e:
        raise DSVL2Error(f"dsvl2 serve needs the server extra ({e.name} is missing): "
                         "pip install 'dsvl2[server]'") from None
    from .. import api
    sock = _bind(args.host, args.port)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s:     %(name)s: %(message)s")
    if args.model == "demo":
        print("dsvl2: note: serving the built-in demo checkpoint with RANDOM weights (gibberish answers); "
              "pass -m deepseek-ai/deepseek-vl2-tiny (or a checkpoint folder) for a real model", file=sys.stderr)
        api.demo_note_given()  # said once is enough: load() does not warn again
    failure: list[BaseException] = []
    server: uvicorn.Server | None = None

    def load():
        return api.load(args.model, dtype=args.dtype, device=args.device, max_batch_size=args.max_batch_size,
                        quantize=args.quantize, kv_cache_bytes=args.kv_cache_bytes,
                        prefix_caching=args.prefix_caching)

    def load_failed(exc: BaseException) -> None:
        failure.append(exc)
        if server is not None:
            server.should_exit = True

    app = create_app(load, served_model_name=args.served_model_name or args.model, api_key=args.api_key,
                     max_queue=args.max_queue, allow_fetch=args.allow_fetch,
                     allow_fetch_private=args.allow_fetch_private, fetch_timeout_s=args.fetch_timeout,
                     allowed_hosts=args.allowed_hosts, allowed_origins=args.allowed_origins,
                     allowed_local_dir=None if args.allowed_local_dir is None else Path(args.allowed_local_dir).expanduser(),
                     max_body_bytes=args.max_body_bytes, max_image_pixels=args.max_image_pixels,
                     chunk_size=args.chunk_size, on_load_error=load_failed,
                     memory_trim_s=args.memory_trim_interval)
    # A few seconds for running streams to end on Ctrl-C; then they are cancelled.
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                            timeout_graceful_shutdown=3)
    server = uvicorn.Server(config)
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    print(f"dsvl2: serving {app.state.dsvl2.served_model_name!r} on http://{shown}:{port} (Ctrl-C to stop); "
          "the model loads in the background, GET /health answers 200 once it is ready", file=sys.stderr)
    if not _is_loopback(host) and not args.allowed_hosts:
        print(f"dsvl2: note: requests are answered when their Host is a loopback name or an address of this "
              f"machine; for a host name clients use (http://NAME:{port}), add --allowed-host NAME",
              file=sys.stderr)
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:
        pass  # uvicorn re-raises the Ctrl-C it shut down on, after a graceful shutdown: a normal stop
    loading = app.state.dsvl2.load_thread
    if loading is not None and loading.is_alive():
        # Stopped while the weights load: an interpreter shutting down under torch's
        # running loader threads aborts the process ("terminate called ..."), so leave now.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    model = app.state.dsvl2.model
    if model is not None:
        model.driver.close()
    if failure:
        exc = failure[0]
        if isinstance(exc, DSVL2Error):
            raise exc
        raise DSVL2Error(f"could not load the model {args.model!r}: {exc}")
    return 0
