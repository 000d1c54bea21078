"""matquant demo: the whole story on the embedded SmolLM2-135M in a few minutes on a laptop CPU."""
from __future__ import annotations

import resource
import time
from pathlib import Path

from matquant.commands.common import add_eval_args, int_list, mode_list
from matquant.commands.quantize import MethodHelp, add_quant_args, config_from_args
from matquant.models.loading import DEFAULT_MODEL


def register(sub) -> None:
    p = sub.add_parser(
        "demo", help="quantize the embedded model once, evaluate every slice, print a table and plot",
        description="Load the embedded SmolLM2-135M (dequantized to fp32: the reference), build ONE int8 MatQuant "
                    "checkpoint of its FFN layers (--recipe quality by default; --method rtn for the data-free "
                    "baseline), evaluate its int8/6/4/3/2 slices, compare with dedicated per-bit RTN baselines, and "
                    "write a table, a JSON file and a PNG plot.", add_help=False)
    p.add_argument("-h", "--help", action=MethodHelp, help="show the options (of --method NAME if given) and exit")
    p.add_argument("--model", default=DEFAULT_MODEL, help="model to use (default: the embedded smollm2-135m)")
    p.add_argument("--out", default="matquant-demo", help="output folder (default ./matquant-demo)")
    p.add_argument("--bits", type=int_list, default=[8, 6, 4, 3, 2], help="precisions to evaluate")
    p.add_argument("--modes", type=mode_list, default=["nested"],
                   help="slicing modes to evaluate, e.g. paper,nested (default nested)")
    p.add_argument("--no-baselines", action="store_true", help="skip the dedicated per-bit RTN baselines")
    p.add_argument("--debug", action="store_true")
    add_quant_args(p, threads_default=2)  # the thread count the docs' numbers used
    add_eval_args(p, windows_default=6)
    p.set_defaults(func=run)


