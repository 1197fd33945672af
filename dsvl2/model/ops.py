"""Small numeric building blocks shared by the vision tower and the language model.

Mixed precision policy (see docs/performance.md, "Vision and prefill: which dtype the big
products use"): weights may be stored in bfloat16 to halve their bytes, while
activations stay float32 on the CPU. On AVX2 CPUs a
bf16 matrix-MATRIX product is ~7x slower than fp32, but a bf16 matrix-VECTOR product runs
at memory bandwidth. So products with bf16 weights compute in one of two ways, chosen by
the kind of step and never by the number of rows in the product:

* inside ``decoding()`` (the engine's decode steps): the native kernels (``native``:
  float32 activations against the bf16 weights, each weight row read once for all rows)
  where they are built, else torch's bf16 GEMVs (half the bytes), one cast in, one out;
* everywhere else (vision, prefill): the weight is upcast to the activations' dtype in
  blocks and one fp32 GEMM runs.

Choosing by row count (the first version did: bf16 up to 4 rows) made a batch row's
numbers depend on the rest of the batch, since an expert's row count depends on the
routing of every row. torch's bf16 CPU kernels give each row the same bits whatever the
number of rows (checked in a test), so with this rule a decode row's products do not
depend on its batch. With float32 weights (the oracle's setting) nothing is cast at all.

Quantised weights (``quant.QuantWeight``, int8 / int4) follow the same rule: the weight
object picks its kernel from the step kind (``decoding()`` or not), never from the rows.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from . import buckets, native, prepack
from .native import amx, policy
from .quant import QuantWeight
from .scratch import upcast  # noqa: F401  (ops.upcast: the name callers use)

# Weight values upcast at a time (whole output rows): bounds the fp32 temporary (tiny's
# lm_head upcast whole would be 662 MB) and keeps it in the last-level cache while it is
# used; 20 MiB of float32 takes each of the vision tower's weights whole (fc1 / fc2: 4.96 M
# values), so its products need no join of blocks (it took 2048 rows: 0.7 s of 43 s joining
# c01's 7 tiles on 2 Zen 3 threads).
BLOCK_ELEMS = 5 << 20


_mode = threading.local()


@contextmanager
def decoding():
    """Products with narrower (bf16) weights compute in the weights' dtype in this block
    (this thread only), whatever their row count. The engine wraps its decode steps."""
    before = decoding_active()
    _mode.decoding = True
    try:
        yield
    finally:
        _mode.decoding = before


# Vision / prefill products in the weights' dtype too: set by ``apply_kernel_choice`` on CPUs
# that multiply bf16 natively (AMX, AVX-512 BF16); process-wide, never per row count.
_big_in_weights = False


def set_big_products_in_weights_dtype(flag: bool) -> None:
    global _big_in_weights
    _big_in_weights = bool(flag)


def apply_kernel_choice(choice: "policy.KernelChoice") -> None:
    """Make a ``native.policy.choose`` result this process's policy. "weights" changes
    nothing: float32 weights and GPUs never cast, whatever the policy."""
    global attention_kernel
    if choice.big_products in ("fp32", "bf16"):
        set_big_products_in_weights_dtype(choice.big_products == "bf16")
    attention_kernel = choice.attention


def big_products_in_weights_dtype() -> bool:
    """The policy ``set_big_products_in_weights_dtype`` set (False: vision / prefill in float32)."""
    return _big_in_weights


def decoding_active() -> bool:
    """Inside ``decoding()`` on this thread (an engine decode step)."""
    return getattr(_mode, "decoding", False)


def decoding_bf16(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """A decode step's product of float activations with narrower (bf16) CPU weights."""
    return decoding_active() and isinstance(weight, torch.Tensor) and weight.dtype != x.dtype and x.is_cpu


def native_product(x: torch.Tensor, *weights: torch.Tensor) -> bool:
    """A decode step's product with these bf16 weights runs in the native kernels (float32
    activations, kernels built)."""
    return decoding_bf16(x, weights[0]) and native.usable(x, *weights)


