"""The ``dsvl2`` command line: chat (one-shot, streamed, JSON, grounding boxes drawn),
interactive chat over piped stdin, init-random, info, and every error a user can cause.

Conventions of this file:
* Most tests call ``dsvl2.commands.main.main([...])`` in-process (capsys captures its output): a
  subprocess costs several seconds of torch import on a busy 2-core machine. A few tests
  at the end run the installed ``dsvl2`` console script (and ``python -m dsvl2``) to
  prove the real entry point, its exit codes and that stderr carries no traceback.
* ONE torch thread (set here and, for subprocesses, through OMP_NUM_THREADS): the models
  are about 1 M parameters, where a second OpenMP thread only makes ops wait.
* Scripted answers: the ``script`` fixture (tests/conftest.py) gives the engine the CLI
  loads a sampler that returns chosen token ids, so that the real engine (prefill, decode
  loop, detokeniser, stop on eos) emits e.g. grounding markup, well-formed or hostile.
* A user error is exactly one stderr line ``dsvl2: error: ...``, exit status 1.
"""

from __future__ import annotations

import functools
import io
import json
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

import dsvl2
import dsvl2.api as api
from dsvl2.checkpoint.random_checkpoint import PRESETS, preset_config
from dsvl2.commands.main import main
from dsvl2.commands.info import describe
from dsvl2.processing import Processor, Tokenizer
from _paths import GOLDEN, IMAGES

TINY = GOLDEN / "tiny"

PHOTO = IMAGES / "monday.jpg"  # 878x620
SMALL_IMAGE = IMAGES / "multi_image_2.jpeg"  # 450x308, a short prompt
EOS = 1
CAT = "<|ref|>the cat<|/ref|><|det|>[[100, 200, 500, 800]]<|/det|>"


pytestmark = pytest.mark.usefixtures("one_thread")


@functools.lru_cache(maxsize=None)
def tokenizer() -> Tokenizer:
    return Tokenizer.from_dir(TINY)


@functools.lru_cache(maxsize=None)
def api_model(folder: Path = TINY) -> api.VLModel:
    """The model the CLI loads by default options (dtype auto, cpu)."""
    return api.load(folder, device="cpu")


def cli(capsys, *argv: str) -> tuple[int, str, str]:
    """Run ``dsvl2 ARGV`` in-process: (exit status, stdout, stderr)."""
    capsys.readouterr()
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as e:  # argparse: --help (0) and usage errors (2)
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err


def assert_error(rc: int, err: str, *words: str) -> str:
    """Exit status 1 and exactly one ``dsvl2: error:`` line (no traceback) containing ``words``."""
    assert rc == 1, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("dsvl2: error: "), err
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]


@pytest.fixture
def stdin(monkeypatch):
    def feed(text: str):
        monkeypatch.setattr(sys, "stdin", io.StringIO(text))

    return feed


@pytest.fixture
def no_load(monkeypatch):
    """Loading a model fails the test: for errors that must come before the (long) load."""

    def refuse(*a, **k):
        raise AssertionError("the model must not be loaded")

    monkeypatch.setattr(api, "load", refuse)


@pytest.fixture
def window(monkeypatch):
    """window(n): the models the CLI loads get a context window of n tokens."""

    def install(n: int):
        real = api.load

        def load(*a, **k):
            m = real(*a, **k)
            m.engine.set_context_window(n)
            return m

        monkeypatch.setattr(api, "load", load)

    return install


def rgb(path) -> Image.Image:
    with Image.open(path) as im:
        return im.convert("RGB")


# --------------------------------------------------------------------------- one-shot chat


def test_chat_without_model_uses_the_demo_and_says_so(capsys):
    rc, out, err = cli(capsys, "chat", "-i", SMALL_IMAGE, "--max-new-tokens", "4", "Describe this image.")
    assert rc == 0, err
    assert out.endswith("\n") and out.strip()
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    note = lines[0]
    assert note.startswith("dsvl2: note:") and "\r" not in err and "\x1b" not in err
    assert "RANDOM" in note.upper() and "-m" in note and "deepseek-ai/deepseek-vl2-tiny" in note


def test_chat_streams_the_same_text_as_the_api(capsys, monkeypatch):
    prompt = "What differs between these pictures?"
    expected = api_model().chat(prompt, images=[PHOTO, SMALL_IMAGE], max_new_tokens=12)

    class Recorder(io.StringIO):
        writes: list[str] = []

        def write(self, s):
            self.writes.append(s)
            return super().write(s)

    rec = Recorder()
    monkeypatch.setattr(sys, "stdout", rec)
    rc = main(["chat", "-m", str(TINY), "-i", str(PHOTO), "-i", str(SMALL_IMAGE), "--max-new-tokens", "12", prompt])
    assert rc == 0
    assert rec.getvalue() == expected.text + "\n"
    assert len([w for w in rec.writes if w.strip()]) > 1  # written piece by piece as it is generated
    assert capsys.readouterr().err == ""  # -m given: no note, and no progress bar off a terminal


def test_chat_json(capsys):
    prompt = "What differs between these pictures?"
    rc, out, err = cli(capsys, "chat", "-m", TINY, "-i", PHOTO, "-i", SMALL_IMAGE, "--max-new-tokens", "12",
                       "--json", prompt)
    assert rc == 0, err
    assert len(out.strip().splitlines()) == 1
    d = json.loads(out)
    expected = api_model().chat(prompt, images=[PHOTO, SMALL_IMAGE], max_new_tokens=12)
    assert d["text"] == expected.text
    assert d["finish_reason"] == "length"
    proc = Processor.from_pretrained(TINY)
    batch = proc([{"role": "<|User|>", "content": "<image>\n<image>\n" + prompt,
                   "images": [str(PHOTO), str(SMALL_IMAGE)]}])
    assert d["usage"] == {"prompt_tokens": batch.seq_lens[0], "completion_tokens": 12,
                          "total_tokens": batch.seq_lens[0] + 12}
    assert d["boxes"] == [] and d["grounding_problems"] == []


