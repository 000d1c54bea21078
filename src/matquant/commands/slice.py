"""matquant slice: export one precision of a checkpoint as a plain transformers model folder."""
from __future__ import annotations

from matquant.commands.common import add_slice_args, load_bits_map


def register(sub) -> None:
    p = sub.add_parser("slice", help="export one precision as a standalone (dequantized) HF model",
                       description="Write the r-bit slice (or a per-layer bits map) of a checkpoint as a plain HF "
                                   "model folder that stock transformers loads (weights dequantized to --dtype).")
    add_slice_args(p)
    p.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"))
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--debug", action="store_true")
    p.set_defaults(func=run)


def run(args) -> int:
    import torch

    from matquant.format.checkpoint import load_checkpoint
    from matquant.format.export import export_dequantized

    bits = args.bits if args.bits is not None else load_bits_map(args.bits_map)
    model, tok, qcfg = load_checkpoint(args.checkpoint, bits=bits, slicing=args.slicing)
    export_dequantized(model, tok, args.out, dtype=getattr(torch, args.dtype), overwrite=args.overwrite)
    what = f"int{args.bits}" if args.bits is not None else f"bits map {args.bits_map}"
    print(f"wrote {args.out}: {what} ({args.slicing or qcfg.slicing} slicing), {args.dtype}; "
          f"load with AutoModelForCausalLM.from_pretrained({args.out!r})")
    return 0
