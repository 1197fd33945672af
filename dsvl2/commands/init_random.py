"""``dsvl2 init-random``: write a checkpoint with random weights in the official layout."""

from __future__ import annotations

from ..errors import DSVL2Error
from .common import HelpFormatter, Progress


def cmd_init_random(args) -> int:
    from ..checkpoint.random_checkpoint import PRESETS, preset_config, write_random_checkpoint
    import torch

    if args.preset not in PRESETS:
        raise DSVL2Error(f"unknown preset {args.preset!r}; choose one of {', '.join(PRESETS)}")
    if not 0 < args.scale <= 1:
        raise DSVL2Error(f"--scale must be in (0, 1], got {args.scale}")
    cfg = preset_config(args.preset, args.scale)
    dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[args.dtype]
    if getattr(args, "quantize", None):  # drawn and quantised tensor by tensor: the bf16 model never exists
        from ..checkpoint.quantised import write_random_quantised
        out = write_random_quantised(args.out_dir, cfg, args.quantize, seed=args.seed,
                                     progress=Progress("writing"), overwrite=args.overwrite)
    else:
        out = write_random_checkpoint(args.out_dir, cfg, seed=args.seed, dtype=dtype,
                                      progress=Progress("writing"), overwrite=args.overwrite)
    print(f"wrote a random {args.preset} checkpoint (scale {args.scale}) to {out}")
    return 0


def add_parser(sub) -> None:
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

