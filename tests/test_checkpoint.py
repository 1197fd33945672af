"""Random checkpoints: presets, scaling, the official layout, sharding, determinism, the demo."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from dsvl2.checkpoint import random_checkpoint as ck
from dsvl2.checkpoint.random_checkpoint import (DEMO_DIR, PRESETS, official_tensor_specs, preset_config, random_tensor,
                              write_random_checkpoint)
from dsvl2.config import ModelConfig, load_config
from dsvl2.errors import CheckpointError, ConfigError
from dsvl2.checkpoint.load import load_model
from _paths import CONFIGS, GOLDEN

REAL = {"tiny": CONFIGS / "tiny/config.reconstructed.json",
        "small": CONFIGS / "small/config.reconstructed.json",
        "base": CONFIGS / "base/config.json"}


def _read_all(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as h:
            for k in h.keys():
                out[k] = h.get_tensor(k)
    return out


def _text_forward(model, vocab: int = 2688) -> torch.Tensor:
    ids = torch.tensor([[0, 5, 17, 300, vocab - 1]])
    am = torch.ones(1, 5, dtype=torch.bool)
    im = torch.zeros(1, 5, dtype=torch.bool)
    with torch.no_grad():
        return model(ids, am, im).logits


# ---- presets ---------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["tiny", "small", "base"])
def test_real_presets_are_the_shared_configs(name):
    assert preset_config(name) == json.loads(REAL[name].read_text())


@pytest.mark.parametrize("variant", ["tiny", "small", "base", "dsv2x"])
def test_golden_presets_are_the_golden_configs(variant):
    assert preset_config(f"golden-{variant}") == json.loads((GOLDEN / variant / "config.json").read_text())


def test_assets_match_shared_files():
    assert (ck.ASSETS / "processor_config.json").read_bytes() == \
        (CONFIGS / "processor_config.reconstructed.json").read_bytes()
    for f in ck.TOKENIZER_FILES:
        assert (ck.ASSETS / "tokenizer" / f).read_bytes() == (GOLDEN / "tokenizer" / f).read_bytes()


def test_base_preset_resolves_reference_defaults():
    lang = ModelConfig.from_hf(preset_config("base")).language
    assert (lang.num_hidden_layers, lang.num_attention_heads, lang.use_mla) == (30, 32, True)
    assert (lang.kv_lora_rank, lang.qk_nope_head_dim, lang.qk_rope_head_dim, lang.v_head_dim) == (512, 128, 64, 128)
    assert lang.q_lora_rank is None
    assert (lang.n_routed_experts, lang.num_experts_per_tok, lang.topk_method) == (72, 6, "noaux_tc")


@pytest.mark.parametrize("name", list(PRESETS))
@pytest.mark.parametrize("scale", [1.0, 0.5, 0.25, 0.1, 0.01])
def test_scaled_presets_stay_valid(name, scale):
    full = ModelConfig.from_hf(preset_config(name))
    cfg = ModelConfig.from_hf(preset_config(name, scale))  # validates
    lang, vis = cfg.language, cfg.vision
    assert lang.vocab_size == full.language.vocab_size
    assert lang.num_hidden_layers >= 1 and vis.layers >= 1
    assert lang.hidden_size <= full.language.hidden_size and vis.width <= full.vision.width
    assert vis.width % vis.heads == 0 and vis.heads == full.vision.heads
    assert cfg.projector.input_dim == vis.width and cfg.projector.n_embed == lang.hidden_size
    assert lang.rope_dim % 2 == 0
    assert (lang.n_routed_experts, lang.num_experts_per_tok, lang.topk_method, lang.use_mla) == \
        (full.language.n_routed_experts, full.language.num_experts_per_tok, full.language.topk_method,
         full.language.use_mla)
    assert any(lang.is_moe_layer(i) for i in range(lang.num_hidden_layers))
    if not lang.use_mla:
        assert lang.hidden_size == lang.num_attention_heads * lang.head_dim
    if scale == 1.0:
        assert cfg == full


def test_scaled_tiny_worked_example():
    lang = ModelConfig.from_hf(preset_config("tiny", 0.25)).language
    vis = ModelConfig.from_hf(preset_config("tiny", 0.25)).vision
    assert (lang.hidden_size, lang.head_dim, lang.intermediate_size, lang.moe_intermediate_size) == (320, 32, 1712, 224)
    assert (lang.num_hidden_layers, lang.first_k_dense_replace, vis.width, vis.layers) == (3, 1, 288, 7)


def test_preset_errors_and_vocab_override():
    with pytest.raises(ConfigError, match="unknown preset"):
        preset_config("huge")
    for bad in (0, -1, 1.5, "0.5"):
        with pytest.raises(ConfigError, match="scale"):
            preset_config("tiny", bad)
    with pytest.raises(ConfigError, match="vocab_size"):
        preset_config("golden-tiny", vocab_size=100)
    assert preset_config("tiny", 0.1, vocab_size=4096)["language_config"]["vocab_size"] == 4096


# ---- official layout -------------------------------------------------------------------

@pytest.mark.parametrize("variant", ["tiny", "small", "base", "dsv2x"])
def test_specs_match_golden_checkpoint_exactly(variant):
    """Same keys, shapes and dtypes as the golden files written by the reference's tooling."""
    specs = official_tensor_specs(load_config(GOLDEN / variant))
    names = {torch.bfloat16: "BF16", torch.float32: "F32"}
    mine = {s.key: (list(s.shape), names[s.dtype]) for s in specs}
    with safe_open(str(GOLDEN / variant / "model.safetensors"), framework="pt") as h:
        gold = {k: (list(h.get_slice(k).get_shape()), h.get_slice(k).get_dtype()) for k in h.keys()}
    assert mine == gold
    manifest = json.loads((GOLDEN / "manifest.json").read_text())["variants"][variant]
    assert sum(s.numel for s in specs) == manifest["n_params"]


