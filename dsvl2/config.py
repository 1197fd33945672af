"""Configs of a DeepSeek-VL2 checkpoint: ``config.json`` and ``processor_config.json``.

One frozen dataclass per sub-model, each built by ``from_hf(dict)``:

* defaults are the reference's own (``DeepseekV2Config``, ``VisionEncoderConfig``,
  ``MlpProjectorConfig``, ``DeepseekVLV2Config``). This matters: the real base
  ``config.json`` omits the layer count, the head count, the MLA sizes and ``use_mla``,
  which then come from the ``DeepseekV2Config`` defaults (30 layers, 32 heads, MLA
  512 / 128 / 64 / 128);
* unknown keys are kept in ``extra`` (never fatal), so a newer config still loads;
* derived sizes are properties; impossible values raise ``ConfigError`` with a message
  that names the key and what is allowed.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any, Mapping

from .errors import ConfigError

__all__ = [
    "VisionConfig",
    "ProjectorConfig",
    "LanguageConfig",
    "ModelConfig",
    "ProcessorConfig",
    "load_config",
    "load_processor_config",
]


def _split_known(cls, d: Mapping[str, Any], renames: Mapping[str, str] = ()) -> tuple[dict, dict]:
    """Split a HF dict into (known dataclass fields, unknown keys)."""
    if not isinstance(d, Mapping):
        raise ConfigError(f"{cls.__name__}: expected a JSON object, got {type(d).__name__}")
    names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
    known, extra = {}, {}
    for key, value in d.items():
        key = dict(renames).get(key, key)
        (known if key in names else extra)[key] = value
    return known, extra


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def _positive_int(obj, *names: str, allow_zero: bool = False) -> None:
    for name in names:
        v = getattr(obj, name)
        ok = isinstance(v, int) and not isinstance(v, bool) and (v >= 0 if allow_zero else v > 0)
        _check(ok, f"{type(obj).__name__}.{name} must be a {'non-negative' if allow_zero else 'positive'} "
                   f"integer, got {v!r}")


class _HFConfig:
    """``from_hf(dict)``: known fields with the reference's defaults, unknown keys kept in
    ``extra``, then ``validate()``. Subclasses normalise values in ``_prepare``."""

    @classmethod
    def _prepare(cls, known: dict) -> dict:
        return known

    @classmethod
    def from_hf(cls, d: Mapping[str, Any]):
        known, extra = _split_known(cls, d)
        cfg = cls(**cls._prepare(known), extra=extra)
        cfg.validate()
        return cfg


@dataclasses.dataclass(frozen=True)
class VisionConfig(_HFConfig):
    """SigLIP ViT (timm-style). Defaults of the reference's ``VisionEncoderConfig``."""

    model_name: str = "siglip_large_patch16_384"
    image_size: int = 384
    patch_size: int = 16
    width: int = 1024
    layers: int = 24
    heads: int = 16
    mlp_ratio: float = 4.0
    global_pool: str = "map"
    ignore_head: bool = True
    class_token: bool = False
    extra: dict = dataclasses.field(default_factory=dict, compare=False, repr=False)

    def validate(self) -> None:
        _positive_int(self, "image_size", "patch_size", "width", "layers", "heads")
        _check(self.width % self.heads == 0,
               f"vision_config: width {self.width} is not divisible by heads {self.heads}")
        _check(self.patch_size <= self.image_size,
               f"vision_config: patch_size {self.patch_size} exceeds image_size {self.image_size}")
        _check(not self.class_token, "vision_config.class_token=true is not supported (no released model uses it)")
        _check(isinstance(self.mlp_ratio, (int, float)) and not isinstance(self.mlp_ratio, bool) and self.mlp_ratio > 0,
               f"vision_config.mlp_ratio must be a number > 0, got {self.mlp_ratio!r}")

    @property
    def head_dim(self) -> int:
        return self.width // self.heads

    @property
    def grid(self) -> int:
        """Patches per side: 384 // 14 = 27 (the last 6 pixels are never seen)."""
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid * self.grid

    @property
    def mlp_hidden(self) -> int:
        # timm: int(dim * mlp_ratio) -> 4304 for SO400M, 358 for the golden width 96
        return int(self.width * self.mlp_ratio)


