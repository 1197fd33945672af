"""The ``dsvl2`` command line: chat (one-shot, streamed, JSON, grounding boxes drawn),
interactive chat over piped stdin, init-random, info, and every error a user can cause.

Conventions of this file:
* Most tests call ``dsvl2.cli.main([...])`` in-process (capsys captures its output): a
  subprocess costs several seconds of torch import on a busy 2-core machine. A few tests
  at the end run the installed ``dsvl2`` console script (and ``python -m dsvl2``) to
  prove the real entry point, its exit codes and that stderr carries no traceback.
* ONE torch thread (set here and, for subprocesses, through OMP_NUM_THREADS): the models
  are about 1 M parameters, where a second OpenMP thread only makes ops wait.
* Scripted answers: ``dsvl2.engine.engine.sample_next`` is replaced so that the real
  engine (prefill, decode loop, detokeniser, stop on eos) emits chosen token ids, e.g.
  grounding markup, well-formed or hostile.
* A user error is exactly one stderr line ``dsvl2: error: ...``, exit status 1.
"""

from __future__ import annotations

import functools
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

import dsvl2.api as api
import dsvl2.engine.engine as engine_mod
from dsvl2.checkpoint import PRESETS, preset_config
from dsvl2.cli import main
from dsvl2.info import _n, describe
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
def script(monkeypatch):
    """script(ids): the engine's next sampled tokens are ``ids`` (then eos)."""

    def install(ids):
        it = iter(list(ids) + [EOS])

        def fake_sample_next(logits, params, generators, seen=None):
            assert logits.shape[0] == 1, "scripted runs hold one request"
            return torch.tensor([next(it, EOS)])

        monkeypatch.setattr(engine_mod, "sample_next", fake_sample_next)

    return install


@pytest.fixture
def stdin(monkeypatch):
    def feed(text: str):
        monkeypatch.setattr(sys, "stdin", io.StringIO(text))

    return feed


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


# --------------------------------------------------------------------------- grounding


def test_grounding_answer_becomes_pixel_boxes_and_a_drawing(capsys, script, tmp_path):
    script(tokenizer().encode(CAT))
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
    script(tokenizer().encode(CAT))
    out_png = tmp_path / "b.png"
    rc, out, err = cli(capsys, "chat", "-m", TINY, "-i", SMALL_IMAGE, "--draw", out_png, "Find the cat.")
    assert rc == 0, err
    assert out == CAT + "\n"
    assert rgb(out_png).size == rgb(SMALL_IMAGE).size


def test_draw_without_image_is_a_note(capsys, script, tmp_path):
    script(tokenizer().encode(CAT))
    rc, out, err = cli(capsys, "chat", "-m", TINY, "--json", "--draw", tmp_path / "x.png", "Find the cat.")
    assert rc == 0, err
    d = json.loads(out)
    assert d["boxes"] == [{"label": "the cat", "box_norm": [100, 200, 500, 800], "box_px": None,
                           "image_index": None}]
    assert "--draw ignored" in err and not (tmp_path / "x.png").exists()


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
    script(tokenizer().encode(markup))
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


def test_interactive_answer_with_an_image_tag_does_not_break_the_session(capsys, stdin, monkeypatch):
    ids = iter(tokenizer().encode("look <image> here") + [EOS])
    real = engine_mod.sample_next
    stdin("Hello\nSecond\n/quit\n")

    def sample(logits, *a, **k):  # scripted first answer, then the model's own greedy tokens
        try:
            return torch.tensor([next(ids)])
        except StopIteration:
            return real(logits, *a, **k)

    monkeypatch.setattr(engine_mod, "sample_next", sample)
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
    assert f": {_n(expected['params_total'])} in the checkpoint ({_n(expected['params_used'])} used" in params
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


def test_interrupt_exits_130(capsys, monkeypatch):
    def interrupted(self, *a, **k):
        raise KeyboardInterrupt
        yield

    monkeypatch.setattr(api.VLModel, "stream", interrupted)
    rc, out, err = cli(capsys, "chat", "-m", TINY, "hi")
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


def test_console_script_chat_with_the_demo(tmp_path):
    p = run(tmp_path, "chat", "-i", SMALL_IMAGE, "--max-new-tokens", "4", "Describe this image.")
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip()
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dsvl2: note:") and "RANDOM" in lines[0], p.stderr


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


def test_console_script_exit_codes(tmp_path):
    p = subprocess.run([sys.executable, "-m", "dsvl2", "--help"], capture_output=True, text=True,
                       env=_env(tmp_path), timeout=60)
    assert p.returncode == 0 and "init-random" in p.stdout and "chat" in p.stdout
    p = run(tmp_path, "chat", "--no-such-option", "hi")
    assert p.returncode == 2 and "usage:" in p.stderr and "Traceback" not in p.stderr
    p = run(tmp_path, "info", "deepseek-ai/deepseek-vl2-small", timeout=90)
    assert p.returncode == 1 and "Traceback" not in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1 and "cannot be reached" in p.stderr


def test_console_script_interactive_over_a_pipe(tmp_path):
    p = run(tmp_path, "chat", "-m", TINY, "--json", "--max-new-tokens", "3",
            stdin=f"/image {SMALL_IMAGE}\nWhat is this?\nAnd then?\n/nope\n/quit\n")
    assert p.returncode == 0, p.stderr
    a, b = [json.loads(line) for line in p.stdout.strip().splitlines()]
    assert b["usage"]["prompt_tokens"] > a["usage"]["prompt_tokens"] > 200
    assert "unknown command /nope" in p.stderr and "Traceback" not in p.stderr