# The blocks of a decode step in native code (RMSNorm, greedy router, MHA attention): on
# wherever the native kernels are built; tests switch them off to compare with torch.
native_blocks = True


def native_block(x: torch.Tensor, *weights: torch.Tensor) -> bool:
    """Run this decode-step block natively: bf16 weights, float32 activations, kernels built."""
    return native_blocks and native_product(x, *weights)


# Prefill / vision attention beside bf16 products runs with bf16 products too
# (``attention_bf16`` below) where the CPU has AVX-512 BF16; tests switch it off to
# compare with torch's float32 attention.
native_attention = True


def attention_in_bf16(x: torch.Tensor, weight, tower: bool = False) -> bool:
    """The attention of a prefill step (or, ``tower``, of the vision tower) whose products
    compute in bf16 (this process's policy, a bf16 or quantised ``weight`` beside it, not a
    decode step) runs with bf16 products too, where a kernel it may take is usable here
    (``attention_bf16`` / ``tower_attention_bf16``). As flash attention in the bf16
    reference: float32 scores and softmax, bf16 inputs to both products. Float32 weights
    (the oracle) and decode steps never."""
    takes = attention_kernel == "amx" or native.attention_usable() or (tower and attention_kernel == "torch")
    return (native_attention and _big_in_weights and x.dtype == torch.float32 and x.is_cpu
            and (isinstance(weight, QuantWeight) or weight.dtype == torch.bfloat16)
            and not decoding_active() and takes)


# Which kernel computes that attention: "native" (``attention.c``), "torch"
# (``scaled_dot_product_attention`` on the bf16 inputs, whose products oneDNN runs on AMX tiles
# where the CPU has them) or "amx" (``amx_attention.c``: the native kernel's numbers on AMX
# tiles); the kernel policy measures them on a vision tile (``native/policy.py``).
attention_kernel = "native"


