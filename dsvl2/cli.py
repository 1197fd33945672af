"""The ``dsvl2`` command line: chat, init-random, info.

Exit status: 0 success, 1 an error the user can fix (bad model, image, option values,
prompt too long...), 2 a usage error (unknown option, missing argument), 130
interrupted. Errors are one line on stderr (``dsvl2: error: ...``), never a traceback;
``DSVL2_DEBUG=1`` shows the traceback too.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from .errors import DSVL2Error

EPILOG_CHAT = """examples:
  dsvl2 chat -i photo.jpg "Describe this image."
  dsvl2 chat -m deepseek-ai/deepseek-vl2-tiny -i a.jpg -i b.jpg "What differs?"
  dsvl2 chat -m ./deepseek-vl2-tiny -i street.jpg --draw boxes.png "<|grounding|>Find the <|ref|>red car<|/ref|>."
  dsvl2 chat -m ./deepseek-vl2-tiny           (interactive: /image PATH, /reset, /quit)

Without -m the built-in demo checkpoint is used: it has RANDOM weights (gibberish
answers) and exists so that everything can be tried offline."""


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


def _sampling(args) -> dict:
    opts = dict(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                repetition_penalty=args.repetition_penalty, max_new_tokens=args.max_new_tokens, seed=args.seed)
    if args.stop:
        opts["stop"] = tuple(args.stop)
    return opts


def _load(args):
    from .api import load

    name = args.model
    if name is None:
        print("dsvl2: note: no -m given, using the built-in demo checkpoint with RANDOM weights "
              "(answers are gibberish); pass -m FOLDER or -m deepseek-ai/deepseek-vl2-tiny for a real model",
              file=sys.stderr)
        name = "demo"
    model = load(name, dtype=args.dtype, device=args.device, progress=Progress("loading"))
    if sys.stderr.isatty():
        bars: dict[str, Progress] = {}

        def stage(name: str, done: int, total: int) -> None:
            # Only work that takes a while gets a bar (real models: seconds per image tile).
            if name not in bars or bars[name].last == 100:
                bars[name] = Progress(f"{'encoding image tiles' if name == 'vision' else 'reading the prompt':<20}")
            bars[name](done, total)

        model.engine.progress = stage
    return model


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


def _stream_answer(model, messages, args, sampling: dict, prefix: str = "", **kwargs):
    """Stream the answer to stdout (unless --json) and return the final ``Answer``.

    ``prefix`` is written with the first piece of text, i.e. after any progress bar."""
    answer = None
    for d in model.stream(messages, chunk_size=args.chunk_size, **kwargs, **sampling):
        if not args.json:
            sys.stdout.write(prefix + d.text)
            prefix = ""
            sys.stdout.flush()
        if d.answer is not None:
            answer = d.answer
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


def _interactive(model, args, sampling) -> int:
    from .api import user_turn

    tty = sys.stdin.isatty()
    history: list[dict] = [{"role": "system", "content": args.system}] if args.system else []
    pending: list[str] = list(args.image)
    if tty:
        print("dsvl2 chat: type a message; /image PATH attaches an image to your next message, "
              "/reset starts over, /quit ends.", file=sys.stderr)
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
        if line.startswith("/image"):
            path = line[len("/image"):].strip()
            if not path:
                print("dsvl2: error: /image needs a path", file=sys.stderr)
                continue
            from .processing import load_image
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
        try:
            answer = _stream_answer(model, history + [turn], args, sampling, prefix="model> " if tty else "")
        except DSVL2Error as e:  # a bad turn must not end the session
            dropped = f" (its {len(pending)} image(s) were dropped; /image to attach again)" if pending else ""
            print(f"\ndsvl2: error: {e}{dropped}", file=sys.stderr)
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
    out = write_random_checkpoint(args.out_dir, cfg, seed=args.seed, dtype=dtype,
                                  progress=Progress("writing"), overwrite=args.overwrite)
    print(f"wrote a random {args.preset} checkpoint (scale {args.scale}) to {out}")
    return 0


def cmd_info(args) -> int:
    from .config import load_config
    from .hub import resolve_model
    from .info import describe, format_info

    folder = resolve_model(args.model)
    has_weights = (folder / "model.safetensors.index.json").is_file() or any(folder.glob("*.safetensors"))
    d = describe(load_config(folder), folder if has_weights else None)  # config only: no weights section
    print(json.dumps(d, indent=2, default=str) if args.json else format_info(d))
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="dsvl2", description="DeepSeek-VL2 (tiny, small, base) on any machine: "
                                 "chat about images, find objects, inspect checkpoints.")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    chat = sub.add_parser("chat", help="answer a prompt about images (or chat interactively)",
                          description="Stream the model's answer to PROMPT; without PROMPT, an interactive chat.",
                          epilog=EPILOG_CHAT, formatter_class=argparse.RawDescriptionHelpFormatter)
    chat.add_argument("prompt", nargs="?", help="the question; omit it for an interactive session")
    chat.add_argument("-m", "--model", help="checkpoint folder or Hugging Face id (default: the built-in demo)")
    chat.add_argument("-i", "--image", action="append", default=[], metavar="IMAGE",
                      help="image file for the prompt (repeatable, in order)")
    chat.add_argument("--system", help="system message placed before the conversation")
    chat.add_argument("--json", action="store_true", help="print one JSON object (text, finish_reason, usage, boxes)")
    chat.add_argument("--draw", metavar="OUT.png", help="save the last image with the grounding boxes drawn on it")
    g = chat.add_argument_group("sampling (default: greedy)")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0, help="0 = off")
    g.add_argument("--repetition-penalty", type=float, default=1.0, help="1 = off")
    g.add_argument("--max-new-tokens", type=int, default=512)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop string (repeatable)")
    r = chat.add_argument_group("runtime")
    r.add_argument("--chunk-size", type=int, default=None, metavar="N",
                   help="prefill in chunks of N tokens (bounded memory)")
    r.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="auto = bf16 weights, fp32 compute on CPU")
    r.add_argument("--device", default="auto", help="auto, cpu, cuda or mps")
    chat.set_defaults(func=cmd_chat)

    init = sub.add_parser("init-random", help="write a random checkpoint in the official layout",
                          description="Write config, processor config, tokenizer and random safetensors weights.")
    init.add_argument("--preset", required=True,
                      help="tiny, small, base (real sizes) or golden-tiny, golden-small, golden-base, golden-dsv2x")
    init.add_argument("--scale", type=float, default=1.0, help="shrink widths by this factor (0 < s <= 1)")
    init.add_argument("--seed", type=int, default=0)
    init.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    init.add_argument("--overwrite", action="store_true", help="replace a checkpoint already in OUT_DIR")
    init.add_argument("out_dir", metavar="OUT_DIR")
    init.set_defaults(func=cmd_init_random)

    info = sub.add_parser("info", help="show a model's architecture in one screen")
    info.add_argument("model", metavar="MODEL", help="checkpoint folder, Hugging Face id, or 'demo'")
    info.add_argument("--json", action="store_true")
    info.set_defaults(func=cmd_info)
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
