"""Connecting to Ray: join a running cluster by address, or start a local instance.

    with connected(address=None) as started:   # a private local instance, shut down after
        ...
    with connected("auto"):                    # the cluster `ray start --head` runs here
        ...

Notable choices:
* ``address=None`` starts a local Ray instance for this process only and shuts it down
  when the ``with`` block ends; an address (``auto``, ``HOST:PORT``, ``ray://HOST:10001``)
  joins a cluster that outlives us. If the process is already connected (``ray.init``
  called by the caller), that connection is used as it is and left open.
* Loopback: on Linux Ray advertises the machine's network address even for a one-machine
  instance, so that other machines could join it, and it rewrites ``127.0.0.1`` in an
  address to that network address. A local instance is for this machine only, so it is
  kept on 127.0.0.1 with the switch Ray itself uses on macOS and Windows
  (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, inherited by every Ray process started
  from here). A cluster whose address is a loopback address (``ray start --head
  --node-ip-address 127.0.0.1``, or ``ray.cluster_utils.Cluster`` in the tests) gets the
  same treatment, otherwise the driver would look for it on the network address.
* No dashboard for a local instance: it costs memory, seconds of start-up and an HTTP port.
* Ray is an install extra (``pip install 'dsvl2[ray]'``); importing this module does not
  import Ray.
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Iterator

from .errors import DSVL2Error

INSTALL_HINT = "pip install 'dsvl2[ray]'"
_LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1", "[::1]")


def import_ray():
    """``import ray``, or a DSVL2Error that says how to install it."""
    try:
        import ray
    except ImportError:
        raise DSVL2Error(f"this command runs on Ray, which is not installed here: {INSTALL_HINT}") from None
    return ray


def is_loopback(address: str) -> bool:
    """``127.0.0.1:6379`` -> True; ``ray://127.0.0.1:10001`` -> True; ``auto`` -> False."""
    host = address.split("://", 1)[-1].rsplit(":", 1)[0]
    return host in _LOOPBACK_HOSTS


def keep_on_loopback() -> None:
    """Make Ray use 127.0.0.1 as this machine's address (see the module docstring)."""
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    # The environment variable is read when Ray is imported; if it already was (a test
    # imported ray.cluster_utils first), the constant Ray consults is set as well.
    from ray._private import ray_constants

    if hasattr(ray_constants, "ENABLE_RAY_CLUSTER"):
        ray_constants.ENABLE_RAY_CLUSTER = False


@contextlib.contextmanager
def connected(address: str | None = None, *, num_cpus: int | None = None) -> Iterator[bool]:
    """Connect to Ray for the duration of the block; yields True if this call started
    a local instance (whose resources are then exactly ``num_cpus`` CPUs)."""
    ray = import_ray()
    if ray.is_initialized():
        yield False
        return
    if address is None or is_loopback(address):
        keep_on_loopback()
    kwargs: dict = {"logging_level": logging.WARNING}
    if address is None:
        kwargs.update(num_cpus=num_cpus, include_dashboard=False)
    else:
        kwargs["address"] = address
    try:
        ray.init(**kwargs)
    except (ConnectionError, RuntimeError, ValueError) as e:
        where = f"the Ray cluster at {address}" if address else "a local Ray instance"
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DSVL2Error(f"cannot connect to {where}: {msg}") from None
    try:
        yield address is None
    finally:
        ray.shutdown()
