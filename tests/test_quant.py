"""Quantised weights (int8 per channel, int4 group-wise): formats, kernels, checkpoints, loading.

The reference for every quantised path is the simple one: dequantise the stored tensors
to float32 (``quant.dequantize``) and run the float model. Kernels compute with bf16
activations, so agreement is to bf16 precision, not bit-exact.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from _paths import GOLDEN
from dsvl2.commands.main import main as cli_main
from dsvl2.errors import CheckpointError
from dsvl2.model import ops, quant
from dsvl2.checkpoint.quantised import quantize_checkpoint
from dsvl2.checkpoint.load import SCALE_SUFFIX, load_model

VARIANTS = ["tiny", "small", "base", "dsv2x"]


def _text_logits(model, decoding: bool = False) -> torch.Tensor:
    ids = torch.tensor([[0, 5, 17, 300, 2687, 44, 91]])
    ones = torch.ones_like(ids, dtype=torch.bool)
    with torch.no_grad():
        if decoding:
            with ops.decoding():
                return model(ids, ones, ~ones).logits
        return model(ids, ones, ~ones).logits


def _dequantised_folder(qdir, out):
    """A float32 checkpoint holding the dequantised values of a quantised one (the reference)."""
    stored = load_file(str(qdir / "model.safetensors"))
    bits = json.loads((qdir / "config.json").read_text())["quantization"]["bits"]
    floats = {}
    for k, v in stored.items():
        if k.endswith(SCALE_SUFFIX):
            continue
        scale = stored.get(k + SCALE_SUFFIX)
        if scale is None:
            floats[k] = v
        else:
            floats[k] = quant.dequantize(v, scale, 8 if v.dtype == torch.int8 else 4)
            assert bits == 8 or v.dtype in (torch.int8, torch.uint8)
    out.mkdir()
    save_file(floats, str(out / "model.safetensors"))
    cfg = json.loads((qdir / "config.json").read_text())
    del cfg["quantization"]
    (out / "config.json").write_text(json.dumps(cfg))
    return out


# ---- formats ------------------------------------------------------------------------------

def test_int8_round_trip_error_is_at_most_half_a_step():
    w = torch.randn(40, 96) * torch.rand(40, 1) * 3
    q, s = quant.quantize_int8(w)
    assert q.dtype == torch.int8 and s.shape == (40,) and s.dtype == torch.bfloat16
    err = (quant.dequantize(q, s, 8) - w).abs()
    assert (err <= s.float()[:, None] / 2 + 1e-6).all()
    assert q.abs().max() == 127  # the row maximum uses the full range (up to bf16 rounding of the scale)


def test_int4_pack_unpack_and_group_error():
    u = torch.randint(0, 16, (8, 64), dtype=torch.uint8)
    assert torch.equal(quant.unpack_int4(quant.pack_int4(u)), u.to(torch.int8) - 8)
    w = torch.randn(16, 128)
    q, s = quant.quantize_int4(w, 32)
    assert q.shape == (16, 64) and s.shape == (16, 4)
    err = (quant.dequantize(q, s, 4) - w).abs().view(16, 4, 32)
    assert (err <= s.float()[..., None] / 2 + 1e-6).all()


def test_int4_group_choice():
    assert quant.int4_group(1280) == 128 and quant.int4_group(96) == 32 and quant.int4_group(64) == 64
    assert quant.int4_group(40) is None


# ---- kernels --------------------------------------------------------------------------------

def _qweight(bits: int, n: int, k: int) -> tuple[quant.QuantWeight, torch.Tensor]:
    w = torch.randn(n, k) * k ** -0.5
    g = quant.int4_group(k) or 0
    q, s = quant.quantize_int8(w) if bits == 8 else quant.quantize_int4(w, g)
    qw = quant.QuantWeight.empty(bits, (n, k), g)
    qw.set_data((), q)
    qw.set_scale((), s)
    return qw, quant.dequantize(q, s, bits)


@pytest.mark.parametrize("bits, n, k, kind", [(8, 48, 96, "int8"), (4, 48, 128, "int4pack"), (4, 40, 64, "int4")])
@pytest.mark.parametrize("decoding", [False, True])
def test_kernel_matches_dequantised_reference(bits, n, k, kind, decoding):
    qw, ref_w = _qweight(bits, n, k)
    assert qw.kind == kind
    x = torch.randn(5, k)
    ref = F.linear(x, ref_w)
    out = qw.linear(x, decoding)
    assert out.dtype == torch.float32 and out.shape == (5, n)
    torch.testing.assert_close(out, ref, atol=3e-2, rtol=2e-2)  # bf16 activations in the kernels
    torch.testing.assert_close(qw.dequantize(), ref_w, atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("bits, n, k", [(8, 896, 1280), (4, 896, 1280), (4, 40, 64), (8, 64, 96)])
def test_decode_rows_do_not_depend_on_the_batch(bits, n, k):
    """A row's numbers are the same alone and in a batch of any size (the ops rule)."""
    qw, _ = _qweight(bits, n, k)
    x = torch.randn(9, k)
    full = qw.linear(x, decoding=True)
    for m in (1, 2, 4, 9):
        assert torch.equal(qw.linear(x[:m], decoding=True), full[:m])
    for i in range(9):
        assert torch.equal(qw.linear(x[i:i + 1], decoding=True)[0], full[i])


