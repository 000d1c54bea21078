"""matquant mixnmatch: per-layer precisions of one checkpoint under a memory budget (fixed schedule or search)."""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict
from pathlib import Path

from matquant.commands.common import int_list, load_bits_map
from matquant.format.atomic import atomic_write_json
from matquant.format.checkpoint import load_checkpoint, read_quant_config
from matquant.format.config import QuantConfig
from matquant.mixnmatch.budget import CostModel, check_ladder, parse_budget, validate_bits_map
from matquant.mixnmatch.schedules import DEFAULT_LADDER, GRANULARITIES, SCHEDULES, schedule_map
from matquant.mixnmatch.search import SearchConfig, search
from matquant.quant.slicing import SLICING_MODES

DEFAULT_REFERENCE = "smollm2-135m"


def _positive(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {s!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {v}")
    return v


def register(sub) -> None:
    p = sub.add_parser(
        "mixnmatch", help="choose per-layer precisions under a memory budget (Mix'n'Match)",
        description="Pick one precision per layer (or per module) of ONE checkpoint so that the model fits a budget, "
                    "by a fixed schedule or by searching (KL to the fp32 model on calibration text). Writes a bits "
                    "map JSON (--out) and/or stores it in the checkpoint (--apply; no weights are rewritten). "
                    "Example: matquant mixnmatch ckpt --budget 3.0 --schedule search --out bits.json; then "
                    "matquant eval ckpt --bits-map bits.json")
    p.add_argument("checkpoint", help="matquant checkpoint folder")
    p.add_argument("--budget", default=None,
                   help="average code bits per quantized weight (e.g. 3.0: an int3 slice is 3.0, scales/zeros not "
                        "counted) or the total model size with a unit (e.g. 120MB, 0.1GiB: packed codes + "
                        "scales/zeros + unquantized tensors)")
    p.add_argument("--schedule", default="search", choices=SCHEDULES + ("search",),
                   help="fixed schedule, or 'search' (sensitivity knapsack + evolutionary search; default)")
    p.add_argument("--granularity", default="layer", choices=GRANULARITIES,
                   help="layer: one precision per transformer block; module: per linear layer (default layer)")
    p.add_argument("--floor", default="auto", metavar="auto|min|BITS",
                   help="lowest precision a fixed schedule may use: auto = the ladder value just below the budget "
                        "(default), min = the ladder's lowest, or a ladder value")
    p.add_argument("--ladder", type=int_list, default=list(DEFAULT_LADDER),
                   help=f"precisions to choose from (default {','.join(map(str, DEFAULT_LADDER))})")
    p.add_argument("--slicing", choices=SLICING_MODES, default=None,
                   help="slicing mode the map is made for (default: the checkpoint's)")
    p.add_argument("--bits-map", default=None, metavar="JSON",
                   help="price (and with --apply store) this existing map instead of making one")
    p.add_argument("--out", default=None, metavar="JSON", help="write {\"bits_map\": {...}, ...metadata} here")
    p.add_argument("--apply", action="store_true",
                   help="store the map in the checkpoint's config.json (quantization_config.bits_map)")
    p.add_argument("--debug", action="store_true", help="show full tracebacks")
    g = p.add_argument_group("search (--schedule search)")
    g.add_argument("--reference", default=DEFAULT_REFERENCE, metavar="MODEL",
                   help="the full-precision model the checkpoint was made from (KL reference; default %(default)s)")
    g.add_argument("--calib-text", default="calib", metavar="SRC",
                   help="calibration text: 'calib' (embedded, disjoint from eval) or a UTF-8 file. Never 'eval'.")
    g.add_argument("--calib-seqlen", type=_positive, default=512, help="calibration window length (default 512)")
    g.add_argument("--calib-windows", type=_positive, default=16, help="calibration windows in the pool (default 16)")
    g.add_argument("--topk", type=_positive, default=128, help="reference log-probs kept per token (default 128)")
    g.add_argument("--generations", type=int, default=20, help="evolution generations (default 20; 0 = knapsack only)")
    g.add_argument("--offspring", type=_positive, default=8, help="children per generation (default 8)")
    g.add_argument("--stage-windows", type=str, default="1,4",
                   help="calibration windows per selection stage, growing (default 1,4)")
    g.add_argument("--survivors", type=str, default="2", help="children kept after each stage but the last (default 2)")
    g.add_argument("--sens-windows", type=_positive, default=1, help="windows per sensitivity measurement (default 1)")
    g.add_argument("--init", default="sensitivity", choices=("sensitivity", "schedules"),
                   help="starting point: best of knapsack-on-sensitivities and fixed schedules (default), or "
                        "fixed schedules only (skips the sensitivity pass)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--work-dir", default=None,
                   help="cache + resumable state (default: .NAME.mixnmatch next to the checkpoint)")
    g.add_argument("--device", default="cpu")
    g.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def _csv_ints(s: str, what: str) -> tuple[int, ...]:
    try:
        vals = tuple(int(x) for x in s.split(",") if x.strip())
    except ValueError:
        raise ValueError(f"--{what} must be comma-separated integers, got {s!r}") from None
    if not vals:
        raise ValueError(f"--{what} is empty")
    return vals


def apply_bits_map(ckpt_dir, bits_map: dict, slicing: str | None = None) -> None:
    """Store `bits_map` (and optionally the slicing mode) in the checkpoint's config.json, atomically."""
    cfg, _ = read_quant_config(ckpt_dir)
    q = dict(cfg["quantization_config"], bits_map=dict(bits_map))
    if slicing is not None:
        q["slicing"] = slicing
    cfg["quantization_config"] = QuantConfig.from_dict(q).to_dict()
    atomic_write_json(Path(ckpt_dir) / "config.json", cfg)


def run(args) -> int:
    t_start = time.time()
    # ---- every check before any work ----
    if args.calib_text == "eval":
        raise ValueError("--calib-text eval is the evaluation text; search on 'calib' or your own file.")
    _, qcfg = read_quant_config(args.checkpoint)
    slicing = args.slicing or qcfg.slicing
    ladder = check_ladder(args.ladder, qcfg.master_bits)
    cost = CostModel.from_checkpoint(args.checkpoint, slicing, ladder)
    budget = parse_budget(args.budget) if args.budget is not None else None
    if args.bits_map is not None:
        user_map = validate_bits_map(load_bits_map(args.bits_map), qcfg.modules, qcfg.master_bits)
        full = {m: (qcfg.bits_map or {}).get(m, qcfg.default_bits) for m in qcfg.modules} | user_map
        if budget is not None:
            cap = cost.code_bits_cap(budget, 1, qcfg.master_bits)
            if cost.map_code_bits(full) > cap + 1e-6:
                raise ValueError(f"bits map {args.bits_map} ({cost.average_bits(full):.3f} average bits, "
                                 f"{cost.total_bytes(full)} bytes) does not fit the budget {budget.describe()}.")
        bits_map, method, extra = full, f"from {args.bits_map}", {}
    else:
        if budget is None:
            raise ValueError("pass --budget (e.g. --budget 3.0 or --budget 120MB), or --bits-map FILE.")
        cap = cost.code_bits_cap(budget, ladder[0], qcfg.master_bits)
        if args.schedule != "search":
            bits_map = schedule_map(cost, cap, args.schedule, ladder, args.granularity, args.floor)
            method, extra = f"{args.schedule} schedule", {"floor": args.floor}
        else:
            scfg = SearchConfig(ladder=ladder, granularity=args.granularity, seed=args.seed,
                                generations=args.generations, offspring=args.offspring,
                                stage_windows=_csv_ints(args.stage_windows, "stage-windows"),
                                survivors=_csv_ints(args.survivors, "survivors"),
                                sens_windows=args.sens_windows, init=args.init)
            if max(scfg.stage_windows) > args.calib_windows or scfg.sens_windows > args.calib_windows:
                raise ValueError(f"--calib-windows {args.calib_windows} is smaller than the windows a stage needs "
                                 f"({max(max(scfg.stage_windows), scfg.sens_windows)}).")
            res = _search(args, qcfg, cost, cap, slicing, scfg)
            bits_map, method = res.bits_map, "search"
            extra = {"search": {"kl": res.kl, "init_kl": res.init_kl, "init_from": res.init_from,
                                "generations": len(res.history), "seconds": res.seconds,
                                "forward_tokens": res.tokens, "config": asdict(scfg),
                                "reference": args.reference, "calib_text": args.calib_text,
                                "calib_seqlen": args.calib_seqlen, "calib_windows": args.calib_windows,
                                "topk": args.topk}}
    summary = cost.summary(bits_map)
    doc = {"bits_map": bits_map, "method": method, "budget": budget.text if budget else None,
           "slicing": slicing, "granularity": args.granularity, "ladder": list(ladder), **summary,
           "checkpoint": str(args.checkpoint), **extra, "wall_seconds": round(time.time() - t_start, 1)}
    hist: dict[int, int] = {}
    for m, b in bits_map.items():
        hist[b] = hist.get(b, 0) + cost.numel[m]
    share = ", ".join(f"int{b} {100 * n / cost.total_weights:.0f}%" for b, n in sorted(hist.items()))
    print(f"{method}: {summary['average_bits']:.3f} average bits ({summary['effective_bits']:.3f} with scales/zeros), "
          f"{summary['total_bytes'] / 2**20:.2f} MiB total; weights at {share}")
    if args.out:
        atomic_write_json(args.out, doc)
        print(f"bits map written to {args.out}; evaluate: matquant eval {args.checkpoint} --bits-map {args.out} "
              f"--slicing {slicing}")
    if args.apply:
        apply_bits_map(args.checkpoint, bits_map, args.slicing)
        print(f"stored in {Path(args.checkpoint) / 'config.json'} (quantization_config.bits_map); "
              "no weights rewritten")
    if not args.out and not args.apply:
        print(json.dumps(bits_map, indent=1))
    return 0


def _search(args, qcfg, cost, cap, slicing, scfg):
    from matquant.data import token_windows
    from matquant.mixnmatch.fitness import KLFitness, load_or_compute_reference
    from matquant.models import load_model

    ckpt = Path(args.checkpoint)
    work = Path(args.work_dir) if args.work_dir else ckpt.parent / f".{ckpt.resolve().name}.mixnmatch"
    progress = not args.no_progress
    model, tok, _ = load_checkpoint(ckpt, device=args.device)
    if tok is None:
        raise ValueError(f"{ckpt} has no tokenizer files; re-create it with `matquant quantize`.")
    windows = token_windows(tok, args.calib_text, args.calib_seqlen, args.calib_windows)
    if windows.shape[0] < args.calib_windows:
        print(f"note: the calibration text holds only {windows.shape[0]} windows of {args.calib_seqlen} tokens")
    meta = {"reference": args.reference, "calib_text": args.calib_text, "seqlen": args.calib_seqlen,
            "vocab": len(tok)}

    def load_ref():
        print(f"computing the fp32 reference ({args.reference}) on {windows.shape[0]} calibration windows ...")
        ref_model, _, _ = load_model(args.reference, device=args.device)
        if ref_model.config.vocab_size != model.config.vocab_size:
            raise ValueError(f"--reference {args.reference} has vocabulary {ref_model.config.vocab_size} but the "
                             f"checkpoint has {model.config.vocab_size}: pass the model the checkpoint was made from.")
        return ref_model

    ref, cached = load_or_compute_reference(work / f"reference-top{args.topk}.safetensors", windows, args.topk,
                                            meta, load_ref, progress)
    if cached:
        print(f"reusing the cached fp32 reference in {work}")
    fitness = KLFitness(model, ref)
    from matquant.format.folder import checkpoint_files

    # the checkpoint files as they are now: a rewrite invalidates the caches
    stamps = "|".join(f"{f.name}:{f.stat().st_size}:{int(f.stat().st_mtime)}" for f in checkpoint_files(ckpt)[1])
    identity = (f"{ckpt.resolve()}|{stamps}|{json.dumps(meta, sort_keys=True)}|k{args.topk}"
                f"|{args.device}")
    return search(model, fitness, cost, cap, slicing, scfg, work_dir=work, identity=identity, progress=progress,
                  log=print)
