"""matquant eval: perplexity of every requested precision of one checkpoint."""
from __future__ import annotations

import json

from matquant.commands.common import add_eval_args, eval_windows, int_list, load_bits_map, mode_list


def register(sub) -> None:
    p = sub.add_parser("eval", help="evaluate precisions of a checkpoint (perplexity)",
                       description="Load ONE checkpoint and report perplexity at each requested precision, switching "
                                   "bits in place (no reload). Example: matquant eval ckpt --bits 8,6,4,3,2 "
                                   "--slicing paper,nested")
    p.add_argument("checkpoint", help="matquant checkpoint folder")
    p.add_argument("--bits", type=int_list, default=[8, 6, 4, 3, 2], help="precisions, e.g. 8,4,2 (default 8,6,4,3,2)")
    p.add_argument("--bits-map", default=None, metavar="JSON",
                   help="also evaluate a per-layer map {module name|glob|regex: bits} (Mix'n'Match)")
    p.add_argument("--slicing", type=mode_list, default=None,
                   help="slicing modes to evaluate, comma-separated (default: the checkpoint's)")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the rows as JSON")
    p.add_argument("--debug", action="store_true", help="show full tracebacks")
    add_eval_args(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from matquant.eval.grid import format_table, ppl_grid
    from matquant.format.atomic import atomic_write_json
    from matquant.format.checkpoint import load_checkpoint

    bits_map = load_bits_map(args.bits_map)
    model, tok, qcfg = load_checkpoint(args.checkpoint, device=args.device)
    if tok is None:
        raise ValueError(f"{args.checkpoint} has no tokenizer files; re-create it with `matquant quantize`.")
    too_high = [b for b in args.bits if b > qcfg.master_bits]
    if too_high:
        raise ValueError(f"--bits {too_high} exceed the checkpoint's master bits ({qcfg.master_bits}).")
    windows = eval_windows(tok, args)
    modes = args.slicing or [qcfg.slicing]
    rows = ppl_grid(model, windows, args.bits, modes, bits_map=bits_map, batch_size=args.batch_size)
    for r in rows:
        r["method"] = qcfg.method
    print(format_table(rows, title=f"{args.checkpoint}: perplexity on {args.eval_text} "
                                   f"({rows[0]['tokens']} tokens, seqlen {args.seqlen})"))
    if args.json:
        atomic_write_json(args.json, rows)
        print(f"rows written to {args.json}")
    return 0
