"""Replicated serving on Ray Serve: N copies of the OpenAI-compatible server, one endpoint.

    dsvl2 serve --ray -m ./deepseek-vl2-tiny --replicas 2      # local Ray, 127.0.0.1:8000
    dsvl2 serve --ray -m ./deepseek-vl2-tiny --replicas 8 --address auto --host 0.0.0.0
    serve run dsvl2.server.ray_serve:build_app model=./deepseek-vl2-tiny replicas=2   # Serve's own CLI
    serve run examples/serve_ray.yaml                                                 # or a config file

The command takes every option of ``dsvl2 serve`` plus ``--replicas``, ``--address``,
``--cpus-per-replica`` and ``--gpus-per-replica``, and runs until Ctrl-C (then the
application is deleted; a local Ray instance is shut down). ``serve run`` / ``serve
deploy`` with ``build_app`` are for deployments that outlive a terminal.

Notable choices:
* A replica is the single-process server itself: ``create_app`` mounted in Serve's ASGI
  ingress, with its own model, engine, driver thread and continuous batching, so routes,
  request checks, errors (OpenAI's JSON shape), streaming and ``/metrics`` are the same
  code. Serve's proxy is the one HTTP endpoint (on the head node only:
  ``proxy_location=HeadOnly``) and routes each request to the less busy of two replicas.
* The model is loaded in the replica's constructor: Serve sends a replica no traffic
  until its constructor returns, so clients never see the single server's 503 "loading"
  answers, and a restarted replica rejoins only when it can answer.
* Back-pressure stays the replica's: Serve may give a replica one request more than it
  holds (``max_batch_size`` slots + ``max_queue`` waiting), so a full replica answers that
  one with the single server's 429 and ``Retry-After`` instead of Serve queueing it
  silently or answering a plain-text 503.
* Balance over locality: Serve's proxy normally sends every request to a replica on its
  own node while that one has room (``max_ongoing_requests``), which for a model server
  means one busy replica and idle others. ``spread_requests()`` turns that preference
  off (``RAY_SERVE_PROXY_PREFER_LOCAL_NODE_ROUTING=0``) for the Ray processes started
  from here, so the proxy picks the less busy of two replicas wherever they are. On a
  cluster started with ``ray start``, set that variable in ``ray start``'s environment.
* Every response carries ``x-dsvl2-replica`` (the Serve replica id): which copy answered,
  to match a client's trouble with a replica's log. ``/metrics`` describes the replica
  that answered the scrape; Ray's own ``ray_serve_*`` metrics cover the deployment.
* Serve's internal gRPC server in each replica is bound to the node's Ray address, not
  to every interface (``bind_internal_grpc_to_node_address``): a local instance stays on
  127.0.0.1.
* A killed replica loses only its own requests (its streams end with an error, its other
  clients see a failed connection); the other replicas' requests are not touched, and
  Serve starts a replacement.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time

from ray import serve

from ..errors import DSVL2Error
from ..sizes import parse_size

APP_NAME = "dsvl2"
REPLICA_HEADER = b"x-dsvl2-replica"

# build_app's options: name -> (type, default). The server's own defaults, plus placement.
OPTIONS = {
    "model": (str, "demo"), "served_model_name": (str, None), "replicas": (int, 2),
    "cpus_per_replica": (float, 1.0), "gpus_per_replica": (float, 0.0),
    "dtype": (str, "auto"), "device": (str, "auto"), "max_batch_size": (int, 16), "max_queue": (int, 64),
    "chunk_size": (int, None), "api_key": (str, None), "allow_fetch": (bool, False),
    "allowed_local_dir": (str, None), "max_body_bytes": (int, 64 << 20), "max_image_pixels": (int, None),
    "kv_cache_bytes": (parse_size, None), "prefix_caching": (bool, True),
    "allow_fetch_private": (bool, False), "fetch_timeout": (float, 10.0),
    "allowed_hosts": (list, []), "allowed_origins": (list, []),
}


def _typed(name: str, value):
    """``serve run ... key=value`` passes strings; a YAML config passes typed values."""
    kind = OPTIONS[name][0]
    if kind is list:  # a YAML list, or "a,b" from the command line
        if value is None:
            return []
        items = value.split(",") if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)) or not all(isinstance(v, str) for v in items):
            raise DSVL2Error(f"{name} must be a list of strings or a comma-separated string, got {value!r}")
        return [v.strip() for v in items if v.strip()]
    if kind is parse_size:  # a byte size: 4294967296, "4GiB", "512 MB"
        if value is None:
            return None
        try:
            n = parse_size(value)
        except ValueError as e:
            raise DSVL2Error(f"{name}: {e}") from None
        if n <= 0:
            raise DSVL2Error(f"{name} must be more than 0 bytes, got {value!r}")
        return n
    if value is None or isinstance(value, kind) and not (kind is int and isinstance(value, bool)):
        return value
    if kind is bool:
        text = str(value).strip().lower()
        if text in ("1", "true", "yes", "on"):
            return True
        if text in ("0", "false", "no", "off"):
            return False
        raise DSVL2Error(f"{name} must be true or false, got {value!r}")
    try:
        return kind(value)
    except (TypeError, ValueError):
        raise DSVL2Error(f"{name} must be {'an integer' if kind is int else 'a number'}, got {value!r}") from None


def options(args: dict) -> dict:
    """``build_app``'s arguments checked and completed with the defaults."""
    unknown = sorted(set(args) - set(OPTIONS))
    if unknown:
        raise DSVL2Error(f"unknown option(s) {', '.join(unknown)}; allowed: {', '.join(OPTIONS)}")
    opts = {name: _typed(name, args.get(name, default)) for name, (_, default) in OPTIONS.items()}
    for name, lo in (("replicas", 1), ("max_batch_size", 1), ("max_queue", 1), ("cpus_per_replica", 0),
                     ("gpus_per_replica", 0)):
        if opts[name] < lo:
            raise DSVL2Error(f"{name} must be >= {lo}, got {opts[name]}")
    if not 0 < opts["fetch_timeout"] <= 600:
        raise DSVL2Error(f"fetch_timeout must be more than 0 and at most 600 seconds, got {opts['fetch_timeout']}")
    from .guard import RequestGuard

    try:
        RequestGuard(None, allowed_hosts=opts["allowed_hosts"], allowed_origins=opts["allowed_origins"])
    except ValueError as e:
        raise DSVL2Error(str(e)) from None
    return opts