def test_init_statistics():
    cfg = ModelConfig.from_hf(preset_config("golden-base"))
    specs = {s.key: s for s in official_tensor_specs(cfg)}

    def stats(key):
        t = random_tensor(specs[key], seed=3).float()
        return t.mean().item(), t.std().item()

    m, s = stats("language.model.layers.0.mlp.down_proj.weight")  # fan_in 256
    assert abs(m) < 0.01 and s == pytest.approx(256 ** -0.5, rel=0.05)
    m, s = stats("vision.patch_embed.proj.weight")  # conv: fan_in 3 * 14 * 14
    assert s == pytest.approx(588 ** -0.5, rel=0.05)
    m, s = stats("language.model.embed_tokens.weight")
    assert s == pytest.approx(1.0, rel=0.05)
    m, s = stats("vision.pos_embed")
    assert s == pytest.approx(0.5, rel=0.05)
    m, s = stats("vision.blocks.0.norm1.weight")
    assert m == pytest.approx(1.0, abs=0.05) and s == pytest.approx(0.1, rel=0.3)
    m, s = stats("language.model.layers.1.input_layernorm.weight")
    assert m == pytest.approx(1.0, abs=0.05)
    bias = specs["language.model.layers.1.mlp.gate.e_score_correction_bias"]
    assert bias.dtype == torch.float32 and random_tensor(bias, 3).dtype == torch.float32
    assert specs["language.model.layers.1.mlp.gate.weight"].dtype == torch.bfloat16


# ---- writing ---------------------------------------------------------------------------

def test_written_golden_tiny_loads_and_runs(tmp_path):
    out = write_random_checkpoint(tmp_path / "ck", preset_config("golden-tiny"), seed=5)
    names = sorted(p.name for p in out.iterdir())
    assert names == ["config.json", "model.safetensors", "processor_config.json", "special_tokens_map.json",
                     "tokenizer.json", "tokenizer_config.json"]
    assert json.loads((out / "config.json").read_text()) == preset_config("golden-tiny")
    model = load_model(out)
    logits = _text_forward(model)
    assert logits.shape == (1, 5, 2688) and torch.isfinite(logits).all()
    # the loader received exactly the tensors that were written
    stored = _read_all(out)
    assert stored["language.model.layers.1.mlp.experts.3.up_proj.weight"].float().equal(
        model.language.model.layers[1].mlp.experts.up_proj[3])
    assert any(k.startswith("vision.attn_pool.") for k in stored)


def test_sharded_equals_single_file(tmp_path):
    cfg = preset_config("golden-base")
    single = write_random_checkpoint(tmp_path / "single", cfg, seed=11)
    progress = []
    sharded = write_random_checkpoint(tmp_path / "sharded", cfg, seed=11, shard_bytes=400_000,
                                      progress=lambda done, total: progress.append((done, total)))
    assert not (single / "model.safetensors.index.json").exists()
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    n = len(files)
    assert n > 3 and files == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert not (sharded / "model.safetensors").exists()
    a, b = _read_all(single), _read_all(sharded)
    assert a.keys() == b.keys() == index["weight_map"].keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in a.values())
    for f in files:  # every tensor sits in the file the index names
        with safe_open(str(sharded / f), framework="pt") as h:
            assert all(index["weight_map"][k] == f for k in h.keys())
    assert progress[-1][0] == progress[-1][1] == index["metadata"]["total_size"]
    assert all(x[0] <= y[0] for x, y in zip(progress, progress[1:]))
    m1, m2 = load_model(single), load_model(sharded)
    s1, s2 = m1.state_dict(), m2.state_dict()
    assert all(torch.equal(s1[k], s2[k]) for k in s1)


