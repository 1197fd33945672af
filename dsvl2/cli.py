"""The ``dsvl2`` command line: chat, init-random, info.

Exit status: 0 success, 1 an error the user can fix (bad model, image, option values,
prompt too long...), 2 a usage error (unknown option, missing argument), 130
interrupted. Errors are one line on stderr (``dsvl2: error: ...``), never a traceback;
``DSVL2_DEBUG=1`` shows the traceback too.

Notable choices

* Everything that can be checked without the model is checked before it loads (a real
  model takes minutes and gigabytes): sampling values, ``--chunk-size``, ``--draw``
  (folder exists, an extension Pillow can save an RGB image as) and every ``-i`` image
  (exists, is a file, decodes).
* Interactive mode: Ctrl-C during an answer stops it and returns to the ``you>`` prompt;
  the interrupted exchange (your message and the partial answer) is left out of the
  history, and the message's images stay attached to the next message. Ctrl-C at the
  prompt, end of input or ``/quit`` end the session (status 0).
* Interactive mode keeps the conversation inside the context window: before a message is
  sent, its prompt (images included, measured with the processor) plus room for
  ``min(--max-new-tokens, ANSWER_ROOM)`` answer tokens must fit; otherwise the oldest
  exchanges are dropped (the system message stays) and a note says how many. A message
  that does not fit even alone is not sent.
"""

from __future__ import annotations

import argparse
import functools
import io
import json
import os
import sys
import time
import warnings
from pathlib import Path

from . import __version__
from .errors import DSVL2Error
from .sizes import KV_CACHE_HELP, size_argument

# Answer tokens kept free in interactive mode (at most --max-new-tokens): a conversation
# whose prompt leaves less is trimmed first. 256 is a few paragraphs; asking for room
# for all 512 default tokens would drop history that most answers never need.
ANSWER_ROOM = 256