def test_chat_sampling_options_reach_the_engine(capsys):
    args = ["chat", "-m", TINY, "--json", "--max-new-tokens", "10", "--temperature", "1", "Tell me a story."]
    a1 = json.loads(cli(capsys, *args, "--seed", "1")[1])
    a2 = json.loads(cli(capsys, *args, "--seed", "1")[1])
    a3 = json.loads(cli(capsys, *args, "--seed", "2")[1])
    assert a1["text"] == a2["text"] != a3["text"]
    sys_ = json.loads(cli(capsys, "chat", "-m", TINY, "--json", "--max-new-tokens", "2", "--system", "Be brief.",
                          "Hello")[1])
    plain = json.loads(cli(capsys, "chat", "-m", TINY, "--json", "--max-new-tokens", "2", "Hello")[1])
    assert sys_["usage"]["prompt_tokens"] > plain["usage"]["prompt_tokens"]


@pytest.mark.filterwarnings("ignore:the built-in demo checkpoint has RANDOM weights")
def test_structured_output_options_reach_the_engine(capsys, tmp_path):
    """The real guide compiler (engine/guided.py) on the demo model: every answer keeps to
    its constraint (a random model would not by chance), and a schema keyword the compiler
    cannot enforce is the one error line that names it."""
    dishes = ["corn", "rice", "soup"]
    schema = {"type": "object", "properties": {"dish": {"enum": dishes}}, "required": ["dish"],
              "additionalProperties": False}
    path = tmp_path / "dish.json"
    path.write_text(json.dumps(schema))

    def answer(*argv) -> dict:
        rc, out, err = cli(capsys, "chat", "-m", "demo", "--json", "--max-new-tokens", "40", *argv)
        assert rc == 0, err
        a = json.loads(out)
        assert a["finish_reason"] == "stop", a
        return a

    assert json.loads(answer("--json-schema", path, "Name the dish.")["text"]) in [{"dish": d} for d in dishes]
    assert re.fullmatch("[0-9]{1,3}", answer("--regex", "[0-9]{1,3}", "How many?")["text"])
    assert answer("--choice", "yes", "--choice", "no", "A dog?")["text"] in ("yes", "no")
    unique = tmp_path / "unique.json"
    unique.write_text(json.dumps({"type": "object", "properties": {"a": {"type": "array", "uniqueItems": True}}}))
    assert_error(*cli(capsys, "chat", "-m", "demo", "--json-schema", unique, "hi")[::2], "uniqueItems")


def test_structured_output_options_are_checked_before_loading(capsys, no_load, tmp_path):
    missing = tmp_path / "nope.json"
    assert_error(*cli(capsys, "chat", "--json-schema", missing, "hi")[::2], "--json-schema", "cannot be read")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert_error(*cli(capsys, "chat", "--json-schema", bad, "hi")[::2], "--json-schema", "not valid JSON")
    arr = tmp_path / "list.json"
    arr.write_text("[1, 2]")
    assert_error(*cli(capsys, "chat", "--json-schema", arr, "hi")[::2], "--json-schema", "object")
    assert_error(*cli(capsys, "chat", "--regex", "", "hi")[::2], "--regex")
    rc, out, err = cli(capsys, "chat", "--regex", "a", "--choice", "b", "hi")
    assert rc == 2 and "not allowed with" in err  # one constraint at a time: a usage error
    rc, out, err = cli(capsys, "chat", "--help")
    assert rc == 0 and "--json-schema FILE" in out and "--choice yes --choice no" in out


# --------------------------------------------------------------------------- grounding


def test_grounding_answer_becomes_pixel_boxes_and_a_drawing(capsys, script, tmp_path):
    script(tokenizer().encode(CAT), EOS)
    out_png = tmp_path / "boxes.png"
    rc, out, err = cli(capsys, "chat", "-m", TINY, "-i", PHOTO, "-i", SMALL_IMAGE, "--json", "--draw", out_png,
                       "--max-new-tokens", "200", "<|grounding|>Find the cat.")
    assert rc == 0, err
    d = json.loads(out)
    assert d["text"] == CAT and d["finish_reason"] == "stop"
    W, H = rgb(SMALL_IMAGE).size  # the LAST image, in its original size
    x1, y1, x2, y2 = int(100 / 999 * W), int(200 / 999 * H), int(500 / 999 * W), int(800 / 999 * H)
    assert d["boxes"] == [{"label": "the cat", "box_norm": [100, 200, 500, 800], "box_px": [x1, y1, x2, y2],
                           "image_index": 1}]
    assert d["grounding_problems"] == []
    assert "1 box(es) drawn" in err and "Traceback" not in err

    drawn, original = rgb(out_png), rgb(SMALL_IMAGE)
    assert drawn.size == (W, H)
    my, mx = (y1 + y2) // 2, (x1 + x2) // 2
    for p in [(x1, my), (x2, my), (mx, y2), (x1 + 1, my + 5), (x2 - 1, my - 5)]:  # on the outline
        assert drawn.getpixel(p) != original.getpixel(p), p
    assert drawn.getpixel((mx, my)) == original.getpixel((mx, my))  # the inside is not filled
    assert drawn.getpixel((2, H - 3)) == original.getpixel((2, H - 3))  # far from the box


def test_grounding_streamed_text_and_draw_without_json(capsys, script, tmp_path):
    script(tokenizer().encode(CAT), EOS)
    out_png = tmp_path / "b.png"
    rc, out, err = cli(capsys, "chat", "-m", TINY, "-i", SMALL_IMAGE, "--draw", out_png, "Find the cat.")
    assert rc == 0, err
    assert out == CAT + "\n"
    assert rgb(out_png).size == rgb(SMALL_IMAGE).size


