"""The hostile-input corpus (tests/hostile/make_corpus.py) through the Python API and the CLI.

Every item declares its outcome (tests/hostile/README.md is the table): an error of a
named ``dsvl2.errors`` class whose message names the problem, or a documented behaviour
that is checked here. No item may end in a traceback, a hang or unbounded memory.

Conventions of this file:
* One demo model for the module, ONE torch thread, answers of 2 tokens (12 where the
  text matters): the point is the input path, not the model.
* Every item goes through ``VLModel.chat``; every item the CLI can express (images,
  a prompt, sampling flags) also goes through ``dsvl2.commands.main.main`` in-process (its loader
  patched to hand back the module's model), and the few marked ``cli`` through a real
  ``python -m dsvl2`` process (each costs seconds of imports), run side by side.
* Memory is bounded by behaviour, not by timing: the decompression bombs must fail
  before Pillow decodes a single row, and 100 images before any image is decoded.
"""

from __future__ import annotations

import builtins
import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

import dsvl2
import dsvl2.api as api
import dsvl2.errors as errors
import dsvl2.processing.image as image_mod
import dsvl2.processing.processor as processor_mod
from dsvl2.api import Answer
from dsvl2.commands.main import main
from dsvl2.grounding import draw_grounding, grounding_to_json, parse_grounding
from dsvl2.processing import normalize_conversation, num_image_tokens
from hostile.make_corpus import SMALL, Item, build, items, resolve, table

ITEMS = items()
BY_KIND = {k: [it for it in ITEMS if it.kind == k] for k in ("image", "request", "grounding")}
W, H = 640, 480  # the image size grounding items are converted to and drawn on

pytestmark = pytest.mark.usefixtures("one_thread")


def ids(item: Item) -> str:
    return item.name


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("hostile")
    build(d)
    return d


@pytest.fixture(scope="module")
def model(one_thread):
    return dsvl2.load("demo", device="cpu")


def chat(model, req: dict, **override) -> Answer:
    sampling = {**req["sampling"], **override}
    if "prompt" in req:
        return model.chat(req["prompt"], images=req.get("images"), **sampling)
    return model.chat(req["messages"], images=req.get("images"), **sampling)


def expect_error(item: Item, fn):
    """``fn()`` raises exactly the declared class, with a message naming the problem."""
    cls = getattr(errors, item.expect)
    with pytest.raises(errors.DSVL2Error) as info:
        fn()
    assert type(info.value) is cls, f"{item.name}: {type(info.value).__name__}: {info.value}"
    assert re.search(item.match, str(info.value), re.I | re.S), (item.match, str(info.value))
    return info.value


# --------------------------------------------------------------------------- the corpus itself


def test_corpus_files_are_small_and_the_manifest_round_trips(corpus):
    sizes = {p.name: p.stat().st_size for p in corpus.iterdir() if p.name != "manifest.json"}
    assert max(sizes.values()) < 70_000, sizes
    assert {it.file for it in BY_KIND["image"]} | {SMALL} == set(sizes)
    manifest = json.loads((corpus / "manifest.json").read_text())
    assert [m["name"] for m in manifest] == [it.name for it in ITEMS]
    assert all(m["expect"] == "ok" or hasattr(errors, m["expect"]) for m in manifest)
    errs = [it for it in ITEMS if it.expect != "ok"]
    assert all(it.match for it in errs), [it.name for it in errs if not it.match]


def test_the_readme_table_is_the_corpus():
    """README.md holds the table ``make_corpus.py --table`` prints (regenerate it after a change)."""
    readme = (Path(__file__).parent / "hostile" / "README.md").read_text()
    assert table() in readme


# --------------------------------------------------------------------------- images, API


