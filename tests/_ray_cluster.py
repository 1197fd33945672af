"""A local Ray cluster of two nodes on 127.0.0.1 for the tests, and a watchdog.

``two_node_cluster()`` starts a head and one worker node (``ray.cluster_utils.Cluster``),
one CPU and 150 MB of object store each, so that two one-CPU actors must run on different
nodes. Everything is kept on loopback (``dsvl2.ray_connect.keep_on_loopback``) and shut
down whatever happens. ``watchdog(seconds)`` fails a test that runs longer (SIGALRM raises
in the main thread), so that a hung Ray job cannot block the suite.
"""

from __future__ import annotations

import contextlib
import os
import signal
from pathlib import Path


class Overtime(Exception):
    pass


@contextlib.contextmanager
def watchdog(seconds: int):
    def overtime(signum, frame):
        raise Overtime(f"the test ran longer than {seconds} s")

    previous = signal.signal(signal.SIGALRM, overtime)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@contextlib.contextmanager
def two_node_cluster():
    import ray
    from ray.cluster_utils import Cluster

    from dsvl2.ray_connect import keep_on_loopback

    keep_on_loopback()
    node = dict(num_cpus=1, object_store_memory=150 * 2**20, node_ip_address="127.0.0.1")
    cluster = Cluster(initialize_head=True, head_node_args={**node, "include_dashboard": False})
    try:
        cluster.add_node(**node)
        cluster.wait_for_nodes()
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


def raylet_pids(cluster) -> set[int]:
    from ray._private import ray_constants

    nodes = [cluster.head_node, *cluster.worker_nodes]
    return {n.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.pid for n in nodes}


def ray_workers(parents: set[int], title: bytes) -> dict[int, int]:
    """{pid: parent raylet pid} of the worker processes whose title starts with ``title``
    (e.g. b"ray::MapWorker") among the children of the raylets ``parents``."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:  # the process ended while we looked
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if cmdline.startswith(title) and ppid in parents:
            found[int(entry)] = ppid
    return found