def test_draw_without_image_is_a_note(capsys, script, tmp_path):
    script(tokenizer().encode(CAT), EOS)
    rc, out, err = cli(capsys, "chat", "-m", TINY, "--json", "--draw", tmp_path / "x.png", "Find the cat.")
    assert rc == 0, err
    d = json.loads(out)
    assert d["boxes"] == [{"label": "the cat", "box_norm": [100, 200, 500, 800], "box_px": None,
                           "image_index": None}]
    assert "--draw ignored" in err and not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("kind", ["missing folder", "unknown extension", "no extension", "a folder"])
def test_draw_is_checked_before_the_model_loads(kind, capsys, tmp_path, no_load):
    target = {"missing folder": tmp_path / "no-such-dir" / "boxes.png", "unknown extension": tmp_path / "boxes.xyz",
              "no extension": tmp_path / "boxes", "a folder": tmp_path}[kind]
    rc, out, err = cli(capsys, "chat", "-m", TINY, "-i", SMALL_IMAGE, "--draw", target, "Find the cat.")
    line = assert_error(rc, err, "--draw", str(target))
    if kind == "missing folder":
        assert "no-such-dir" in line and "does not exist" in line
    elif kind == "a folder":
        assert "is a folder" in line
    else:
        assert ("'.xyz'" if kind == "unknown extension" else "no file extension") in line
        for ext in (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tiff"):  # what Pillow can save
            assert ext in line.split(";")[-1], ext
        assert ".xbm" not in line  # XBM holds 1-bit images only: Pillow cannot save the drawing as one
    assert out == ""


def test_draw_as_jpeg(capsys, script, tmp_path):
    script(tokenizer().encode(CAT), EOS)
    out_jpg = tmp_path / "boxes.JPG"
    rc, out, err = cli(capsys, "chat", "-m", TINY, "-i", SMALL_IMAGE, "--draw", out_jpg, "Find the cat.")
    assert rc == 0, err
    with Image.open(out_jpg) as im:
        assert im.format == "JPEG" and im.size == rgb(SMALL_IMAGE).size


@pytest.mark.parametrize("kind", ["missing", "text file", "directory"])
def test_images_are_checked_before_the_model_loads(kind, capsys, tmp_path, no_load):
    path = tmp_path / "phot.jpg"  # a typo of photo.jpg
    if kind == "text file":
        path.write_text("not a picture")
    elif kind == "directory":
        path.mkdir()
    rc, out, err = cli(capsys, "chat", "-m", TINY, "-i", SMALL_IMAGE, "-i", path, "Describe.")
    line = assert_error(rc, err, "phot.jpg")
    assert {"missing": "not found", "text file": "not an image", "directory": "not a file"}[kind] in line
    # interactive mode checks them before loading too
    rc, out, err = cli(capsys, "chat", "-m", TINY, "-i", path)
    assert_error(rc, err, "phot.jpg")


HOSTILE = "__import__('pathlib').Path('PWNED').touch()"
MALFORMED = {
    "unclosed det and box": "<|ref|>cat<|/ref|><|det|>[[10, 20, 30",
    "unclosed ref": "<|ref|>cat<|det|>[[1, 2, 3, 4]]<|/det|> and more",
    "non-numbers": "<|ref|>cat<|/ref|><|det|>[[a, b, c, d]]<|/det|>",
    "three numbers": "<|ref|>cat<|/ref|><|det|>[[1, 2, 3]]<|/det|>",
    "huge number": "<|ref|>cat<|/ref|><|det|>[[1" + "0" * 50 + ", 5, 6, 7]]<|/det|>",
    "power expression": "<|ref|>cat<|/ref|><|det|>[[10**50, 1, 2, 3]]<|/det|>",
    "code": f"<|ref|>cat<|/ref|><|det|>[[{HOSTILE}, 1, 2, 3]]<|/det|>",
    "code as the whole list": f"<|ref|>cat<|/ref|><|det|>{HOSTILE}<|/det|>",
    "stray closers": "<|/det|><|/ref|><|det|><|det|>[[]]",
}


@pytest.mark.parametrize("name", list(MALFORMED))
def test_malformed_grounding_never_raises_nor_executes(name, capsys, script, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # where the hostile markup would create PWNED
    markup = MALFORMED[name]
    script(tokenizer().encode(markup), EOS)
    rc, out, err = cli(capsys, "chat", "-m", TINY, "-i", SMALL_IMAGE, "--json", "--draw", "out.png",
                       "--max-new-tokens", "300", "<|grounding|>Find the cat.")
    assert rc == 0, err
    assert "Traceback" not in err and "error" not in err
    d = json.loads(out)
    assert d["text"] == markup
    assert d["grounding_problems"], d  # each problem is reported ...
    assert "dsvl2: note: grounding markup:" in err  # ... on stderr too
    W, H = rgb(SMALL_IMAGE).size
    for b in d["boxes"]:  # whatever survives is a valid box on the image
        x1, y1, x2, y2 = b["box_norm"]
        assert 0 <= x1 <= x2 <= 999 and 0 <= y1 <= y2 <= 999
        assert b["box_px"] == [int(x1 / 999 * W), int(y1 / 999 * H), int(x2 / 999 * W), int(y2 / 999 * H)]
    if name == "huge number":
        assert d["boxes"][0]["box_norm"] == [6, 5, 999, 7]  # clamped to 999, corners put in order
    assert rgb("out.png").size == (W, H)
    assert not (tmp_path / "PWNED").exists()


# --------------------------------------------------------------------------- interactive


def test_interactive_session(capsys, stdin):
    stdin(f"/image {SMALL_IMAGE}\n"
          "What is in this picture?\n"
          "\n"
          "And what colour is it?\n"
          "/bogus command\n"
          "/image\n"
          f"/image {IMAGES / 'no-such.jpg'}\n"
          "/reset\n"
          "Hello again\n"
          "/quit\n"
          "never answered\n")
    rc, out, err = cli(capsys, "chat", "-m", TINY, "--json", "--max-new-tokens", "5")
    assert rc == 0, err
    answers = [json.loads(line) for line in out.strip().splitlines()]
    assert len(answers) == 3  # "/quit" ended the session before the last line
    first, second, third = answers

    proc = Processor.from_pretrained(TINY)
    turn1 = {"role": "<|User|>", "content": "<image>\nWhat is in this picture?", "images": [str(SMALL_IMAGE)]}
    assert first["usage"]["prompt_tokens"] == proc([turn1]).seq_lens[0]
    # the history is kept, the first turn's image still attached
    conv = [turn1, {"role": "<|Assistant|>", "content": first["text"]},
            {"role": "<|User|>", "content": "And what colour is it?"}]
    assert second["usage"]["prompt_tokens"] == proc(conv).seq_lens[0]
    assert second["usage"]["prompt_tokens"] > first["usage"]["prompt_tokens"] + first["usage"]["completion_tokens"]
    text_only = [{**turn1, "content": "What is in this picture?", "images": []}] + conv[1:]
    assert second["usage"]["prompt_tokens"] > proc(text_only).seq_lens[0] + 100  # the image tokens
    # after /reset: a fresh conversation, no image
    assert third["usage"]["prompt_tokens"] == proc([{"role": "<|User|>", "content": "Hello again"}]).seq_lens[0]

    assert "dsvl2: error: unknown command /bogus" in err
    assert "dsvl2: error: /image needs a path" in err
    assert "dsvl2: error: image file not found" in err and "no-such.jpg" in err
    assert "conversation reset" in err
    assert "Traceback" not in err


def test_interactive_end_of_input_and_a_failing_turn(capsys, stdin):
    # 11 images do not fit the 4096-token window: that turn fails, the session goes on
    many = "".join(f"/image {PHOTO}\n" for _ in range(11))
    stdin(many + "Too many?\n/reset\nShort one\n")  # no /quit: end of input ends the session
    rc, out, err = cli(capsys, "chat", "-m", TINY, "--json", "--max-new-tokens", "2")
    assert rc == 0, err
    answers = [json.loads(line) for line in out.strip().splitlines()]
    assert len(answers) == 1 and answers[0]["usage"]["prompt_tokens"] < 20
    assert "dsvl2: error:" in err and "4096" in err and "Traceback" not in err


def test_interactive_answer_with_an_image_tag_does_not_break_the_session(capsys, stdin, script):
    script(tokenizer().encode("look <image> here") + [EOS])  # then the model's own greedy tokens
    stdin("Hello\nSecond\n/quit\n")
    rc, out, err = cli(capsys, "chat", "-m", TINY, "--json", "--max-new-tokens", "10")
    assert rc == 0, err
    answers = [json.loads(line) for line in out.strip().splitlines()]
    assert answers[0]["text"] == "look <image> here"
    assert len(answers) == 2, err
    assert "error" not in err


def test_interactive_rejects_bad_options_before_the_session(capsys, stdin, monkeypatch):
    def no_load(*a, **k):
        raise AssertionError("the model must not be loaded for bad options")

    monkeypatch.setattr(api, "load", no_load)
    stdin("Hello\nHello\n/quit\n")
    rc, out, err = cli(capsys, "chat", "-m", TINY, "--temperature", "-1")
    assert_error(rc, err, "temperature", "-1")
    assert out == ""


def test_interactive_image_command_strips_quotes_and_expands_home(capsys, stdin, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    shutil.copy(SMALL_IMAGE, tmp_path / "my photo.jpeg")
    stdin("/image '~/my photo.jpeg'\nWhat?\n/reset\n"
          '/image "~/my photo.jpeg"\nWhat?\n/reset\n'
          "/image ~/my photo.jpeg\nWhat?\n/quit\n")
    rc, out, err = cli(capsys, "chat", "-m", TINY, "--json", "--max-new-tokens", "2")
    assert rc == 0, err
    answers = [json.loads(line) for line in out.strip().splitlines()]
    n = Processor.from_pretrained(TINY)([{"role": "<|User|>", "content": "<image>\nWhat?",
                                          "images": [str(SMALL_IMAGE)]}]).seq_lens[0]
    assert [a["usage"]["prompt_tokens"] for a in answers] == [n, n, n]
    assert err.count(f"{tmp_path / 'my photo.jpeg'} will be attached") == 3
    assert "error" not in err


def _user(text: str, images=()) -> dict:
    return {"role": "<|User|>", "content": "<image>\n" * len(images) + text, "images": [str(p) for p in images]}


def test_interactive_drops_the_oldest_exchanges_that_no_longer_fit(capsys, stdin, window):
    proc = Processor.from_pretrained(TINY)
    system = {"role": "system", "content": "Be brief."}
    first = _user("Describe.", [SMALL_IMAGE])
    n1 = proc([system, first]).seq_lens[0]
    # room for 5 answer tokens (--max-new-tokens 5) and 3 more: the image turn fits alone, nothing after it
    window(n1 + 5 + 3)
    stdin(f"/image {SMALL_IMAGE}\nDescribe.\nHi\nAgain\n/quit\n")
    rc, out, err = cli(capsys, "chat", "-m", TINY, "--json", "--max-new-tokens", "5", "--system", "Be brief.")
    assert rc == 0, err
    a1, a2, a3 = [json.loads(line) for line in out.strip().splitlines()]
    assert a1["usage"]["prompt_tokens"] == n1
    # "Hi": the image exchange is dropped, the system message stays
    assert a2["usage"]["prompt_tokens"] == proc([system, _user("Hi")]).seq_lens[0]
    # "Again": what is left still fits, nothing more is dropped
    conv = [system, _user("Hi"), {"role": "<|Assistant|>", "content": a2["text"].replace("<image>", "")},
            _user("Again")]
    assert a3["usage"]["prompt_tokens"] == proc(conv).seq_lens[0]
    notes = [line for line in err.splitlines() if "no longer fit" in line]
    assert len(notes) == 1 and "dropped the 1 oldest exchange" in notes[0] and "/reset" in notes[0], err
    assert f"{n1 + 8}-token context window" in notes[0]


def test_interactive_message_that_does_not_fit_alone_is_not_sent(capsys, stdin, window):
    proc = Processor.from_pretrained(TINY)
    n_one = proc([_user("Describe.", [SMALL_IMAGE])]).seq_lens[0]
    two = proc([_user("Two?", [SMALL_IMAGE, PHOTO])]).seq_lens[0]
    assert two > n_one + 100
    window(n_one + 50)
    stdin(f"Hi\n/image {SMALL_IMAGE}\n/image {PHOTO}\nTwo?\nAgain\n/quit\n")
    rc, out, err = cli(capsys, "chat", "-m", TINY, "--json", "--max-new-tokens", "5")
    assert rc == 0, err
    hi, again = [json.loads(line) for line in out.strip().splitlines()]
    errors = [line for line in err.splitlines() if line.startswith("dsvl2: error:")]
    assert len(errors) == 1, err
    assert f"needs {two} prompt tokens" in errors[0] and f"context window of {n_one + 50} tokens" in errors[0]
    assert "not sent" in errors[0] and "/reset" in errors[0] and "2 image(s) were dropped" in errors[0]
    assert "no longer fit" not in err  # nothing was dropped from the history for it
    conv = [_user("Hi"), {"role": "<|Assistant|>", "content": hi["text"].replace("<image>", "")}, _user("Again")]
    assert again["usage"]["prompt_tokens"] == proc(conv).seq_lens[0]


# --------------------------------------------------------------------------- init-random, info


def test_init_random_info_and_chat(capsys, tmp_path):
    out_dir = tmp_path / "rand-tiny"
    rc, out, err = cli(capsys, "init-random", "--preset", "tiny", "--scale", "0.05", out_dir)
    assert rc == 0, err
    assert "wrote a random tiny checkpoint" in out and str(out_dir) in out
    assert (out_dir / "config.json").is_file() and (out_dir / "model.safetensors").is_file()
    expected = describe(preset_config("tiny", 0.05))

    rc, out, err = cli(capsys, "info", out_dir)
    assert rc == 0, err
    params = next(line for line in out.splitlines() if line.startswith("parameters"))
    # "parameters: 15.2M in the checkpoint (4.1M used ...": 3 significant digits and a unit
    m = re.search(r": ([\d.]+)([BMK]?) in the checkpoint \(([\d.]+)([BMK]?) used", params)
    assert m, params
    scale = {"B": 1e9, "M": 1e6, "K": 1e3, "": 1}
    assert float(m[1]) * scale[m[2]] == pytest.approx(expected["params_total"], rel=5e-3)
    assert float(m[3]) * scale[m[4]] == pytest.approx(expected["params_used"], rel=5e-3)
    assert str(out_dir) in out

    rc, out, err = cli(capsys, "info", "--json", out_dir)
    assert rc == 0, err
    d = json.loads(out)
    assert d["params_total"] == expected["params_total"] and d["params_used"] == expected["params_used"]
    assert d["weights"]["params_in_files"] == expected["params_total"]  # every tensor written, attn_pool too
    assert d["weights"]["dtype"] == "bfloat16"

    rc, out, err = cli(capsys, "chat", "-m", out_dir, "--json", "--max-new-tokens", "3", "hi")
    assert rc == 0, err
    a = json.loads(out)
    assert 1 <= a["usage"]["completion_tokens"] <= 3 and a["usage"]["prompt_tokens"] > 1

    # a second write into the same folder needs --overwrite
    rc, out, err = cli(capsys, "init-random", "--preset", "tiny", "--scale", "0.05", out_dir)
    assert_error(rc, err, "--overwrite")


@pytest.mark.parametrize("variant, published", [("tiny", 3.37e9), ("small", 16.1e9), ("base", 27.5e9)])
def test_info_of_the_real_configs(variant, published, capsys, tmp_path):
    cfg = preset_config(variant)
    assert abs(describe(cfg)["params_total"] / published - 1) < 0.015
    (tmp_path / "config.json").write_text(json.dumps(cfg))  # the config only, no weights
    rc, out, err = cli(capsys, "info", tmp_path)
    assert rc == 0, err
    rows = {k.strip(): v for k, v in (line.split(" : ", 1) for line in out.splitlines())}
    assert rows["variant"] == variant
    params = rows["parameters"]
    shown = float(params.split("B in the checkpoint")[0])
    assert abs(shown * 1e9 / published - 1) < 0.015, params
    assert "as an official bf16 checkpoint" in out


def test_info_demo_json(capsys):
    rc, out, err = cli(capsys, "info", "--json", "demo")
    assert rc == 0, err
    d = json.loads(out)
    assert d["params_total"] == d["weights"]["params_in_files"] > 0


def test_info_names_the_quantised_products_variant(capsys):
    """The instruction set of the int8 / int4 decode products on this machine: the variant
    the kernels report (the CPU's highest), in the JSON and on its own line."""
    from dsvl2.model import native

    rc, out, err = cli(capsys, "info", "--json", "demo")
    assert rc == 0, err
    want = native.quant_variant() if native.available() else None
    assert json.loads(out)["native_decode"]["quant_variant"] == want
    rc, out, err = cli(capsys, "info", "demo")
    assert rc == 0, err
    if want:
        line = next(x for x in out.splitlines() if x.startswith("int8 / int4 decode"))
        assert want in line and ("integer digits" in line) == (want in ("avx512-vnni", "avx2-digits"))


def test_info_says_where_the_routed_experts_prefill_runs(capsys, monkeypatch):
    """AMX tiles where the kernels grant them (``native.amx``), else oneDNN; off by its switch."""
    from dsvl2.model.native import amx

    for on in (True, False):
        monkeypatch.setattr(amx, "enabled", on)
        rc, out, err = cli(capsys, "info", "--json", "demo")
        assert rc == 0, err
        d = json.loads(out)
        assert d["amx_experts"] == (on and amx.usable())
        rc, out, err = cli(capsys, "info", "demo")
        lines = [x for x in out.splitlines() if x.startswith("expert prefill")]
        if d["kernels"]["big_products"] == "bf16":
            assert len(lines) == 1 and ("AMX tiles" in lines[0]) == d["amx_experts"]
        else:
            assert not lines


def test_info_without_a_model_shows_the_demo(capsys):
    demo = cli(capsys, "info", "demo")
    rc, out, err = cli(capsys, "info")
    assert rc == 0 and demo[0] == 0, err
    assert out == demo[1] and "demo" in out
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dsvl2: note:") and "demo" in lines[0]


# --------------------------------------------------------------------------- errors


def test_missing_model_folder(capsys, tmp_path):
    assert_error(*cli(capsys, "chat", "-m", tmp_path / "nope", "hi")[::2], "not found", "nope")
    assert_error(*cli(capsys, "info", tmp_path / "nope")[::2], "not found")
    assert_error(*cli(capsys, "chat", "-m", tmp_path, "hi")[::2], "no config.json")


@pytest.mark.parametrize("kind", ["missing", "text file", "truncated", "empty", "directory"])
def test_bad_images(kind, capsys, tmp_path):
    path = tmp_path / "photo.jpg"
    if kind == "text file":
        path.write_text("this is not a picture\n")
    elif kind == "truncated":
        data = PHOTO.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "directory":
        path.mkdir()
    rc, out, err = cli(capsys, "chat", "-m", TINY, "-i", SMALL_IMAGE, "-i", path, "Describe.")
    line = assert_error(rc, err, "photo.jpg")
    words = {"missing": "not found", "text file": "not an image", "truncated": "truncated",
             "empty": "not an image", "directory": "not a file"}
    assert words[kind] in line
    assert out == ""


def test_too_many_images_for_the_context_window(capsys):
    images = [PHOTO] * 11
    n = Processor.from_pretrained(TINY)([{"role": "<|User|>", "content": "<image>\n" * 11 + "Compare.",
                                          "images": [str(p) for p in images]}]).seq_lens[0]
    assert n > 4096
    argv = ["chat", "-m", TINY] + [a for p in images for a in ("-i", p)] + ["Compare."]
    assert_error(*cli(capsys, *argv)[::2], f"{n} prompt tokens", "4096")


@pytest.mark.parametrize("option, value, word", [
    ("--temperature", "-1", "--temperature"),
    ("--temperature", "nan", "--temperature"),
    ("--top-p", "0", "--top-p"),
    ("--top-p", "1.5", "--top-p"),
    ("--top-k", "-1", "--top-k"),
    ("--repetition-penalty", "0", "--repetition-penalty"),
    ("--max-new-tokens", "0", "--max-new-tokens"),
    ("--chunk-size", "0", "--chunk-size"),
])
def test_bad_sampling_values(option, value, word, capsys):
    assert_error(*cli(capsys, "chat", "-m", TINY, option, value, "hi")[::2], word)


def test_bad_sampling_values_are_rejected_before_loading(capsys, monkeypatch):
    def no_load(*a, **k):
        raise AssertionError("bad options must be rejected before the model is loaded")

    monkeypatch.setattr(api, "load", no_load)
    assert_error(*cli(capsys, "chat", "-m", TINY, "--top-p", "0", "hi")[::2], "--top-p")
    assert_error(*cli(capsys, "chat", "-m", TINY, "--chunk-size", "-4", "hi")[::2], "--chunk-size")


def test_bad_dtype_or_device(capsys):
    assert_error(*cli(capsys, "chat", "-m", TINY, "--device", "tpu", "hi")[::2], "unknown device", "tpu")
    rc, out, err = cli(capsys, "chat", "-m", TINY, "--dtype", "int8", "hi")
    assert rc == 2 and "invalid choice" in err  # argparse: a usage error


def test_init_random_errors(capsys, tmp_path):
    line = assert_error(*cli(capsys, "init-random", "--preset", "huge", tmp_path / "x")[::2], "unknown preset",
                        "'huge'")
    for name in PRESETS:
        assert name in line
    assert_error(*cli(capsys, "init-random", "--preset", "tiny", "--scale", "0", tmp_path / "x")[::2], "--scale")
    assert_error(*cli(capsys, "init-random", "--preset", "tiny", "--scale", "2", tmp_path / "x")[::2], "--scale")
    assert not (tmp_path / "x").exists()


def test_help_and_usage_errors(capsys):
    rc, out, err = cli(capsys, "--help")
    assert rc == 0
    for command in ("chat", "init-random", "info"):
        assert command in out
    rc, out, err = cli(capsys, "chat", "--help")
    assert rc == 0 and "/image PATH" in out and "RANDOM" in out and "--draw" in out
    rc, out, err = cli(capsys)
    assert rc == 2 and "usage:" in err
    rc, out, err = cli(capsys, "chat", "--no-such-option", "hi")
    assert rc == 2 and "unrecognized arguments" in err
    rc, out, err = cli(capsys, "chat", "--temperature", "hot", "hi")
    assert rc == 2 and "invalid float value" in err


def test_help_shows_the_defaults_and_keeps_the_examples(capsys):
    rc, out, err = cli(capsys, "chat", "--help")
    assert rc == 0
    flat = " ".join(out.split())  # help lines wrap at the terminal width
    for option, default in [("--max-new-tokens N", "512"), ("--temperature TEMPERATURE", "0.0"),
                            ("--top-p TOP_P", "1.0"), ("--top-k TOP_K", "0"),
                            ("--repetition-penalty REPETITION_PENALTY", "1.0"), ("--dtype", "auto"),
                            ("--device DEVICE", "auto")]:
        start = flat.index(option, flat.index("options:"))
        end = flat.index(" --", start + len(option)) if " --" in flat[start + len(option):] else len(flat)
        assert f"(default: {default})" in flat[start:end], (option, flat[start:end])
    assert "(default: False)" not in out and "(default: None)" not in out and "(default: [])" not in out
    # the epilog keeps its line breaks
    assert '\n  dsvl2 chat -i photo.jpg "Describe this image."\n' in out
    rc, out, err = cli(capsys, "init-random", "--help")
    flat = " ".join(out.split())
    assert rc == 0 and "(default: 1.0)" in flat and "(default: bfloat16)" in flat


def test_version(capsys):
    rc, out, err = cli(capsys, "--version")
    assert rc == 0 and out == f"dsvl2 {dsvl2.__version__}\n"


class _Refused(Exception):
    pass


def _fake_hub(monkeypatch, error: BaseException):
    """huggingface_hub.snapshot_download: nothing cached, and downloading raises ``error``."""
    import huggingface_hub

    def snapshot_download(repo_id, allow_patterns=None, local_files_only=False):
        if local_files_only:
            raise FileNotFoundError(f"{repo_id} is not cached")
        raise error

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)


def _sentence(line: str) -> str:
    msg = line[len("dsvl2: error: "):]
    assert msg.endswith(".") and "Got:" not in msg and "\n" not in msg, msg
    return msg


def test_unreachable_hub_error_is_a_whole_sentence(capsys, monkeypatch):
    try:  # the chain huggingface_hub raises: hub error <- httpx ConnectError <- socket error
        try:
            raise socket.gaierror(-2, "Name or service not known")
        except socket.gaierror as e:
            raise ConnectionError("[Errno -2] Name or service not known") from e
    except ConnectionError as e:
        wrapped = OSError("Got: ConnectError: [Errno -2] Name or service not known\nAn error happened while")
        wrapped.__cause__ = e
    _fake_hub(monkeypatch, wrapped)
    msg = _sentence(assert_error(*cli(capsys, "info", "deepseek-ai/deepseek-vl2-tiny")[::2]))
    assert msg == ("cannot download deepseek-ai/deepseek-vl2-tiny: the Hugging Face hub cannot be reached from this "
                   "machine (Name or service not known). To use a local copy instead, download it on a machine with "
                   "internet access (hf download deepseek-ai/deepseek-vl2-tiny --local-dir DIR), copy the folder "
                   "here and pass the folder instead of the id: dsvl2 chat -m DIR.")


def test_offline_hub_error_is_a_whole_sentence(capsys, monkeypatch):
    import huggingface_hub.constants

    _fake_hub(monkeypatch, AssertionError("offline mode must not try the network"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    msg = _sentence(assert_error(*cli(capsys, "chat", "-m", "deepseek-ai/deepseek-vl2-small", "hi")[::2]))
    assert msg.startswith("deepseek-ai/deepseek-vl2-small is not in the local Hugging Face cache and offline mode "
                          "is on (HF_HUB_OFFLINE), so it cannot be downloaded. Unset HF_HUB_OFFLINE")
    assert "dsvl2 chat -m DIR" in msg


def test_refused_download_error_cuts_the_reason_at_a_word(capsys, monkeypatch):
    long = ("404 Client Error. Repository Not Found for url: https://huggingface.co/api/models/deepseek-ai/"
            "deepseek-vl2-tinyy/revision/main. Please make sure you specified the correct repo_id and repo_type.")
    _fake_hub(monkeypatch, _Refused(long))
    msg = _sentence(assert_error(*cli(capsys, "info", "deepseek-ai/deepseek-vl2-tinyy")[::2]))
    reason = msg[msg.index("(") + 1:msg.index(" ...)")]
    assert len(reason) > 30 and long.startswith(reason) and long[len(reason)] in " :"  # cut between words
    assert "refused or failed" in msg and "deepseek-ai/deepseek-vl2-tiny," in msg and "-m DIR" in msg


def test_interrupt_exits_130(capsys, monkeypatch):
    class CtrlC(io.StringIO):  # Ctrl-C arrives while the answer is being printed
        def write(self, s):
            raise KeyboardInterrupt

    monkeypatch.setattr(sys, "stdout", CtrlC())
    rc = main(["chat", "-m", str(TINY), "hi"])
    err = capsys.readouterr().err
    assert rc == 130 and "interrupted" in err and "Traceback" not in err


def test_broken_pipe_is_quiet(capsys, monkeypatch):
    class ClosedPipe(io.StringIO):
        def write(self, s):
            raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(sys, "stdout", ClosedPipe())
    rc = main(["info", "--json", "demo"])
    if getattr(sys.stdout, "name", None) == os.devnull:  # main parked stdout there; monkeypatch restores it
        sys.stdout.close()
    assert rc == 0
    assert capsys.readouterr().err == ""


# --------------------------------------------------------------------------- the real entry point


def _env(tmp_path) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "DSVL2_DEBUG"}
    env.update(OMP_NUM_THREADS="1", HF_HOME=str(tmp_path / "hf-home"), HF_HUB_ETAG_TIMEOUT="3",
               HF_HUB_DOWNLOAD_TIMEOUT="3", HF_HUB_DISABLE_TELEMETRY="1")
    env.pop("HF_HUB_OFFLINE", None)
    return env


def _console_script() -> str:
    exe = Path(sys.executable).with_name("dsvl2")
    return str(exe) if exe.is_file() else "dsvl2"


def run(tmp_path, *argv, stdin: str | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([_console_script(), *map(str, argv)], input=stdin, capture_output=True, text=True,
                          env=_env(tmp_path), timeout=timeout, cwd=tmp_path)


@pytest.mark.slow
def test_console_script_chat_with_the_demo(tmp_path):
    p = run(tmp_path, "chat", "-i", SMALL_IMAGE, "--max-new-tokens", "4", "Describe this image.")
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip()
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dsvl2: note:") and "RANDOM" in lines[0], p.stderr


@pytest.mark.slow
def test_console_script_unreachable_hub(tmp_path):
    p = run(tmp_path, "chat", "-m", "deepseek-ai/deepseek-vl2-tiny", "hi", timeout=90)  # must not hang
    assert p.returncode == 1 and p.stdout == ""
    assert "Traceback" not in p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1, p.stderr
    line = lines[0]
    assert line.startswith("dsvl2: error: ") and "deepseek-ai/deepseek-vl2-tiny" in line
    assert "Hugging Face hub cannot be reached" in line
    assert "-m DIR" in line and "folder" in line


@pytest.mark.slow
def test_console_script_exit_codes(tmp_path):
    p = subprocess.run([sys.executable, "-m", "dsvl2", "--help"], capture_output=True, text=True,
                       env=_env(tmp_path), timeout=60)
    assert p.returncode == 0 and "init-random" in p.stdout and "chat" in p.stdout
    p = run(tmp_path, "chat", "--no-such-option", "hi")
    assert p.returncode == 2 and "usage:" in p.stderr and "Traceback" not in p.stderr
    p = run(tmp_path, "info", "deepseek-ai/deepseek-vl2-small", timeout=90)
    assert p.returncode == 1 and "Traceback" not in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1 and "cannot be reached" in p.stderr


@pytest.mark.slow
def test_console_script_interactive_over_a_pipe(tmp_path):
    p = run(tmp_path, "chat", "-m", TINY, "--json", "--max-new-tokens", "3",
            stdin=f"/image {SMALL_IMAGE}\nWhat is this?\nAnd then?\n/nope\n/quit\n")
    assert p.returncode == 0, p.stderr
    a, b = [json.loads(line) for line in p.stdout.strip().splitlines()]
    assert b["usage"]["prompt_tokens"] > a["usage"]["prompt_tokens"] > 200
    assert "unknown command /nope" in p.stderr and "Traceback" not in p.stderr


def _read_until(fd: int, done, timeout: float = 120) -> bytes:
    """Bytes read from a pipe until ``done(bytes_so_far)``; the wait is bounded by ``timeout``."""
    data = b""
    deadline = time.monotonic() + timeout
    while not done(data):
        left = deadline - time.monotonic()
        assert left > 0, f"gave up waiting after {timeout} s; read so far: {data[-300:]!r}"
        if select.select([fd], [], [], left)[0]:
            chunk = os.read(fd, 65536)
            assert chunk, f"the pipe closed early; read so far: {data[-300:]!r}"
            data += chunk
    return data


def _default_sigint() -> None:
    # A child inherits an ignored SIGINT, and Python then leaves it ignored (as `nohup` wants);
    # an earlier test in the same pytest process (Ray's) can leave it so. A terminal user's
    # dsvl2 has the default, which is what these tests are about.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _interactive_process(tmp_path, *argv) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "dsvl2", "chat", *map(str, argv)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env(tmp_path), cwd=tmp_path,
                            preexec_fn=_default_sigint)


@pytest.mark.slow
def test_ctrl_c_stops_the_answer_and_the_session_goes_on(tmp_path):
    demo = api_model("demo")
    story, question = "Tell me a long story", "What is this?"
    # The first answer must still be running when Ctrl-C comes (right after its first
    # piece of text): the demo's greedy answer to it has no eos and no stop string early.
    head = demo.chat(story, max_new_tokens=64)
    assert head.finish_reason == "length"
    # The second answer ends at a stop string taken from its own greedy text.
    words = demo.chat(question, max_new_tokens=12).text.split()
    stop = next(w for w in words[1:] if len(w) >= 3 and w not in head.text)
    expected = demo.chat(question, max_new_tokens=100000, stop=[stop])
    assert expected.finish_reason == "stop" and expected.text.strip()

    p = _interactive_process(tmp_path, "-m", "demo", "--max-new-tokens", "100000", "--stop", stop)
    try:
        p.stdin.write(story.encode() + b"\n")
        p.stdin.flush()
        first = _read_until(p.stdout.fileno(), lambda data: len(data) > 0)  # the answer is streaming
        p.send_signal(signal.SIGINT)
        rest, err = p.communicate(question.encode() + b"\n/quit\n", timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(timeout=30)
    out, err = (first + rest).decode(), err.decode()
    assert p.returncode == 0, err
    assert "Traceback" not in err
    assert err.count("answer interrupted") == 1, err
    assert out.endswith("\n" + expected.text + "\n"), out[-300:]
    partial = out[:-len(expected.text) - 2]
    assert partial and (head.text.startswith(partial) or partial.startswith(head.text))  # what had streamed


@pytest.mark.slow
def test_ctrl_c_at_the_prompt_ends_the_session(tmp_path):
    p = _interactive_process(tmp_path, "-m", TINY, "--max-new-tokens", "2")
    try:
        p.stdin.write(b"/nope\n")
        p.stdin.flush()
        err = _read_until(p.stderr.fileno(), lambda data: b"unknown command /nope" in data)
        p.send_signal(signal.SIGINT)  # the session waits at the prompt now
        out, rest = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(timeout=30)
    assert p.returncode == 0, (err + rest).decode()
    assert out == b"" and b"Traceback" not in err + rest


def test_help_imports_neither_torch_nor_the_servers():
    """`dsvl2 --help` and every subcommand's --help build the parser only: torch, FastAPI and
    Ray are imported when a command runs (seconds of start-up otherwise)."""
    code = ("import sys, contextlib, io\nfrom dsvl2.commands.main import main\n"
            "for argv in (['--help'], ['chat', '--help'], ['serve', '--help'], ['batch', '--help'],"
            " ['quantize', '--help'], ['info', '--help'], ['init-random', '--help']):\n"
            "    with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
            "        main(argv)\n"
            "print(sorted({'torch', 'fastapi', 'ray', 'uvicorn'} & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
