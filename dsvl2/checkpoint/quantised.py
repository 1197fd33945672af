"""``dsvl2 quantize MODEL OUT --bits 8|4``: write an int8 / int4 checkpoint, tensor by tensor.

The output keeps the official key names and file layout (same shards, same index); each
quantised weight ``<key>`` is stored in its quantised form next to ``<key>_scale``
(formats: ``dsvl2.model.quant``; which tensors: ``dsvl2.checkpoint.load.quant_bits``), and
``config.json`` records the scheme under ``"quantization"``. ``dsvl2.load`` then reads it
directly, with memory equal to its size.

Streaming: one source tensor is read, quantised and written at a time (the source files
are read with plain reads, not mapped), so quantising the 32 GB bf16 small needs a few
hundred MB (its largest tensor, the embedding, as float32), never the model.
The same helpers write quantised random checkpoints (``dsvl2 init-random --quantize``).
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch

from ..errors import CheckpointError
from ..model import quant
from .load import (QUANT_SCHEMES, SCALE_SUFFIX, iter_stored, quant_bits, read_header, read_tensor,
    sanitize_key, stored_scheme, weight_files)

_ST_NAMES = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32", torch.int8: "I8", torch.uint8: "U8"}
SCHEME_OF_BITS = {8: "int8", 4: "int4"}
COPIED = ("processor_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")

Entry = tuple[str, torch.dtype, tuple[int, ...]]


def tensor_bits(key: str, shape: tuple[int, ...], scheme: str | None) -> int | None:
    """Bits an official checkpoint tensor is stored in under ``scheme`` (None: as is)."""
    mapped = sanitize_key(key)
    if mapped is None or len(shape) != 2:
        return None
    return quant_bits(mapped[0], shape, scheme)


def entries_for(key: str, shape: tuple[int, ...], dtype: torch.dtype, scheme: str | None) -> list[Entry]:
    """The stored entries of one source tensor: itself, or (quantised values, scales)."""
    bits = tensor_bits(key, shape, scheme)
    if bits is None:
        return [(key, dtype, shape)]
    n, k = shape
    if bits == 8:
        return [(key, torch.int8, (n, k)), (key + SCALE_SUFFIX, torch.bfloat16, (n,))]
    return [(key, torch.uint8, (n, k // 2)), (key + SCALE_SUFFIX, torch.bfloat16, (n, k // quant.int4_group(k)))]


def quantize_tensor(key: str, w: torch.Tensor, scheme: str | None) -> list[torch.Tensor]:
    """The stored tensors of ``w`` under ``scheme``, in ``entries_for`` order."""
    bits = tensor_bits(key, tuple(w.shape), scheme)
    if bits is None:
        return [w]
    return list(quant.quantize_int8(w) if bits == 8 else quant.quantize_int4(w, quant.int4_group(w.shape[-1])))


def header(entries: list[Entry]) -> bytes:
    meta: dict = {"__metadata__": {"format": "pt"}}
    off = 0
    for key, dt, shape in entries:
        nb = math.prod(shape) * torch.empty((), dtype=dt).element_size()
        meta[key] = {"dtype": _ST_NAMES[dt], "shape": list(shape), "data_offsets": [off, off + nb]}
        off += nb
    text = json.dumps(meta, separators=(",", ":")).encode()
    text += b" " * ((-len(text)) % 8)
    return len(text).to_bytes(8, "little") + text


def write_stream(path: Path, entries: list[Entry], tensors: Iterable[torch.Tensor]) -> int:
    """Write a safetensors file whose tensors arrive one at a time (in ``entries`` order)."""
    partial = path.with_name(path.name + ".partial")
    n = 0
    try:
        with open(partial, "wb") as f:
            f.write(header(entries))
            for (key, dt, shape), t in zip(entries, tensors, strict=True):
                if t.dtype != dt or tuple(t.shape) != tuple(shape):
                    raise CheckpointError(f"internal: {key} came as {t.dtype} {list(t.shape)}, expected {dt} {list(shape)}")
                f.write(t.contiguous().reshape(-1).view(torch.uint8).numpy().data)
                n += t.numel() * t.element_size()
        os.replace(partial, path)
    finally:
        if partial.exists():
            partial.unlink()
    return n


def scheme_record(scheme: str) -> dict:
    """config.json ``quantization``: enough to know what the numbers mean."""
    return {"scheme": scheme, "bits": 8 if scheme == "int8" else 4, "symmetric": True, "scale_dtype": "bfloat16",
            "int8": "per output channel (scale [N])",
            "int4": None if scheme == "int8" else "routed experts, group-wise along K (scale [N, K/G])",
            "int4_group_sizes": list(quant.INT4_GROUPS), "scale_suffix": SCALE_SUFFIX,
            "float": "router gate, kv_b_proj, embeddings, norms, vision tower, projector"}


def _prepare_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"{out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise CheckpointError(f"{out} is not empty; pass --overwrite to replace its checkpoint")
        for f in out.iterdir():
            if f.is_file() and (f.suffix in (".json", ".safetensors", ".partial")):
                f.unlink()
    out.mkdir(parents=True, exist_ok=True)


def quantize_checkpoint(src: str | Path, out: str | Path, bits: int, *, overwrite: bool = False,
                        progress: Callable[[int, int], None] | None = None) -> Path:
    """Write ``src`` (a float checkpoint folder) quantised to ``bits`` (8 or 4) into ``out``."""
    if bits not in SCHEME_OF_BITS:
        raise CheckpointError(f"--bits must be 8 or 4, got {bits!r}")
    scheme = SCHEME_OF_BITS[bits]
    src, out = Path(src), Path(out)
    if not src.is_dir():
        raise CheckpointError(f"{src}: model folder not found")
    if stored_scheme(src) is not None:
        raise CheckpointError(f"{src} is already quantised; quantise its float checkpoint")
    if src.resolve() == out.resolve():
        raise CheckpointError("OUT must be a different folder from MODEL")
    files = weight_files(src)
    cfg = json.loads((src / "config.json").read_text(encoding="utf-8"))
    _prepare_out(out, overwrite)
    total = sum(t.nbytes for f in files for t in read_header(f))
    done = 0
    weight_map: dict[str, str] = {}
    for f in files:
        stored = read_header(f)
        entries = [e for t in stored for e in entries_for(t.key, t.shape, t.dtype, scheme)]

        def produce(f=f) -> Iterator[torch.Tensor]:
            nonlocal done
            for t, fh in iter_stored([f]):
                yield from quantize_tensor(t.key, read_tensor(t, fh), scheme)
                done += t.nbytes
                if progress is not None:
                    progress(done, total)

        write_stream(out / f.name, entries, produce())
        weight_map.update({k: f.name for k, _, _ in entries})
    if (src / "model.safetensors.index.json").is_file():
        size = sum((out / f.name).stat().st_size for f in files)
        (out / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": size}, "weight_map": weight_map}, indent=2) + "\n")
    cfg["quantization"] = scheme_record(scheme)
    (out / "config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    for name in COPIED:
        if (src / name).is_file():
            shutil.copyfile(src / name, out / name)
    return out


# ---- command line ----------------------------------------------------------------------------


# ---- quantised random checkpoints (dsvl2 init-random --quantize) ------------------------------

def write_random_quantised(out_dir: str | Path, config: dict, scheme: str, seed: int = 0,
                           shard_bytes: int = 2 * 1024 ** 3, progress: Callable[[int, int], None] | None = None,
                           *, overwrite: bool = False) -> Path:
    """A random checkpoint of ``config`` written directly in ``scheme`` (int8 / int4).

    Its values are those of the bf16 random checkpoint with the same seed, quantised
    (``quantize_checkpoint`` of that checkpoint writes the same tensors), but the bf16 model
    is never held nor written: one tensor at a time is drawn, quantised and written, so
    memory stays at the largest tensor (the lm_head, a few GB as float32 for base).
    """
    from .random_checkpoint import (ASSETS, INDEX_NAME, TOKENIZER_FILES, TORCH_DTYPE_NAMES, official_tensor_specs,
        plan_shards, random_tensor, random_tensor_chunks)
    from ..config import ModelConfig

    if scheme not in QUANT_SCHEMES:
        raise CheckpointError(f"quantize must be one of {', '.join(QUANT_SCHEMES)}, got {scheme!r}")
    out = Path(out_dir)
    cfg = ModelConfig.from_hf(config)
    config = json.loads(json.dumps(config))
    for d in (config, config.get("language_config")):
        if isinstance(d, dict) and "torch_dtype" in d:
            d["torch_dtype"] = TORCH_DTYPE_NAMES[torch.bfloat16]
    specs = official_tensor_specs(cfg, torch.bfloat16)
    units = {s.key: entries_for(s.key, s.shape, s.dtype, scheme) for s in specs}

    class _Unit:  # a source tensor with the size of what it is stored as
        def __init__(self, spec):
            self.spec = spec
            self.nbytes = sum(math.prod(sh) * torch.empty((), dtype=dt).element_size() for _, dt, sh in units[spec.key])

    shards = plan_shards([_Unit(s) for s in specs], shard_bytes)
    total = sum(u.nbytes for sh in shards for u in sh)
    free = shutil.disk_usage(out.parent if not out.exists() else out).free if out.parent.exists() else None
    if free is not None and free < total + 64 * 1024 ** 2:
        raise CheckpointError(f"not enough disk space for {out}: the checkpoint needs {total / 1e9:.2f} GB, "
                              f"{free / 1e9:.2f} GB free")
    _prepare_out(out, overwrite)
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    done = 0
    weight_map: dict[str, str] = {}
    for name, shard in zip(names, shards):
        entries = [e for u in shard for e in units[u.spec.key]]

        def produce(shard=shard) -> Iterator[torch.Tensor]:
            nonlocal done
            for u in shard:
                spec = u.spec
                if len(units[spec.key]) == 1:  # stays float: streamed in chunks like the bf16 writer
                    parts = [torch.from_numpy(c) for c in random_tensor_chunks(spec, seed)]
                    t = torch.cat(parts) if len(parts) > 1 else parts[0]
                    yield (t.view(torch.bfloat16) if spec.dtype == torch.bfloat16 else t).view(spec.shape)
                else:
                    yield from quantize_tensor(spec.key, random_tensor(spec, seed), scheme)
                done += u.nbytes
                if progress is not None:
                    progress(done, total)

        write_stream(out / name, entries, produce())
        weight_map.update({k: name for k, _, _ in entries})
    if len(shards) > 1:
        (out / INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                 indent=2) + "\n")
    config["quantization"] = scheme_record(scheme)
    (out / "config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    shutil.copyfile(ASSETS / "processor_config.json", out / "processor_config.json")
    for f in TOKENIZER_FILES:
        shutil.copyfile(ASSETS / "tokenizer" / f, out / f)
    return out