def test_stacked_slot_equals_unstacked():
    qw = quant.QuantWeight.empty(4, (3, 32, 64), 64)
    ws = [torch.randn(32, 64) for _ in range(3)]
    for e, w in enumerate(ws):
        q, s = quant.quantize_int4(w, 64)
        qw.set_data((e,), q)
        qw.set_scale((e,), s)
    for e, w in enumerate(ws):
        q, s = quant.quantize_int4(w, 64)
        torch.testing.assert_close(qw[e].dequantize(), quant.dequantize(q, s, 4), atol=1e-2, rtol=1e-2)


# ---- checkpoints and loading ------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("bits", [8, 4])
def test_quantised_checkpoint_matches_dequantised_reference(tmp_path, variant, bits):
    qdir = quantize_checkpoint(GOLDEN / variant, tmp_path / "q", bits)
    cfg = json.loads((qdir / "config.json").read_text())
    assert cfg["quantization"]["scheme"] == f"int{bits}"
    model = load_model(qdir)
    assert model.quantization == f"int{bits}"
    moe = next(layer.mlp for layer in reversed(model.language.model.layers) if layer.is_moe)  # dsv2x ends dense
    experts = moe.experts.gate_proj
    assert isinstance(experts, quant.QuantWeight) and experts.bits == bits
    assert isinstance(model.language.lm_head.weight, quant.QuantWeight)
    assert not isinstance(moe.gate.weight, quant.QuantWeight)  # router stays float
    ref = load_model(_dequantised_folder(qdir, tmp_path / "ref"))
    want = _text_logits(ref)
    for decoding in (False, True):
        torch.testing.assert_close(_text_logits(model, decoding), want, atol=6e-2, rtol=3e-2)
    # quantising while loading gives the very same model as the written checkpoint
    onfly = load_model(GOLDEN / variant, quantize=f"int{bits}")
    assert torch.equal(_text_logits(onfly), _text_logits(model))


def test_quantised_files_are_smaller(tmp_path):
    src = sum(f.stat().st_size for f in (GOLDEN / "base").glob("*.safetensors"))
    q8 = quantize_checkpoint(GOLDEN / "base", tmp_path / "q8", 8)
    q4 = quantize_checkpoint(GOLDEN / "base", tmp_path / "q4", 4)
    s8, s4 = ((d / "model.safetensors").stat().st_size for d in (q8, q4))
    assert s4 < s8 < src


def test_load_errors(tmp_path):
    with pytest.raises(CheckpointError, match="int8"):
        load_model(GOLDEN / "tiny", quantize="int3")
    q4 = quantize_checkpoint(GOLDEN / "tiny", tmp_path / "q4", 4)
    with pytest.raises(CheckpointError, match="already quantised"):
        load_model(q4, quantize="int8")
    with pytest.raises(CheckpointError, match="already quantised"):
        quantize_checkpoint(q4, tmp_path / "again", 8)
    # a missing scale is named
    tensors = load_file(str(q4 / "model.safetensors"))
    key = "language.model.layers.1.mlp.experts.3.up_proj.weight" + SCALE_SUFFIX
    del tensors[key]
    save_file(tensors, str(q4 / "model.safetensors"))
    with pytest.raises(CheckpointError, match="missing") as e:
        load_model(q4)
    assert key in str(e.value)


