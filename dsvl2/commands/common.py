"""What every ``dsvl2`` subcommand shares: the help format, the progress bar, and the
sampling / structured-output / runtime option groups with the code that reads them back.

Imports nothing heavy (no torch): ``dsvl2 --help`` stays instant.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

from ..errors import DSVL2Error
from ..sizes import KV_CACHE_HELP, size_argument


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


def guide_from_args(args):
    """The --json-schema / --regex / --choice constraint as a ``Guide`` (None without one);
    the schema file is read and parsed here, before the model loads."""
    from ..engine.guided import Guide  # imported when used: llguidance is loaded only for a constraint
    from ..structured import guide_from_schema

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


def as_flags(message: str) -> str:
    """An error message with ``SamplingParams.<field>`` named as the command-line flag
    (``--<field>``, underscores as dashes), so that it names what the user typed."""
    return re.sub(r"SamplingParams\.(\w+)", lambda m: "--" + m.group(1).replace("_", "-"), message)


def sampling_options(args) -> dict:
    """The sampling options (``add_sampling_options``) as ``SamplingParams`` keywords."""
    opts = dict(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                repetition_penalty=args.repetition_penalty, max_new_tokens=args.max_new_tokens, seed=args.seed)
    if args.stop:
        opts["stop"] = tuple(args.stop)
    guide = guide_from_args(args)
    if guide is not None:
        opts["guide"] = guide
    return opts


def add_sampling_options(parser: argparse.ArgumentParser, title: str = "sampling (default: greedy)",
                         structured: bool = False) -> None:
    """--temperature, --top-p, --top-k, --repetition-penalty, --max-new-tokens, --seed, --stop
    (read back by ``sampling_options``); with ``structured``, the --json-schema / --regex /
    --choice group too."""
    g = parser.add_argument_group(title)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass, 0 < p <= 1; 1 = off")
    g.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens; 0 = off")
    g.add_argument("--repetition-penalty", type=float, default=1.0, help="1 = off")
    g.add_argument("--max-new-tokens", type=int, default=512, metavar="N",
                   help="the most tokens an answer may have")
    g.add_argument("--seed", type=int, default=None, help="seed for sampling (default: a new one each run)")
    g.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop string (repeatable)")
    if structured:
        c = parser.add_argument_group("structured output (one of them; constrained decoding, engine/guided.py)")
        x = c.add_mutually_exclusive_group()
        x.add_argument("--json-schema", metavar="FILE", help="the answer is JSON following the JSON schema in FILE")
        x.add_argument("--regex", metavar="PATTERN", help="the answer matches the regular expression PATTERN")
        x.add_argument("--choice", action="append", default=[], metavar="TEXT",
                       help="the answer is one of these texts (repeatable: --choice yes --choice no)")


def add_runtime_options(group, *, device_help: str = "auto, cpu, cuda or mps",
                        kv_help: str = KV_CACHE_HELP) -> None:
    """--dtype, --device, --quantize, --kv-cache-bytes: how a model is loaded (``dsvl2.load``'s
    keywords of the same names)."""
    group.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                       help="auto = bf16 weights, fp32 compute on CPU")
    group.add_argument("--device", default="auto", help=device_help)
    group.add_argument("--quantize", choices=["int8", "int4"], default=None,
                       help="quantise the weights while loading (int8: LM linears; int4: routed experts)")
    group.add_argument("--kv-cache-bytes", type=size_argument, default=None, metavar="SIZE", help=kv_help)
