"""``dsvl2 chat``: answer a prompt about images, or chat interactively.

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

import functools
import io
import json
import os
import sys
import warnings
from pathlib import Path

from ..errors import ContextLengthError, DSVL2Error
from .common import HelpFormatter, Progress, add_runtime_options, add_sampling_options, as_flags, sampling_options


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


def _load(args):
    from ..api import demo_note_given, load

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

        model.engine.set_progress(stage)
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
    from ..processing import load_image

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
    from ..engine.sampling import SamplingParams

    sampling = sampling_options(args)
    try:  # bad option values fail now, not after loading (or at every turn)
        SamplingParams(**sampling)
    except DSVL2Error as e:  # name the command-line flag, not the dataclass field
        raise DSVL2Error(as_flags(str(e))) from None
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
    """``history`` ([system message?] + (user, assistant) pairs) without the oldest
    exchanges that leave less than ``room`` tokens of the context window with ``turn``:
    -> (history kept, exchanges dropped). ``history.fit_history`` decides."""
    from ..history import fit_history

    try:
        fitted = fit_history(model, history + [turn], room)
    except ContextLengthError as e:
        raise DSVL2Error(f"this message needs {e.tokens} prompt tokens (images included) and the answer {room}, "
                         f"more than the context window of {e.window} tokens; it was not sent. Send a shorter "
                         "message or fewer images (/reset starts a new conversation)") from None
    return fitted.messages[:-1], fitted.dropped // 2


def _interactive(model, args, sampling) -> int:
    try:
        return _session(model, args, sampling)
    except KeyboardInterrupt:  # Ctrl-C outside an answer (at the prompt) ends the session
        print(file=sys.stderr)
        return 0


def _session(model, args, sampling) -> int:
    from ..api import user_turn
    from ..processing import load_image

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


def add_parser(sub) -> None:
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
    add_sampling_options(chat, structured=True)
    r = chat.add_argument_group("runtime")
    r.add_argument("--chunk-size", type=int, default=None, metavar="N",
                   help="prefill in chunks of N tokens, for bounded memory (default: the whole prompt at once)")
    add_runtime_options(r)
    chat.set_defaults(func=cmd_chat)