def test_deterministic_for_a_seed(tmp_path):
    cfg = preset_config("golden-dsv2x")

    def digest(folder):
        return hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()

    a = write_random_checkpoint(tmp_path / "a", cfg, seed=7)
    b = write_random_checkpoint(tmp_path / "b", cfg, seed=7)
    c = write_random_checkpoint(tmp_path / "c", cfg, seed=8)
    assert digest(a) == digest(b) != digest(c)


def test_float32_checkpoint(tmp_path):
    out = write_random_checkpoint(tmp_path / "f32", preset_config("golden-small", 0.5), dtype=torch.float32)
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "float32"
    with safe_open(str(out / "model.safetensors"), framework="pt") as h:
        assert {h.get_slice(k).get_dtype() for k in h.keys()} == {"F32"}
    assert torch.isfinite(_text_forward(load_model(out))).all()


def test_refuses_non_empty_folder_and_overwrites_cleanly(tmp_path):
    out = tmp_path / "ck"
    write_random_checkpoint(out, preset_config("golden-tiny"), shard_bytes=500_000)
    assert (out / "model.safetensors.index.json").exists()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="not empty"):
        write_random_checkpoint(out, preset_config("golden-tiny"))
    write_random_checkpoint(out, preset_config("golden-tiny"), overwrite=True)
    # stale shards and index are gone (an index would shadow the new single file)
    assert sorted(p.name for p in out.glob("model*")) == ["model.safetensors"]
    assert (out / "notes.txt").read_text() == "mine"
    load_model(out)
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError, match="not a folder"):
        write_random_checkpoint(tmp_path / "file", preset_config("golden-tiny"))


def test_checks_free_disk_space(tmp_path, monkeypatch):
    old = write_random_checkpoint(tmp_path / "old", preset_config("golden-tiny"))
    before = sorted(p.name for p in old.iterdir())
    monkeypatch.setattr(ck, "free_bytes", lambda folder: 10 * 1024 ** 2)
    with pytest.raises(CheckpointError, match="not enough disk space"):
        write_random_checkpoint(tmp_path / "ck", preset_config("golden-tiny"))
    assert not (tmp_path / "ck").exists()
    with pytest.raises(CheckpointError, match="not enough disk space"):
        write_random_checkpoint(old, preset_config("golden-small", 0.5, vocab_size=500_000), overwrite=True)
    assert sorted(p.name for p in old.iterdir()) == before  # a refused overwrite deletes nothing


def test_invalid_config_is_a_config_error(tmp_path):
    cfg = preset_config("golden-tiny")
    cfg["projector_config"]["n_embed"] = 65
    with pytest.raises(ConfigError, match="n_embed"):
        write_random_checkpoint(tmp_path / "ck", cfg)


# ---- the shipped demo ------------------------------------------------------------------

def test_shipped_demo_loads_and_runs():
    files = list(DEMO_DIR.iterdir())
    assert sum(f.stat().st_size for f in files) < 5 * 1024 ** 2
    cfg = load_config(DEMO_DIR)
    assert cfg.language.use_mla and cfg.language.q_lora_rank is None
    model = load_model(DEMO_DIR)
    assert torch.isfinite(_text_forward(model)).all()
    assert (DEMO_DIR / "tokenizer.json").is_file() and (DEMO_DIR / "processor_config.json").is_file()


def test_write_demo_cli_reproduces_shipped_demo(tmp_path):
    assert ck.main(["--write-demo", "--out", str(tmp_path / "demo")]) == 0
    for f in DEMO_DIR.iterdir():
        assert (tmp_path / "demo" / f.name).read_bytes() == f.read_bytes(), f.name


def test_cli_writes_a_preset(tmp_path, capsys):
    assert ck.main(["--preset", "golden-dsv2x", "--out", str(tmp_path / "x"), "--scale", "0.5", "--seed", "3"]) == 0
    assert "wrote" in capsys.readouterr().out
    assert load_config(tmp_path / "x") == ModelConfig.from_hf(preset_config("golden-dsv2x", 0.5))
    assert ck.main(["--preset", "golden-dsv2x", "--out", str(tmp_path / "x")]) == 2  # not empty
    assert "not empty" in capsys.readouterr().err
