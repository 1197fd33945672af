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

The attention beside bf16 products (``ops.tower_attention_bf16``) has three kernels: the native
one (``attention.c``, AVX-512 BF16), torch's ``scaled_dot_product_attention`` on the bf16
inputs, whose products oneDNN runs on AMX tiles where the CPU has them (2.2x the native
kernel on vision tiles on an Intel Xeon with AMX), and the native kernel's numbers on AMX
tiles (``amx_attention.c``: 4.2x the native, 2.0x torch's there; only where
``amx.usable()`` and ``amx.enabled``). Where bf16 is chosen and the native kernel is
usable, each usable kernel runs one vision tile's attention ([1, 16, 729, 72]), in turns
(``ATTENTION_ROUNDS``, the best of each); the fastest is taken if it is at least
``ATTENTION_MARGIN`` times as fast as the native one; else the native one.
``DSVL2_ATTENTION=native|torch|amx`` overrides that. torch's kernel, where chosen, runs the
vision tower's attention only; a prefill's stays on a native kernel (``ops.attention_bf16``:
torch's gives a row other bits beside longer prompts).

``DSVL2_BIG_PRODUCTS=fp32|bf16`` overrides the choice. A measurement is cached per machine
(CPU model, flags, torch version, threads) with the load average it was taken at (one taken
on a busy machine is made again at a load on a quiet one: ``BUSY``) in ``kernels.json`` in
dsvl2's cache directory (``dsvl2/cachedir.py``: ``$DSVL2_CACHE_DIR``, else ``$XDG_CACHE_HOME/dsvl2``, else
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
from dataclasses import asdict, dataclass, replace
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
    measured: dict | None = None  # GFLOP/s of the measured products (and attention ms), when measured
    attention: str = "native"  # the bf16 attention's kernel (ops.attention_bf16): "native" | "torch" | "amx"

    def to_dict(self) -> dict:
        return asdict(self)


def best_seconds(fn, reps: int) -> float:
    """The best of ``reps`` timed calls of ``fn()``, after one untimed call (a warm-up)."""
    fn()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def matmul_gflops(dtype: torch.dtype, m: int = 256, k: int = 2048, n: int = 2048, reps: int = 3) -> float:
    """The best of ``reps`` timed [m, k] x [k, n] products in ``dtype``, after a warm-up (GFLOP/s)."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(m, k, generator=g).to(dtype)
    b = torch.randn(k, n, generator=g).to(dtype)
    return 2 * m * k * n / best_seconds(lambda: torch.matmul(a, b), reps) / 1e9


ATTENTION_MARGIN = 1.2
ATTENTION_ROUNDS = 3  # each kernel timed this many times, in turns
ATTENTION_KERNELS = ("native", "torch", "amx")
ATTENTION_SHAPE = (1, 16, 729, 72)  # one vision tile's attention: [B, heads, patches, head size]


def attention_ms(kernel: str, reps: int = 3) -> float:
    """The best of ``reps`` timed runs of one vision tile's bf16 attention (``ATTENTION_SHAPE``)
    on ``kernel`` (one of ``ATTENTION_KERNELS``), after a warm-up (milliseconds)."""
    from . import attention_bf16, attention_bf16_amx, attention_bf16_torch

    fn = {"native": attention_bf16, "torch": attention_bf16_torch, "amx": attention_bf16_amx}[kernel]
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(ATTENTION_SHAPE, generator=g).to(torch.bfloat16) for _ in range(3))
    out = torch.empty(ATTENTION_SHAPE, dtype=torch.bfloat16)
    return best_seconds(lambda: fn(q, k, v, 0.125, out=out), reps) * 1e3


def amx_attention_usable() -> bool:
    """The AMX attention kernel runs here and is not switched off (``DSVL2_AMX=0``)."""
    from . import amx

    return amx.active()


def _attention_timing(kernel: str) -> float | None:
    """``attention_ms`` where the native kernel (and, for "amx", AMX) is usable here; None
    where it is not (nothing to compare with: the native kernel stays the choice)."""
    from . import attention_usable

    usable = attention_usable() and (kernel != "amx" or amx_attention_usable())
    return attention_ms(kernel) if usable else None


def _attention_override() -> str | None:
    want = os.environ.get("DSVL2_ATTENTION")
    if want and want not in ATTENTION_KERNELS:
        raise ValueError(f"DSVL2_ATTENTION must be one of {', '.join(ATTENTION_KERNELS)}, got {want!r}")
    if want == "amx" and not amx_attention_usable():
        raise ValueError("DSVL2_ATTENTION=amx needs a CPU and kernel with AMX (AMX-TILE, AMX-BF16) and DSVL2_AMX "
                         "not 0; this machine has no usable AMX: use native or torch")
    return want or None


CACHE_NAME = "kernels.json"
# The load average per CPU at or above which a measurement is taken on a busy machine: both
# kernels slow down, by different amounts (the attention's torch / native ratio measured 1.17
# beside a test run, 2.25 on the quiet machine). Such a measurement is cached with its load
# and made again at the next load on a quiet machine (below BUSY / 2).
BUSY = 1.0


def load_per_cpu() -> float:
    """The 1-minute load average per CPU this process may use (0 where there is none)."""
    try:
        return os.getloadavg()[0] / max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return 0.0


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
           measure=None, use_cache: bool = True, measure_attention=None) -> KernelChoice:
    """Decide (see the module docstring); ``flags`` / ``measure`` / ``measure_attention``
    (kernel -> ms) are for tests. With neither measurement given, the attention is measured
    (``attention_ms``) where bf16 is chosen and the native kernel is usable."""
    choice = _choose(device, weight_dtype, flags, measure, use_cache, measure_attention)
    want = _attention_override()
    return replace(choice, attention=want) if want else choice


def _choose(device, weight_dtype, flags, measure, use_cache, measure_attention) -> KernelChoice:
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
    # "attention-amx": entries cached before the AMX attention was measured are not reused;
    # one cached with the AMX kernels switched on does not serve a process with them off
    amx_on = "amx" if amx_attention_usable() else "no-amx"
    key = hashlib.sha1(f"{name}|{sorted(flags)}|{torch.__version__}|{torch.get_num_threads()}|attention-{amx_on}"
                       .encode()).hexdigest()
    if use_cache:
        try:
            cached = dict(_read_cache().get(key) or {})
            busy_then = float(cached.pop("load_per_cpu", 0.0))
            # a measurement taken on a busy machine stands until one can be taken on a quiet one
            if cached and not (busy_then >= BUSY and load_per_cpu() < BUSY / 2):
                return KernelChoice(**cached)
        except (ValueError, TypeError):
            pass
    load_now = load_per_cpu()
    if measure is None and measure_attention is None:  # the real measurements, not a test's
        measure_attention = _attention_timing
    measure = measure or matmul_gflops
    speeds = {"fp32_gflops": round(measure(torch.float32), 1), "bf16_gflops": round(measure(torch.bfloat16), 1)}
    pick = "bf16" if speeds["bf16_gflops"] > speeds["fp32_gflops"] else "fp32"
    attention = "native"
    if pick == "bf16" and measure_attention is not None:
        native_ms = measure_attention("native")  # None: the native kernel is not usable here
        if native_ms is not None:  # in turns, the best of each: a moment of load hits all of them
            times = {"native": [native_ms]}
            for kernel in ATTENTION_KERNELS[1:]:
                ms = measure_attention(kernel)  # None: not usable here
                if ms is not None:
                    times[kernel] = [ms]
            for _ in range(ATTENTION_ROUNDS - 1):
                for kernel, t in times.items():
                    t.append(measure_attention(kernel))
            for kernel, t in times.items():
                speeds[f"attention_{kernel}_ms"] = round(min(t), 2)
            fastest = min(times, key=lambda kernel: speeds[f"attention_{kernel}_ms"])
            if speeds[f"attention_{fastest}_ms"] * ATTENTION_MARGIN <= speeds["attention_native_ms"]:
                attention = fastest
    choice = KernelChoice(pick, f"{'/'.join(native)} present; measured bf16 {speeds['bf16_gflops']} vs fp32 "
                                f"{speeds['fp32_gflops']} GFLOP/s", name, speeds, attention)
    if use_cache:  # atomically, into a checked directory; a read-only home only costs a measurement next time
        data = _read_cache()
        data[key] = {**choice.to_dict(), "load_per_cpu": round(load_now, 2)}
        cachedir.write_file(CACHE_NAME, json.dumps(data, indent=1).encode())
    return choice