@pytest.mark.parametrize("item", BY_KIND["image"], ids=ids)
def test_image_item_through_the_api(item, corpus, model, monkeypatch):
    path = corpus / item.file
    if item.expect != "ok":
        decoded = []
        real_load = ImageFile.ImageFile.load
        monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: decoded.append(self) or real_load(self))
        err = expect_error(item, lambda: model.chat("Describe this image.", images=[path], max_new_tokens=2))
        assert item.file in str(err)  # the message names the source
        if item.expect == "ImageTooLargeError":
            assert decoded == [], "a decompression bomb must be refused from its header, before decoding"
        return
    a = model.chat("Describe this image.", images=[path], max_new_tokens=2)
    assert a.completion_tokens >= 1 and a.finish_reason in ("stop", "length")
    (img,) = a.images
    assert img.mode == "RGB" and img.size == item.size
    for (x, y), rgb in item.pixels:
        got = img.getpixel((x, y))
        assert max(abs(g - e) for g, e in zip(got, rgb)) <= 4, ((x, y), got, rgb)  # JPEG rounding
    # the prompt holds the closed-form number of image tokens for the chosen grid
    batch, _ = model.process("Describe this image.", images=[path])
    (best,) = batch.best_resolutions[0]
    assert batch.num_image_tokens == [[num_image_tokens(best[0] // 384, best[1] // 384)]]
    assert a.prompt_tokens == batch.seq_lens[0]


def test_sliver_images_use_one_tile(corpus, model):
    for name in ("size_1x20000.png", "size_20000x1.png", "size_1x1.png"):
        batch, _ = model.process("x", images=[corpus / name])
        assert batch.best_resolutions == [[(384, 384)]] and batch.num_image_tokens == [[421]], name


def test_exif_orientation_is_not_applied_like_the_reference(corpus, model):
    """The reference opens + convert("RGB"): a rotated phone photo is seen as stored."""
    with Image.open(corpus / "exif_rotated.jpeg") as raw:
        assert raw.getexif()[0x0112] == 6
        stored = raw.convert("RGB")
    a = model.chat("x", images=[corpus / "exif_rotated.jpeg"], max_new_tokens=1)
    assert a.images[0].tobytes() == stored.tobytes()


# --------------------------------------------------------------------------- requests, API


@pytest.fixture(scope="module")
def baseline(corpus, model) -> Answer:
    """The plain one-image request, 12 greedy tokens: what the stop items are compared with."""
    req = resolve(next(it for it in ITEMS if it.name == "baseline").request, corpus)
    return chat(model, req, max_new_tokens=12)


def _stop_that_occurs(text: str) -> str:
    """A short piece of ``text`` (letters/digits, not at its start) to use as a stop string."""
    for m in re.finditer(r"[A-Za-z0-9]{2}", text):
        if m.start() > 0:
            return m.group()
    raise AssertionError(f"the demo's answer has no usable stop string: {text!r}")


@pytest.mark.parametrize("item", BY_KIND["request"], ids=ids)
def test_request_item_through_the_api(item, corpus, model, baseline, monkeypatch, request):
    req = resolve(item.request, corpus)
    if item.expect != "ok":
        decoded = []
        real = processor_mod.load_image
        monkeypatch.setattr(processor_mod, "load_image", lambda src: decoded.append(src) or real(src))
        expect_error(item, lambda: chat(model, req))
        if item.check == "no_decode":
            assert decoded == [], "the image count must be refused before any image is decoded"
        return
    if item.check == "context_capped":
        # 10^9 tokens are accepted and end at the context window; a window just above the
        # prompt makes that a few tokens instead of thousands.
        window = baseline.prompt_tokens + 4
        previous = model.engine.set_context_window(window)
        request.addfinalizer(lambda: model.engine.set_context_window(previous))
    a = chat(model, req)
    assert isinstance(a, Answer) and a.finish_reason in ("stop", "length")
    if item.check == "answers":
        assert a.completion_tokens >= 1
    elif item.check == "one_token":
        assert a.completion_tokens == len(a.token_ids) == 1
    elif item.check == "context_capped":
        assert a.finish_reason == "length"
        assert 1 <= a.completion_tokens and a.prompt_tokens + a.completion_tokens <= window
    elif item.check == "same_as_greedy":
        greedy = chat(model, req, temperature=0.0, seed=None)
        assert a.token_ids == greedy.token_ids
    elif item.check == "same_as_top_k_off":
        assert a.token_ids == chat(model, req, top_k=0).token_ids
    elif item.check == "stops_ignored":
        assert (a.token_ids, a.text, a.finish_reason) == (baseline.token_ids, baseline.text, baseline.finish_reason)
    elif item.check == "stop_cuts":
        stop = _stop_that_occurs(baseline.text)
        stops = list(req["sampling"]["stop"]) + [stop]
        assert len(stops) == 100
        a = chat(model, req, stop=stops)
        assert a.finish_reason == "stop"
        assert a.text == baseline.text[:baseline.text.index(stop)]
    else:
        raise AssertionError(f"unknown check {item.check!r}")


def test_pixel_budget_of_a_conversation(corpus, model, monkeypatch):
    """The images of one conversation hold at most ``max_pixels``; the image that crosses it
    is the last one decoded (64 x 48 = 3072 pixels each here)."""
    monkeypatch.setattr(model.processor, "max_pixels", 5000)
    decoded = []
    real = processor_mod.load_image
    monkeypatch.setattr(processor_mod, "load_image", lambda src: decoded.append(src) or real(src))
    with pytest.raises(errors.ImageTooLargeError, match=r"6144 pixels by image 2 of 3.*at most 5000"):
        model.chat("Compare.", images=[corpus / SMALL] * 3, max_new_tokens=1)
    assert len(decoded) == 2
    assert model.chat("Describe.", images=[corpus / SMALL], max_new_tokens=1).completion_tokens == 1


def test_high_bit_depth_conversion_in_blocks_equals_the_whole_image_formula(monkeypatch):
    """16-bit and float images are converted a block of rows at a time (bounded memory);
    the result must be the whole-image formula, also when the decisive value (a float
    above 1, which switches F to the 0..255 scale) sits in the last block."""
    monkeypatch.setattr(image_mod, "BLOCK_PIXELS", 1000)  # 100-pixel rows: 10 rows a block
    rng = np.random.default_rng(0)
    v16 = rng.integers(0, 65536, (95, 100), dtype=np.uint16)
    got = np.asarray(image_mod.load_image(Image.fromarray(v16)))[..., 0]
    assert np.array_equal(got, (v16.astype(np.int64) + 128) // 257)
    f = rng.random((95, 100), dtype=np.float32)
    f[-1, -1] = 3.0  # only the last block says "not 0..1"
    got = np.asarray(image_mod.load_image(Image.fromarray(f)))[..., 0]
    assert np.array_equal(got, np.rint(np.clip(f, 0, 255)).astype(np.uint8))
    f[-1, -1] = 1.0  # now every value is in 0..1
    got = np.asarray(image_mod.load_image(Image.fromarray(f)))[..., 0]
    assert np.array_equal(got, np.rint(f * 255).astype(np.uint8))


def test_image_limit_in_a_batch_names_the_conversation(corpus, model):
    ok = [{"role": "user", "content": "hi"}]
    many = [{"role": "user", "content": [{"type": "image", "image": str(corpus / SMALL)}] * 17}]
    with pytest.raises(errors.ConversationError, match=r"conversation 1: .*17 images; at most 16"):
        model.chat([ok, many], max_new_tokens=1)


@pytest.mark.parametrize("messages, images", [
    (None, None), (5, None),  # found by the fuzzer: None / an int gave a TypeError
    ([{"role": "user", "content": "<image> hi"}], "a.png"),  # one path, not a list: not 5 images
    ([{"role": "user", "content": "hi"}], 3),
])
def test_conversation_and_images_must_be_lists(messages, images):
    with pytest.raises(errors.ConversationError, match="list"):
        normalize_conversation(messages, images)


def test_the_model_still_answers_after_every_hostile_request(corpus, model, baseline):
    """Nothing above leaves state behind: the same request gives the same answer."""
    req = resolve(next(it for it in ITEMS if it.name == "baseline").request, corpus)
    again = chat(model, req, max_new_tokens=12)
    assert (again.token_ids, again.text) == (baseline.token_ids, baseline.text)


# --------------------------------------------------------------------------- grounding


@pytest.fixture
def no_eval(monkeypatch):
    """Model output must never reach eval / exec / compile."""

    def refuse(*args, **kwargs):
        raise AssertionError("model output was evaluated")

    for name in ("eval", "exec", "compile"):
        monkeypatch.setattr(builtins, name, refuse)


@pytest.mark.parametrize("item", BY_KIND["grounding"], ids=ids)
def test_grounding_item(item, no_eval):
    g = parse_grounding(item.text)
    assert [box for _, box in g.boxes] == [tuple(b) for b in item.boxes]
    assert bool(g.problems) == item.noted, g.problems
    assert len(g.problems) <= 51  # capped (50 notes + one "... and N more")
    j = grounding_to_json(g, W, H)
    assert len(j["boxes"]) == len(item.boxes)
    for b in j["boxes"]:
        x1, y1, x2, y2 = b["box_px"]
        assert 0 <= x1 <= x2 <= W and 0 <= y1 <= y2 <= H, b
    json.dumps(j)  # JSON-ready
    canvas = Image.new("RGB", (W, H), (9, 9, 9))
    drawn = draw_grounding(canvas, item.text)
    assert drawn.size == (W, H) and drawn.mode == "RGB"
    assert canvas.getpixel((0, 0)) == (9, 9, 9)  # the input image is not drawn on
    if item.boxes:
        assert drawn.tobytes() != canvas.tobytes()


# --------------------------------------------------------------------------- CLI

_FLOAT_FLAGS = ("temperature", "top_p", "repetition_penalty")
_INT_FLAGS = ("top_k", "max_new_tokens", "seed")


def cli_argv(item: Item, corpus: Path) -> list[str] | None:
    """``dsvl2 chat`` arguments for an item, or None when the CLI cannot express it
    (roles, several messages, values argparse rejects as a usage error, exit status 2)."""
    if item.kind == "image":
        return ["chat", "-m", "demo", "-i", str(corpus / item.file), "--max-new-tokens", "2", "Describe this image."]
    if item.kind != "request" or item.check in ("context_capped", "stop_cuts"):
        return None
    req = resolve(item.request, corpus)
    if "prompt" in req:
        prompt, images = req["prompt"], list(req.get("images") or [])
    else:
        msgs = req["messages"]
        if len(msgs) != 1 or msgs[0].get("role") != "user" or not isinstance(msgs[0].get("content"), list):
            return None
        parts = msgs[0]["content"]
        images = [p["image"] if p.get("type") == "image" else p["image_url"]["url"]  # -i takes data: URLs too
                  for p in parts if "image" in p or isinstance(p.get("image_url"), dict)]
        texts = [p["text"] for p in parts if p.get("type") == "text"]
        if len(images) + len(texts) != len(parts) or len(texts) != 1 or parts[-1].get("type") != "text":
            return None
        prompt = texts[0]
        if "<image>" in prompt:  # text in a message part, but a tag in the CLI's (reference-format) prompt
            return None
    argv = ["chat", "-m", "demo"]
    for path in images:
        argv += ["-i", path]
    for key, value in req["sampling"].items():
        flag = "--" + key.replace("_", "-")
        if key in _FLOAT_FLAGS and isinstance(value, (int, float)) and not isinstance(value, bool):
            argv.append(f"{flag}={float(value)!r}")  # '=': argparse takes "-inf" for an option
        elif key in _INT_FLAGS and isinstance(value, int) and not isinstance(value, bool):
            argv.append(f"{flag}={value}")
        elif key == "stop" and isinstance(value, list) and all(isinstance(s, str) for s in value):
            for s in value:
                argv.append(f"--stop={s}")
        else:
            return None
    return argv + ["--", prompt]


def assert_cli_outcome(item: Item, rc: int, out: str, err: str) -> None:
    assert "Traceback" not in err, err
    if item.expect == "ok":
        assert rc == 0, err
        return
    assert rc == 1, (rc, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dsvl2: error: "), err
    # the CLI names its flags (--top-p) where the API names fields (top_p)
    line = re.sub(r"--([a-z][a-z-]*)", lambda m: m.group(1).replace("-", "_"), lines[0])
    assert re.search(item.match, line, re.I | re.S), (item.match, lines[0])


CLI_ITEMS = [it for it in ITEMS if it.kind in ("image", "request")]


@pytest.mark.parametrize("item", CLI_ITEMS, ids=ids)
def test_item_through_the_cli_in_process(item, corpus, model, capsys, monkeypatch):
    argv = cli_argv(item, corpus)
    if argv is None:
        return  # not expressible on the command line; covered through the API above
    monkeypatch.setattr(api, "load", lambda *a, **k: model)
    capsys.readouterr()
    try:
        rc = main(argv)
    except SystemExit as e:
        rc = e.code
    out, err = capsys.readouterr()
    assert_cli_outcome(item, rc, out, err)
    if item.expect == "ok" and item.kind == "request":
        req = resolve(item.request, corpus)
        assert out == chat(model, req).text + "\n"  # the CLI prints what the API answers


def test_cli_expresses_a_representative_share():
    expressible = [it.name for it in CLI_ITEMS if cli_argv(it, Path("/c")) is not None]
    assert len(expressible) >= 50, expressible
    assert {"bomb_png", "images_100", "text_over_window", "sampling_temperature_nan",
            "stop_100_long"} <= set(expressible)


@pytest.mark.slow
def test_items_through_the_real_cli_process(corpus):
    """A few items through ``python -m dsvl2``: exit status, one error line, no traceback."""
    chosen = [it for it in ITEMS if it.cli]
    assert {it.expect == "ok" for it in chosen} == {True, False}  # an answer and an error
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(dsvl2.__file__).parent.parent)}
    env.pop("DSVL2_DEBUG", None)
    procs = [(it, subprocess.Popen([sys.executable, "-m", "dsvl2", *cli_argv(it, corpus)], stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True, env=env))
             for it in chosen]
    try:
        for it, p in procs:
            out, err = p.communicate(timeout=180)  # a hang guard, not a speed check
            assert_cli_outcome(it, p.returncode, out, err)
    finally:
        for _, p in procs:
            if p.poll() is None:
                p.kill()
