"""Kernel choice per machine (model/native/policy.py) and the bf16 big-product path it enables.

The choice is tested with given CPU flags and a given measurement (no timing here); the
bf16 path is checked against the float32 path on a golden model within bf16 rounding.
"""

from __future__ import annotations

import pytest
import torch

from dsvl2.model import native, ops
from dsvl2.model.native import policy as kernels
from dsvl2.checkpoint.load import load_model
from _paths import GOLDEN


@pytest.fixture(autouse=True)
def no_env(monkeypatch, tmp_path):
    monkeypatch.delenv("DSVL2_BIG_PRODUCTS", raising=False)
    monkeypatch.delenv("DSVL2_ATTENTION", raising=False)
    monkeypatch.setenv("DSVL2_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(ops, "attention_kernel", ops.attention_kernel)  # restored afterwards
    monkeypatch.setattr(kernels, "load_per_cpu", lambda: 0.0)  # a quiet machine unless a test says
    yield
    ops.set_big_products_in_weights_dtype(False)


def test_avx2_only_cpu_upcasts_without_measuring():
    def never(dtype):
        raise AssertionError("no measurement on a CPU without bf16 units")

    c = kernels.choose("cpu", torch.bfloat16, flags={"avx2", "fma"}, measure=never)
    assert c.big_products == "fp32" and "no native bf16" in c.reason


@pytest.mark.parametrize("flag", kernels.NATIVE_BF16_FLAGS)
def test_native_bf16_cpu_measures_and_picks_the_faster(flag):
    fast_bf16 = {torch.float32: 260.0, torch.bfloat16: 1965.0}  # an AMX Xeon's figures
    c = kernels.choose("cpu", torch.bfloat16, flags={flag}, measure=fast_bf16.get, use_cache=False)
    assert c.big_products == "bf16" and c.measured == {"fp32_gflops": 260.0, "bf16_gflops": 1965.0}
    slow_bf16 = {torch.float32: 150.0, torch.bfloat16: 20.0}
    assert kernels.choose("cpu", torch.bfloat16, flags={flag}, measure=slow_bf16.get,
                          use_cache=False).big_products == "fp32"


def test_measurement_is_cached_per_machine():
    calls = []

    def counting(dtype):
        calls.append(dtype)
        return 100.0 if dtype == torch.float32 else 300.0

    first = kernels.choose("cpu", torch.bfloat16, flags={"amx_bf16"}, measure=counting)
    again = kernels.choose("cpu", torch.bfloat16, flags={"amx_bf16"}, measure=counting)
    assert first == again and first.big_products == "bf16" and len(calls) == 2  # measured once
    kernels.choose("cpu", torch.bfloat16, flags={"amx_bf16", "avx512_bf16"}, measure=counting)
    assert len(calls) == 4  # other flags: another machine, measured again
    assert kernels.cache_file().is_file()


def _products(fp32: float, bf16: float):
    return {torch.float32: fp32, torch.bfloat16: bf16}.get


@pytest.mark.parametrize("native_ms, torch_ms, want", [(13.1, 5.2, "torch"), (13.1, 11.0, "native"),
                                                       (6.0, 9.0, "native")])
def test_attention_kernel_is_torchs_only_where_clearly_faster(native_ms, torch_ms, want):
    """Both attention kernels timed where bf16 products are chosen (the AMX one not usable:
    its timing None); torch's taken at ATTENTION_MARGIN (1.2x) or more (13.1 / 5.2 ms: an
    AMX Xeon's figures)."""
    times = {"native": native_ms, "torch": torch_ms}
    c = kernels.choose("cpu", torch.bfloat16, flags={"amx_bf16"}, measure=_products(260.0, 1965.0),
                       use_cache=False, measure_attention=times.get)
    assert c.big_products == "bf16" and c.attention == want
    assert c.measured == {"fp32_gflops": 260.0, "bf16_gflops": 1965.0, "attention_native_ms": native_ms,
                          "attention_torch_ms": torch_ms}
    ops.apply_kernel_choice(c)
    assert ops.attention_kernel == want


def test_attention_times_are_the_best_of_rounds_in_turns():
    """A moment of load that slows one round of a kernel does not decide: the best of each."""
    seq = {"native": iter([30.0, 13.0, 13.5]), "torch": iter([5.5, 25.0, 5.2])}
    c = kernels.choose("cpu", torch.bfloat16, flags={"amx_bf16"}, measure=_products(260.0, 1965.0),
                       use_cache=False, measure_attention=lambda kernel: next(seq[kernel]) if kernel in seq else None)
    assert (c.measured["attention_native_ms"], c.measured["attention_torch_ms"], c.attention) == (13.0, 5.2, "torch")


def test_without_the_native_kernel_the_attention_is_not_timed(monkeypatch):
    """The real measurement (no test timings given) where the native kernel cannot run: no
    attention timed, the native choice kept (``attention_in_bf16`` then takes torch's float32
    attention)."""
    monkeypatch.setattr(native, "attention_usable", lambda: False)
    c = kernels.choose("cpu", torch.bfloat16, flags={"amx_bf16"}, use_cache=False)
    assert c.attention == "native" and set(c.measured) == {"fp32_gflops", "bf16_gflops"}


def test_attention_is_not_timed_where_products_stay_float32():
    def never(kernel):
        raise AssertionError("no attention measurement without bf16 products")

    c = kernels.choose("cpu", torch.bfloat16, flags={"avx512_bf16"}, measure=_products(150.0, 20.0),
                       use_cache=False, measure_attention=never)
    assert (c.big_products, c.attention) == ("fp32", "native")


def test_attention_choice_is_cached_with_the_products(monkeypatch):
    calls = []

    def timing(kernel):
        calls.append(kernel)
        return {"native": 13.0, "torch": 5.0}.get(kernel)  # no AMX kernel here

    first = kernels.choose("cpu", torch.bfloat16, flags={"amx_bf16"}, measure=_products(100.0, 300.0),
                           measure_attention=timing)
    again = kernels.choose("cpu", torch.bfloat16, flags={"amx_bf16"}, measure=_products(100.0, 300.0),
                           measure_attention=timing)
    # asked for each kernel, then the usable ones timed in turns, ATTENTION_ROUNDS each; cached
    assert first == again and first.attention == "torch"
    assert calls == ["native", "torch", "amx"] + ["native", "torch"] * (kernels.ATTENTION_ROUNDS - 1)


@pytest.mark.parametrize("load_then, load_now, measured_again", [(0.3, 0.1, False), (1.6, 1.4, False),
                                                                  (1.6, 0.3, True)])
def test_a_measurement_on_a_busy_machine_is_made_again_on_a_quiet_one(monkeypatch, load_then, load_now,
                                                                       measured_again):
    """The cache keeps the load average per CPU each measurement was taken at; one taken at
    BUSY or more stands while the machine stays busy and is replaced at a quiet load."""
    calls = []

    def timing(kernel):
        calls.append(kernel)
        return {"native": 13.0, "torch": 5.0}.get(kernel)

    def choose():
        return kernels.choose("cpu", torch.bfloat16, flags={"amx_bf16"}, measure=_products(100.0, 300.0),
                              measure_attention=timing)

    monkeypatch.setattr(kernels, "load_per_cpu", lambda: load_then)
    first = choose()
    monkeypatch.setattr(kernels, "load_per_cpu", lambda: load_now)
    calls.clear()
    again = choose()
    assert again == first and bool(calls) == measured_again
    if measured_again:  # the quiet measurement replaced the busy one: it stands now
        monkeypatch.setattr(kernels, "load_per_cpu", lambda: 0.0)
        calls.clear()
        choose()
        assert calls == []


def test_attention_override(monkeypatch):
    monkeypatch.setenv("DSVL2_ATTENTION", "native")
    c = kernels.choose("cpu", torch.bfloat16, flags={"amx_bf16"}, measure=_products(100.0, 300.0),
                       use_cache=False, measure_attention={"native": 13.0, "torch": 5.0}.get)
    assert c.attention == "native"
    monkeypatch.setenv("DSVL2_ATTENTION", "torch")
    assert kernels.choose("cpu", torch.bfloat16, flags={"avx2"}).attention == "torch"
    monkeypatch.setenv("DSVL2_ATTENTION", "fast")
    with pytest.raises(ValueError, match="one of native, torch, amx"):
        kernels.choose("cpu", torch.bfloat16, flags={"avx2"})


@pytest.mark.parametrize("usable", [True, False])
def test_attention_override_amx_only_where_amx_runs(usable, monkeypatch):
    monkeypatch.setattr(kernels, "amx_attention_usable", lambda: usable)
    monkeypatch.setenv("DSVL2_ATTENTION", "amx")
    if usable:
        assert kernels.choose("cpu", torch.bfloat16, flags={"avx2"}).attention == "amx"
    else:
        with pytest.raises(ValueError, match="DSVL2_ATTENTION=amx needs a CPU and kernel with AMX"):
            kernels.choose("cpu", torch.bfloat16, flags={"avx2"})


@pytest.mark.parametrize("times, want", [({"native": 13.1, "torch": 5.2, "amx": 3.1}, "amx"),
                                         ({"native": 13.1, "torch": 5.2, "amx": 6.0}, "torch"),
                                         ({"native": 3.0, "torch": 5.2, "amx": 2.8}, "native")])
def test_the_fastest_of_three_attention_kernels_where_clearly_faster_than_the_native_one(times, want):
    """With AMX usable all three are timed in turns; the fastest is taken if ATTENTION_MARGIN
    (1.2x) faster than the native one (3.0 / 2.8 is not)."""
    c = kernels.choose("cpu", torch.bfloat16, flags={"amx_bf16"}, measure=_products(260.0, 1965.0),
                       use_cache=False, measure_attention=times.get)
    assert c.attention == want
    assert {k: c.measured[f"attention_{k}_ms"] for k in times} == times


def test_the_amx_switch_is_part_of_the_cache_key(monkeypatch):
    """A choice cached with the AMX kernels usable (maybe "amx") does not serve a process
    where they are off (``DSVL2_AMX=0``): measured again there."""
    calls = []

    def timing(kernel):
        calls.append(kernel)
        return {"native": 13.0, "torch": 5.0, "amx": 3.0}[kernel] if kernel != "amx" or amx_on else None

    def choose():
        return kernels.choose("cpu", torch.bfloat16, flags={"amx_bf16"}, measure=_products(100.0, 300.0),
                              measure_attention=timing)

    amx_on = True
    monkeypatch.setattr(kernels, "amx_attention_usable", lambda: amx_on)
    assert choose().attention == "amx"
    amx_on = False
    calls.clear()
    assert choose().attention == "torch" and calls


def test_float32_weights_and_gpus_never_cast():
    assert kernels.choose("cpu", torch.float32).big_products == "weights"
    assert kernels.choose("cuda", torch.bfloat16).big_products == "weights"


def test_override(monkeypatch):
    monkeypatch.setenv("DSVL2_BIG_PRODUCTS", "bf16")
    assert kernels.choose("cpu", torch.bfloat16, flags=set()).big_products == "bf16"
    monkeypatch.setenv("DSVL2_BIG_PRODUCTS", "fast")
    with pytest.raises(ValueError, match="fp32 or bf16"):
        kernels.choose("cpu", torch.bfloat16)


@pytest.mark.parametrize("attention", ["native", "torch", "amx"])
def test_bf16_big_products_agree_with_the_fp32_path(attention, monkeypatch):
    """Vision and a prefill forward with bf16 products vs the fp32 upcast path, same bf16
    weights, on each attention kernel (the native one where the CPU has it, else torch's
    float32 attention; the AMX one where the CPU has AMX): equal within bf16 rounding."""
    if attention == "amx" and not kernels.amx_attention_usable():
        pytest.skip("hardware: the AMX attention kernel needs a CPU with AMX-TILE / AMX-BF16; this machine has not")
    model = load_model(GOLDEN / "small", torch.bfloat16)
    tiles = torch.rand(2, 3, 384, 384, generator=torch.Generator().manual_seed(0)) * 2 - 1
    ids = torch.randint(3, 2600, (1, 40), generator=torch.Generator().manual_seed(1))
    am = torch.ones_like(ids, dtype=torch.bool)

    def run():
        with torch.no_grad():
            feats = model.tile_features(tiles)
            x = model.language.embed(ids, torch.float32)
            _, ctx = model.language.padded_context(am)
            return feats, model.language(x, ctx).logits

    f32_feats, f32_logits = run()
    ops.apply_kernel_choice(kernels.KernelChoice("bf16", "test", attention=attention))
    calls = []
    for kernel, name in (("native", "attention_bf16"), ("torch", "attention_bf16_torch"), ("amx", "attention_bf16_amx")):
        real = getattr(native, name)
        monkeypatch.setattr(native, name, lambda *a, _k=kernel, _f=real, **kw: calls.append(_k) or _f(*a, **kw))
    bf_feats, bf_logits = run()
    # the chosen kernel in every layer of the tower and of the language model; torch's, where
    # chosen, in the tower's only (the language model's prefill on the native kernel where the
    # CPU has it, else torch's float32 attention); none where the native one was chosen but
    # cannot run (torch's float32 attention then)
    tower, lm = model.cfg.vision.layers, model.cfg.language.num_hidden_layers
    usable = native.attention_usable()
    want = {"native": ["native"] * (tower + lm) if usable else [],
            "torch": ["torch"] * tower + (["native"] * lm if usable else []),
            "amx": ["amx"] * (tower + lm)}[attention]
    assert calls == want
    assert not torch.equal(bf_feats, f32_feats)  # the bf16 path really ran
    rel = lambda a, b: float((a - b).norm() / b.norm())  # noqa: E731
    # bf16 keeps 8 bits of mantissa (relative rounding 2^-9 ~ 0.2 %) per product
    assert rel(bf_feats, f32_feats) < 0.02 and rel(bf_logits, f32_logits) < 0.02