class _ReplicaHeader:
    """ASGI wrapper adding ``x-dsvl2-replica`` to every HTTP response; everything else
    (lifespan, attributes such as ``add_exception_handler``) goes to the wrapped app."""

    def __init__(self, app, replica: str):
        self.app = app
        self.value = replica.encode()

    def __getattr__(self, name):
        return getattr(self.app, name)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def tagged(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), (REPLICA_HEADER, self.value)]}
            await send(message)

        return await self.app(scope, receive, tagged)


def bind_internal_grpc_to_node_address() -> None:
    """Serve (2.60) starts a gRPC server in every replica for calls between deployments
    and binds it to every interface ("[::]:0"), even when the whole cluster lives on
    127.0.0.1. Bind it to this node's Ray address instead, where the other nodes reach
    it; called in the replica's constructor, before Serve starts that server."""
    import ray
    from ray.serve._private import replica

    bind = getattr(replica, "add_port_to_grpc_server", None)
    if bind is None or getattr(bind, "dsvl2_node_address", False):
        return  # another Ray version, or already done in this process
    node = ray.util.get_node_ip_address()
    host = f"[{node}]" if ":" in node else node

    def bind_to_node(server, address: str):
        if address.startswith("[::]:"):
            address = f"{host}:{address.rsplit(':', 1)[1]}"
        return bind(server, address)

    bind_to_node.dsvl2_node_address = True
    replica.add_port_to_grpc_server = bind_to_node