def attention_bf16(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                   mask: torch.Tensor | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """A prefill's attention: ``native.attention_bf16`` (its contract) on the AMX kernel where
    the policy chose it, else on the native one, never on torch's. A prefill batches
    prompts of different lengths, padded to the longest (keys masked): the native kernels
    give a row the same bits whatever the padding, while torch's flash kernel splits the
    keys by their padded count (a row alone and padded to 40 or 700 keys differ by up to
    2^-7), so a row's bits would depend on the other requests. Kernels by step kind, never
    by the batch (tests/test_attention_torch.py)."""
    if attention_kernel == "amx":
        return native.attention_bf16_amx(q, k, v, scale, mask, out=out)
    return native.attention_bf16(q, k, v, scale, mask, out=out)


def tower_attention_bf16(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                         out: torch.Tensor | None = None) -> torch.Tensor:
    """The vision tower's attention (every tile alone: 729 queries of its own 729 keys, no
    mask, so no padding) on the kernel the policy chose, torch's included."""
    if attention_kernel == "torch":
        return native.attention_bf16_torch(q, k, v, scale, out=out)
    return attention_bf16(q, k, v, scale, out=out)


def linear_rows(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear``; outside decode steps a bf16 CPU product's rows padded to a bucket (``buckets.py``)."""
    return buckets.linear(x, weight, bias, pad=not decoding_active())


def _in_weight_dtype(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Against narrower (bf16) weights on the CPU, compute in the weights' dtype in a decode
    step, and in every step on machines with native bf16 matrix units (``native/policy.py``)."""
    return (weight.dtype != x.dtype and x.device.type == "cpu"
            and (_big_in_weights or decoding_active()))


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ weight.T + bias`` in x's dtype, whatever dtype the weight is stored in."""
    if isinstance(weight, QuantWeight):  # int8 / int4: the weight picks its kernel by step kind
        out = weight.linear(x, decoding_active(), _big_in_weights)
        return out if bias is None else out + bias.to(x.dtype)
    if weight.dtype == x.dtype:
        return F.linear(x, weight, bias)
    if _in_weight_dtype(x, weight):
        # Decode: bf16 GEMVs read half the bytes; the result returns in x's dtype.
        if decoding_active() and native.usable(x, weight):  # float32 activations, weights read once for all rows
            return native.linear(x, weight, bias)
        if amx_bf16(x, weight):
            return _amx_linear(x, weight, bias)
        out = linear_rows(x.to(weight.dtype), weight, None if bias is None else bias.to(weight.dtype))
        return out.to(x.dtype)
    n = weight.shape[0]
    rows = max(1, BLOCK_ELEMS // max(1, weight.shape[-1]))
    if n <= rows:
        return F.linear(x, upcast(weight, x.dtype), None if bias is None else bias.to(x.dtype))
    parts = [F.linear(x, upcast(weight[i:i + rows], x.dtype),
                      None if bias is None else bias[i:i + rows].to(x.dtype))
             for i in range(0, n, rows)]
    return torch.cat(parts, dim=-1)


def amx_bf16(x: torch.Tensor, weight) -> bool:
    """A prefill product of a bf16 weight that runs on AMX tiles (``native.amx.linear``): outside
    decode, under bf16 products, AMX on, the weight a contiguous 2-d bf16 CPU tensor of a
    shape the kernel takes, autograd not recording. As the quantised weights' prefill
    products: x rounded to bf16, float32 sums, no bf16 rounding of the result (so the
    language model's attention projections of a tiny-size prefill: 1,380 -> 1,770 GFLOP/s at
    1,431 rows, and no cast back)."""
    return (not decoding_active() and _big_in_weights and _amx_bf16_weight(weight) and x.is_cpu and x.numel() > 0
            and _untracked(x, weight) and amx.active())


def _amx_bf16_weight(w) -> bool:
    """A contiguous 2-d bf16 CPU weight of a shape ``amx.linear`` / ``amx.expert`` take."""
    return (isinstance(w, torch.Tensor) and w.dtype is torch.bfloat16 and w.ndim == 2 and w.is_cpu
            and w.is_contiguous() and amx.takes(*w.shape))


def _untracked(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Autograd does not record x @ w here: a native kernel may replace torch's ops (a loaded
    model's parameters require grad; under no_grad / inference_mode that does not count)."""
    return not (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad))


def _amx_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    y = amx.linear(x.reshape(-1, x.shape[-1]).to(torch.bfloat16), weight)
    if bias is not None:
        y += bias.float()
    return y.to(x.dtype).view(*x.shape[:-1], weight.shape[0])


def narrow_product(x: torch.Tensor, weight) -> bool:
    """A vision / prefill product that computes in the (bf16) weight's dtype, whose result
    ``linear_narrow`` and ``Linear.narrow`` keep in that dtype."""
    return isinstance(weight, torch.Tensor) and _in_weight_dtype(x, weight) and not decoding_active()


def linear_narrow(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``linear``, except that where the product computes in the (bf16) weights' dtype its
    result stays in that dtype instead of returning to x's: for chains of big products
    (the vision tower's fc1 -> GELU -> fc2, qkv -> attention -> proj) that would otherwise
    cast every intermediate to float32 and back. The bits are ``linear``'s: the bf16
    result is what ``linear`` casts up, an elementwise op on bf16 computes in float32 and
    rounds once, what the next product's cast of its float32 result does (true of the
    tanh GELU, checked in tests/test_model.py; not of torch's erf GELU, so check any other
    op before chaining it), and ``x + y`` with y bf16 promotes exactly.
    Elsewhere (float32 or quantised weights, another policy): ``linear`` itself."""
    if narrow_product(x, weight):
        return linear_rows(x.to(weight.dtype), weight, None if bias is None else bias.to(weight.dtype))
    return linear(x, weight, bias)


def weight_matmul(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x @ weight`` (batched, weight [..., K, N]) in x's dtype; same dtype policy as ``linear``."""
    if weight.dtype == x.dtype:
        return torch.matmul(x, weight)
    if _in_weight_dtype(x, weight):
        return torch.matmul(x.to(weight.dtype), weight).to(x.dtype)
    return torch.matmul(x, upcast(weight, x.dtype))


def _packed_product(x: torch.Tensor, weight) -> bool:
    """A vision / prefill product that runs in the (bf16) weight's dtype under this policy:
    x in float32 (cast once, ``narrow_product``) or already in the weight's dtype (the result
    of a previous narrow product: fc2 after fc1, proj after the attention)."""
    if x.dtype == getattr(weight, "dtype", None):
        return _big_in_weights and x.device.type == "cpu" and not decoding_active()
    return narrow_product(x, weight)


class Linear(nn.Linear):
    """nn.Linear whose weights may be stored in a narrower dtype than the activations.

    ``prepack()`` keeps a oneDNN-reordered copy of a bf16 weight beside it (``prepack.py``)
    for ``narrow``: the vision tower's products, run in bf16 where the policy says so."""

    packed: torch.Tensor | None = None
    _packed_of: tuple[int, int] | None = None  # (data_ptr, version) of the weight packed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)

    def prepack(self, rows: int = 729) -> bool:
        """Reorder the bf16 weight once for ``narrow`` (where ``prepack.usable()``); True if done."""
        w = self.weight
        if not (isinstance(w, torch.Tensor) and w.dtype is torch.bfloat16 and w.is_cpu and prepack.usable()):
            return False
        self.packed = prepack.pack(w, rows)
        self._packed_of = (w.data_ptr(), w._version)
        return True

    def narrow(self, x: torch.Tensor, gelu_tanh: bool = False) -> torch.Tensor:
        """``linear_narrow(x, weight, bias)``, then the tanh GELU if asked. Where the product
        runs in bf16 and the weight is prepacked (and unchanged since): one oneDNN call on
        the reordered weight, same bits as ``linear_narrow``. Where the kernels are built,
        the GELU runs in place: on a bf16 result by table (``native/gelu.c``: the float32
        GELU rounded once; 1.5 ms for a 4-tile fc1 result where oneDNN's GELU post-op on
        the float32 accumulator cost 8-10 ms), on a float32 one in one pass (within 1 ulp of
        |x| of the exact value, as torch's); ``F.gelu`` elsewhere."""
        w = self.weight
        if self.packed is not None and self._packed_of == (w.data_ptr(), w._version) and _packed_product(x, w):
            b = None if self.bias is None else self.bias.to(w.dtype)
            h = prepack.product(x.to(w.dtype), self.packed, b)
        else:
            h = linear_narrow(x, w, self.bias)
        if not gelu_tanh:
            return h
        if h.is_cpu and h.is_contiguous() and not h.requires_grad and native.available():
            if h.dtype is torch.bfloat16:
                return native.gelu_tanh_bf16_(h)  # in place, one table read a value
            if h.dtype is torch.float32:
                return native.gelu_tanh_(h)  # in place, one pass: 3-5x torch's (native/gelu.c)
        return F.gelu(h, approximate="tanh")


class RMSNorm(nn.Module):
    """RMSNorm computed in float32, scaled by the weight after casting back (reference order)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if native_block(x, self.weight) or self._native_prefill(x):
            return native.rmsnorm(x, self.weight, self.eps)  # one call instead of eight ops
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight.to(dtype) * h.to(dtype)


    def _native_prefill(self, x: torch.Tensor) -> bool:
        """A prefill's norm of a bf16 model under bf16 products (where its products already
        round to bf16): the native RMSNorm, rows shared among the threads (a small-size
        prefill's [1,431, 2,048]: 3.3 -> ~1 ms; torch's is four passes). Its rows sum x^2 in
        another order than torch's mean (an ulp of the scale at times). Not for float32
        weights (the oracle), not in decode (``native_block`` decides there), not with
        autograd."""
        w = self.weight
        return (_big_in_weights and w.dtype is torch.bfloat16 and x.dtype is torch.float32 and x.is_cpu
                and not decoding_active() and _untracked(x, w) and native.available())


class LayerNorm(nn.LayerNorm):
    """LayerNorm whose parameters may be stored in a narrower dtype than the activations."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = None if self.weight is None else self.weight.to(x.dtype)
        b = None if self.bias is None else self.bias.to(x.dtype)
        return F.layer_norm(x, self.normalized_shape, w, b, self.eps)


def amx_mlp_slots(x: torch.Tensor, gate, up, down) -> tuple | None:
    """Where a dense SiLU-gated MLP of a prefill (shared experts, the dense layers) runs as
    one ``native.amx.expert`` call: its three weights as that takes them, else None. Outside
    decode, under bf16 products, float32 activations, AMX usable and on (``amx.enabled``),
    and the weights all bf16 or all int8 / int4 of one kind, in shapes the kernel takes.
    The numbers: the products as ``amx.linear`` computes them, SiLU and its product with up
    in float32 (a vector exponential: a few ulps from torch's SiLU), rounded to bf16 once
    before down; x packed once for gate and up, no [rows, F] tensors written."""
    if (decoding_active() or not _big_in_weights or x.dtype != torch.float32 or not x.is_cpu or not x.numel()
            or not amx.active()):
        return None
    ws = (gate, up, down)
    if all(isinstance(w, QuantWeight) for w in ws):
        if len({w.kind for w in ws}) == 1 and all(w.amx_ready() for w in ws):
            return tuple(w.amx_args() for w in ws)
        return None
    if all(_amx_bf16_weight(w) for w in ws):
        return tuple((w, None, 0) for w in ws)
    return None


def gated_mlp(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """``down(silu(gate(x)) * up(x))`` for weights [F, D], [F, D], [D, F], in x's dtype.

    Decode with bf16 weights: the whole MLP runs in bf16 with one cast in and
    one out, like the bf16 reference, instead of a cast around each of the three GEMVs.
    Decode with the native kernels built (bf16, int8 or int4 weights): the whole MLP in one
    native call, the one ``decode_plan`` strings together with the other blocks. Prefill on
    AMX: one ``amx.expert`` call (``amx_mlp_slots``).
    """
    slots = amx_mlp_slots(x, gate, up, down)
    if slots is not None:  # a prefill MLP in one AMX call (every routing weight 1.0: exact)
        x2 = x.reshape(-1, x.shape[-1]).to(torch.bfloat16).contiguous()
        y = amx.expert(x2, *slots, torch.ones(x2.shape[0]))
        return y.view(*x.shape[:-1], y.shape[-1])
    if isinstance(gate, QuantWeight):
        if decoding_active() and native.usable_int8(x, gate, up, down):
            return native.gated_mlp_int8(x, gate, up, down)
        if decoding_active() and native.usable_int4(x, gate, up, down):
            return native.gated_mlp_int4(x, gate, up, down)
        return linear(F.silu(linear(x, gate)) * linear(x, up), down)
    if _in_weight_dtype(x, gate):
        if decoding_active() and native.usable(x, gate, up, down):
            return native.gated_mlp(x, gate, up, down)
        xb, m = buckets.padded_rows(x.to(gate.dtype), pad=not decoding_active())  # once for the three products
        y = F.linear(F.silu(F.linear(xb, gate)) * F.linear(xb, up), down)
        return y[:m].view(*x.shape[:-1], down.shape[0]).to(x.dtype)
    return linear(F.silu(linear(x, gate)) * linear(x, up), down)


class GatedMLP(nn.Module):
    """SiLU-gated MLP ``down(silu(gate(x)) * up(x))`` (dense layers and shared experts)."""

    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = Linear(hidden, intermediate, bias=False)
        self.up_proj = Linear(hidden, intermediate, bias=False)
        self.down_proj = Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return gated_mlp(x, self.gate_proj.weight, self.up_proj.weight, self.down_proj.weight)
