"""The ``dsvl2`` command: one subcommand per module of this folder, each a thin layer over
the library (chat, init-random, info, quantize, serve, batch).

Exit status: 0 success, 1 an error the user can fix (bad model, image, option values,
prompt too long...), 2 a usage error (unknown option, missing argument), 130
interrupted. Errors are one line on stderr (``dsvl2: error: ...``), never a traceback;
``DSVL2_DEBUG=1`` shows the traceback too. Building the parser imports neither torch nor
FastAPI nor Ray: each subcommand imports what it needs when it runs.
"""

from __future__ import annotations

import argparse
import os
import sys

from .. import __version__
from ..errors import DSVL2Error
from . import batch, chat, info, init_random, quantize, serve
from .common import HelpFormatter


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="dsvl2", description="DeepSeek-VL2 (tiny, small, base) on any machine: "
                                 "chat about images, find objects, inspect checkpoints.", formatter_class=HelpFormatter)
    ap.add_argument("--version", action="version", version=f"dsvl2 {__version__}")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for command in (chat, init_random, info, batch, serve, quantize):
        command.add_parser(sub)
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