@serve.ingress()
class DSVL2Server:
    """One replica: a loaded model and the server app around it."""

    def __init__(self, opts: dict):
        import torch

        from .. import api

        bind_internal_grpc_to_node_address()

        if opts["gpus_per_replica"] == 0:
            torch.set_num_threads(max(1, int(opts["cpus_per_replica"])))  # this replica's CPUs, not the node's
        self.opts = opts
        self.model = api.load(opts["model"], dtype=opts["dtype"], device=opts["device"],
                              max_batch_size=opts["max_batch_size"], kv_cache_bytes=opts["kv_cache_bytes"],
                              prefix_caching=opts["prefix_caching"])

    def __serve_build_asgi_app__(self):
        from pathlib import Path

        from .app import create_app

        o = self.opts
        app = create_app(self.model, served_model_name=o["served_model_name"] or o["model"], api_key=o["api_key"],
                         max_queue=o["max_queue"], allow_fetch=o["allow_fetch"],
                         allow_fetch_private=o["allow_fetch_private"], fetch_timeout_s=o["fetch_timeout"],
                         allowed_hosts=o["allowed_hosts"], allowed_origins=o["allowed_origins"],
                         allowed_local_dir=None if o["allowed_local_dir"] is None else Path(o["allowed_local_dir"]),
                         max_body_bytes=o["max_body_bytes"], max_image_pixels=o["max_image_pixels"],
                         chunk_size=o["chunk_size"])
        return _ReplicaHeader(app, serve.get_replica_context().replica_id.unique_id)

    def __del__(self):
        model = getattr(self, "model", None)
        if model is not None:
            model.driver.close()


def spread_requests() -> None:
    """Route by load, not by node (see the module docstring); for Ray started after this."""
    os.environ["RAY_SERVE_PROXY_PREFER_LOCAL_NODE_ROUTING"] = "0"


def build_app(args: dict | None = None):
    """The Serve application: ``serve run dsvl2.server.ray_serve:build_app key=value ...``."""
    o = options(dict(args or {}))
    deployment = serve.deployment(
        DSVL2Server, name="DSVL2Server", num_replicas=o["replicas"],
        ray_actor_options={"num_cpus": o["cpus_per_replica"], "num_gpus": o["gpus_per_replica"]},
        max_ongoing_requests=o["max_batch_size"] + o["max_queue"] + 1)
    return deployment.bind(o)


# ---------------------------------------------------------------------------------------
# `dsvl2 serve --ray` (dsvl2/commands/serve.py parses the options)
# ---------------------------------------------------------------------------------------

def run(args: argparse.Namespace, ready=None) -> int:
    """Serve until Ctrl-C; ``ready(url)`` is called once every replica answers."""
    from ..ray_connect import connected

    if not 0 <= args.port <= 65535:
        raise DSVL2Error(f"--port must be from 0 to 65535, got {args.port}")
    def stop(signum, frame):  # an orchestrator's SIGTERM: the same clean stop as Ctrl-C
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    names = set(OPTIONS) & set(vars(args))
    app = build_app({name: getattr(args, name) for name in names})
    spread_requests()
    with connected(args.address):
        serve.start(proxy_location="HeadOnly", http_options={"host": args.host, "port": args.port})
        try:
            serve.run(app, name=APP_NAME, route_prefix="/")
            url = f"http://{args.host}:{args.port}"
            print(f"dsvl2: {args.replicas} replica(s) of {args.model} at {url}/v1 (Ctrl-C stops)", file=sys.stderr)
            if ready is not None:
                ready(url)
            while True:
                time.sleep(1)
        except KeyboardInterrupt:
            pass
        finally:
            serve.delete(APP_NAME)
            serve.shutdown()
    return 0
