"""matquant experiment: run a YAML grid of quantization × evaluation measurements, resumably."""
from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser(
        "experiment", help="run an experiment grid (YAML) into a resumable results store, with tables and plots",
        description="Expand GRID.yaml (models × methods × slicing × scope × bits, see docs/experiments.md), run "
                    "every measurement not yet in the results store (JSONL; each result appended as soon as it is "
                    "measured), then regenerate results.md and the PNG plots. Interrupt at any time and run the "
                    "same command again to resume.")
    p.add_argument("grid", help="grid file (YAML)")
    p.add_argument("--dry-run", action="store_true", help="list the measurements and what is already done, run none")
    p.add_argument("--report-only", action="store_true", help="only regenerate tables and plots from the store")
    p.add_argument("--debug", action="store_true", help="show full tracebacks")
    p.set_defaults(func=run)


def run(args) -> int:
    from matquant.experiments.grid import load_grid
    from matquant.experiments.report import build_tables, write_report
    from matquant.experiments.runner import _describe, run_grid
    from matquant.experiments.store import ResultStore, config_key

    grid = load_grid(args.grid)
    store = ResultStore(grid.store)
    if args.dry_run:
        done = store.keys()
        for j in grid.jobs:
            for c in j.evals:
                print(("done  " if config_key(c) in done else "todo  ") + _describe(c))
        return 0
    if not args.report_only:
        s = run_grid(grid)
        print(f"{s['measured']} measured, {s['skipped']} skipped (already done), {s['seconds']:.0f}s")
    files = write_report(store, grid.out, name=grid.name, docs=grid.docs)
    print(build_tables(store.records()))
    print("report: " + ", ".join(str(f) for f in files.values()) + (f", {grid.docs}" if grid.docs else ""))
    return 0
