"""Checkpoint loading: official safetensors layout -> a ``DeepseekVL2`` in the requested dtype.

* Single ``model.safetensors`` or sharded ``model.safetensors.index.json``; official key
  names (``vision.*``, ``projector.layers.*``, ``language.model.*``,
  ``language.lm_head.weight``, ``image_newline``, ``view_seperator``).
* The model is built on the ``meta`` device (no memory), each tensor is read from the
  memory-mapped file, converted to the target dtype and assigned: at no point is there
  a second full copy of the weights. Routed experts are stacked into [E, F, D] tensors,
  filled expert by expert.
* ``sanitize_key`` is the one place where checkpoint names map to module names; the
  unused SigLIP attention-pool head (``vision.attn_pool.*``) is dropped there.
* A missing or unexpected tensor, or a shape that does not match the config, is a
  ``CheckpointError`` that names it.
* ``e_score_correction_bias`` stays float32 whatever the dtype (it is stored and used in
  float32 by the reference).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Callable, Iterator

import torch
from safetensors import safe_open

from .config import ModelConfig, load_config
from .errors import CheckpointError
from .model.vl import DeepseekVL2

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


def iter_tensors(files: list[Path]) -> Iterator[tuple[str, Callable[[], torch.Tensor], tuple[int, ...]]]:
    """(key, loader, shape) for every tensor of the files, one file open at a time.

    A loader is only valid during its iteration step: each file's memory map is closed
    before the next file is opened, so at most one shard's pages are mapped at a time.
    """
    for f in files:
        try:
            handle = safe_open(str(f), framework="pt")
        except Exception as e:  # safetensors raises its own error types for corrupt headers
            raise CheckpointError(f"{f}: cannot read safetensors file ({e})") from None
        with handle as h:
            for key in h.keys():
                shape = tuple(h.get_slice(key).get_shape())
                yield key, (lambda h=h, key=key: h.get_tensor(key)), shape


def count_tensors(files: list[Path]) -> int:
    n = 0
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as h:
                n += len(h.keys())
        except Exception as e:
            raise CheckpointError(f"{f}: cannot read safetensors file ({e})") from None
    return n


def build_empty(cfg: ModelConfig) -> DeepseekVL2:
    with torch.device("meta"):
        return DeepseekVL2(cfg)


def load_model(folder: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
               progress: Callable[[int, int], None] | None = None) -> DeepseekVL2:
    """Load a checkpoint folder (config.json + safetensors) into a ``DeepseekVL2``."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: model folder not found")
    cfg = load_config(folder)
    model = build_empty(cfg)
    params = dict(model.named_parameters())
    filled: dict[str, torch.Tensor] = {}
    expert_seen: dict[str, set[int]] = {}
    unexpected: list[str] = []
    files = weight_files(folder)
    dev = torch.device(device)
    total = count_tensors(files) if progress is not None else 0
    for n_done, (key, load, shape) in enumerate(iter_tensors(files), 1):
        if progress is not None:
            progress(n_done, total)
        mapped = sanitize_key(key)
        if mapped is None:
            continue
        name, expert = mapped
        p = params.get(name)
        if p is None:
            unexpected.append(key)
            continue
        want = tuple(p.shape[1:]) if expert is not None else tuple(p.shape)
        if shape != want or (expert is not None and not 0 <= expert < p.shape[0]):
            raise CheckpointError(f"tensor {key!r} has shape {list(shape)}, the config expects {list(want)}"
                                  + (f" for expert {expert} of {p.shape[0]}" if expert is not None else ""))
        target = torch.float32 if name.endswith(KEEP_FP32) else dtype
        if expert is None:
            filled[name] = load().to(device=dev, dtype=target)
        else:
            if name not in filled:
                filled[name] = torch.empty(p.shape, dtype=target, device=dev)
            filled[name][expert].copy_(load())
            expert_seen.setdefault(name, set()).add(expert)
    if unexpected:
        raise CheckpointError(f"{folder}: unexpected tensor(s) not used by this config: "
                              + ", ".join(sorted(unexpected)[:10]) + (" ..." if len(unexpected) > 10 else ""))
    missing = [n for n in params if n not in filled]
    for name, seen in expert_seen.items():
        n_exp = params[name].shape[0]
        if len(seen) != n_exp:
            lacking = sorted(set(range(n_exp)) - seen)
            missing.append(f"{name.rsplit('.', 1)[0]}.{lacking[0]}.{name.rsplit('.', 1)[1]}.weight"
                           + (f" (and {len(lacking) - 1} more experts)" if len(lacking) > 1 else ""))
    if missing:
        raise CheckpointError(f"{folder}: missing tensor(s): " + ", ".join(missing[:10])
                              + (" ..." if len(missing) > 10 else ""))
    model.load_state_dict(filled, strict=False, assign=True)
    # Non-persistent buffers (rotary frequencies) were built on meta: rebuild them.
    model.language.rotary = type(model.language.rotary)(cfg.language).to(dev)
    model.eval()
    return model
