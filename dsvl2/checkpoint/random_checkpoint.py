"""Random checkpoints in the official layout: presets, scaling, streaming writer, the demo.

Real weights cannot be downloaded on these machines, so benchmarks and tests run on
random checkpoints that have the official file format: the same ``config.json``,
``processor_config.json``, tokenizer files and safetensors key names (per-expert
routed-expert tensors, the unused SigLIP ``vision.attn_pool.*`` head included) as the
published ones. ``dsvl2.checkpoint.load.load_model`` reads them through the real loading path.

Notable choices:
* ``PRESETS``: the three real configs (``tiny``, ``small``, ``base``; see
  ``tests/data/configs/PROVENANCE.md`` for which are verbatim and which are
  reconstructed) and the four golden toy architectures (``golden-*``), all shipped in
  ``dsvl2/assets/configs``.
* ``preset_config(name, scale)`` shrinks widths AND depths by ``scale`` while keeping the
  structure (attention kind, routing, expert counts, dense prefix, vocabulary) valid.
* The tensor list comes from the model itself: build on ``meta``, expand the stacked
  ``[E, F, D]`` experts back into per-expert keys, add the attention-pool head
  (``official_tensor_specs``). So a checkpoint can never disagree with the loader.
* Every tensor has its own generator, seeded from (seed, key): the bytes do not depend
  on tensor order or on sharding, and two writes with the same seed are identical.
* Writing streams: safetensors headers are computed from the shapes up front and each
  tensor is generated in fixed-size chunks straight into the file, so memory stays at a
  few MB of buffers whatever the model size (the real base is 55 GB in bf16).

Initialisation (as the golden checkpoints): linear / conv weights N(0, 1/fan_in), biases
N(0, 0.02^2), norm weights 1 + N(0, 0.1^2), token embeddings / ``image_newline`` /
``view_seperator`` N(0, 1), ``pos_embed`` N(0, 0.5^2), ``attn_pool.latent`` N(0, 0.2^2),
``e_score_correction_bias`` N(0, 0.04^2) stored in float32.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import json
import math
import os
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import numpy as np
import torch

from ..config import LanguageConfig, ModelConfig, VisionConfig
from ..errors import CheckpointError, ConfigError
from .load import KEEP_FP32, build_empty

__all__ = [
    "ASSETS",
    "DEMO_DIR",
    "PRESETS",
    "TORCH_DTYPE_NAMES",
    "TensorSpec",
    "plan_shards",
    "preset_config",
    "official_tensor_specs",
    "random_tensor",
    "write_random_checkpoint",
    "write_demo",
    "main",
]

ASSETS = Path(__file__).resolve().parent.parent / "assets"
DEMO_DIR = ASSETS / "demo"
DEMO_PRESET = "golden-small"
DEMO_SEED = 2024

# name -> config file under assets/configs
PRESETS: dict[str, str] = {
    "tiny": "tiny.json",      # deepseek-vl2-tiny (reconstructed)
    "small": "small.json",    # deepseek-vl2-small (reconstructed)
    "base": "base.json",      # deepseek-vl2 (the found original)
    "golden-tiny": "golden-tiny.json",
    "golden-small": "golden-small.json",
    "golden-base": "golden-base.json",
    "golden-dsv2x": "golden-dsv2x.json",
}

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
INDEX_NAME = "model.safetensors.index.json"

_ST_DTYPES = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}
TORCH_DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}
_CHUNK = 1 << 20  # elements generated per step: bounds memory, fixed so output is deterministic
_DISK_HEADROOM = 64 * 1024 ** 2


# ---- presets ---------------------------------------------------------------------------

def _tokenizer_size() -> int:
    with open(ASSETS / "tokenizer" / "tokenizer.json", encoding="utf-8") as f:
        tok = json.load(f)
    ids = list(tok["model"]["vocab"].values()) + [t["id"] for t in tok.get("added_tokens", [])]
    return max(ids) + 1


def _shrink(value: int, scale: float) -> int:
    """value * scale rounded to a multiple of 8 (2 for small values), at least 2."""
    x = value * scale
    m = 8 if x >= 32 else 2
    return max(2, int(round(x / m)) * m)


def _shrink_depth(value: int, scale: float) -> int:
    return max(1, int(round(value * scale)))


def preset_config(name: str, scale: float = 1.0, *, vocab_size: int | None = None) -> dict:
    """The HF ``config.json`` dict of a preset, optionally shrunk.

    ``scale`` in (0, 1] multiplies the widths (language hidden size, dense and expert MLP
    widths, head sizes, MLA ranks, vision width through its head size) and the depths
    (language and vision layers, never below 1). Head counts, expert counts, top-k,
    routing, the vocabulary, the image geometry and the MLP ratio are kept, and the
    invariants the model needs are re-established: MHA hidden = heads * head_dim, even
    rotary dims, vision width = heads * head_dim, projector ``input_dim`` = vision width
    and ``n_embed`` = hidden size, at least one MoE layer if the preset has one.
    ``scale == 1`` returns the shipped file unchanged (apart from ``vocab_size``).

    Worked example: ``preset_config('tiny', 0.25)`` -> hidden 320 (10 heads x 32),
    intermediate 1712, moe_intermediate 224, 3 layers (layer 0 dense), vision width 288
    (16 heads x 18), 7 vision layers, vocab 129280.
    """
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not 0 < scale <= 1:
        raise ConfigError(f"scale must be a number in (0, 1], got {scale!r}")
    with open(ASSETS / "configs" / PRESETS[name], encoding="utf-8") as f:
        cfg = json.load(f)
    if scale != 1:
        cfg = _scaled(cfg, float(scale))
    if vocab_size is not None:
        n_tok = _tokenizer_size()
        if not isinstance(vocab_size, int) or vocab_size < n_tok:
            raise ConfigError(f"vocab_size must be an integer >= {n_tok} (the shipped tokenizer's length, "
                              f"so that every token id has an embedding row), got {vocab_size!r}")
        cfg["language_config"]["vocab_size"] = vocab_size
    ModelConfig.from_hf(cfg)  # a preset must always be a valid config
    return cfg


def _scaled(cfg: dict, s: float) -> dict:
    cfg = copy.deepcopy(cfg)
    lang_d, vis_d = cfg["language_config"], cfg.setdefault("vision_config", {})
    # Resolve the reference defaults first: the real base config omits most LM fields.
    lang = LanguageConfig.from_hf(lang_d)
    vis = VisionConfig.from_hf(vis_d)

    layers = _shrink_depth(lang.num_hidden_layers, s)
    new: dict[str, Any] = {
        "num_hidden_layers": layers,
        "num_attention_heads": lang.num_attention_heads,
        "num_key_value_heads": lang.kv_heads,
        "intermediate_size": _shrink(lang.intermediate_size, s),
        "use_mla": lang.use_mla,
        # keep a MoE layer: the dense prefix may not swallow every layer
        "first_k_dense_replace": min(lang.first_k_dense_replace, layers - 1),
    }
    if lang.n_routed_experts is not None:
        new["moe_intermediate_size"] = _shrink(lang.moe_intermediate_size, s)
    if lang.use_mla:
        new.update(
            hidden_size=_shrink(lang.hidden_size, s),
            kv_lora_rank=_shrink(lang.kv_lora_rank, s),
            q_lora_rank=None if lang.q_lora_rank is None else _shrink(lang.q_lora_rank, s),
            qk_nope_head_dim=_shrink(lang.qk_nope_head_dim, s),
            qk_rope_head_dim=_shrink(lang.qk_rope_head_dim, s),
            v_head_dim=_shrink(lang.v_head_dim, s),
        )
    else:
        head_dim = _shrink(lang.head_dim, s)  # even: rotary needs pairs
        new["hidden_size"] = lang.num_attention_heads * head_dim
    lang_d.update(new)

    vis_head = _shrink(vis.head_dim, s)
    vis_d.update(width=vis.heads * vis_head, heads=vis.heads, layers=_shrink_depth(vis.layers, s))
    proj_d = cfg.setdefault("projector_config", {})
    proj_d.update(input_dim=vis_d["width"], n_embed=lang_d["hidden_size"])
    return cfg


# ---- the official tensor list ------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class TensorSpec:
    key: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * torch.empty((), dtype=self.dtype).element_size()


_STACKED = re.compile(r"^(.*\.mlp\.experts)\.(gate_proj|up_proj|down_proj)$")


def _attn_pool_shapes(vis: VisionConfig) -> list[tuple[str, tuple[int, ...]]]:
    """The unused SigLIP MAP head that the official checkpoints carry."""
    w, h = vis.width, vis.mlp_hidden
    return [
        ("latent", (1, 1, w)),
        ("q.weight", (w, w)), ("q.bias", (w,)),
        ("kv.weight", (2 * w, w)), ("kv.bias", (2 * w,)),
        ("proj.weight", (w, w)), ("proj.bias", (w,)),
        ("norm.weight", (w,)), ("norm.bias", (w,)),
        ("mlp.fc1.weight", (h, w)), ("mlp.fc1.bias", (h,)),
        ("mlp.fc2.weight", (w, h)), ("mlp.fc2.bias", (w,)),
    ]


def official_tensor_specs(cfg: ModelConfig, dtype: torch.dtype = torch.bfloat16,
                          model: torch.nn.Module | None = None) -> list[TensorSpec]:
    """(key, shape, dtype) of every tensor an official checkpoint of ``cfg`` holds, in module order.

    ``model``: an already built (meta) ``DeepseekVL2`` of ``cfg``, to save building one.
    """
    model = build_empty(cfg) if model is None else model
    specs: list[TensorSpec] = []
    pending: dict[str, dict[str, tuple[int, ...]]] = {}  # experts prefix -> proj -> stacked shape

    def dt(key: str) -> torch.dtype:
        return torch.float32 if key.endswith(KEEP_FP32) else dtype

    for name, p in model.named_parameters():
        m = _STACKED.match(name)
        if m:
            group = pending.setdefault(m.group(1), {})
            group[m.group(2)] = tuple(p.shape)
            if len(group) == 3:  # official order: experts.{e}.gate_proj, up_proj, down_proj
                n_exp = group["gate_proj"][0]
                for e in range(n_exp):
                    for proj in ("gate_proj", "up_proj", "down_proj"):
                        key = f"{m.group(1)}.{e}.{proj}.weight"
                        specs.append(TensorSpec(key, group[proj][1:], dt(key)))
                del pending[m.group(1)]
            continue
        specs.append(TensorSpec(name, tuple(p.shape), dt(name)))
        if name == "vision.norm.bias":
            specs += [TensorSpec(f"vision.attn_pool.{k}", s, dtype) for k, s in _attn_pool_shapes(cfg.vision)]
    if pending:  # cannot happen unless the model's expert names change
        raise CheckpointError(f"incomplete stacked experts in the model: {sorted(pending)}")
    return specs


# ---- initialisation --------------------------------------------------------------------

def _init_rule(key: str, shape: tuple[int, ...]) -> tuple[float, float]:
    """(mean, std) of the normal distribution a tensor is drawn from."""
    leaf = key.rsplit(".", 1)[-1]
    if key.endswith("e_score_correction_bias"):
        return 0.0, 0.04
    if key.endswith("embed_tokens.weight") or key in ("image_newline", "view_seperator"):
        return 0.0, 1.0
    if key.endswith("pos_embed"):
        return 0.0, 0.5
    if key.endswith("attn_pool.latent"):
        return 0.0, 0.2
    if leaf == "bias":
        return 0.0, 0.02
    module = key.rsplit(".", 2)[-2] if key.count(".") >= 1 else ""
    if leaf == "weight" and "norm" in module and len(shape) == 1:
        return 1.0, 0.1
    if len(shape) >= 2:
        fan_in = math.prod(shape[1:])
        return 0.0, fan_in ** -0.5
    return 0.0, 0.02


def _key_seed(seed: int, key: str) -> int:
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _encode(x: np.ndarray, dtype: torch.dtype) -> np.ndarray:
    """float32 values -> the stored bytes' element type (bf16 as uint16, round to nearest even).

    numpy, not ``Tensor.to``: on these 2-core VMs torch's multi-threaded elementwise
    kernels pay ~7 ms of thread wake-up per call on mid-sized tensors, which made the
    conversion the bottleneck of writing; this serial version runs at ~300-800 M values/s.
    """
    if dtype == torch.float32:
        return x.astype("<f4", copy=False)  # safetensors is little-endian
    if dtype == torch.float16:
        return x.astype("<f2")
    u = x.view(np.uint32)
    return ((u + np.uint32(0x7FFF) + ((u >> 16) & np.uint32(1))) >> 16).astype("<u2")


def random_tensor_chunks(spec: TensorSpec, seed: int) -> Iterator[np.ndarray]:
    """The tensor's stored values as flat numpy chunks (at most ``_CHUNK`` elements each)."""
    g = torch.Generator().manual_seed(_key_seed(seed, spec.key))
    mean, std = _init_rule(spec.key, spec.shape)
    left = spec.numel
    while left > 0:
        n = min(left, _CHUNK)
        x = torch.empty(n, dtype=torch.float32).normal_(mean, std, generator=g)
        yield _encode(x.numpy(), spec.dtype)
        left -= n


