"""Mix'n'Match Pareto measurement: perplexity vs bits of uniform slices, fixed schedules and searched maps.

Usage (make a checkpoint first, e.g. `python -m matquant quantize --out WORK/rtn8`):

    OMP_NUM_THREADS=1 PYTHONPATH=src python lab/benchmarks/mixnmatch_pareto.py WORK/rtn8 --out runs/mnm \
        --eval-windows 2 --modes nested,paper --budgets 2.5,3,3.5,4,5,6 --search-budgets 3.0

Jobs run in priority order (everything at budget 3.0 first, then uniform slices, other budgets, other searches)
and every result is appended to OUT/results.json atomically, so an interrupted run resumes where it stopped.
Searched maps come from the real CLI (`matquant mixnmatch ... --schedule search`), on the 'calib' text;
perplexity is on the 'eval' text (never searched on). Writes OUT/table.md and OUT/pareto.png.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import shlex
import sys
import time
from pathlib import Path

import torch

from matquant.cli import main as cli_main
from matquant.data import token_windows
from matquant.eval.perplexity import perplexity
from matquant.format.atomic import atomic_write_json, atomic_write_text
from matquant.format.checkpoint import load_checkpoint
from matquant.mixnmatch import SCHEDULES, CostModel, parse_budget, schedule_map
from matquant.nn import set_bits


def _hash(m: dict) -> str:
    return hashlib.sha1(json.dumps(m, sort_keys=True).encode()).hexdigest()[:10]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("checkpoint")
    p.add_argument("--out", required=True)
    p.add_argument("--eval-windows", type=int, default=2)
    p.add_argument("--eval-seqlen", type=int, default=2048)
    p.add_argument("--modes", default="nested,paper")
    p.add_argument("--schedule-modes", default=None, help="modes for the fixed schedules at budgets != 3 "
                                                          "(default: --modes)")
    p.add_argument("--budgets", default="2.5,3,3.5,4,5,6")
    p.add_argument("--uniform-bits", default="2,3,4,5,6,8")
    p.add_argument("--search-budgets", default="3.0")
    p.add_argument("--search-modes", default=None, help="default: --modes")
    p.add_argument("--search-args", default="", help="extra CLI options for `matquant mixnmatch` (quoted)")
    p.add_argument("--fp32", default=None, metavar="MODEL", help="also evaluate this fp32 model (e.g. smollm2-135m)")
    p.add_argument("--floors", default="auto,min", help="floors of the fixed schedules (matquant.mixnmatch.FLOORS)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--skip-first", action="store_true",
                   help="skip the budget-3.0 block (when another process measures it)")
    p.add_argument("--plot-only", action="store_true")
    p.add_argument("--merge", nargs="*", default=[], metavar="DIR",
                   help="with --plot-only: also take the rows of these earlier OUT folders (e.g. another mode)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    res_path = out / "results.json"
    results = json.loads(res_path.read_text()) if res_path.exists() else {"rows": []}
    done = {(r["mode"], r["map_hash"]) for r in results["rows"]}
    modes = args.modes.split(",")
    smodes = (args.schedule_modes or args.modes).split(",")
    floors = args.floors.split(",")
    search_modes = (args.search_modes or args.modes).split(",")
    budgets = [float(b) for b in args.budgets.split(",") if b]
    search_budgets = [float(b) for b in args.search_budgets.split(",") if b]
    cost = CostModel.from_checkpoint(args.checkpoint)

    def save():
        atomic_write_json(res_path, results)
        write_outputs(results, out)

    if args.plot_only:
        for d in args.merge:
            other = json.loads((Path(d) / "results.json").read_text())
            results["rows"] += other["rows"]
            results.setdefault("protocol", other.get("protocol", {}))
            if "fp32" in other:
                results.setdefault("fp32", other["fp32"])
        seen, rows = set(), []
        for r in results["rows"]:  # the same measurement from several folders counts once
            k = (r["kind"], r["label"], r["budget"], r["mode"])
            if k not in seen:
                seen.add(k)
                rows.append(r)
        results["rows"] = rows
        write_outputs(results, out)
        return 0
    model, tok, qcfg = load_checkpoint(args.checkpoint)
    windows = token_windows(tok, "eval", args.eval_seqlen, args.eval_windows)
    results["protocol"] = {"checkpoint": str(args.checkpoint), "eval_text": "eval", "seqlen": args.eval_seqlen,
                           "windows": int(windows.shape[0]), "threads": args.threads,
                           "method": qcfg.method, "group_size": qcfg.group_size, "scope": qcfg.scope}

    def evaluate(kind, label, budget, mode, bits_map, extra=None):
        key = (mode, _hash(bits_map))
        if key in done:
            for r in results["rows"]:  # same map already measured under another label: record the alias
                if (r["mode"], r["map_hash"]) == key and (r["kind"], r["label"], r["budget"]) != (kind, label, budget):
                    if not any((x["kind"], x["label"], x["budget"], x["mode"]) == (kind, label, budget, mode)
                               for x in results["rows"]):
                        results["rows"].append(dict(r, kind=kind, label=label, budget=budget, **(extra or {})))
                        save()
                    break
            return
        set_bits(model, bits_map, mode)
        t0 = time.time()
        r = perplexity(model, windows, desc=f"{label} {mode} @{budget}")
        row = {"kind": kind, "label": label, "budget": budget, "mode": mode, "ppl": r.ppl, "nll": r.nll,
               "tokens": r.tokens, **cost.summary(bits_map), "map_hash": key[1], "eval_s": round(time.time() - t0, 1),
               **(extra or {})}
        results["rows"].append(row)
        done.add(key)
        save()
        print(f"{kind:9s} {label:16s} budget {budget} {mode:6s}: ppl {r.ppl:.3f} "
              f"({row['average_bits']:.3f} bits)", flush=True)

    def schedules_at(b, ms):
        cap = cost.code_bits_cap(parse_budget(str(b)), 2)
        for mode in ms:
            for s in SCHEDULES:
                for fl in floors:  # label "pyramid" = the default floor (auto), "pyramid/min" = the whole ladder
                    label = s if fl == "auto" else f"{s}/{fl}"
                    evaluate("schedule", label, b, mode, schedule_map(cost, cap, s, floor=fl))

    def search_at(b, mode):
        path = out / f"search-{b:g}-{mode}.json"
        if not path.exists():
            argv = ["mixnmatch", args.checkpoint, "--budget", str(b), "--slicing", mode, "--out", str(path),
                    "--work-dir", str(out / "work"), *shlex.split(args.search_args)]
            print("matquant " + " ".join(argv), flush=True)
            t0 = time.time()
            rc = cli_main(argv)
            if rc:
                print(f"search failed (rc {rc})", file=sys.stderr)
                return
            print(f"search took {time.time() - t0:.0f}s", flush=True)
        doc = json.loads(path.read_text())
        s = doc.get("search", {})
        evaluate("search", "search", b, mode, doc["bits_map"],
                 {"search_kl": s.get("kl"), "search_init": s.get("init_from"), "search_init_kl": s.get("init_kl"),
                  "search_wall_s": doc.get("wall_seconds"), "search_tokens": s.get("forward_tokens"),
                  "search_seconds": s.get("seconds"), "search_config": s.get("config")})

    # 1. everything at budget 3.0
    for mode in modes if not args.skip_first else []:
        evaluate("uniform", "int3", 3.0, mode, cost.uniform(3))
    if not args.skip_first:
        schedules_at(3.0, modes)
    if 3.0 in search_budgets and not args.skip_first:
        for mode in search_modes:
            search_at(3.0, mode)
    # 2. uniform slices
    for b in [int(x) for x in args.uniform_bits.split(",") if x]:
        for mode in (modes if b < qcfg.master_bits else modes[:1]):
            evaluate("uniform", f"int{b}", float(b), mode, cost.uniform(b))
    # 3. other budgets, fixed schedules; 4. other searches
    for b in budgets:
        if b != 3.0 or args.skip_first:
            schedules_at(b, smodes)
    for b in search_budgets:
        if b != 3.0:
            for mode in search_modes:
                search_at(b, mode)
    if args.fp32 and not any(r["kind"] == "fp32" for r in results["rows"]):
        from matquant.models import load_model

        del model
        fp, _, _ = load_model(args.fp32)
        r = perplexity(fp, windows, desc="fp32")
        results["fp32"] = {"ppl": r.ppl, "nll": r.nll, "tokens": r.tokens}
        save()
    save()
    return 0


def write_outputs(results: dict, out: Path) -> None:
    rows = results["rows"]
    fp32 = results.get("fp32", {}).get("ppl")
    pr = results.get("protocol", {})
    lines = [f"Perplexity on 'eval' ({pr.get('windows')} windows × {pr.get('seqlen')} tokens), "
             f"{pr.get('method')} int8 checkpoint, {pr.get('scope')} layers, group {pr.get('group_size')}"
             + (f"; fp32 reference ppl {fp32:.3f}" if fp32 else ""), "",
             "| budget | kind | label | slicing | avg bits | eff. bits | ppl |" + (" ÷ fp32 |" if fp32 else ""),
             "|---|---|---|---|---|---|---|" + ("---|" if fp32 else "")]
    order = {"uniform": 0, "schedule": 1, "search": 2}
    for r in sorted(rows, key=lambda r: (r["budget"], r["mode"], order.get(r["kind"], 3), r["ppl"])):
        ratio = f" {r['ppl'] / fp32:.2f}× |" if fp32 else ""
        lines.append(f"| {r['budget']:g} | {r['kind']} | {r['label']} | {r['mode']} | {r['average_bits']:.3f} | "
                     f"{r['effective_bits']:.3f} | {r['ppl']:.3f} |{ratio}")
    atomic_write_text(out / "table.md", "\n".join(lines) + "\n" + "\n" + summary(rows, fp32))
    plot(rows, fp32, out / "pareto.png", pr)


def summary(rows, fp32) -> str:
    """Per budget and slicing mode: the uniform mix, the best fixed schedule (default floor), the searched map."""
    ref = fp32 or 1.0

    def cell(r):
        return "—" if r is None else f"{r['ppl'] / ref:.3g}×" if fp32 else f"{r['ppl']:.3g}"

    out = [f"Summary ({'÷ fp32' if fp32 else 'ppl'}; search vs the best other map at the same budget)", "",
           "| budget | mode | uniform slice (or mix) | best fixed schedule | search | search vs best other |",
           "|---|---|---|---|---|---|"]
    for b, mode in sorted({(r["budget"], r["mode"]) for r in rows if r["kind"] != "uniform"}):
        at = [r for r in rows if r["budget"] == b and r["mode"] == mode]
        uni = next((r for r in at if r["kind"] == "uniform"), None) or next(
            (r for r in at if r["kind"] == "schedule" and r["label"] == "uniform"), None)  # the int-b slice if any
        fixed = sorted((r for r in at if r["kind"] == "schedule" and "/" not in r["label"]), key=lambda r: r["ppl"])
        srch = next((r for r in at if r["kind"] == "search"), None)
        others = [r["ppl"] for r in at if r["kind"] != "search"]
        gain = f"{100 * (srch['ppl'] / min(others) - 1):+.1f} %" if srch and others else "—"
        best = f"{fixed[0]['label']} {cell(fixed[0])}" if fixed else "—"
        out.append(f"| {b:g} | {mode} | {cell(uni)} | {best} | {cell(srch)} | {gain} |")
    return "\n".join(out) + "\n"


def plot(rows, fp32, path, protocol=None, ymax_ratio: float = 30.0) -> None:
    """Perplexity (÷ fp32 when known) vs average code bits. Schedules with a non-default floor ('pyramid/min') are
    left to the table; points above `ymax_ratio`× fp32 are drawn as triangles on the top edge."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=100)
    styles = {"uniform": ("-", "o"), "schedule": ("", "x"), "search": ("-", "*")}
    series: dict[tuple, list] = {}
    ref = fp32 or 1.0
    top = ymax_ratio * ref if fp32 else None
    for r in rows:
        if r["kind"] == "schedule" and "/" in r["label"]:
            continue
        name = (r["kind"], r["label"] if r["kind"] == "schedule" else r["kind"], r["mode"])
        series.setdefault(name, []).append((r["average_bits"], r["ppl"]))
    for i, ((kind, label, mode), pts) in enumerate(sorted(series.items())):
        pts = sorted(set(pts))
        ls, mk = styles.get(kind, ("-", "."))
        inside = [p for p in pts if top is None or p[1] <= top]
        line, = ax.plot([p[0] for p in inside], [p[1] / ref for p in inside], linestyle=ls or "none", marker=mk,
                        ms=11 if kind == "search" else 5, lw=1.6 if kind == "search" else 1.2, alpha=0.9,
                        zorder=3 if kind == "search" else 2,
                        label=f"{'uniform slice' if kind == 'uniform' else label} ({mode})")
        above = [p for p in pts if top is not None and p[1] > top]
        if above:
            ax.plot([p[0] for p in above], [ymax_ratio] * len(above), linestyle="none", marker="^", ms=5,
                    color=line.get_color(), alpha=0.9, clip_on=False)
    if fp32:
        ax.axhline(1.0, ls="--", c="k", lw=1, label=f"fp32 (ppl {fp32:.2f})")
    ax.set_yscale("log")
    if fp32:
        ax.set_ylim(0.95, ymax_ratio)
    pr = protocol or {}
    ax.set_xlabel(f"average code bits per quantized weight ({pr.get('scope', '?')} layers; +0.5 for scales/zeros)")
    ax.set_ylabel(f"perplexity {'÷ fp32 ' if fp32 else ''}on 'eval' (log" +
                  (f"; ▲ > {ymax_ratio:g}×)" if fp32 else ")"))
    ax.set_title(f"SmolLM2-135M Mix'n'Match: one int8 {pr.get('method', '')} checkpoint, {pr.get('scope', '')}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=6.5, ncol=2, loc="upper right", bbox_to_anchor=(1, 0.93))
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    from matquant.format.atomic import atomic_write_bytes

    atomic_write_bytes(path, buf.getvalue())


if __name__ == "__main__":
    raise SystemExit(main())
