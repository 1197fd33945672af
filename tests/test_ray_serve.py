"""Replicated serving (``dsvl2.server.ray_serve``): the OpenAI-compatible server as a Ray
Serve deployment of 2 replicas on a local 2-node Ray cluster, answering concurrent
``openai`` clients; one replica killed mid-run does not lose the other's requests.

Conventions of this file:
* The model is the demo checkpoint in float32 on both sides: replicas batch concurrent
  requests (continuous batching), and in float32 a batched row equals the same
  conversation answered alone, so every answer is compared exactly with
  ``dsvl2.load("demo", dtype="float32").chat(...)`` run in this process.
* The cluster (tests/_ray_cluster.py) has two nodes of one CPU each; replicas take one
  CPU, so there is one replica per node. Serve's proxy runs on the head node only and
  listens on 127.0.0.1; it routes by load, not locality (``spread_requests``). Each response names its replica (``x-dsvl2-replica``).
* Clients never retry (``max_retries=0``): a request that failed must show as failed.
* Bounded by a watchdog; the application, Serve, Ray and the cluster are shut down
  whatever happens. Marked ``slow``.
"""

from __future__ import annotations

import base64
import functools
import socket
import threading
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import ray
from ray import serve

from dsvl2.server.ray_serve import APP_NAME, bind_internal_grpc_to_node_address, build_app, options, spread_requests
from dsvl2.errors import DSVL2Error
from _paths import IMAGES
from _ray_cluster import two_node_cluster, watchdog

BUDGET_S = 600  # a hang guard, not a speed check: generous for a loaded 2-core machine
SMALL_IMAGE = IMAGES / "multi_image_2.jpeg"


@functools.lru_cache(maxsize=None)
def reference():
    import dsvl2

    return dsvl2.load("demo", dtype="float32", device="cpu")


def expected(messages: list[dict], max_tokens: int) -> str:
    return reference().chat(messages, max_new_tokens=max_tokens).text


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ask(client: openai.OpenAI, messages: list[dict], max_tokens: int, stream: bool,
        state: dict | None = None) -> dict:
    """One request -> {"replica", "text"} or {"replica", "error"} (replica None if unknown).

    ``state`` (optional) gets "replica" as soon as the response headers arrive and its
    "started" event set once the first chunk is read (or the request has ended)."""
    state = state if state is not None else {"started": threading.Event()}
    state["replica"] = None
    try:
        raw = client.chat.completions.with_raw_response.create(
            model="demo", messages=messages, max_tokens=max_tokens, temperature=0, stream=stream)
        state["replica"] = raw.headers.get("x-dsvl2-replica")
        if not stream:
            return {"replica": state["replica"], "text": raw.parse().choices[0].message.content}
        text = ""
        for chunk in raw.parse():
            state["started"].set()
            if chunk.choices and chunk.choices[0].delta.content:
                text += chunk.choices[0].delta.content
        return {"replica": state["replica"], "text": text}
    except Exception as e:  # a killed replica: connection dropped, 5xx, or an error event
        return {"replica": state["replica"], "error": f"{type(e).__name__}: {e}"}
    finally:
        state["started"].set()


def replica_actor(unique_id: str):
    """The Ray actor of the Serve replica whose id a response header named."""
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
             if a["namespace"] == "serve" and a["name"].endswith("#" + unique_id)]
    assert len(names) == 1, names
    return ray.get_actor(names[0], namespace="serve")


def prompts(n: int, tag: str) -> list[list[dict]]:
    return [[{"role": "user", "content": f"{tag} {i}: tell me about the number {i}."}] for i in range(n)]


def test_build_app_options_are_checked():
    assert options({})["replicas"] == 2 and options({"replicas": "3", "allow_fetch": "true"})["replicas"] == 3
    assert options({"allow_fetch": "no"})["allow_fetch"] is False
    with pytest.raises(DSVL2Error, match="unknown option"):
        options({"replica": 2})
    with pytest.raises(DSVL2Error, match="replicas must be >= 1"):
        options({"replicas": 0})
    with pytest.raises(DSVL2Error, match="max_batch_size must be an integer"):
        options({"max_batch_size": "many"})
    # the security options of `dsvl2 serve` (lists: a YAML list or "a,b" from `serve run`)
    o = options({"allowed_hosts": "vl.example, gpu1.lan", "allowed_origins": ["https://chat.example.com"],
                 "allow_fetch_private": "true", "fetch_timeout": "2.5"})
    assert o["allowed_hosts"] == ["vl.example", "gpu1.lan"] and o["allowed_origins"] == ["https://chat.example.com"]
    assert o["allow_fetch_private"] is True and o["fetch_timeout"] == 2.5
    assert options({})["allowed_hosts"] == [] and options({})["fetch_timeout"] == 10.0
    with pytest.raises(DSVL2Error, match="allowed-origin"):
        options({"allowed_origins": "chat.example.com/path"})
    with pytest.raises(DSVL2Error, match="fetch_timeout"):
        options({"fetch_timeout": 0})