@dataclasses.dataclass(frozen=True)
class ProjectorConfig(_HFConfig):
    """Downsample MLP projector. Defaults of the reference's ``MlpProjectorConfig``."""

    projector_type: str = "downsample_mlp_gelu"
    input_dim: int = 1152
    n_embed: int = 2048
    depth: int = 2
    mlp_ratio: int = 1
    downsample_ratio: int = 2
    extra: dict = dataclasses.field(default_factory=dict, compare=False, repr=False)

    def validate(self) -> None:
        _check(self.projector_type == "downsample_mlp_gelu",
               f"projector_config.projector_type {self.projector_type!r} is not supported; "
               "every DeepSeek-VL2 model uses 'downsample_mlp_gelu'")
        _positive_int(self, "input_dim", "n_embed", "depth", "mlp_ratio", "downsample_ratio")

    @property
    def hidden(self) -> int:
        return self.n_embed * self.mlp_ratio


_ROPE_TYPES = ("linear", "dynamic", "yarn")
_TOPK_METHODS = ("greedy", "group_limited_greedy", "noaux_tc")


@dataclasses.dataclass(frozen=True)
class LanguageConfig(_HFConfig):
    """DeepSeek-V2 decoder. Defaults of the reference's ``DeepseekV2Config``."""

    vocab_size: int = 102400
    hidden_size: int = 4096
    intermediate_size: int = 11008
    moe_intermediate_size: int = 1407
    num_hidden_layers: int = 30
    num_attention_heads: int = 32
    num_key_value_heads: int | None = 32
    n_shared_experts: int | None = None
    n_routed_experts: int | None = None
    routed_scaling_factor: float = 1.0
    kv_lora_rank: int | None = 512
    q_lora_rank: int | None = 1536
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    qk_nope_head_dim: int = 128
    topk_method: str = "greedy"
    n_group: int | None = None
    topk_group: int | None = None
    num_experts_per_tok: int | None = None
    moe_layer_freq: int = 1
    first_k_dense_replace: int = 0
    norm_topk_prob: bool = False
    scoring_func: str = "softmax"
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    bos_token_id: int = 100000
    eos_token_id: int = 100001
    pad_token_id: int | None = None
    tie_word_embeddings: bool = False
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    attention_bias: bool = False
    use_mla: bool = True
    extra: dict = dataclasses.field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def _prepare(cls, known: dict) -> dict:
        # The reference's default topk_method is the misspelt 'gready'; it means greedy.
        if known.get("topk_method") == "gready":
            known["topk_method"] = "greedy"
        return known

    def validate(self) -> None:
        _positive_int(self, "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                      "num_attention_heads", "max_position_embeddings", "moe_layer_freq")
        _positive_int(self, "first_k_dense_replace", allow_zero=True)
        _check(self.hidden_act == "silu", f"language_config.hidden_act {self.hidden_act!r} is not supported (only 'silu')")
        _check(not self.tie_word_embeddings, "language_config.tie_word_embeddings=true is not supported")
        if self.use_mla:
            _positive_int(self, "kv_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim")
            _check(self.qk_rope_head_dim % 2 == 0,
                   f"language_config.qk_rope_head_dim must be even for rotary embeddings, got {self.qk_rope_head_dim}")
            if self.q_lora_rank is not None:
                _positive_int(self, "q_lora_rank")
        else:
            _check(self.hidden_size % self.num_attention_heads == 0,
                   f"language_config: hidden_size {self.hidden_size} is not divisible by "
                   f"num_attention_heads {self.num_attention_heads} (use_mla=false needs head_dim = hidden/heads)")
            _check(self.head_dim % 2 == 0, f"language_config: head_dim {self.head_dim} must be even for rotary embeddings")
            kv = self.kv_heads
            _check(isinstance(kv, int) and kv > 0 and self.num_attention_heads % kv == 0,
                   f"language_config.num_key_value_heads {self.num_key_value_heads!r} must divide "
                   f"num_attention_heads {self.num_attention_heads}")
        if self.n_routed_experts is not None:
            _positive_int(self, "n_routed_experts", "moe_intermediate_size", "num_experts_per_tok")
            _check(self.num_experts_per_tok <= self.n_routed_experts,
                   f"language_config.num_experts_per_tok {self.num_experts_per_tok} exceeds "
                   f"n_routed_experts {self.n_routed_experts}")
            _check(self.topk_method in _TOPK_METHODS,
                   f"language_config.topk_method {self.topk_method!r} is not one of {', '.join(_TOPK_METHODS)}")
            _check(self.scoring_func in ("softmax", "sigmoid"),
                   f"language_config.scoring_func {self.scoring_func!r} must be 'softmax' or 'sigmoid'")
            if self.topk_method == "noaux_tc":
                _check(self.scoring_func == "sigmoid", "language_config: topk_method 'noaux_tc' needs scoring_func 'sigmoid'")
            if self.topk_method != "greedy":
                _positive_int(self, "n_group", "topk_group")
                _check(self.n_routed_experts % self.n_group == 0,
                       f"language_config: n_routed_experts {self.n_routed_experts} is not divisible by n_group {self.n_group}")
                _check(self.topk_group <= self.n_group,
                       f"language_config: topk_group {self.topk_group} exceeds n_group {self.n_group}")
                if self.topk_method == "noaux_tc":
                    _check(self.n_routed_experts // self.n_group >= 2,
                           "language_config: noaux_tc needs at least 2 experts per group")
            if self.n_shared_experts is not None:
                _positive_int(self, "n_shared_experts", allow_zero=True)
        if self.rope_scaling is not None:
            _check(isinstance(self.rope_scaling, Mapping) and self.rope_scaling.get("type") in _ROPE_TYPES,
                   f"language_config.rope_scaling must be null or have type in {_ROPE_TYPES}, got {self.rope_scaling!r}")
            f = self.rope_scaling.get("factor")
            _check(isinstance(f, (int, float)) and f >= 1, f"language_config.rope_scaling.factor must be >= 1, got {f!r}")

    # ---- derived sizes --------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        """MHA head size (use_mla=false): hidden / heads."""
        return self.hidden_size // self.num_attention_heads

    @property
    def kv_heads(self) -> int:
        return self.num_key_value_heads or self.num_attention_heads

    @property
    def q_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def rope_dim(self) -> int:
        return self.qk_rope_head_dim if self.use_mla else self.head_dim

    def is_moe_layer(self, i: int) -> bool:
        return (self.n_routed_experts is not None and i >= self.first_k_dense_replace
                and i % self.moe_layer_freq == 0)

    @property
    def softmax_scale(self) -> float:
        if not self.use_mla:
            return self.head_dim ** -0.5
        scale = self.q_head_dim ** -0.5
        rs = self.rope_scaling
        # The reference applies mscale_all_dim whatever the rope_scaling type.
        if rs is not None:
            mall = rs.get("mscale_all_dim", 0) or 0
            if mall:
                m = yarn_mscale(rs["factor"], mall)
                scale = scale * m * m
        return scale

    @property
    def kv_cache_values_per_token_per_layer(self) -> int:
        """Values the KV cache holds per token per layer: latent + k_pe for MLA, k + v for MHA."""
        if self.use_mla:
            return self.kv_lora_rank + self.qk_rope_head_dim
        return 2 * self.kv_heads * self.head_dim


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """DeepSeek-V2 YaRN attention scale: 0.1 * m * ln(s) + 1 (1 when s <= 1)."""
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The whole DeepSeek-VL2 model (``config.json``)."""

    vision: VisionConfig
    projector: ProjectorConfig
    language: LanguageConfig
    tile_tag: str = "2D"
    global_view_pos: str = "head"
    candidate_resolutions: tuple[tuple[int, int], ...] = ((384, 384),)
    extra: dict = dataclasses.field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_hf(cls, d: Mapping[str, Any]) -> "ModelConfig":
        if not isinstance(d, Mapping):
            raise ConfigError(f"config.json must hold a JSON object, got {type(d).__name__}")
        d = dict(d)
        vision = VisionConfig.from_hf(d.pop("vision_config", {}) or {})
        projector = ProjectorConfig.from_hf(d.pop("projector_config", {}) or {})
        language = LanguageConfig.from_hf(d.pop("language_config", {}) or {})
        tile_tag = d.pop("tile_tag", "2D")
        gvp = d.pop("global_view_pos", "head")
        cands = d.pop("candidate_resolutions", ((384, 384),))
        cfg = cls(vision=vision, projector=projector, language=language, tile_tag=tile_tag,
                  global_view_pos=gvp, candidate_resolutions=_resolutions(cands, "candidate_resolutions"),
                  extra=d)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        _check(self.tile_tag == "2D", f"tile_tag {self.tile_tag!r} is not supported (only '2D'; '1D' is dead code in the reference)")
        _check(self.global_view_pos in ("head", "tail"),
               f"global_view_pos must be 'head' or 'tail', got {self.global_view_pos!r}")
        _check(self.projector.input_dim == self.vision.width,
               f"projector_config.input_dim {self.projector.input_dim} must equal vision_config.width {self.vision.width}")
        _check(self.projector.n_embed == self.language.hidden_size,
               f"projector_config.n_embed {self.projector.n_embed} must equal language hidden_size {self.language.hidden_size}")

    @property
    def tokens_per_tile_side(self) -> int:
        """ceil((image_size // patch_size) / downsample_ratio): 14 for 384 / 14 / 2."""
        return math.ceil(self.vision.grid / self.projector.downsample_ratio)


def _resolutions(value, name: str) -> tuple[tuple[int, int], ...]:
    try:
        out = tuple((int(w), int(h)) for w, h in value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be a list of [width, height] pairs, got {value!r}") from None
    _check(len(out) > 0 and all(w > 0 and h > 0 for w, h in out),
           f"{name} must be a non-empty list of positive [width, height] pairs, got {value!r}")
    return out


@dataclasses.dataclass(frozen=True)
class ProcessorConfig(_HFConfig):
    """``processor_config.json``: tiling and normalisation settings of the processor."""

    candidate_resolutions: tuple[tuple[int, int], ...] = ((384, 384),)
    patch_size: int = 14
    downsample_ratio: int = 2
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    normalize: bool = True
    image_token: str = "<image>"
    pad_token: str = "<｜▁pad▁｜>"
    sft_format: str = "deepseek"
    extra: dict = dataclasses.field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def _prepare(cls, known: dict) -> dict:
        if "candidate_resolutions" in known:
            known["candidate_resolutions"] = _resolutions(known["candidate_resolutions"], "candidate_resolutions")
        for key in ("image_mean", "image_std"):
            if key in known:
                v = known[key]
                _check(isinstance(v, (list, tuple)) and len(v) == 3,
                       f"processor_config.{key} must be a list of 3 numbers, got {v!r}")
                known[key] = tuple(float(x) for x in v)
        return known

    def validate(self) -> None:
        _positive_int(self, "patch_size", "downsample_ratio")
        _check(all(s != 0 for s in self.image_std), f"processor_config.image_std must not contain 0, got {self.image_std}")
        _check(self.sft_format == "deepseek",
               f"processor_config.sft_format {self.sft_format!r} is not supported (only 'deepseek')")

    @property
    def image_size(self) -> int:
        """Tile side: the first candidate's width (384), as in the reference."""
        return self.candidate_resolutions[0][0]


def _read_json(path: Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: file not found")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None


def _load(path_or_dir: str | Path, filename: str, cls):
    p = Path(path_or_dir)
    if p.is_dir():
        p = p / filename
    try:
        return cls.from_hf(_read_json(p))
    except ConfigError as e:
        if str(e).startswith(str(p)):
            raise
        raise ConfigError(f"{p}: {e}") from None
    except TypeError as e:  # a field given with an impossible type, e.g. a list for an int
        raise ConfigError(f"{p}: {e}") from None


def load_config(path_or_dir: str | Path) -> ModelConfig:
    """Read ``config.json`` (a file, or a checkpoint folder holding one)."""
    return _load(path_or_dir, "config.json", ModelConfig)


def load_processor_config(path_or_dir: str | Path) -> ProcessorConfig:
    """Read ``processor_config.json`` (a file, or a checkpoint folder holding one)."""
    return _load(path_or_dir, "processor_config.json", ProcessorConfig)
