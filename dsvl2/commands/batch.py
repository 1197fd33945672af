"""The ``dsvl2 batch`` command line."""

from __future__ import annotations

import argparse
import sys

from ..errors import GenerationError
from ..sizes import KV_CACHE_HELP
from ..batch.pipeline import run_batch
from ..batch.readers import DEFAULT_PROMPT
from .common import HelpFormatter, add_runtime_options, add_sampling_options, as_flags, sampling_options

EPILOG = """examples:
  dsvl2 batch -m ./deepseek-vl2-tiny photos/ captions.jsonl
  dsvl2 batch -m ./deepseek-vl2-tiny --prompt "List the objects." photos/ objects.parquet
  dsvl2 batch -m ./deepseek-vl2-tiny requests.jsonl out.jsonl --actors 4 --address auto

INPUT rows (JSONL, or Parquet with the same columns):
  {"id": "a1", "images": ["a1.jpg"], "prompt": "What is this?", "sampling": {"max_new_tokens": 64}}
or an OpenAI batch file (JSONL; OUT then gets OpenAI's batch output lines):
  {"custom_id": "a1", "method": "POST", "url": "/v1/chat/completions", "body": {"model": "any",
   "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "a1.jpg"}},
   {"type": "text", "text": "What is this?"}]}], "max_tokens": 64}}
Re-running the same command skips the ids / custom_ids already in OUT (resume after a crash or Ctrl-C)."""


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``dsvl2 batch`` on the CLI's subparsers."""
    p = subparsers.add_parser("batch", help="answer every image / row of a dataset on Ray (resumable)",
                              description="Answer every image of a folder, every row of a JSONL/Parquet file, or "
                              "every request of an OpenAI batch file, on Ray Data actors; results go to OUT "
                              "(JSONL or Parquet) as they finish.",
                              epilog=EPILOG, formatter_class=HelpFormatter)
    p.add_argument("input", metavar="INPUT",
                   help="a folder of images, a .jsonl/.parquet file of rows, or an OpenAI batch file (.jsonl)")
    p.add_argument("out", metavar="OUT", help="result file (.jsonl or .parquet); requests already in it are skipped")
    p.add_argument("-m", "--model", required=True, help="checkpoint folder, Hugging Face id, or 'demo'")
    p.add_argument("--prompt", default=DEFAULT_PROMPT, help=f"prompt for rows without one (default: {DEFAULT_PROMPT!r})")
    p.add_argument("--format", choices=["jsonl", "parquet"], help="OUT's format (default: from its extension)")
    r = p.add_argument_group("Ray")
    r.add_argument("--actors", type=int, default=1, help="model copies answering in parallel (default 1)")
    r.add_argument("--batch-size", type=int, default=4, help="rows / requests per Ray batch, written together (default 4)")
    r.add_argument("--rows-per-call", type=int, default=1,
                   help="rows (or OpenAI requests) the engine answers together (default 1: exactly the answers of "
                   "one chat call each)")
    r.add_argument("--cpus-per-actor", type=float, default=1, help="CPUs (and torch threads) per actor (default 1)")
    r.add_argument("--gpus-per-actor", type=float, default=0, help="GPUs per actor (default 0)")
    r.add_argument("--address", help="join this Ray cluster (auto, HOST:PORT, ray://HOST:10001); "
                   "default: start a local Ray instance")
    add_sampling_options(p, "sampling (default: greedy; a row's 'sampling', or an OpenAI body's fields, "
                            "override these)")
    t = p.add_argument_group("runtime")
    add_runtime_options(t, device_help="auto, cpu, cuda or mps (on each actor)",
                        kv_help=KV_CACHE_HELP.replace("memory for the KV cache", "memory for each actor's KV cache"))
    p.set_defaults(func=cmd_batch)
    return p


def cmd_batch(args) -> int:
    sampling = sampling_options(args)
    try:
        summary = run_batch(args.model, args.input, args.out, prompt=args.prompt, sampling=sampling,
                            actors=args.actors, batch_size=args.batch_size, rows_per_call=args.rows_per_call,
                            cpus_per_actor=args.cpus_per_actor, gpus_per_actor=args.gpus_per_actor,
                            dtype=args.dtype, device=args.device, quantize=args.quantize,
                            kv_cache_bytes=args.kv_cache_bytes, address=args.address, fmt=args.format)
    except GenerationError as e:  # name the command-line flag, not the dataclass field
        raise GenerationError(as_flags(str(e))) from None
    except KeyboardInterrupt:
        print(f"\ndsvl2 batch: the results so far are in {args.out}; run the same command again to continue",
              file=sys.stderr)
        raise
    print(f"dsvl2 batch: wrote {summary.written} new row(s) ({summary.errors} with errors) to {summary.out} "
          f"in {summary.seconds:.1f} s; {summary.skipped} were already there", file=sys.stderr)
    return 0