def run(args) -> int:
    import torch

    from matquant.algorithms.pipeline import quantize, set_threads
    from matquant.data import token_windows
    from matquant.eval.grid import ppl_grid
    from matquant.experiments.report import format_table
    from matquant.eval.perplexity import perplexity
    from matquant.eval.plot import plot_ppl_vs_bits
    from matquant.format.atomic import atomic_write_json, atomic_write_text
    from matquant.format.checkpoint import checkpoint_size_bytes, state_dict_bytes
    from matquant.models import find_targets, linear_weight, load_model
    from matquant.nn.linear import MatQuantLinear
    from matquant.nn.replace import set_submodule
    from matquant.quant.minmax import quantize_minmax

    t0 = time.time()
    config, calibration = config_from_args(args)  # every option checked before any work
    threads = set_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"[1/5] loading {args.model} (fp32 reference) ...", flush=True)
    model, tok, src = load_model(args.model, device=args.device)
    fp32_bytes = state_dict_bytes(model)
    windows = token_windows(tok, args.eval_text, args.seqlen, args.windows or None)
    print(f"[2/5] fp32 perplexity on {args.eval_text} ({windows.numel()} tokens, seqlen {args.seqlen}) ...", flush=True)
    ref = perplexity(model, windows, args.batch_size, desc="ppl fp32")
    targets = find_targets(model, config.scope, config.modules)
    fp_weights = {n: linear_weight(model.get_submodule(n)).detach().clone() for n in targets}
    print(f"[3/5] quantizing {len(targets)} layers: {config.name} {_options_text(config)}, int{config.master_bits} "
          f"master, group {config.group_size}, {threads} threads ...", flush=True)
    tq = time.time()
    ckpt = out / "checkpoint"
    model, tok, qcfg = quantize(model, config, tokenizer=tok, out=ckpt, overwrite=True, calib=calibration,
                                log=lambda *_: None)
    quant_s = time.time() - tq
    print(f"[4/5] evaluating slices {args.bits} x {args.modes} of the one checkpoint ...", flush=True)
    rows = ppl_grid(model, windows, args.bits, args.modes, batch_size=args.batch_size)
    for r in rows:
        r["method"] = f"{config.name} int{config.master_bits} sliced"
    base_rows = []
    if not args.no_baselines:
        print("[5/5] dedicated RTN baselines (one model per bit-width) ...", flush=True)
        sliced = {n: model.get_submodule(n) for n in targets}
        for b in [b for b in args.bits if b != config.master_bits]:
            for n in targets:
                old = sliced[n]
                qw = quantize_minmax(fp_weights[n], b, config.group_size, config.symmetric,
                                     getattr(torch, config.param_dtype))
                set_submodule(model, n, MatQuantLinear.from_quantized(qw, old.bias, dtype=old.compute_dtype))
            r = perplexity(model, windows, args.batch_size, desc=f"ppl RTN int{b}")
            base_rows.append({"method": f"rtn int{b} dedicated", "bits": b, "slicing": "-", "ppl": r.ppl,
                              "nll": r.nll, "tokens": r.tokens, "seqlen": r.seqlen,
                              "effective_bits": None})
        for n in targets:
            set_submodule(model, n, sliced[n])
    wall = time.time() - t0
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    ck_bytes = checkpoint_size_bytes(ckpt)
    all_rows = [{"method": "fp32 reference", "bits": 32, "slicing": "-", "ppl": ref.ppl, "effective_bits": 32}] \
        + rows + base_rows
    table = format_table(all_rows, ref_ppl=ref.ppl,
                         title=f"{src.describe().split('/')[-1]} — {qcfg.scope} layers, group {qcfg.group_size}, "
                               f"{ref.tokens} eval tokens")
    summary = {
        "model": args.model, "source": src.describe(), "method": config.name, "qconfig": qcfg.to_dict(),
        "fp32": ref.to_dict(), "rows": all_rows, "quantize_seconds": round(quant_s, 1),
        "wall_seconds": round(wall, 1), "peak_rss_gib": round(peak_rss, 2),
        "checkpoint_bytes": ck_bytes, "fp32_model_bytes": fp32_bytes, "torch": torch.__version__,
        "threads": threads,
    }
    atomic_write_json(out / "results.json", summary)
    atomic_write_text(out / "results.md", table + "\n")
    plot_rows = [dict(r, series=f"int{config.master_bits} sliced, {r['slicing']} slicing") for r in rows
                 if r["slicing"] != "any"]
    for r in rows:
        if r["slicing"] == "any":  # the master precision is shared by every mode
            plot_rows += [dict(r, series=f"int{config.master_bits} sliced, {m} slicing") for m in args.modes]
    plot_rows += [dict(r, series="RTN dedicated") for r in base_rows]
    plot_rows += [dict(r, series="RTN dedicated") for r in rows if r["bits"] == config.master_bits]
    plot_ppl_vs_bits(plot_rows, ref.ppl, out / "ppl_vs_bits.png",
                     title=f"SmolLM2-135M {qcfg.scope}: one int{config.master_bits} checkpoint, every slice")
    print()
    print(table)
    print()
    print(f"checkpoint  {ckpt}  ({ck_bytes / 2**20:.1f} MiB; fp32 model {fp32_bytes / 2**20:.1f} MiB)")
    print(f"table       {out / 'results.md'}\nJSON        {out / 'results.json'}\nplot        {out / 'ppl_vs_bits.png'}")
    print(f"wall time {wall:.0f}s, peak RSS {peak_rss:.2f} GiB")
    print(f"next: matquant eval {ckpt} --bits 4,2 --slicing nested   |   "
          f"python -c \"import matquant; m, tok = matquant.load('{ckpt}', bits=4)\"")
    return 0


def _options_text(config) -> str:
    """The options that differ from the method's defaults, e.g. 'clip=weighted slice_params=own'."""
    return " ".join(f"{k}={v}" for k, v in config.method_args().items())
