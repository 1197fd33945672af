"""describe() / format_info(): parameter counts of the real configs, cache sizes, file facts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dsvl2.checkpoint.random_checkpoint import DEMO_DIR, preset_config, write_random_checkpoint
from dsvl2.config import load_config
from dsvl2.commands.info import describe, format_info
from _paths import CONFIGS, GOLDEN

REAL = {"tiny": CONFIGS / "tiny/config.reconstructed.json",
        "small": CONFIGS / "small/config.reconstructed.json",
        "base": CONFIGS / "base/config.json"}
# Published total sizes (model cards / paper): what the official checkpoints hold.
PUBLISHED_TOTAL = {"tiny": 3.37e9, "small": 16.1e9, "base": 27.5e9}
# Published activated sizes (vision included, embedding table excluded).
PUBLISHED_ACTIVE = {"tiny": 1.0e9, "small": 2.8e9, "base": 4.5e9}


@pytest.fixture(scope="module")
def real():
    """describe() of the three real configs, counted on the meta device."""
    out = {}
    for name, path in REAL.items():
        cfg = load_config(path) if path.exists() else None
        out[name] = describe(cfg if cfg is not None else preset_config(name))
    return out


@pytest.mark.parametrize("name", ["tiny", "small", "base"])
def test_total_parameters_match_published(real, name):
    d = real[name]
    assert d["variant"] == name
    assert d["params_total"] == pytest.approx(PUBLISHED_TOTAL[name], rel=0.015)
    assert d["params_total"] == d["params_used"] + d["params_attn_pool"]
    assert d["params_used"] == d["params_language"] + d["params_vision"] + d["params_projector"] + 2 * d["hidden_size"]


@pytest.mark.parametrize("name", ["tiny", "small", "base"])
def test_active_parameters_close_to_published(real, name):
    d = real[name]
    active = d["params_active_no_embedding"] + d["params_active_vision"]
    assert active == pytest.approx(PUBLISHED_ACTIVE[name], rel=0.05)


def test_tiny_counts_by_hand(real):
    d = real["tiny"]
    D, V, F, Fe, E, L = 1280, 129280, 6848, 896, 64, 12
    attn = 4 * D * D  # q, k, v, o without bias (10 heads x 128)
    norms = 2 * D
    dense = 3 * D * F
    gate = E * D
    shared = 3 * D * 2 * Fe
    routed = 3 * D * Fe
    language = 2 * V * D + D + L * (attn + norms) + dense + (L - 1) * (gate + shared + E * routed)
    assert d["params_language"] == language
    assert d["params_active"] == 2 * V * D + D + L * (attn + norms) + dense + (L - 1) * (gate + shared + 6 * routed)
    assert d["params_active_no_embedding"] == d["params_active"] - V * D
    W, H, P = 1152, int(1152 * 3.7362), 27 * 27
    block = 2 * 2 * W + (3 * W * W + 3 * W) + (W * W + W) + (H * W + H) + (W * H + W)
    tower = (3 * 14 * 14 * W + W) + P * W + 27 * block + 2 * W
    assert d["params_vision"] == tower
    assert d["params_projector"] == (4 * W * D + D) + (D * D + D)
    assert d["params_attn_pool"] == W + 3 * (W * W + W) + (W * W + W) + 2 * W + (H * W + H) + (W * H + W)
    assert (d["attention"], d["heads"], d["kv_heads"], d["head_dims"]) == ("MHA", 10, 10, {"head_dim": 128})
    assert (d["layers"], d["dense_layers"], d["moe_layers"]) == (12, 1, 11)
    assert d["experts"]["routing"] == "greedy" and d["experts"]["top_k"] == 6


def test_kv_cache_bytes(real):
    assert real["tiny"]["kv_cache_bytes_per_token"] == {"bf16": 2 * 10 * 128 * 12 * 2, "fp32": 2 * 10 * 128 * 12 * 4}
    assert real["tiny"]["kv_cache_bytes_per_token"]["bf16"] == 61440
    assert real["base"]["kv_cache_bytes_per_token"] == {"bf16": (512 + 64) * 30 * 2, "fp32": (512 + 64) * 30 * 4}
    assert real["base"]["kv_cache_bytes_per_token"]["bf16"] == 34560
    assert real["small"]["kv_cache_bytes_per_token"]["bf16"] == (512 + 64) * 27 * 2


def test_base_facts(real):
    d = real["base"]
    assert (d["layers"], d["heads"], d["attention"]) == (30, 32, "MLA (no q compression)")
    assert d["head_dims"] == {"kv_lora_rank": 512, "q_lora_rank": None, "qk_nope_head_dim": 128,
                              "qk_rope_head_dim": 64, "v_head_dim": 128}
    ex = d["experts"]
    assert (ex["routed"], ex["shared"], ex["top_k"], ex["routing"], ex["scoring"]) == (72, 2, 6, "noaux_tc", "sigmoid")
    assert (ex["n_group"], ex["topk_group"], ex["norm_topk_prob"], ex["routed_scaling_factor"]) == (1, 1, True, 2.0)
    assert d["rope"] == "plain" and d["vocab_size"] == 129280


def test_variant_guess_and_rope():
    assert describe(preset_config("tiny", 0.25))["variant"] == "custom"
    d = describe(preset_config("golden-dsv2x"))
    assert d["variant"] == "custom" and d["rope"] == "yarn (factor 4)"
    assert d["attention"] == "MLA (q_lora_rank 48)" and d["experts"]["routing"] == "group_limited_greedy"
    assert d["kv_cache_bytes_per_token"]["bf16"] == (24 + 8) * 4 * 2


def test_golden_checkpoint_on_disk():
    folder = GOLDEN / "tiny"
    d = describe(load_config(folder), folder)
    w = d["weights"]
    manifest = json.loads((GOLDEN / "manifest.json").read_text())["variants"]["tiny"]
    assert w["params_in_files"] == d["params_total"] == manifest["n_params"]
    assert w["bytes_on_disk"] == manifest["checkpoint_bytes"]
    assert w["dtype"] == "bfloat16" and w["tensors"] == manifest["n_tensors"] and w["files"] == 1


def test_written_sharded_checkpoint_on_disk(tmp_path):
    out = write_random_checkpoint(tmp_path / "ck", preset_config("golden-base"), shard_bytes=1_000_000)
    d = describe(load_config(out), out)
    w = d["weights"]
    assert w["files"] == len(list(out.glob("model-*.safetensors"))) > 1
    assert w["bytes_on_disk"] == sum(f.stat().st_size for f in out.glob("*.safetensors"))
    assert w["tensors_by_dtype"]["float32"] == 2  # e_score_correction_bias of the 2 MoE layers
    assert w["dtype"] == "bfloat16" and w["params_in_files"] == d["params_total"]


def test_format_info(real):
    text = format_info(real["tiny"])
    lines = text.splitlines()
    assert 8 <= len(lines) <= 25 and all(len(line) < 140 for line in lines)
    assert len({line.index(" : ") for line in lines}) == 1  # aligned
    assert "3.37B" in text and "MHA" in text and "61440 B bf16" in text and "top-6" in text
    demo = format_info(describe(load_config(DEMO_DIR), DEMO_DIR))
    assert "bfloat16" in demo and "on disk" in demo and "MLA" in demo
    assert "noaux_tc" in format_info(real["base"])
