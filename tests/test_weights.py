"""Checkpoint loading: dtypes, values, expert stacking, shards, errors that name the tensor."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from dsvl2.errors import CheckpointError
from dsvl2.checkpoint.load import load_model, sanitize_key
from _paths import GOLDEN

VARIANTS = ["tiny", "small", "base", "dsv2x"]
EXPERT_KEY = "language.model.layers.{layer}.mlp.experts.{e}.{proj}.weight"


pytestmark = pytest.mark.usefixtures("one_thread")


def _file_tensors(variant: str) -> dict[str, torch.Tensor]:
    with safe_open(str(GOLDEN / variant / "model.safetensors"), framework="pt") as h:
        return {k: h.get_tensor(k) for k in h.keys()}


def _copy_folder(variant: str, dst: Path, tensors: dict[str, torch.Tensor] | None = None) -> Path:
    """A checkpoint folder with the golden config and the given tensors (default: the golden ones)."""
    dst.mkdir(parents=True, exist_ok=True)
    shutil.copy(GOLDEN / variant / "config.json", dst / "config.json")
    if tensors is None:
        shutil.copy(GOLDEN / variant / "model.safetensors", dst / "model.safetensors")
    else:
        save_file(tensors, str(dst / "model.safetensors"))
    return dst


# ---- dtypes and values ---------------------------------------------------------------------

@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_golden_loads_with_file_values(variant, dtype):
    model = load_model(GOLDEN / variant, dtype=dtype)
    params = dict(model.named_parameters())
    for name, p in params.items():
        want = torch.float32 if name.endswith("e_score_correction_bias") else dtype
        assert p.dtype == want, name
        assert p.device.type == "cpu" and not p.is_meta
    with safe_open(str(GOLDEN / variant / "model.safetensors"), framework="pt") as h:
        for key in ["language.lm_head.weight", "language.model.embed_tokens.weight", "image_newline",
                    "view_seperator", "vision.pos_embed", "vision.patch_embed.proj.weight",
                    "projector.layers.0.weight", "language.model.layers.0.input_layernorm.weight",
                    "language.model.layers.0.self_attn.o_proj.weight"]:
            # bf16 -> fp32 is exact, so the comparison is exact
            assert torch.equal(params[key].float(), h.get_tensor(key).float()), key
        # one stacked expert slice vs the per-expert tensors in the file
        e = 5
        layer = next(i for i, blk in enumerate(model.language.model.layers) if blk.is_moe)
        assert layer == (0 if variant == "dsv2x" else 1)
        experts = model.language.model.layers[layer].mlp.experts
        for proj in ("gate_proj", "up_proj", "down_proj"):
            stacked = getattr(experts, proj)
            assert stacked.shape[0] == model.cfg.language.n_routed_experts
            file_t = h.get_tensor(EXPERT_KEY.format(layer=layer, e=e, proj=proj))
            assert torch.equal(stacked[e].float(), file_t.float()), proj
            assert not torch.equal(stacked[e + 1].float(), file_t.float())  # really a different slice
        if variant == "base":
            key = "language.model.layers.1.mlp.gate.e_score_correction_bias"
            assert h.get_slice(key).get_dtype() == "F32"
            assert torch.equal(params[key], h.get_tensor(key))
    # rotary buffers were rebuilt off the meta device, with the right values
    assert not any(b.is_meta for b in model.buffers())
    rope_dim = model.cfg.language.rope_dim
    if variant != "dsv2x":  # plain rope: theta^(-2i/d)
        want = 10000.0 ** (-torch.arange(0, rope_dim, 2, dtype=torch.float64) / rope_dim)
        assert torch.allclose(model.language.rotary.inv_freq.double(), want, rtol=1e-6)


def test_every_file_tensor_is_loaded_exactly():
    """All of base (the most special cases: fp32 bias, stacked experts, attn_pool) round-trips."""
    model = load_model(GOLDEN / "base", dtype=torch.bfloat16)
    params = dict(model.named_parameters())
    used = set()
    for key, t in _file_tensors("base").items():
        mapped = sanitize_key(key)
        if mapped is None:
            assert key.startswith("vision.attn_pool.")
            continue
        name, expert = mapped
        got = params[name] if expert is None else params[name][expert]
        assert got.dtype == t.dtype and torch.equal(got, t), key
        used.add(name)
    assert used == set(params)


def test_attn_pool_is_accepted_and_not_loaded():
    keys = _file_tensors("tiny").keys()
    assert any(k.startswith("vision.attn_pool.") for k in keys)
    model = load_model(GOLDEN / "tiny")
    assert not any("attn_pool" in n for n, _ in model.named_parameters())
    assert not any("attn_pool" in n for n, _ in model.named_modules())


def test_bf16_load_keeps_no_fp32_copy():
    model = load_model(GOLDEN / "base", dtype=torch.bfloat16)
    n_total = sum(p.numel() for p in model.parameters())
    n_bias = sum(p.numel() for n, p in model.named_parameters() if n.endswith("e_score_correction_bias"))
    assert n_bias == 2 * 18
    expected = (n_total - n_bias) * 2 + n_bias * 4
    assert sum(p.numel() * p.element_size() for p in model.parameters()) == expected
    # no parameter is a view into a larger (e.g. fp32 or whole-file) buffer
    storages = {}
    for n, p in model.named_parameters():
        storages[p.untyped_storage().data_ptr()] = p.untyped_storage().nbytes()
        assert p.untyped_storage().nbytes() == p.numel() * p.element_size(), n
    assert sum(storages.values()) == expected
    # and the file itself is the same size in bf16 (+ the unused attn_pool head)
    file_bytes = sum(t.numel() * t.element_size() for k, t in _file_tensors("base").items()
                     if not k.startswith("vision.attn_pool."))
    assert file_bytes == expected


# ---- shards --------------------------------------------------------------------------------

def test_sharded_copy_loads_identically(tmp_path):
    tensors = _file_tensors("small")
    keys = sorted(tensors)
    folder = tmp_path / "sharded"
    folder.mkdir()
    shutil.copy(GOLDEN / "small" / "config.json", folder / "config.json")
    n = 3
    names = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    weight_map = {}
    for i, name in enumerate(names):
        part = {k: tensors[k] for k in keys[i::n]}  # interleaved: experts of one layer span shards
        save_file(part, str(folder / name))
        weight_map.update({k: name for k in part})
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
         "weight_map": weight_map}))
    a = load_model(GOLDEN / "small").state_dict()
    b = load_model(folder).state_dict()
    assert a.keys() == b.keys()
    assert all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)

    # an index naming a shard that is not there
    (folder / names[1]).unlink()
    with pytest.raises(CheckpointError) as e:
        load_model(folder)
    assert names[1] in str(e.value) and "do not exist" in str(e.value)


# ---- errors --------------------------------------------------------------------------------

@pytest.mark.parametrize("key", ["language.model.layers.2.post_attention_layernorm.weight",
                                 "language.model.layers.2.mlp.experts.11.up_proj.weight"])  # one expert
def test_missing_tensor_is_named(tmp_path, key):
    tensors = _file_tensors("tiny")
    del tensors[key]
    folder = _copy_folder("tiny", tmp_path / "ck", tensors)
    with pytest.raises(CheckpointError) as e:
        load_model(folder)
    assert "missing" in str(e.value) and key in str(e.value)


def test_unexpected_tensor_is_named(tmp_path):
    tensors = _file_tensors("tiny")
    tensors["language.model.layers.7.mlp.mystery.weight"] = torch.zeros(3, dtype=torch.bfloat16)
    folder = _copy_folder("tiny", tmp_path / "ck", tensors)
    with pytest.raises(CheckpointError) as e:
        load_model(folder)
    assert "unexpected" in str(e.value) and "language.model.layers.7.mlp.mystery.weight" in str(e.value)


def test_expert_beyond_config_is_an_error(tmp_path):
    tensors = _file_tensors("tiny")
    key = "language.model.layers.1.mlp.experts.16.gate_proj.weight"  # tiny has experts 0..15
    tensors[key] = tensors["language.model.layers.1.mlp.experts.0.gate_proj.weight"].clone()
    folder = _copy_folder("tiny", tmp_path / "ck", tensors)
    with pytest.raises(CheckpointError) as e:
        load_model(folder)
    assert key in str(e.value)


@pytest.mark.parametrize("key, new_shape, want", [
    ("language.model.layers.0.mlp.up_proj.weight", (161, 64), (160, 64)),
    ("language.model.layers.1.mlp.experts.3.down_proj.weight", (64, 31), (64, 32)),
])
def test_wrong_shape_names_tensor_and_both_shapes(tmp_path, key, new_shape, want):
    tensors = _file_tensors("tiny")
    assert tuple(tensors[key].shape) == want
    tensors[key] = torch.zeros(new_shape, dtype=torch.bfloat16)
    folder = _copy_folder("tiny", tmp_path / "ck", tensors)
    with pytest.raises(CheckpointError) as e:
        load_model(folder)
    msg = str(e.value)
    assert key in msg and str(list(new_shape)) in msg and str(list(want)) in msg


def test_missing_folder(tmp_path):
    with pytest.raises(CheckpointError) as e:
        load_model(tmp_path / "no_such_model")
    assert "no_such_model" in str(e.value) and "not found" in str(e.value)


def test_folder_without_weights(tmp_path):
    folder = tmp_path / "ck"
    folder.mkdir()
    shutil.copy(GOLDEN / "tiny" / "config.json", folder / "config.json")
    with pytest.raises(CheckpointError) as e:
        load_model(folder)
    assert str(folder) in str(e.value) and "model.safetensors" in str(e.value)


@pytest.mark.parametrize("how", ["garbage", "truncated"])
def test_corrupt_safetensors(tmp_path, how):
    folder = _copy_folder("tiny", tmp_path / "ck")
    f = folder / "model.safetensors"
    data = f.read_bytes()
    f.chmod(0o644)
    f.write_bytes(b"\x00\x01not a safetensors file" * 10 if how == "garbage" else data[: len(data) // 2])
    with pytest.raises(CheckpointError) as e:
        load_model(folder)
    assert str(f) in str(e.value) and "safetensors" in str(e.value)


def test_corrupt_index(tmp_path):
    folder = _copy_folder("tiny", tmp_path / "ck")
    (folder / "model.safetensors.index.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="index"):
        load_model(folder)
