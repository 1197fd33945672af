"""Which dtype the big matrix products (vision, prefill) compute in, chosen per machine.

CPUs differ by a factor of ~50 in bf16 matrix products: on AVX2-only CPUs a bf16 GEMM
is ~7x slower than fp32 (no bf16 units; measured on the development machines), on
AVX-512 BF16 and AMX CPUs it is several times faster than fp32 (AMX: ~1.9 TFLOP/s vs
0.26 for fp32 on a 2-thread Xeon). So the choice is made for the machine it runs on:

* weights not in bf16 (float32, the oracle's setting): nothing to choose, no casts;
* a GPU: activations are already in the weights' dtype there (``compute_dtype``);
* a CPU whose flags show native bf16 matrix units (``amx_bf16`` or ``avx512_bf16``):
  bf16, if a short measurement (a 256 x 2048 x 2048 product in both dtypes) confirms
  that bf16 is faster; else fp32;
* any other CPU: fp32 (weights upcast a layer at a time), without measuring.

``DSVL2_BIG_PRODUCTS=fp32|bf16`` overrides the choice. A measurement is cached per
machine (CPU model, flags, torch version, threads) in ``kernels.json`` in dsvl2's cache
directory (``dsvl2/cachedir.py``: ``$DSVL2_CACHE_DIR``, else ``$XDG_CACHE_HOME/dsvl2``, else
``~/.cache/dsvl2``); a file there that is not ours alone (another owner, group / other
writable, a symlink) is ignored, and the measurement made again. Decode steps read the weights in their own dtype
(``ops.decoding``, ``native``), whatever is chosen here; either way a row's numbers do not depend
on its batch.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ... import cachedir
from .cpu import cpu_info

NATIVE_BF16_FLAGS = ("amx_bf16", "avx512_bf16")


@dataclass(frozen=True)
class KernelChoice:
    big_products: str      # "fp32" | "bf16" | "weights" (GPU / float32 weights)
    reason: str
    cpu: str = ""
    measured: dict | None = None  # GFLOP/s of the measured products, when measured

    def to_dict(self) -> dict:
        return asdict(self)


def matmul_gflops(dtype: torch.dtype, m: int = 256, k: int = 2048, n: int = 2048, reps: int = 3) -> float:
    """The best of ``reps`` timed [m, k] x [k, n] products in ``dtype``, after a warm-up (GFLOP/s)."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(m, k, generator=g).to(dtype)
    b = torch.randn(k, n, generator=g).to(dtype)
    torch.matmul(a, b)  # warm-up
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        torch.matmul(a, b)
        best = min(best, time.perf_counter() - t)
    return 2 * m * k * n / best / 1e9


CACHE_NAME = "kernels.json"


def cache_file() -> Path:
    """Where the measurements are cached with this environment (``cachedir.root()``)."""
    return cachedir.root() / CACHE_NAME


def _read_cache() -> dict:
    """The cached measurements, or {} (none, unreadable, or not ours alone: see ``cachedir``)."""
    raw = cachedir.read_file(CACHE_NAME)
    try:
        data = json.loads(raw) if raw else {}
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def choose(device: torch.device | str, weight_dtype: torch.dtype, flags: set[str] | None = None,
           measure=None, use_cache: bool = True) -> KernelChoice:
    """Decide (see the module docstring); ``flags`` / ``measure`` are for tests."""
    dev = torch.device(device)
    override = os.environ.get("DSVL2_BIG_PRODUCTS")
    if override:
        if override not in ("fp32", "bf16"):
            raise ValueError(f"DSVL2_BIG_PRODUCTS must be fp32 or bf16, got {override!r}")
        return KernelChoice(override, "set by DSVL2_BIG_PRODUCTS")
    if weight_dtype == torch.float32:
        return KernelChoice("weights", "float32 weights: products compute in float32, nothing is cast")
    if dev.type != "cpu":
        return KernelChoice("weights", f"{dev.type}: activations are in the weights' dtype")
    name, found = cpu_info()
    flags = found if flags is None else flags
    native = [f for f in NATIVE_BF16_FLAGS if f in flags]
    if not native:
        return KernelChoice("fp32", "no native bf16 matrix units (no amx_bf16 / avx512_bf16): bf16 GEMMs "
                                    "are slower than fp32 here, weights are upcast", name)
    key = hashlib.sha1(f"{name}|{sorted(flags)}|{torch.__version__}|{torch.get_num_threads()}".encode()).hexdigest()
    if use_cache:
        try:
            cached = _read_cache().get(key)
            if cached:
                return KernelChoice(**cached)
        except (ValueError, TypeError):
            pass
    measure = measure or matmul_gflops
    speeds = {"fp32_gflops": round(measure(torch.float32), 1), "bf16_gflops": round(measure(torch.bfloat16), 1)}
    pick = "bf16" if speeds["bf16_gflops"] > speeds["fp32_gflops"] else "fp32"
    choice = KernelChoice(pick, f"{'/'.join(native)} present; measured bf16 {speeds['bf16_gflops']} vs fp32 "
                                f"{speeds['fp32_gflops']} GFLOP/s", name, speeds)
    if use_cache:  # atomically, into a checked directory; a read-only home only costs a measurement next time
        data = _read_cache()
        data[key] = choice.to_dict()
        cachedir.write_file(CACHE_NAME, json.dumps(data, indent=1).encode())
    return choice