EPILOG_CHAT = """examples:
  dsvl2 chat -i photo.jpg "Describe this image."
  dsvl2 chat -m deepseek-ai/deepseek-vl2-tiny -i a.jpg -i b.jpg "What differs?"
  dsvl2 chat -m ./deepseek-vl2-tiny -i street.jpg --draw boxes.png "<|grounding|>Find the <|ref|>red car<|/ref|>."
  dsvl2 chat -i photo.jpg --json-schema dish.json "Name the dish and its main ingredients."
  dsvl2 chat -i photo.jpg --choice yes --choice no "Is there a dog?"
  dsvl2 chat -m ./deepseek-vl2-tiny           (interactive: /image PATH, /reset, /quit; Ctrl-C stops an answer)

Without -m the built-in demo checkpoint is used: it has RANDOM weights (gibberish
answers) and exists so that everything can be tried offline."""


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the epilog as written and shows each option's default (what
    ArgumentDefaultsHelpFormatter does), except empty ones (None, False, []) and those
    the help already states."""

    def _get_help_string(self, action):
        text = action.help or ""
        empty = action.default is None or action.default is False or action.default == []  # not 0 or 0.0
        if not action.option_strings or "default" in text or empty or action.default is argparse.SUPPRESS:
            return text
        return f"{text} (default: %(default)s)".strip()


class Progress:
    """A one-line progress bar on stderr, only on a terminal and only for work that lasts:
    nothing is drawn before ``delay`` seconds (small models finish silently)."""

    def __init__(self, label: str, enabled: bool | None = None, delay: float = 0.5):
        self.label = label
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self.t0 = time.perf_counter()
        self.delay = delay
        self.last = -1
        self.shown = False

    def __call__(self, done: int, total: int) -> None:
        if total <= 0:
            return
        pct = int(100 * done / total)
        if pct == self.last and done != total:
            return
        self.last = pct
        elapsed = time.perf_counter() - self.t0
        if not self.enabled or (not self.shown and elapsed < self.delay):
            return
        self.shown = True
        bar = "#" * (pct // 4) + "." * (25 - pct // 4)
        sys.stderr.write(f"\r{self.label} [{bar}] {pct:3d}% {elapsed:5.1f}s")
        if done >= total:
            sys.stderr.write("\n")
        sys.stderr.flush()


def _guide(args):
    """The --json-schema / --regex / --choice constraint as a ``Guide`` (None without one);
    the schema file is read and parsed here, before the model loads."""
    from .engine.guided import Guide
    from .structured import guide_from_schema

    if getattr(args, "json_schema", None):
        path = Path(args.json_schema).expanduser()
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise DSVL2Error(f"--json-schema {args.json_schema}: cannot be read ({e})") from None
        try:
            schema = json.loads(text)
        except (json.JSONDecodeError, RecursionError) as e:
            raise DSVL2Error(f"--json-schema {args.json_schema}: not valid JSON ({e})") from None
        if not isinstance(schema, dict):
            raise DSVL2Error(f"--json-schema {args.json_schema}: a JSON schema is an object ({{...}}), "
                             f"this file holds a JSON {type(schema).__name__}")
        return guide_from_schema(schema, "--json-schema")
    if getattr(args, "regex", None) is not None:
        if not args.regex:
            raise DSVL2Error("--regex needs a non-empty pattern")
        return Guide.regex(args.regex)
    if getattr(args, "choice", None):
        if not all(args.choice):
            raise DSVL2Error("--choice needs a non-empty text")
        return Guide.choice(args.choice)
    return None


def _sampling(args) -> dict:
    opts = dict(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                repetition_penalty=args.repetition_penalty, max_new_tokens=args.max_new_tokens, seed=args.seed)
    if args.stop:
        opts["stop"] = tuple(args.stop)
    guide = _guide(args)
    if guide is not None:
        opts["guide"] = guide
    return opts


def _load(args):
    from .api import demo_note_given, load

    name = args.model
    if name is None:
        print("dsvl2: note: no -m given, using the built-in demo checkpoint with RANDOM weights "
              "(answers are gibberish); pass -m FOLDER or -m deepseek-ai/deepseek-vl2-tiny for a real model",
              file=sys.stderr)
        demo_note_given()  # said once is enough: load() does not warn again
        name = "demo"
    model = load(name, dtype=args.dtype, device=args.device, progress=Progress("loading"),
                 quantize=getattr(args, "quantize", None), kv_cache_bytes=getattr(args, "kv_cache_bytes", None))
    if sys.stderr.isatty():
        bars: dict[str, Progress] = {}

        def stage(name: str, done: int, total: int) -> None:
            # Only work that takes a while gets a bar (real models: seconds per image tile).
            if name not in bars or bars[name].last == 100:
                bars[name] = Progress(f"{'encoding image tiles' if name == 'vision' else 'reading the prompt':<20}")
            bars[name](done, total)

        model.engine.progress = stage
    return model


@functools.lru_cache(maxsize=1)
def _save_extensions() -> tuple[str, ...]:
    """File extensions Pillow can save an RGB image as (probed: some formats take only
    other modes, some are read-only stubs), the common ones first."""
    from PIL import Image

    Image.init()
    probe = Image.new("RGB", (1, 1))
    found = []
    for ext, fmt in sorted(Image.registered_extensions().items()):
        if fmt not in Image.SAVE:
            continue
        try:
            with warnings.catch_warnings():  # e.g. "IM image format is deprecated": still saves
                warnings.simplefilter("ignore")
                probe.save(io.BytesIO(), format=fmt)
        except Exception:  # noqa: BLE001 - each plugin fails in its own way (OSError, ValueError, KeyError)
            continue
        found.append(ext)
    first = [e for e in (".png", ".jpg", ".jpeg", ".webp") if e in found]
    return tuple(first + [e for e in found if e not in first])


def _check_draw(value: str) -> str:
    """The --draw path, checked before anything runs: -> the path to save to."""
    out = Path(value).expanduser()
    if out.is_dir():
        raise DSVL2Error(f"--draw {value}: is a folder; give a file name such as {out / 'boxes.png'}")
    ext = out.suffix.lower()
    allowed = _save_extensions()
    if ext not in allowed:
        what = f"unknown image extension {ext!r}" if ext else "no file extension"
        raise DSVL2Error(f"--draw {value}: {what}; Pillow can save {', '.join(allowed)}")
    folder = out.parent
    if not folder.is_dir():
        raise DSVL2Error(f"--draw {value}: the folder {str(folder)!r} does not exist")
    if not os.access(folder, os.W_OK):
        raise DSVL2Error(f"--draw {value}: the folder {str(folder)!r} is not writable")
    return str(out)


def _check_images(paths) -> None:
    """Each -i image exists and decodes (a typo must not cost a model load)."""
    from .processing import load_image

    for path in paths:
        load_image(path)  # ImageError names the path and what is wrong


def _finish(answer, args, out) -> None:
    if not answer.text.strip() and answer.completion_tokens:
        print(f"dsvl2: note: the model produced {answer.completion_tokens} token(s) with no visible text "
              "(ids beyond the tokenizer, or only whitespace; random checkpoints do this)", file=sys.stderr)
    if args.draw:
        if answer.images:
            answer.draw().save(args.draw)
            print(f"dsvl2: {len(answer.boxes)} box(es) drawn on image {len(answer.images)} -> {args.draw}",
                  file=sys.stderr)
        else:
            print("dsvl2: note: --draw ignored, the conversation has no image", file=sys.stderr)
    for p in answer.grounding.problems[:5]:
        print(f"dsvl2: note: grounding markup: {p}", file=sys.stderr)


def _stream_answer(model, messages, args, sampling: dict, prefix: str = "", shown: list | None = None, **kwargs):
    """Stream the answer to stdout (unless --json) and return the final ``Answer``.

    ``prefix`` is written with the first piece of text, i.e. after any progress bar;
    ``shown`` (optional) collects what was written, for a caller that is interrupted."""
    shown = [] if shown is None else shown
    answer = None
    deltas = model.stream(messages, chunk_size=args.chunk_size, **kwargs, **sampling)
    try:
        for d in deltas:
            if not args.json:
                shown.append(prefix + d.text)  # first: an interrupted write may have reached the terminal
                sys.stdout.write(prefix + d.text)
                prefix = ""
                sys.stdout.flush()
            if d.answer is not None:
                answer = d.answer
    finally:
        close = getattr(deltas, "close", None)
        if close is not None:  # an interrupted answer frees its engine request now, not at garbage collection
            close()
    return answer


def cmd_chat(args) -> int:
    from .engine.sampling import SamplingParams

    sampling = _sampling(args)
    try:  # bad option values fail now, not after loading (or at every turn)
        SamplingParams(**sampling)
    except DSVL2Error as e:  # name the command-line flag, not the dataclass field
        msg = str(e)
        for field in sampling:
            msg = msg.replace(f"SamplingParams.{field}", "--" + field.replace("_", "-"))
        raise DSVL2Error(msg) from None
    if args.chunk_size is not None and args.chunk_size < 1:
        raise DSVL2Error(f"--chunk-size must be a positive integer, got {args.chunk_size}")
    if args.draw:
        args.draw = _check_draw(args.draw)
    _check_images(args.image)
    model = _load(args)
    if args.prompt is not None:
        answer = _stream_answer(model, args.prompt, args, sampling, images=args.image, system=args.system)
        if args.json:
            print(json.dumps(answer.to_dict(), ensure_ascii=False))
        else:
            sys.stdout.write("\n")
        _finish(answer, args, sys.stdout)
        return 0
    return _interactive(model, args, sampling)


def _image_command(rest: str) -> str:
    """The path of ``/image PATH``: surrounding quotes removed, ``~`` expanded (spaces
    inside the path need no quotes: the whole rest of the line is the path)."""
    path = rest.strip()
    if len(path) >= 2 and path[0] == path[-1] and path[0] in "'\"":
        path = path[1:-1].strip()
    return os.path.expanduser(path) if path else ""


def _fit(model, history: list[dict], turn: dict, room: int) -> tuple[list[dict], int]:
    """Drop the oldest exchanges of ``history`` until its prompt with ``turn`` leaves
    ``room`` tokens of the context window: -> (history kept, exchanges dropped).

    ``history`` is [system message?] + (user, assistant) pairs. Lengths come from the
    processor itself (images included), so the check is exact, not an estimate."""
    window = model.engine.context_window

    def fits(conv: list[dict]) -> tuple[bool, int]:
        n = model.processor(conv + [turn]).seq_lens[0]
        return n + room <= window, n

    ok, n = fits(history)
    if ok:
        return history, 0
    head = history[:1] if history and history[0]["role"] == "system" else []
    body = history[len(head):]
    alone, n_alone = fits(head) if body else (False, n)
    if not alone:
        raise DSVL2Error(f"this message needs {n_alone} prompt tokens (images included) and the answer {room}, "
                         f"more than the context window of {window} tokens; it was not sent. Send a shorter "
                         "message or fewer images (/reset starts a new conversation)")
    dropped = 0
    while body:
        body, dropped = body[2:], dropped + 1
        if fits(head + body)[0]:
            break
    return head + body, dropped


def _interactive(model, args, sampling) -> int:
    try:
        return _session(model, args, sampling)
    except KeyboardInterrupt:  # Ctrl-C outside an answer (at the prompt) ends the session
        print(file=sys.stderr)
        return 0


def _session(model, args, sampling) -> int:
    from .api import user_turn
    from .processing import load_image

    tty = sys.stdin.isatty()
    history: list[dict] = [{"role": "system", "content": args.system}] if args.system else []
    pending: list[str] = list(args.image)
    room = min(args.max_new_tokens, ANSWER_ROOM)
    if tty:
        print("dsvl2 chat: type a message; /image PATH attaches an image to your next message, "
              "/reset starts over, /quit ends. Ctrl-C stops an answer.", file=sys.stderr)
    while True:
        if tty:
            sys.stderr.write("you> ")
            sys.stderr.flush()
        line = sys.stdin.readline()
        if not line:
            return 0
        line = line.strip()
        if not line:
            continue
        if line in ("/quit", "/exit"):
            return 0
        if line == "/reset":
            history = history[:1] if args.system else []
            pending = []
            print("dsvl2: conversation reset", file=sys.stderr)
            continue
        if line == "/image" or line.startswith("/image "):
            path = _image_command(line[len("/image"):])
            if not path:
                print("dsvl2: error: /image needs a path", file=sys.stderr)
                continue
            try:
                load_image(path)
            except DSVL2Error as e:
                print(f"dsvl2: error: {e}", file=sys.stderr)
                continue
            pending.append(path)
            print(f"dsvl2: {path} will be attached to your next message", file=sys.stderr)
            continue
        if line.startswith("/"):
            print(f"dsvl2: error: unknown command {line.split()[0]} (use /image PATH, /reset, /quit)", file=sys.stderr)
            continue
        turn = user_turn(line, pending)
        shown: list[str] = []
        try:
            history, dropped = _fit(model, history, turn, room)
            if dropped:
                print(f"dsvl2: note: the conversation no longer fit the model's {model.engine.context_window}-token "
                      f"context window: dropped the {dropped} oldest exchange(s) (question and answer); "
                      "/reset starts a new conversation", file=sys.stderr)
            answer = _stream_answer(model, history + [turn], args, sampling, prefix="model> " if tty else "",
                                    shown=shown)
        except KeyboardInterrupt:  # stop this answer, keep the session
            if shown:
                print(flush=True)  # end the partial answer's line
            kept = f"; its {len(pending)} image(s) stay attached to your next message" if pending else ""
            print(f"dsvl2: note: answer interrupted; it and your message are left out of the conversation{kept}",
                  file=sys.stderr)
            continue
        except DSVL2Error as e:  # a bad turn must not end the session
            if shown:
                print(flush=True)
            lost = f" (its {len(pending)} image(s) were dropped; /image to attach again)" if pending else ""
            print(f"dsvl2: error: {e}{lost}", file=sys.stderr)
            pending = []
            continue
        print(json.dumps(answer.to_dict(), ensure_ascii=False) if args.json else "")
        # an "<image>" in the answer would be an image tag without an image in every later turn
        history += [turn, {"role": "<|Assistant|>", "content": answer.text.replace("<image>", "")}]
        pending = []
        _finish(answer, args, sys.stdout)


def cmd_init_random(args) -> int:
    from .checkpoint import PRESETS, preset_config, write_random_checkpoint
    import torch

    if args.preset not in PRESETS:
        raise DSVL2Error(f"unknown preset {args.preset!r}; choose one of {', '.join(PRESETS)}")
    if not 0 < args.scale <= 1:
        raise DSVL2Error(f"--scale must be in (0, 1], got {args.scale}")
    cfg = preset_config(args.preset, args.scale)
    dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[args.dtype]
    if getattr(args, "quantize", None):  # drawn and quantised tensor by tensor: the bf16 model never exists
        from .quantize import write_random_quantised
        out = write_random_quantised(args.out_dir, cfg, args.quantize, seed=args.seed,
                                     progress=Progress("writing"), overwrite=args.overwrite)
    else:
        out = write_random_checkpoint(args.out_dir, cfg, seed=args.seed, dtype=dtype,
                                      progress=Progress("writing"), overwrite=args.overwrite)
    print(f"wrote a random {args.preset} checkpoint (scale {args.scale}) to {out}")
    return 0


def cmd_info(args) -> int:
    from .config import load_config
    from .hub import resolve_model
    from .info import describe, format_info

    if args.model is None:
        print("dsvl2: note: no MODEL given, showing the built-in demo checkpoint (random weights); "
              "pass a folder or an id such as deepseek-ai/deepseek-vl2-tiny", file=sys.stderr)
    folder = resolve_model("demo" if args.model is None else args.model)
    has_weights = (folder / "model.safetensors.index.json").is_file() or any(folder.glob("*.safetensors"))
    # config only: no weights section; --quantize: the bytes after quantisation (nothing is loaded)
    d = describe(load_config(folder), folder if has_weights else None, quantize=args.quantize)
    import torch
    from .model import kernels
    d["kernels"] = kernels.choose("cpu", torch.bfloat16).to_dict()  # what bf16 weights would run with here
    from .model import native
    d["native_decode"] = native.status()  # decode-step products with bf16 weights (model/native)
    print(json.dumps(d, indent=2, default=str) if args.json else format_info(d))
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="dsvl2", description="DeepSeek-VL2 (tiny, small, base) on any machine: "
                                 "chat about images, find objects, inspect checkpoints.", formatter_class=HelpFormatter)
    ap.add_argument("--version", action="version", version=f"dsvl2 {__version__}")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    chat = sub.add_parser("chat", help="answer a prompt about images (or chat interactively)",
                          description="Stream the model's answer to PROMPT; without PROMPT, an interactive chat.",
                          epilog=EPILOG_CHAT, formatter_class=HelpFormatter)
    chat.add_argument("prompt", nargs="?", help="the question; omit it for an interactive session")
    chat.add_argument("-m", "--model", help="checkpoint folder or Hugging Face id (default: the built-in demo)")
    chat.add_argument("-i", "--image", action="append", default=[], metavar="IMAGE",
                      help="image file for the prompt (repeatable, in order)")
    chat.add_argument("--system", help="system message placed before the conversation")
    chat.add_argument("--json", action="store_true", help="print one JSON object (text, finish_reason, usage, boxes)")
    chat.add_argument("--draw", metavar="OUT.png", help="save the last image with the grounding boxes drawn on it")
    g = chat.add_argument_group("sampling (default: greedy)")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass, 0 < p <= 1; 1 = off")
    g.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens; 0 = off")
    g.add_argument("--repetition-penalty", type=float, default=1.0, help="1 = off")
    g.add_argument("--max-new-tokens", type=int, default=512, metavar="N",
                   help="the most tokens an answer may have")
    g.add_argument("--seed", type=int, default=None, help="seed for sampling (default: a new one each run)")
    g.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop string (repeatable)")
    c = chat.add_argument_group("structured output (one of them; constrained decoding, engine/guided.py)")
    x = c.add_mutually_exclusive_group()
    x.add_argument("--json-schema", metavar="FILE", help="the answer is JSON following the JSON schema in FILE")
    x.add_argument("--regex", metavar="PATTERN", help="the answer matches the regular expression PATTERN")
    x.add_argument("--choice", action="append", default=[], metavar="TEXT",
                   help="the answer is one of these texts (repeatable: --choice yes --choice no)")
    r = chat.add_argument_group("runtime")
    r.add_argument("--chunk-size", type=int, default=None, metavar="N",
                   help="prefill in chunks of N tokens, for bounded memory (default: the whole prompt at once)")
    r.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="auto = bf16 weights, fp32 compute on CPU")
    r.add_argument("--device", default="auto", help="auto, cpu, cuda or mps")
    r.add_argument("--quantize", choices=["int8", "int4"], default=None,
                   help="quantise the weights while loading (int8: LM linears; int4: routed experts)")
    r.add_argument("--kv-cache-bytes", type=size_argument, default=None, metavar="SIZE", help=KV_CACHE_HELP)
    chat.set_defaults(func=cmd_chat)

    init = sub.add_parser("init-random", help="write a random checkpoint in the official layout",
                          description="Write config, processor config, tokenizer and random safetensors weights.",
                          formatter_class=HelpFormatter)
    init.add_argument("--preset", required=True,
                      help="tiny, small, base (real sizes) or golden-tiny, golden-small, golden-base, golden-dsv2x")
    init.add_argument("--scale", type=float, default=1.0, help="shrink widths by this factor (0 < s <= 1)")
    init.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    init.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"], help="dtype of the weights")
    init.add_argument("--overwrite", action="store_true", help="replace a checkpoint already in OUT_DIR")
    init.add_argument("--quantize", choices=["int8", "int4"], default=None,
                      help="write the weights quantised (as `dsvl2 quantize` would), in bounded memory")
    init.add_argument("out_dir", metavar="OUT_DIR")
    init.set_defaults(func=cmd_init_random)

    info = sub.add_parser("info", help="show a model's architecture in one screen",
                          description="Architecture, parameter counts and memory of a checkpoint (or of a config "
                          "alone).", formatter_class=HelpFormatter)
    info.add_argument("model", metavar="MODEL", nargs="?", default=None,
                      help="checkpoint folder, Hugging Face id, or 'demo' (default: the built-in demo)")
    info.add_argument("--json", action="store_true", help="print one JSON object")
    info.add_argument("--quantize", choices=["int8", "int4"], default=None,
                      help="also show the weights' bytes after quantisation (a quantised folder shows its own)")
    info.set_defaults(func=cmd_info)

    from . import batch  # `dsvl2 batch` (Ray Data); the module imports neither Ray nor torch
    batch.add_parser(sub)
    from .server import cli as server_cli  # `dsvl2 serve`; FastAPI is imported only when it runs
    server_cli.add_parser(sub)
    from . import quantize  # `dsvl2 quantize`
    quantize.add_parser(sub)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("\ndsvl2: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `dsvl2 chat ... | head`; BrokenPipeError is an OSError, so first
        try:
            sys.stdout = open(os.devnull, "w")  # nothing more to flush into the closed pipe at exit
        except OSError:
            pass
        return 0
    except (DSVL2Error, ValueError, FileNotFoundError, OSError) as e:
        if os.environ.get("DSVL2_DEBUG"):
            raise
        msg = str(e).strip().replace("\n", " ") or type(e).__name__
        print(f"dsvl2: error: {msg}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