def random_tensor(spec: TensorSpec, seed: int) -> torch.Tensor:
    """The whole tensor as the checkpoint stores it (tests, small models); the writer streams."""
    flat = np.concatenate(list(random_tensor_chunks(spec, seed)))
    t = torch.from_numpy(flat)
    if spec.dtype == torch.bfloat16:
        t = t.view(torch.bfloat16)
    return t.view(spec.shape)


# ---- writing ---------------------------------------------------------------------------

def plan_shards(specs: list[TensorSpec], shard_bytes: int) -> list[list[TensorSpec]]:
    """Greedy packing in module order; a tensor larger than a shard gets a shard of its own."""
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for s in specs:
        if shards[-1] and size + s.nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(s)
        size += s.nbytes
    return shards


def _header(specs: list[TensorSpec]) -> bytes:
    """safetensors header: u64 little-endian length + JSON, padded with spaces to 8 bytes."""
    meta: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for s in specs:
        meta[s.key] = {"dtype": _ST_DTYPES[s.dtype], "shape": list(s.shape), "data_offsets": [offset, offset + s.nbytes]}
        offset += s.nbytes
    text = json.dumps(meta, separators=(",", ":")).encode()
    text += b" " * ((-len(text)) % 8)
    return len(text).to_bytes(8, "little") + text


