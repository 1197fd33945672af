"""``dsvl2 quantize``: write an int8 / int4 copy of a checkpoint (``checkpoint/quantised.py``)."""

from __future__ import annotations

from pathlib import Path

from .common import HelpFormatter, Progress


def cmd_quantize(args) -> int:
    # the library (and torch) only when the command runs: `dsvl2 --help` stays instant
    from ..checkpoint.quantised import SCHEME_OF_BITS, quantize_checkpoint
    from ..checkpoint.hub import resolve_model

    src = resolve_model(args.model)
    out = quantize_checkpoint(src, args.out, args.bits, overwrite=args.overwrite, progress=Progress("quantising"))
    size = sum(f.stat().st_size for f in Path(out).glob("*.safetensors"))
    print(f"wrote {SCHEME_OF_BITS[args.bits]} checkpoint {out} ({size / 1e9:.2f} GB of weights)")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("quantize", help="write an int8 / int4 copy of a checkpoint",
                       description="Quantise a checkpoint tensor by tensor (bounded memory): int8 per output "
                       "channel for every language-model linear layer; --bits 4 also stores the routed experts "
                       "in int4 groups. The result loads directly (dsvl2 chat -m OUT).", formatter_class=HelpFormatter)
    p.add_argument("model", metavar="MODEL", help="float checkpoint folder or Hugging Face id")
    p.add_argument("out", metavar="OUT", help="output folder")
    p.add_argument("--bits", type=int, choices=[8, 4], required=True, help="8 = int8, 4 = int4 experts")
    p.add_argument("--overwrite", action="store_true", help="replace a checkpoint already in OUT")
    p.set_defaults(func=cmd_quantize)