@pytest.mark.slow  # a 2-node Ray cluster, Serve and two model replicas: a minute or more here
def test_two_replicas_answer_concurrent_clients_and_survive_a_killed_replica():
    spread_requests()  # before the cluster starts: its processes inherit it
    with watchdog(BUDGET_S), two_node_cluster() as cluster:
        ray.init(address=cluster.address, logging_level="WARNING")
        port = free_port()
        serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port})
        try:
            serve.run(build_app({"model": "demo", "replicas": 2, "dtype": "float32", "device": "cpu",
                                 "max_batch_size": 4, "max_queue": 8}), name=APP_NAME, route_prefix="/")
            client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0,
                                   timeout=120)
            check_concurrent_clients(client)
            check_killed_replica(client)
        finally:
            serve.shutdown()


def check_concurrent_clients(client: openai.OpenAI) -> None:
    image = "data:image/jpeg;base64," + base64.b64encode(SMALL_IMAGE.read_bytes()).decode()
    convs = prompts(7, "warm-up") + [[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": image}}, {"type": "text", "text": "Describe this image."}]}]]
    with ThreadPoolExecutor(len(convs)) as pool:
        results = list(pool.map(lambda ic: ask(client, ic[1], 12, stream=ic[0] % 2 == 0), enumerate(convs)))
    assert all("text" in r for r in results), results
    assert len({r["replica"] for r in results}) == 2, results  # both replicas answered
    for conv, r in zip(convs, results):
        api_conv = conv if isinstance(conv[0]["content"], str) else [
            {"role": "user", "content": [{"type": "image", "image": str(SMALL_IMAGE)},
                                         {"type": "text", "text": "Describe this image."}]}]
        assert r["text"] == expected(api_conv, 12), conv


def check_killed_replica(client: openai.OpenAI) -> None:
    convs = prompts(8, "long")
    states = [{"started": threading.Event()} for _ in convs]
    with ThreadPoolExecutor(len(convs)) as pool:
        futures = [pool.submit(ask, client, c, 128, True, st) for c, st in zip(convs, states)]
        for st in states:
            assert st["started"].wait(120)
        # Every stream is under way (or over): kill the replica the first one went to.
        target = states[0]["replica"]
        assert target is not None and len({st["replica"] for st in states}) == 2, states
        ray.kill(replica_actor(target), no_restart=True)
        results = [f.result() for f in futures]
    on_target = [r for r in results if r["replica"] == target]
    others = [(c, r) for c, r in zip(convs, results) if r["replica"] != target]
    assert any("error" in r for r in on_target), on_target  # the kill did cut requests off
    for conv, r in others:  # ... and none of the other replica's
        assert r.get("text") == expected(conv, 128), r
    # Afterwards the endpoint still answers (the survivor, or Serve's replacement).
    after = prompts(3, "after")
    with ThreadPoolExecutor(len(after)) as pool:
        results = list(pool.map(lambda c: ask(client, c, 8, stream=False), after))
    for conv, r in zip(after, results):
        assert r.get("text") == expected(conv, 8), r


def test_serve_internal_grpc_server_binds_to_the_node_address_not_every_interface(monkeypatch):
    """The one place dsvl2 reaches into Ray's private modules (Serve has no public option
    for it): the replica's internal gRPC server asks for "[::]:PORT" (every interface);
    after ``bind_internal_grpc_to_node_address`` it gets this node's Ray address, and any
    other address passes through unchanged. If a Ray upgrade removes the hook this test
    says so (the function then changes nothing)."""
    from ray.serve._private import replica  # the module the function adjusts

    assert callable(getattr(replica, "add_port_to_grpc_server", None)), \
        "Ray Serve no longer has replica.add_port_to_grpc_server: revisit bind_internal_grpc_to_node_address"
    asked = []
    monkeypatch.setattr(replica, "add_port_to_grpc_server", lambda server, address: asked.append(address) or 7)
    bind_internal_grpc_to_node_address()
    node = ray.util.get_node_ip_address()
    assert replica.add_port_to_grpc_server(None, "[::]:0") == 7
    assert replica.add_port_to_grpc_server(None, "10.1.2.3:5") == 7
    assert asked == [(f"[{node}]" if ":" in node else node) + ":0", "10.1.2.3:5"]
    bind_internal_grpc_to_node_address()  # twice in one process: not wrapped twice
    replica.add_port_to_grpc_server(None, "[::]:9")
    assert len(asked) == 3