def _managed(name: str) -> bool:
    """Files this writer owns in a checkpoint folder (removed by ``overwrite=True``)."""
    return (name in ("config.json", "processor_config.json", INDEX_NAME, *TOKENIZER_FILES)
            or (name.startswith("model") and name.endswith(".safetensors")) or name.endswith(".partial"))


def free_bytes(folder: Path) -> int:
    """Free disk space where ``folder`` is or would be (its nearest existing parent)."""
    p = folder
    while not p.exists():
        p = p.parent
    return shutil.disk_usage(p).free


def write_random_checkpoint(out_dir: str | Path, config: Mapping[str, Any], seed: int = 0,
                            dtype: torch.dtype = torch.bfloat16, shard_bytes: int = 2 * 1024 ** 3,
                            progress: Callable[[int, int], None] | None = None, *,
                            overwrite: bool = False) -> Path:
    """Write a random checkpoint of ``config`` (an HF config.json dict) to ``out_dir``.

    Writes the weights (``model.safetensors`` if they fit in ``shard_bytes``, else
    ``model-<k>-of-<n>.safetensors`` shards and ``model.safetensors.index.json``),
    then config.json, processor_config.json and the tokenizer files (package assets), so
    an interrupted write never looks like a complete checkpoint.
    ``progress(bytes_written, bytes_total)`` is called after every tensor. Refuses a
    non-empty folder unless ``overwrite`` (which removes only the files written here),
    and checks the free disk space first. Returns the folder.
    """
    out = Path(out_dir)
    if dtype not in _ST_DTYPES:
        raise CheckpointError(f"dtype {dtype} is not supported; use one of {', '.join(map(str, _ST_DTYPES))}")
    if not isinstance(shard_bytes, int) or shard_bytes <= 0:
        raise CheckpointError(f"shard_bytes must be a positive integer, got {shard_bytes!r}")
    cfg = ModelConfig.from_hf(config)
    config = copy.deepcopy(dict(config))
    for d in (config, config.get("language_config")):
        if isinstance(d, dict) and "torch_dtype" in d:
            d["torch_dtype"] = TORCH_DTYPE_NAMES[dtype]

    if out.exists() and not out.is_dir():
        raise CheckpointError(f"{out} exists and is not a folder")
    stale: list[Path] = []
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise CheckpointError(f"{out} is not empty; pass overwrite=True (--overwrite) to replace its checkpoint")
        stale = [f for f in out.iterdir() if f.is_file() and _managed(f.name)]

    specs = official_tensor_specs(cfg, dtype)
    shards = plan_shards(specs, shard_bytes)
    total = sum(s.nbytes for s in specs)
    need = total + sum(len(_header(sh)) for sh in shards) + _DISK_HEADROOM
    free = free_bytes(out) + sum(f.stat().st_size for f in stale)  # the old checkpoint makes room
    if free < need:
        raise CheckpointError(f"not enough disk space for {out}: the checkpoint needs {need / 1e9:.2f} GB "
                              f"(incl. {_DISK_HEADROOM // 1024 ** 2} MiB headroom), {free / 1e9:.2f} GB free")
    for f in stale:  # only after every check passed: a refused write leaves the folder as it was
        f.unlink()
    out.mkdir(parents=True, exist_ok=True)

    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    done = 0
    partial: Path | None = None
    try:
        for name, shard in zip(names, shards):
            partial = out / (name + ".partial")
            with open(partial, "wb") as f:
                f.write(_header(shard))
                for spec in shard:
                    for chunk in random_tensor_chunks(spec, seed):
                        f.write(chunk.data)
                    done += spec.nbytes
                    if progress is not None:
                        progress(done, total)
            os.replace(partial, out / name)
            partial = None
    finally:
        if partial is not None and partial.exists():
            partial.unlink()
    if len(shards) > 1:
        index = {"metadata": {"total_size": total},
                 "weight_map": {s.key: name for name, shard in zip(names, shards) for s in shard}}
        (out / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")

    (out / "config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    shutil.copyfile(ASSETS / "processor_config.json", out / "processor_config.json")
    for f in TOKENIZER_FILES:
        shutil.copyfile(ASSETS / "tokenizer" / f, out / f)
    return out


def write_demo(out_dir: str | Path = DEMO_DIR) -> Path:
    """(Re)write the shipped demo checkpoint: the golden-small architecture, fixed seed, bf16."""
    return write_random_checkpoint(out_dir, preset_config(DEMO_PRESET), seed=DEMO_SEED, overwrite=True)


# ---- command line ----------------------------------------------------------------------

def _progress_printer(label: str) -> Callable[[int, int], None]:
    start = time.monotonic()
    last = [0.0]

    def show(done: int, total: int) -> None:
        now = time.monotonic()
        if now - last[0] < 0.5 and done < total:
            return
        last[0] = now
        rate = done / max(now - start, 1e-9) / 1e6
        sys.stderr.write(f"\r{label}: {done / 1e9:6.2f} / {total / 1e9:.2f} GB  {rate:6.0f} MB/s")
        if done >= total:
            sys.stderr.write("\n")
        sys.stderr.flush()

    return show


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dsvl2.checkpoint.random_checkpoint",
                                 description="Write random DeepSeek-VL2 checkpoints in the official layout.")
    ap.add_argument("--write-demo", action="store_true", help=f"regenerate the shipped demo checkpoint ({DEMO_DIR})")
    ap.add_argument("--preset", choices=list(PRESETS), help="architecture to write")
    ap.add_argument("--out", type=Path, help="output folder (default for --write-demo: the package's demo folder)")
    ap.add_argument("--scale", type=float, default=1.0, help="shrink widths and depths by this factor (0, 1]")
    ap.add_argument("--vocab-size", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    ap.add_argument("--shard-gb", type=float, default=2.0, help="shard size in GiB (default 2)")
    ap.add_argument("--overwrite", action="store_true")
    args = ap.parse_args(argv)
    try:
        if args.write_demo:
            out = write_demo(args.out or DEMO_DIR)
        else:
            if args.preset is None or args.out is None:
                ap.error("give --preset and --out (or --write-demo)")
            cfg = preset_config(args.preset, args.scale, vocab_size=args.vocab_size)
            out = write_random_checkpoint(args.out, cfg, seed=args.seed, dtype=getattr(torch, args.dtype),
                                          shard_bytes=int(args.shard_gb * 1024 ** 3),
                                          progress=_progress_printer(args.preset), overwrite=args.overwrite)
    except (CheckpointError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    size = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    print(f"wrote {out} ({size / 1e6:.1f} MB of weights)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
