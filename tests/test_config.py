"""Configs: the real and golden config.json files, reference defaults, derived sizes, errors."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest

from dsvl2.config import (
    LanguageConfig,
    ModelConfig,
    ProcessorConfig,
    VisionConfig,
    load_config,
    load_processor_config,
)
from dsvl2.errors import ConfigError
from _paths import CONFIGS, GOLDEN



def _golden_dict(variant: str = "tiny") -> dict:
    return json.loads((GOLDEN / variant / "config.json").read_text())


# ---- real configs ------------------------------------------------------------------------

def test_real_base_config_gets_reference_defaults():
    """The base config.json omits layers, heads and the MLA sizes: DeepseekV2Config defaults apply."""
    cfg = load_config(CONFIGS / "base" / "config.json")
    lang = cfg.language
    assert (lang.num_hidden_layers, lang.num_attention_heads, lang.num_key_value_heads) == (30, 32, 32)
    assert lang.use_mla is True
    assert (lang.kv_lora_rank, lang.q_lora_rank) == (512, None)
    assert (lang.qk_nope_head_dim, lang.qk_rope_head_dim, lang.v_head_dim) == (128, 64, 128)
    assert lang.q_head_dim == 192 and lang.rope_dim == 64
    assert lang.softmax_scale == pytest.approx(192 ** -0.5, rel=1e-12)
    assert (lang.n_routed_experts, lang.num_experts_per_tok, lang.n_shared_experts) == (72, 6, 2)
    assert (lang.topk_method, lang.scoring_func, lang.norm_topk_prob) == ("noaux_tc", "sigmoid", True)
    assert lang.routed_scaling_factor == 2.0 and lang.first_k_dense_replace == 1
    assert (lang.hidden_size, lang.vocab_size, lang.max_position_embeddings) == (2560, 129280, 4096)
    assert lang.rope_scaling is None and lang.rope_theta == 10000.0
    # MLA cache: latent + k_pe per token per layer
    assert lang.kv_cache_values_per_token_per_layer == 512 + 64
    vis = cfg.vision
    assert (vis.width, vis.heads, vis.head_dim, vis.layers) == (1152, 16, 72, 27)
    assert (vis.image_size, vis.patch_size, vis.grid, vis.num_patches) == (384, 14, 27, 729)
    assert vis.mlp_hidden == 4304  # int(1152 * 3.7362)
    proj = cfg.projector
    assert (proj.input_dim, proj.depth, proj.n_embed, proj.mlp_ratio) == (1152, 2, 2560, 1)
    assert proj.projector_type == "downsample_mlp_gelu" and proj.downsample_ratio == 2
    assert cfg.global_view_pos == "head" and cfg.tile_tag == "2D"
    assert len(cfg.candidate_resolutions) == 23 and cfg.candidate_resolutions[0] == (384, 384)
    assert cfg.candidate_resolutions[-1] == (1152, 1152)
    assert cfg.tokens_per_tile_side == 14


def test_real_base_config_keeps_unknown_keys_in_extra():
    cfg = load_config(CONFIGS / "base")  # a folder works too
    assert cfg.extra["model_type"] == "deepseek_vl_v2" and cfg.extra["transformers_version"] == "4.38.2"
    assert cfg.language.extra["lm_head"] is False and cfg.language.extra["model_type"] == "deepseek_v2"
    assert cfg.vision.extra == {"model_type": "vision"}
    assert cfg.projector.extra == {"model_type": "mlp_projector"}


def test_reconstructed_tiny_and_small_configs():
    tiny = load_config(CONFIGS / "tiny" / "config.reconstructed.json")
    lt = tiny.language
    assert lt.use_mla is False and (lt.hidden_size, lt.num_attention_heads) == (1280, 10)
    assert lt.head_dim == 128 and lt.rope_dim == 128 and lt.kv_heads == 10
    assert lt.softmax_scale == pytest.approx(128 ** -0.5, rel=1e-12)
    assert lt.kv_cache_values_per_token_per_layer == 2 * 10 * 128
    assert (lt.num_hidden_layers, lt.n_routed_experts, lt.num_experts_per_tok) == (12, 64, 6)
    assert (lt.topk_method, lt.scoring_func) == ("greedy", "softmax")
    assert tiny.projector.n_embed == 1280 and tiny.vision.head_dim == 72

    small = load_config(CONFIGS / "small" / "config.reconstructed.json")
    ls = small.language
    assert ls.use_mla is True and (ls.hidden_size, ls.num_hidden_layers, ls.num_attention_heads) == (2048, 27, 16)
    assert (ls.kv_lora_rank, ls.q_lora_rank, ls.qk_rope_head_dim) == (512, None, 64)
    assert (ls.n_routed_experts, ls.moe_intermediate_size, ls.vocab_size) == (64, 1408, 102400)


@pytest.mark.parametrize("variant", ["tiny", "small", "base", "dsv2x"])
def test_golden_configs_load(variant):
    cfg = load_config(GOLDEN / variant)
    assert cfg.language.vocab_size == 2688 and cfg.language.rms_norm_eps == 1e-6
    assert cfg.projector.input_dim == cfg.vision.width
    assert cfg.global_view_pos == ("tail" if variant == "dsv2x" else "head")


# ---- unknown keys --------------------------------------------------------------------------

def test_unknown_keys_are_kept_and_not_fatal():
    d = _golden_dict("tiny")
    d["future_top"] = {"a": 1}
    d["language_config"]["future_lang"] = [1, 2]
    d["vision_config"]["future_vision"] = "x"
    d["projector_config"]["future_proj"] = 3.5
    cfg = ModelConfig.from_hf(d)
    assert cfg.extra["future_top"] == {"a": 1}
    assert cfg.language.extra["future_lang"] == [1, 2]
    assert cfg.vision.extra["future_vision"] == "x"
    assert cfg.projector.extra["future_proj"] == 3.5
    # extras do not take part in equality: the same model is described
    assert cfg == ModelConfig.from_hf(_golden_dict("tiny"))
    p = ProcessorConfig.from_hf({"ignore_id": -100, "patch_size": 14})
    assert p.extra == {"ignore_id": -100}


# ---- impossible values ---------------------------------------------------------------------

def _mutated(section: str | None, **changes) -> dict:
    d = copy.deepcopy(_golden_dict("tiny"))
    target = d if section is None else d[section]
    target.update(changes)
    return d


@pytest.mark.parametrize("section, changes, words", [
    ("language_config", {"hidden_size": 66}, ["hidden_size 66", "num_attention_heads 4"]),
    ("vision_config", {"width": 90}, ["width 90", "heads 4"]),
    ("language_config", {"num_experts_per_tok": 17}, ["num_experts_per_tok 17", "n_routed_experts 16"]),
    ("language_config", {"topk_method": "best_of"}, ["topk_method", "'best_of'"]),
    ("language_config", {"topk_method": "group_limited_greedy", "n_group": 3, "topk_group": 1},
     ["n_routed_experts 16", "n_group 3"]),
    ("projector_config", {"n_embed": 96}, ["n_embed 96", "hidden_size 64"]),
    ("language_config", {"rope_scaling": {"type": "ntk-by-parts", "factor": 2.0}}, ["rope_scaling", "ntk-by-parts"]),
    (None, {"global_view_pos": "middle"}, ["global_view_pos", "'middle'"]),
])
def test_impossible_values_raise_config_error_naming_the_key(section, changes, words, tmp_path):
    d = _mutated(section, **changes)
    with pytest.raises(ConfigError) as e:
        ModelConfig.from_hf(d)
    for w in words:
        assert w in str(e.value)
    # through the file loader the message also names the file
    f = tmp_path / "config.json"
    f.write_text(json.dumps(d))
    with pytest.raises(ConfigError) as e:
        load_config(tmp_path)
    assert str(f) in str(e.value) and all(w in str(e.value) for w in words)


def test_hidden_not_divisible_only_matters_for_mha():
    d = _mutated("language_config", hidden_size=66)
    d["language_config"].update(use_mla=True, kv_lora_rank=8, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8)
    d["projector_config"]["n_embed"] = 66
    assert ModelConfig.from_hf(d).language.hidden_size == 66  # MLA has explicit head sizes


def test_wrong_type_is_a_config_error(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(_mutated("vision_config", layers="two")))
    with pytest.raises(ConfigError, match="layers"):
        load_config(tmp_path)
    for bad in ("3.7362", None, 0, True):
        with pytest.raises(ConfigError, match="mlp_ratio"):
            ModelConfig.from_hf(_mutated("vision_config", mlp_ratio=bad))
    with pytest.raises(ConfigError, match="JSON object"):
        ModelConfig.from_hf([1, 2])


def test_invalid_json_and_missing_file(tmp_path):
    bad = tmp_path / "config.json"
    bad.write_text('{"language_config": {"hidden_size": 64,}')
    with pytest.raises(ConfigError) as e:
        load_config(bad)
    assert str(bad) in str(e.value) and "not valid JSON" in str(e.value)
    with pytest.raises(ConfigError) as e:
        load_config(tmp_path / "nowhere")
    assert "nowhere" in str(e.value) and "not found" in str(e.value)
    with pytest.raises(ConfigError, match="not found"):
        load_processor_config(tmp_path / "sub")
    # ConfigError is also a ValueError for callers that only know the builtin types
    assert issubclass(ConfigError, ValueError)


# ---- processor config ----------------------------------------------------------------------

def test_processor_config_defaults():
    p = ProcessorConfig()
    assert p.candidate_resolutions == ((384, 384),) and p.image_size == 384
    assert (p.patch_size, p.downsample_ratio, p.normalize) == (14, 2, True)
    assert p.image_mean == (0.5, 0.5, 0.5) and p.image_std == (0.5, 0.5, 0.5)
    assert (p.image_token, p.pad_token, p.sft_format) == ("<image>", "<｜▁pad▁｜>", "deepseek")
    assert ProcessorConfig.from_hf({}) == p


def test_processor_image_size_is_first_candidate_width():
    p = ProcessorConfig.from_hf({"candidate_resolutions": [[768, 384], [384, 384]]})
    assert p.image_size == 768 and p.candidate_resolutions == ((768, 384), (384, 384))
    golden = load_processor_config(GOLDEN / "tiny")
    assert golden.image_size == 384 and len(golden.candidate_resolutions) == 23
    assert golden.extra["ignore_id"] == -100
    with pytest.raises(ConfigError, match="image_mean"):
        ProcessorConfig.from_hf({"image_mean": [0.5, 0.5]})
    with pytest.raises(ConfigError, match="candidate_resolutions"):
        ProcessorConfig.from_hf({"candidate_resolutions": [[384]]})


# ---- derived values ------------------------------------------------------------------------

def test_yarn_softmax_scale_dsv2x():
    lang = load_config(GOLDEN / "dsv2x").language
    assert lang.rope_scaling["type"] == "yarn" and lang.q_lora_rank == 48
    # independent: DeepSeek-V2 YaRN mscale 0.1 * m * ln(factor) + 1 with m = mscale_all_dim
    mscale = 0.1 * 0.707 * math.log(4.0) + 1.0
    expected = (8 + 8) ** -0.5 * mscale * mscale
    assert lang.softmax_scale == pytest.approx(expected, rel=1e-12)
    assert lang.softmax_scale != pytest.approx(16 ** -0.5)


def test_is_moe_layer():
    x = load_config(GOLDEN / "dsv2x").language  # first_k_dense_replace 0, moe_layer_freq 2
    assert [x.is_moe_layer(i) for i in range(4)] == [True, False, True, False]
    base = load_config(CONFIGS / "base").language  # first_k_dense_replace 1, freq 1
    assert [base.is_moe_layer(i) for i in range(30)] == [False] + [True] * 29
    dense = LanguageConfig(n_routed_experts=None)
    assert not any(dense.is_moe_layer(i) for i in range(30))


def test_vision_head_dim_and_mlp_hidden_golden():
    v = load_config(GOLDEN / "small").vision
    assert (v.width, v.heads, v.head_dim, v.mlp_hidden) == (96, 4, 24, 358)
    assert VisionConfig().head_dim == 1024 // 16
