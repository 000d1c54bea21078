"""matquant quantize: build one multi-precision checkpoint from a full-precision model."""
from __future__ import annotations

import time

from matquant.models.loading import DEFAULT_MODEL
from matquant.models.targets import SCOPES
from matquant.quant.slicing import SLICING_MODES


def add_quant_args(p, method_default: str = "rtn") -> None:
    from matquant.algorithms import METHODS

    g = p.add_argument_group("quantization")
    g.add_argument("--method", default=method_default, choices=sorted(METHODS),
                   help="rtn: round-to-nearest MinMax (no data). Others: see docs/methods.md (default %(default)s)")
    g.add_argument("--bits-master", type=int, default=8, metavar="C",
                   help="bits of the stored master codes; every precision <= C is sliced from them (default 8)")
    g.add_argument("--scope", default="ffn", choices=SCOPES, help="which linear layers to quantize (default ffn)")
    g.add_argument("--modules", default=None, metavar="REGEX",
                   help="quantize exactly the linear layers whose full name matches REGEX (any architecture)")
    g.add_argument("--group-size", type=int, default=64,
                   help="input weights per (scale, zero) group; -1 = per output channel (default 64)")
    g.add_argument("--symmetric", action="store_true", help="symmetric quantizer (zero-point fixed at 2^(C-1))")
    g.add_argument("--slicing", default="paper", choices=SLICING_MODES,
                   help="how an r-bit slice is read from the C-bit codes: paper (round-half-up + clamp), "
                        "nested (truncate + bucket centre: an exact bit prefix), extra (no clamp, 2^r+1 levels). "
                        "Stored as the checkpoint's default; can be changed at eval time.")
    g.add_argument("--param-dtype", default="float16", choices=("float16", "bfloat16", "float32"),
                   help="storage dtype of scales and zeros (default float16)")
    g.add_argument("--calib-text", default="calib", metavar="SRC",
                   help="calibration text for data-driven methods: 'calib' (embedded, disjoint from eval) or a file")
    g.add_argument("--calib-windows", type=int, default=None,
                   help="calibration windows (default: the method's, else 128; omniquant 8)")
    g.add_argument("--calib-seqlen", type=int, default=None,
                   help="calibration window length (default: the method's, else 2048; omniquant 256)")
    from matquant.algorithms.omniquant import add_omniquant_args

    add_omniquant_args(p)


def quant_kwargs(args) -> dict:
    from matquant.algorithms.omniquant import omniquant_kwargs

    return dict(master_bits=args.bits_master, group_size=args.group_size, scope=args.scope, modules=args.modules,
                symmetric=args.symmetric, slicing=args.slicing, param_dtype=args.param_dtype,
                **omniquant_kwargs(args))


def calibration(args, tokenizer):
    from matquant.algorithms import CALIBRATED, METHODS
    from matquant.data import token_windows

    if args.method not in CALIBRATED:
        return None
    n, seqlen = getattr(METHODS[args.method], "calib_defaults", (128, 2048))
    return token_windows(tokenizer, args.calib_text, args.calib_seqlen or seqlen, args.calib_windows or n)


def register(sub) -> None:
    p = sub.add_parser("quantize", help="quantize a model into one multi-precision checkpoint folder",
                       description="Quantize the target linear layers of a model to C-bit master codes and write ONE "
                                   "checkpoint folder from which every precision <= C can be loaded.")
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help="HF hub id, local HF folder, .gguf file, or the embedded 'smollm2-135m' (default)")
    p.add_argument("--out", required=True, help="output checkpoint folder")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--debug", action="store_true", help="show full tracebacks")
    add_quant_args(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from pathlib import Path

    from matquant.algorithms import quantize_model
    from matquant.format.checkpoint import save_checkpoint
    from matquant.models import load_model

    if Path(args.out).exists() and not args.overwrite:
        raise FileExistsError(f"{args.out} already exists; pass --overwrite or choose another --out.")
    t0 = time.time()
    kw = quant_kwargs(args)  # validates method options before any work
    print(f"loading {args.model} ...")
    model, tok, src = load_model(args.model)
    calib = calibration(args, tok)
    qcfg = quantize_model(model, args.method, calib=calib, **kw)
    save_checkpoint(model, tok, args.out, qcfg, overwrite=args.overwrite)
    print(f"wrote {args.out}: {len(qcfg.modules)} layers, {args.method}, int{qcfg.master_bits} master, "
          f"group {qcfg.group_size}, slicing {qcfg.slicing} ({time.time() - t0:.0f}s)")
    return 0
