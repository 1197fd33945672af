"""What a checkpoint is: sizes, parameter counts, attention / routing kind, cache cost.

``describe(config, folder)`` returns plain numbers in a dict (for scripts, the CLI and
benchmark reports); ``format_info`` renders them as one screen of aligned text.

Counting conventions:
* parameters are counted on the ``meta`` device (no memory), from the same model the
  loader builds: ``params_used``. The official checkpoints also carry the SigLIP
  attention-pool head that the model never runs; ``params_total`` includes it and is
  the number that matches the published sizes (tiny 3.37B, small 16.1B, base 27.5B);
* ``params_active`` is what the language model touches for one token, as the brief of
  this module defines it: the whole embedding table + attention + norms + dense MLPs +
  for MoE layers the router, the shared experts and top-k of the routed experts +
  ``lm_head``. DeepSeek's published "activated parameters" leave the embedding table out
  (a lookup reads one row) and add the vision tower: ``params_active_no_embedding`` and
  ``params_active_vision`` give those parts;
* KV cache per token: MLA caches (kv_lora_rank + qk_rope_head_dim) values per layer, MHA
  2 * kv_heads * head_dim.
* Quantisation (no weights are loaded): a folder written by ``dsvl2 quantize`` /
  ``init-random --quantize`` names its scheme in config.json ``"quantization"`` and its
  bytes are those on disk; ``quantize=`` on a float folder (or a config alone) gives the
  bytes ``dsvl2 quantize`` would write, from each tensor's stored entries
  (``dsvl2.checkpoint.quantised.entries_for``: the same rule the writer and the loader use).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Mapping

from ..config import ModelConfig
from ..errors import CheckpointError
from .common import HelpFormatter

__all__ = ["describe", "format_info"]

_ST_NAMES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32", "F64": "float64",
             "I64": "int64", "I32": "int32", "I8": "int8", "U8": "uint8", "BOOL": "bool"}
_VARIANTS = ("tiny", "small", "base")


def _numel(module) -> int:
    return sum(p.numel() for p in module.parameters())


def _signature(cfg: ModelConfig) -> tuple:
    lang = cfg.language
    return lang.hidden_size, lang.num_hidden_layers, lang.n_routed_experts, lang.use_mla


def guess_variant(cfg: ModelConfig) -> str:
    """'tiny' / 'small' / 'base' when hidden size, depth, expert count and attention kind match, else 'custom'."""
    from ..checkpoint.random_checkpoint import preset_config  # the real configs live with the presets

    sig = _signature(cfg)
    for name in _VARIANTS:
        if _signature(ModelConfig.from_hf(preset_config(name))) == sig:
            return name
    return "custom"


def _read_header(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if not 0 < n < 1 << 30:
                raise ValueError(f"header length {n}")
            header = json.loads(f.read(n))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
    header.pop("__metadata__", None)
    return header


def _weights_on_disk(folder: Path) -> dict:
    from ..checkpoint.load import weight_files

    files = weight_files(folder)
    by_dtype: dict[str, int] = {}  # dtype -> bytes
    tensors: dict[str, int] = {}
    params = 0
    for f in files:
        for entry in _read_header(f).values():
            name = _ST_NAMES.get(entry["dtype"], entry["dtype"])
            begin, end = entry["data_offsets"]
            by_dtype[name] = by_dtype.get(name, 0) + end - begin
            tensors[name] = tensors.get(name, 0) + 1
            n = 1
            for d in entry["shape"]:
                n *= d
            params += n
    return {
        "folder": str(folder),
        "files": len(files),
        "bytes_on_disk": sum(f.stat().st_size for f in files),
        "dtype": max(by_dtype, key=by_dtype.get) if by_dtype else None,
        "tensors_by_dtype": tensors,
        "tensors": sum(tensors.values()),
        "params_in_files": params,
    }


def _stored_bytes(entries) -> int:
    import math

    import torch

    return sum(math.prod(shape) * torch.empty((), dtype=dt).element_size() for _, dt, shape in entries)


def quantization_facts(specs, folder: Path | None, quantize: str | None) -> dict | None:
    """The quantisation section: the folder's stored scheme, or the bytes ``quantize`` would give.

    ``specs``: the official tensors of the config (bf16), used when there are no weight
    files; with a float folder its own tensors (names, shapes, dtypes) are counted.
    """
    from ..checkpoint.quantised import entries_for
    from ..checkpoint.load import read_header, stored_scheme, weight_files

    stored = stored_scheme(folder) if folder is not None else None
    if stored is not None:
        if quantize not in (None, stored["scheme"]):
            raise CheckpointError(f"{folder} is already quantised ({stored['scheme']}); it cannot be loaded as "
                                  f"{quantize} (quantise the float checkpoint instead)")
        files = weight_files(folder) if any(folder.glob("*.safetensors")) else []
        return {"scheme": stored["scheme"], "source": "checkpoint",
                "bytes": sum(t.nbytes for f in files for t in read_header(f)) if files else None,
                "float_bytes": None}
    if quantize is None:
        return None
    has_weights = folder is not None and any(folder.glob("*.safetensors"))
    tensors = ([(t.key, t.shape, t.dtype) for f in weight_files(folder) for t in read_header(f)] if has_weights
               else [(s.key, s.shape, s.dtype) for s in specs])
    return {"scheme": quantize, "source": "--quantize",
            "bytes": sum(_stored_bytes(entries_for(k, sh, dt, quantize)) for k, sh, dt in tensors),
            "float_bytes": sum(_stored_bytes([(k, dt, sh)]) for k, sh, dt in tensors)}


def describe(config: ModelConfig | Mapping[str, Any], folder: str | Path | None = None,
             quantize: str | None = None) -> dict:
    """Facts about a model config (and, with ``folder``, its weight files) as a dict of plain values.

    ``quantize`` ("int8" / "int4"): also the bytes the weights take in that scheme
    (``quantization``); a quantised folder reports its own scheme whatever this is."""
    from ..checkpoint.random_checkpoint import official_tensor_specs
    from ..checkpoint.load import build_empty

    cfg = config if isinstance(config, ModelConfig) else ModelConfig.from_hf(config)
    lang, vis = cfg.language, cfg.vision
    model = build_empty(cfg)
    specs = official_tensor_specs(cfg, model=model)

    lm = model.language
    embedding = lm.model.embed_tokens.weight.numel()
    lm_head = lm.lm_head.weight.numel()
    active = embedding + lm_head + _numel(lm.model.norm)
    moe_layers = 0
    for layer in lm.model.layers:
        active += _numel(layer.self_attn) + _numel(layer.input_layernorm) + _numel(layer.post_attention_layernorm)
        if layer.is_moe:
            moe_layers += 1
            mlp = layer.mlp
            active += _numel(mlp.gate)
            if mlp.shared_experts is not None:
                active += _numel(mlp.shared_experts)
            active += _numel(mlp.experts) * lang.num_experts_per_tok // lang.n_routed_experts
        else:
            active += _numel(layer.mlp)
    vision_params, projector_params = _numel(model.vision), _numel(model.projector)
    used = _numel(model)
    total = sum(s.numel for s in specs)

    if lang.use_mla:
        attention = "MLA" + (f" (q_lora_rank {lang.q_lora_rank})" if lang.q_lora_rank else " (no q compression)")
        head_dims = {"kv_lora_rank": lang.kv_lora_rank, "q_lora_rank": lang.q_lora_rank,
                     "qk_nope_head_dim": lang.qk_nope_head_dim, "qk_rope_head_dim": lang.qk_rope_head_dim,
                     "v_head_dim": lang.v_head_dim}
    else:
        attention = "MHA" if lang.kv_heads == lang.num_attention_heads else "GQA"
        head_dims = {"head_dim": lang.head_dim}

    experts = None
    if lang.n_routed_experts is not None:
        experts = {"routed": lang.n_routed_experts, "shared": lang.n_shared_experts or 0,
                   "top_k": lang.num_experts_per_tok, "routing": lang.topk_method,
                   "scoring": lang.scoring_func, "n_group": lang.n_group, "topk_group": lang.topk_group,
                   "norm_topk_prob": lang.norm_topk_prob, "routed_scaling_factor": lang.routed_scaling_factor,
                   "expert_width": lang.moe_intermediate_size}

    rs = lang.rope_scaling
    rope = "plain" if rs is None else f"{rs['type']} (factor {rs['factor']:g})"

    per_layer = lang.kv_cache_values_per_token_per_layer
    kv_values = per_layer * lang.num_hidden_layers
    tile_tokens = cfg.tokens_per_tile_side * cfg.tokens_per_tile_side

    out = {
        "variant": guess_variant(cfg),
        "params_total": total,
        "params_used": used,
        "params_attn_pool": total - used,
        "params_language": _numel(lm),
        "params_embedding": embedding,
        "params_lm_head": lm_head,
        "params_vision": vision_params,
        "params_projector": projector_params,
        "params_active": active,
        "params_active_no_embedding": active - embedding,
        "params_active_vision": vision_params + projector_params,
        "attention": attention,
        "heads": lang.num_attention_heads,
        "kv_heads": lang.kv_heads,
        "head_dims": head_dims,
        "layers": lang.num_hidden_layers,
        "dense_layers": lang.num_hidden_layers - moe_layers,
        "moe_layers": moe_layers,
        "experts": experts,
        "rope": rope,
        "rope_theta": lang.rope_theta,
        "hidden_size": lang.hidden_size,
        "vocab_size": lang.vocab_size,
        "max_position_embeddings": lang.max_position_embeddings,
        "vision": {"layers": vis.layers, "width": vis.width, "heads": vis.heads, "image_size": vis.image_size,
                   "patch_size": vis.patch_size, "tokens_per_tile": tile_tokens},
        "kv_cache_values_per_token": kv_values,
        "kv_cache_bytes_per_token": {"bf16": kv_values * 2, "fp32": kv_values * 4},
        "checkpoint_bytes_bf16": sum(s.nbytes for s in specs),
        "weights": _weights_on_disk(Path(folder)) if folder is not None else None,
        "quantization": quantization_facts(specs, Path(folder) if folder is not None else None, quantize),
    }
    return out


# ---- text ------------------------------------------------------------------------------

def _n(x: int | float) -> str:
    """3370501440 -> '3.37B', 15238352 -> '15.2M', 61440 -> '61.4K'."""
    for div, suffix, fmt in ((1e9, "B", "{:.2f}"), (1e6, "M", "{:.1f}"), (1e3, "K", "{:.1f}")):
        if abs(x) >= div:
            return fmt.format(x / div) + suffix
    return f"{x:g}"


def _bytes(x: int) -> str:
    for div, unit in ((1024 ** 3, "GiB"), (1024 ** 2, "MiB"), (1024, "KiB")):
        if x >= div:
            return f"{x / div:.2f} {unit}"
    return f"{x} B"


# what each variant of the quantised decode products (native.quant_variant) does
QUANT_VARIANT_WORDS = {
    "avx512-vnni": "int4 products by integer digits of the activations (AVX-512 VNNI, groups of 128), "
                   "int8 widened to float32 on AVX-512",
    "avx512": "int8 / int4 widened to float32 on AVX-512",
    "avx2-digits": "int4 products by integer digits of the activations (AVX2, groups of 128), "
                   "int8 widened to float32 on AVX2",
    "avx2": "int8 / int4 widened to float32 on AVX2",
}


def format_info(d: Mapping[str, Any]) -> str:
    """One screen of aligned ``key: value`` lines for a ``describe`` result."""
    ex = d.get("experts")
    hd = d["head_dims"]
    if "head_dim" in hd:
        att = f"{d['attention']}, {d['heads']} heads x {hd['head_dim']}, {d['kv_heads']} kv heads"
    else:
        att = (f"{d['attention']}, {d['heads']} heads, kv_lora {hd['kv_lora_rank']}, "
               f"qk {hd['qk_nope_head_dim']}+{hd['qk_rope_head_dim']} (nope+rope), v {hd['v_head_dim']}")
    kv = d["kv_cache_bytes_per_token"]
    v = d["vision"]
    rows = [
        ("variant", d["variant"]),
        ("parameters", f"{_n(d['params_total'])} in the checkpoint ({_n(d['params_used'])} used + "
                       f"{_n(d['params_attn_pool'])} unused attn_pool head)"),
        ("  language", f"{_n(d['params_language'])} (embedding {_n(d['params_embedding'])}, "
                       f"lm_head {_n(d['params_lm_head'])})"),
        ("  vision", f"{_n(d['params_vision'])} tower + {_n(d['params_projector'])} projector"),
        ("active / token", f"{_n(d['params_active'])} language ({_n(d['params_active_no_embedding'])} "
                           f"without the embedding table) + {_n(d['params_active_vision'])} vision per tile"),
        ("attention", att),
        ("layers", f"{d['layers']} ({d['dense_layers']} dense + {d['moe_layers']} MoE), hidden {d['hidden_size']}"),
    ]
    if ex:
        groups = f", groups {ex['topk_group']}/{ex['n_group']}" if ex["routing"] != "greedy" else ""
        rows.append(("experts", f"{ex['routed']} routed (width {ex['expert_width']}) + {ex['shared']} shared, "
                                f"top-{ex['top_k']}, {ex['routing']}, {ex['scoring']}{groups}, "
                                f"norm_topk {str(ex['norm_topk_prob']).lower()}, "
                                f"scale {ex['routed_scaling_factor']:g}"))
    rows += [
        ("rope", f"{d['rope']}, theta {d['rope_theta']:g}"),
        ("context / vocab", f"{d['max_position_embeddings']} positions, vocab {d['vocab_size']}"),
        ("kv cache / token", f"{kv['bf16']} B bf16, {kv['fp32']} B fp32 "
                             f"({d['kv_cache_values_per_token']} values; 4096 tokens bf16: {_bytes(kv['bf16'] * 4096)})"),
        ("vision tower", f"SigLIP {v['layers']} layers, width {v['width']}, {v['heads']} heads, "
                         f"{v['image_size']} px / patch {v['patch_size']}, {v['tokens_per_tile']} tokens per tile"),
    ]
    w = d.get("weights")
    if w:
        dts = ", ".join(f"{n} {k}" for k, n in sorted(w["tensors_by_dtype"].items()))
        rows += [
            ("weights", f"{w['dtype']}, {_bytes(w['bytes_on_disk'])} on disk in {w['files']} file(s)"),
            ("  tensors", f"{w['tensors']} ({dts}), {_n(w['params_in_files'])} parameters"),
            ("  folder", w["folder"]),
        ]
    else:
        rows.append(("weights", f"{_bytes(d['checkpoint_bytes_bf16'])} as an official bf16 checkpoint"))
    q = d.get("quantization")
    if q:
        if q["source"] == "checkpoint":
            size = f"{_bytes(q['bytes'])} of weights as stored" if q["bytes"] is not None else "no weight files"
            rows.append(("quantised", f"{q['scheme']} (config.json 'quantization'): {size}"))
        else:
            rows.append(("quantised", f"{q['scheme']} (--quantize): {_bytes(q['bytes'])} of weights after "
                                      f"quantisation, from {_bytes(q['float_bytes'])}"))
    k = d.get("kernels")
    if k:
        rows.append(("big products", f"{k['big_products']} on this machine: {k['reason']}"))
        if k["big_products"] == "bf16":
            m = k.get("measured") or {}
            each = [f"{kernel} {m[f'attention_{kernel}_ms']} ms" for kernel in ("native", "torch", "amx")
                    if f"attention_{kernel}_ms" in m]
            timed = f" (one vision tile: {', '.join(each)})" if len(each) > 1 else ""
            rows.append(("bf16 attention", f"{k.get('attention', 'native')} kernel{timed}"))
            if d.get("amx_experts") is not None:
                rows.append(("expert prefill", "AMX tiles, stored weights read once (native/amx.c)"
                             if d["amx_experts"] else
                             "oneDNN GEMMs (quantised: each expert dequantised first); no AMX here or DSVL2_AMX=0"))
    nd = d.get("native_decode")
    if nd:
        how = "native" if nd["native_decode"] else "torch's bf16 kernels"
        rows.append(("decode products", f"{how} ({nd['reason']})"))
        if nd.get("quant_variant"):
            rows.append(("int8 / int4 decode", f"{nd['quant_variant']}: {QUANT_VARIANT_WORDS[nd['quant_variant']]}"))
        if nd.get("prefetch_bytes") is not None:
            rows.append(("decode prefetch", f"{nd['prefetch_bytes']} bytes ahead in each weight row"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}} : {val}" for k, val in rows)


# ---- the command ----

def cmd_info(args) -> int:
    from ..config import load_config
    from ..checkpoint.hub import resolve_model
    
    if args.model is None:
        print("dsvl2: note: no MODEL given, showing the built-in demo checkpoint (random weights); "
              "pass a folder or an id such as deepseek-ai/deepseek-vl2-tiny", file=sys.stderr)
    folder = resolve_model("demo" if args.model is None else args.model)
    has_weights = (folder / "model.safetensors.index.json").is_file() or any(folder.glob("*.safetensors"))
    # config only: no weights section; --quantize: the bytes after quantisation (nothing is loaded)
    d = describe(load_config(folder), folder if has_weights else None, quantize=args.quantize)
    import torch
    from ..model.native import policy as kernels
    d["kernels"] = kernels.choose("cpu", torch.bfloat16).to_dict()  # what bf16 weights would run with here
    from ..model import native
    d["native_decode"] = native.status()  # decode-step products with bf16 weights (model/native)
    # which instruction set the int8 / int4 decode products use here (each row's bits depend on it)
    d["native_decode"]["quant_variant"] = native.quant_variant() if native.available() else None
    from ..model.native import amx
    # the routed experts' prefill products on AMX tiles (model/native/amx.py), where bf16 products run
    d["amx_experts"] = amx.active()
    print(json.dumps(d, indent=2, default=str) if args.json else format_info(d))
    return 0


def add_parser(sub) -> None:
    info = sub.add_parser("info", help="show a model's architecture in one screen",
                          description="Architecture, parameter counts and memory of a checkpoint (or of a config "
                          "alone).", formatter_class=HelpFormatter)
    info.add_argument("model", metavar="MODEL", nargs="?", default=None,
                      help="checkpoint folder, Hugging Face id, or 'demo' (default: the built-in demo)")
    info.add_argument("--json", action="store_true", help="print one JSON object")
    info.add_argument("--quantize", choices=["int8", "int4"], default=None,
                      help="also show the weights' bytes after quantisation (a quantised folder shows its own)")
    info.set_defaults(func=cmd_info)

