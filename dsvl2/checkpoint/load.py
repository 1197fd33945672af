"""Checkpoint loading: official safetensors layout -> a ``DeepseekVL2`` in the requested dtype.

* Single ``model.safetensors`` or sharded ``model.safetensors.index.json``; official key
  names (``vision.*``, ``projector.layers.*``, ``language.model.*``,
  ``language.lm_head.weight``, ``image_newline``, ``view_seperator``).
* The model is built on the ``meta`` device (no memory) and each tensor is read with
  plain file reads (our own safetensors header parser, ``read_header``) straight into its
  final tensor: routed experts into their slot of the stacked [E, F, D] tensor, tensors
  already in the target dtype without any temporary. No memory map: mapped pages count
  in the resident memory and were kept while a shard was open (11.4 GB resident for the
  6.7 GB tiny); now the peak is the weights plus one tensor (7.45 GB for tiny with a
  chat on one image, 1.10x).
* Quantised weights (``quant_bits`` says which tensors): a ``dsvl2 quantize`` checkpoint
  stores ``<key>`` (int8 / packed int4) and ``<key>_scale``; ``quantize=`` quantises a
  float checkpoint tensor by tensor while loading. Either way a ``model.quant.QuantWeight``
  replaces the parameter, and the ops layer picks its kernel.
* ``sanitize_key`` is the one place where checkpoint names map to module names; the
  unused SigLIP attention-pool head (``vision.attn_pool.*``) is dropped there.
* A missing or unexpected tensor, or a shape that does not match the config, is a
  ``CheckpointError`` that names it.
* ``e_score_correction_bias`` stays float32 whatever the dtype (it is stored and used in
  float32 by the reference).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch

from ..config import ModelConfig, load_config
from ..errors import CheckpointError
from ..model import pages, quant
from ..model.vl import DeepseekVL2

_EXPERT = re.compile(r"^(language\.model\.layers\.\d+\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
KEEP_FP32 = ("e_score_correction_bias",)


def sanitize_key(key: str) -> tuple[str, int | None] | None:
    """Checkpoint key -> (module parameter name, expert index or None); None = drop."""
    if key.startswith("vision.attn_pool."):
        return None
    m = _EXPERT.match(key)
    if m:
        return f"{m.group(1)}.{m.group(3)}", int(m.group(2))
    return key, None


def weight_files(folder: Path) -> list[Path]:
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            wm = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from None
        files = [folder / f for f in dict.fromkeys(wm.values())]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{index} names shard(s) that do not exist: {', '.join(missing)}")
        return files
    single = folder / "model.safetensors"
    if single.is_file():
        return [single]
    found = sorted(p.name for p in folder.glob("*.safetensors"))
    if found:
        return [folder / f for f in found]
    raise CheckpointError(f"{folder}: no model.safetensors or model.safetensors.index.json found")


_ST_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "I8": torch.int8,
              "U8": torch.uint8, "I32": torch.int32, "I64": torch.int64, "BOOL": torch.bool}


@dataclass(frozen=True)
class StoredTensor:
    """One tensor of a safetensors file: where its bytes are, and what they are."""

    file: Path
    key: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    nbytes: int


def read_header(f: Path) -> list[StoredTensor]:
    """The tensors of a safetensors file in file order, checked against the file's size."""
    try:
        size = f.stat().st_size
        with open(f, "rb") as h:
            n = int.from_bytes(h.read(8), "little")
            if not 0 < n <= min(size - 8, 100 * 1024 ** 2):
                raise ValueError(f"header length {n} does not fit a {size}-byte file")
            meta = json.loads(h.read(n))
        base = 8 + n
        out = []
        for key, v in meta.items():
            if key == "__metadata__":
                continue
            dt = _ST_DTYPES.get(v["dtype"])
            if dt is None:
                raise ValueError(f"tensor {key!r} has unsupported dtype {v['dtype']}")
            a, b = v["data_offsets"]
            shape = tuple(int(d) for d in v["shape"])
            if b - a != math.prod(shape) * torch.empty((), dtype=dt).element_size() or base + b > size:
                raise ValueError(f"tensor {key!r}: data_offsets {[a, b]} do not match its shape or the file size")
            out.append(StoredTensor(f, key, dt, shape, base + a, b - a))
    except (OSError, ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{f}: cannot read safetensors file ({e})") from None
    return sorted(out, key=lambda t: t.start)


def read_into(t: StoredTensor, out: torch.Tensor, fh) -> torch.Tensor:
    """Read the tensor's bytes straight into ``out`` (contiguous, same dtype and size).

    Plain reads, no memory map: the bytes land in their final place once, and the page
    cache they pass through is not part of this process's resident memory.
    """
    buf = out.reshape(-1).view(torch.uint8).numpy() if out.numel() else None
    if buf is not None:
        fh.seek(t.start)
        view = memoryview(buf)
        got = 0
        while got < t.nbytes:
            n = fh.readinto(view[got:])
            if not n:
                raise CheckpointError(f"{t.file}: cannot read safetensors file (tensor {t.key!r} is truncated)")
            got += n
    return out


def read_tensor(t: StoredTensor, fh) -> torch.Tensor:
    """The tensor read into new memory (2 MiB pages where large: model/pages.py)."""
    return read_into(t, pages.empty(t.shape, t.dtype), fh)


def iter_stored(files: list[Path]) -> Iterator[tuple[StoredTensor, object]]:
    """(tensor, open file handle) for every tensor of the files, one file open at a time."""
    for f in files:
        tensors = read_header(f)
        with open(f, "rb", buffering=0) as fh:
            for t in tensors:
                yield t, fh


def count_tensors(files: list[Path]) -> int:
    return sum(len(read_header(f)) for f in files)


def build_empty(cfg: ModelConfig) -> DeepseekVL2:
    with torch.device("meta"):
        return DeepseekVL2(cfg)


# ---- quantisation layout ---------------------------------------------------------------------

QUANT_SCHEMES = ("int8", "int4")
SCALE_SUFFIX = "_scale"
_LM_LINEAR = re.compile(
    r"^language\.(lm_head\.weight|model\.layers\.\d+\.(self_attn\.(q_proj|k_proj|v_proj|o_proj|q_a_proj|q_b_proj"
    r"|kv_a_proj_with_mqa)\.weight|mlp\.(shared_experts\.)?(gate_proj|up_proj|down_proj)\.weight"
    r"|mlp\.experts\.(gate_proj|up_proj|down_proj)))$")


def quant_bits(name: str, shape: tuple[int, ...], scheme: str | None) -> int | None:
    """Bits a module parameter is stored in under ``scheme`` (None = stays float).

    int8: every linear layer of the language model (attention, dense MLP, shared and
    routed experts, lm_head). int4: the routed experts in int4 where a group size fits
    their width, the rest as int8. Stay float: the router gate (routing is decided on
    it), ``kv_b_proj`` (MLA absorbs it into batched matmuls, not a linear), embeddings,
    norms, the vision tower and the projector.
    """
    if scheme is None or not _LM_LINEAR.match(name):
        return None
    if scheme == "int4" and ".mlp.experts." in name and quant.int4_group(shape[-1]) is not None:
        return 4
    return 8


def stored_scheme(folder: Path) -> dict | None:
    """The ``quantization`` entry of config.json (written by ``dsvl2 quantize``), if any."""
    try:
        q = json.loads((Path(folder) / "config.json").read_text(encoding="utf-8")).get("quantization")
    except (OSError, json.JSONDecodeError):
        return None
    if q is None:
        return None
    if not isinstance(q, dict) or q.get("scheme") not in QUANT_SCHEMES:
        raise CheckpointError(f"{folder}/config.json: 'quantization' must name a scheme in {QUANT_SCHEMES}, got {q!r}")
    return q


def load_model(folder: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
               progress: Callable[[int, int], None] | None = None, quantize: str | None = None) -> DeepseekVL2:
    """Load a checkpoint folder (config.json + safetensors) into a ``DeepseekVL2``.

    ``quantize``: "int8" or "int4" quantises a float checkpoint tensor by tensor while
    loading (see ``quant_bits``); a checkpoint written by ``dsvl2 quantize`` loads in its
    own scheme (``quantize`` may then be None or the same scheme). Memory: every tensor is
    read once into its final place (experts straight into their stacked slot), so the
    peak is the weights plus one tensor.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: model folder not found")
    if quantize is not None and quantize not in QUANT_SCHEMES:
        raise CheckpointError(f"quantize must be None, 'int8' or 'int4', got {quantize!r}")
    cfg = load_config(folder)
    stored = stored_scheme(folder)
    if stored is not None and quantize not in (None, stored["scheme"]):
        raise CheckpointError(f"{folder} is already quantised ({stored['scheme']}); it cannot be loaded as {quantize} "
                              "(quantise the float checkpoint instead)")
    scheme = stored["scheme"] if stored is not None else quantize
    dev = torch.device(device)
    if scheme is not None and dev.type != "cpu":
        raise CheckpointError(f"quantised weights run on the CPU only (the kernels are torch's CPU ones), not {dev}")
    model = build_empty(cfg)
    params = dict(model.named_parameters())
    filled: dict[str, torch.Tensor] = {}
    qfilled: dict[str, quant.QuantWeight] = {}
    seen: dict[str, set] = {}
    unexpected: list[str] = []
    files = weight_files(folder)
    total = count_tensors(files) if progress is not None else 0

    def qbits(name: str, p: torch.Tensor) -> int | None:
        return quant_bits(name, tuple(p.shape), scheme)

    for n_done, (t, fh) in enumerate(iter_stored(files), 1):
        if progress is not None:
            progress(n_done, total)
        key = t.key
        is_scale = stored is not None and key.endswith(SCALE_SUFFIX)
        mapped = sanitize_key(key[:-len(SCALE_SUFFIX)] if is_scale else key)
        if mapped is None:
            continue
        name, expert = mapped
        p = params.get(name)
        if p is None:
            unexpected.append(key)
            continue
        full = tuple(p.shape[1:]) if expert is not None else tuple(p.shape)
        if expert is not None and not 0 <= expert < p.shape[0]:
            raise CheckpointError(f"tensor {key!r}: expert {expert} is beyond the config's {p.shape[0]} experts")
        bits = qbits(name, p)
        want, want_dtype = full, None
        if stored is not None and bits is not None:  # stored quantised tensor or scale
            n, k = full
            group = quant.int4_group(k) if bits == 4 else 0
            if is_scale:
                want, want_dtype = ((n,) if bits == 8 else (n, k // group)), torch.bfloat16
            else:
                want, want_dtype = ((n, k) if bits == 8 else (n, k // 2)), (torch.int8 if bits == 8 else torch.uint8)
        elif is_scale:
            unexpected.append(key)
            continue
        if t.shape != want or (want_dtype is not None and t.dtype != want_dtype):
            raise CheckpointError(f"tensor {key!r} has shape {list(t.shape)} ({t.dtype}), the config expects "
                                  f"{list(want)}" + (f" ({want_dtype})" if want_dtype is not None else "")
                                  + (f" for expert {expert} of {p.shape[0]}" if expert is not None else ""))
        slot = () if expert is None else (expert,)
        seen.setdefault(name, set()).add((expert, is_scale))
        if bits is not None:
            qw = qfilled.get(name)
            if qw is None:
                qw = qfilled[name] = quant.QuantWeight.empty(bits, tuple(p.shape), quant.int4_group(p.shape[-1]) or 0)
            if stored is None:  # quantise while loading
                qw.quantize_slot(slot, read_tensor(t, fh))
            elif is_scale:
                qw.set_scale(slot, read_tensor(t, fh))
            elif qw.kind == "int4pack":
                qw.set_data(slot, read_tensor(t, fh))
            else:
                read_into(t, qw.data[slot], fh)
            continue
        target = torch.float32 if name.endswith(KEEP_FP32) else dtype
        if expert is None:
            if t.dtype == target and dev.type == "cpu":
                filled[name] = read_tensor(t, fh)
            else:
                filled[name] = pages.empty(t.shape, target, dev).copy_(read_tensor(t, fh))
        else:
            if name not in filled:
                filled[name] = pages.empty(p.shape, target, dev)
            if t.dtype == target and dev.type == "cpu":
                read_into(t, filled[name][expert], fh)
            else:
                filled[name][expert].copy_(read_tensor(t, fh))
    if unexpected:
        raise CheckpointError(f"{folder}: unexpected tensor(s) not used by this config: "
                              + ", ".join(sorted(unexpected)[:10]) + (" ..." if len(unexpected) > 10 else ""))
    missing = []
    for name, p in params.items():
        parts = (False, True) if stored is not None and qbits(name, p) is not None else (False,)
        stacked = name.rsplit(".", 1)[-1] in ("gate_proj", "up_proj", "down_proj") and ".experts." in name
        experts = range(p.shape[0]) if stacked else (None,)
        have = seen.get(name, set())
        lacking = [(e, s) for e in experts for s in parts if (e, s) not in have]
        if not lacking:
            continue
        e, s = lacking[0]
        base = name if e is None else f"{name.rsplit('.', 1)[0]}.{e}.{name.rsplit('.', 1)[1]}.weight"
        missing.append(base + (SCALE_SUFFIX if s else "")
                       + (f" (and {len(lacking) - 1} more)" if len(lacking) > 1 else ""))
    if missing:
        raise CheckpointError(f"{folder}: missing tensor(s): " + ", ".join(missing[:10])
                              + (" ..." if len(missing) > 10 else ""))
    model.load_state_dict(filled, strict=False, assign=True)
    for name, qw in qfilled.items():  # quantised weights replace their (meta) parameters
        mod_name, attr = name.rsplit(".", 1)
        quant.hold(model.get_submodule(mod_name), attr, qw)
    model.language.rebuild_rotary(dev)  # non-persistent buffers were built on meta
    model.quantization = scheme
    model.eval()
    return model