def test_cli_quantize_then_chat(tmp_path, capsys):
    assert cli_main(["quantize", str(GOLDEN / "small"), str(tmp_path / "q"), "--bits", "8"]) == 0
    assert "int8" in capsys.readouterr().out
    assert cli_main(["chat", "-m", str(tmp_path / "q"), "hello", "--max-new-tokens", "3", "--json"]) == 0
    a = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert a["usage"]["completion_tokens"] == 3 if "usage" in a else a["completion_tokens"] == 3
    assert cli_main(["quantize", str(GOLDEN / "small"), str(tmp_path / "q"), "--bits", "4"]) == 1  # not empty


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_init_random_quantised_equals_quantising_the_bf16_one(tmp_path, scheme):
    """init-random --quantize writes exactly what `dsvl2 quantize` makes of the bf16 random checkpoint."""
    assert cli_main(["init-random", "--preset", "golden-small", "--quantize", scheme, str(tmp_path / "direct")]) == 0
    assert cli_main(["init-random", "--preset", "golden-small", str(tmp_path / "bf16")]) == 0
    quantize_checkpoint(tmp_path / "bf16", tmp_path / "via", 8 if scheme == "int8" else 4)
    a, b = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("direct", "via"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert load_model(tmp_path / "direct").quantization == scheme


# ---- --quantize on `dsvl2 info` and `dsvl2 serve` ---------------------------------------------

def _tensor_bytes(folder) -> int:
    from dsvl2.checkpoint.load import read_header, weight_files

    return sum(t.nbytes for f in weight_files(folder) for t in read_header(f))


@pytest.mark.parametrize("bits", [8, 4])
def test_info_quantize_predicts_the_written_bytes(tmp_path, capsys, bits):
    """info --quantize on a float folder gives the bytes `dsvl2 quantize` then writes;
    on the written folder it reports the scheme from config.json and those bytes."""
    scheme = f"int{bits}"
    assert cli_main(["info", str(GOLDEN / "base"), "--quantize", scheme, "--json"]) == 0
    q = json.loads(capsys.readouterr().out)["quantization"]
    qdir = quantize_checkpoint(GOLDEN / "base", tmp_path / "q", bits)
    written = _tensor_bytes(qdir)
    assert q == {"scheme": scheme, "source": "--quantize", "bytes": written, "float_bytes": _tensor_bytes(GOLDEN / "base")}
    assert written < q["float_bytes"]
    assert cli_main(["info", str(qdir), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["quantization"] == {"scheme": scheme, "source": "checkpoint", "bytes": written, "float_bytes": None}
    assert cli_main(["info", str(qdir)]) == 0
    line = next(l for l in capsys.readouterr().out.splitlines() if l.startswith("quantised"))
    assert scheme in line and "config.json" in line
    assert cli_main(["info", str(GOLDEN / "base"), "--json"]) == 0  # no scheme: no section
    assert json.loads(capsys.readouterr().out)["quantization"] is None
    other = "int4" if bits == 8 else "int8"
    assert cli_main(["info", str(qdir), "--quantize", other]) == 1
    assert "already quantised" in capsys.readouterr().err


def test_info_quantize_of_a_real_config_without_weights():
    """A config alone (no weight files): the bytes of the official bf16 tensors, quantised."""
    from dsvl2.checkpoint.random_checkpoint import official_tensor_specs, preset_config
    from dsvl2.config import ModelConfig
    from dsvl2.commands.info import describe
    from dsvl2.checkpoint.quantised import entries_for

    cfg = ModelConfig.from_hf(preset_config("tiny"))
    d8, d4 = describe(cfg, quantize="int8"), describe(cfg, quantize="int4")
    specs = official_tensor_specs(cfg, torch.bfloat16)
    lm_head = next(s for s in specs if s.key == "language.lm_head.weight")
    assert [e[1] for e in entries_for(lm_head.key, lm_head.shape, lm_head.dtype, "int8")] == [torch.int8, torch.bfloat16]
    assert d8["quantization"]["float_bytes"] == d8["checkpoint_bytes_bf16"]
    # int8 saves one byte per quantised weight, less the bf16 scales: more than a third of tiny
    assert 0.5 < d8["quantization"]["bytes"] / d8["checkpoint_bytes_bf16"] < 0.65
    assert d4["quantization"]["bytes"] < 0.45 * d8["checkpoint_bytes_bf16"]


def test_serve_quantize_reaches_the_loader(monkeypatch, capsys):
    """`dsvl2 serve --quantize int8` loads the model quantised (uvicorn's run replaced by a
    call of the app's own loader, so no port is served)."""
    import uvicorn

    loaded = []

    def run(self, sockets=None):
        state = self.config.app.state.dsvl2
        state.model = state.loader()
        loaded.append(state.model)
        for s in sockets or ():
            s.close()

    monkeypatch.setattr(uvicorn.Server, "run", run)
    assert cli_main(["serve", "-m", str(GOLDEN / "tiny"), "--port", "0", "--quantize", "int8"]) == 0
    (model,) = loaded
    assert model.model.quantization == "int8"
    assert isinstance(model.model.language.lm_head.weight, quant.QuantWeight)
