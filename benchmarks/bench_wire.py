"""What one pipeline-stage boundary costs: moving a hidden state between processes.

Prints ONE JSON object on stdout (progress on stderr). Never asserted by a test.

    python benchmarks/bench_wire.py
    python benchmarks/bench_wire.py --repeats 200 --prefill-tokens 1431

A layer-range pipeline (docs/distributed.md) sends the hidden state ``[B, T, D]`` bf16
(D = 2560 for deepseek-vl2 base) from one stage to the next: ``[B, 1, D]`` per decode
step, ``[B, T, D]`` per prefill. This measures the transport alone (the stages do no
work), on this machine over loopback, so it is a lower bound for a real network (add the
wire's latency and size / bandwidth; docs/distributed.md does that arithmetic):

* ``ray``: two actors, one per node of a local 2-node Ray cluster on 127.0.0.1
  (``ray.cluster_utils.Cluster``), called as a pipeline: driver -> stage A -> stage B ->
  driver, A's result passed to B as an ObjectRef (Ray moves it node to node).
  ``per_hop_ms`` = median round / 3 hops.
* ``gloo``: two processes with ``torch.distributed`` (gloo backend, TCP on 127.0.0.1),
  ping-pong with ``send`` / ``recv``; ``per_hop_ms`` = median round trip / 2.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

D = 2560  # deepseek-vl2 base hidden size


def log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def shapes(args) -> dict[str, tuple[int, int, int]]:
    return {"decode_b1": (1, 1, D), "decode_b16": (16, 1, D), f"prefill_t{args.prefill_tokens}": (1, args.prefill_tokens, D)}


def nbytes(shape) -> int:
    return shape[0] * shape[1] * shape[2] * 2  # bf16


# ------------------------------------------------------------------------------- Ray


def bench_ray(args) -> dict:
    import ray
    import torch
    from ray.cluster_utils import Cluster

    from dsvl2.ray_connect import keep_on_loopback

    keep_on_loopback()
    node = dict(num_cpus=1, object_store_memory=200 * 2**20, node_ip_address="127.0.0.1")
    cluster = Cluster(initialize_head=True, head_node_args={**node, "include_dashboard": False})
    try:
        cluster.add_node(**node)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, logging_level="WARNING")

        @ray.remote(num_cpus=1)
        class Stage:
            def forward(self, x):
                return x  # transport only: a real stage runs its layers here

            def node(self):
                return ray.get_runtime_context().get_node_id()

        a, b = Stage.remote(), Stage.remote()
        nodes = ray.get([a.node.remote(), b.node.remote()])
        out = {"nodes_distinct": nodes[0] != nodes[1]}
        for name, shape in shapes(args).items():
            x = torch.zeros(shape, dtype=torch.bfloat16)
            for _ in range(5):  # warm-up: connections, first serialisation
                ray.get(b.forward.remote(a.forward.remote(x)))
            times = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                ray.get(b.forward.remote(a.forward.remote(x)))
                times.append(time.perf_counter() - t0)
            med = statistics.median(times)
            out[name] = {"bytes": nbytes(shape), "round_ms": round(med * 1e3, 3), "per_hop_ms": round(med / 3 * 1e3, 3)}
            log(f"ray {name}: {out[name]}")
        return out
    finally:
        ray.shutdown()
        cluster.shutdown()


# ------------------------------------------------------------------------------- gloo


def _gloo_worker(rank: int, port: int, args, queue) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    out = {}
    for name, shape in shapes(args).items():
        x = torch.zeros(shape, dtype=torch.bfloat16)
        times = []
        for i in range(args.repeats + 5):
            t0 = time.perf_counter()
            if rank == 0:
                dist.send(x, 1)
                dist.recv(x, 1)
            else:
                dist.recv(x, 0)
                dist.send(x, 0)
            if i >= 5:
                times.append(time.perf_counter() - t0)
        med = statistics.median(times)
        out[name] = {"bytes": nbytes(shape), "round_trip_ms": round(med * 1e3, 3), "per_hop_ms": round(med / 2 * 1e3, 3)}
    dist.destroy_process_group()
    if rank == 0:
        queue.put(out)


def bench_gloo(args) -> dict:
    import multiprocessing as mp
    import socket

    with socket.socket() as s:  # a free port on loopback
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_gloo_worker, args=(r, port, args, queue)) for r in (0, 1)]
    for p in procs:
        p.start()
    try:
        out = queue.get(timeout=300)
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    for name, v in out.items():
        log(f"gloo {name}: {v}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=100)
    ap.add_argument("--prefill-tokens", type=int, default=1431, help="a 3x2-tile image prompt (monday.jpg)")
    ap.add_argument("--skip", choices=["ray", "gloo"], action="append", default=[])
    args = ap.parse_args()
    import ray
    import torch

    report = {"benchmark": "bench_wire", "ray_version": ray.__version__, "torch_version": torch.__version__,
              "cpu_count": os.cpu_count(), "load_avg_at_start": [round(x, 2) for x in os.getloadavg()],
              "hidden_size": D, "repeats": args.repeats}
    if "ray" not in args.skip:
        report["ray"] = bench_ray(args)
    if "gloo" not in args.skip:
        report["gloo"] = bench_gloo(args)
    report["load_avg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
