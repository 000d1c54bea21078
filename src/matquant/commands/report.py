"""matquant report: print the tables of a results store."""
from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("report", help="print the result tables of an experiment store",
                       description="Print the perplexity and zero-shot tables of a results store (the .jsonl file "
                                   "or the grid's output folder). Default: runs/*/results.jsonl.")
    p.add_argument("store", nargs="?", default=None, help="results .jsonl file or folder holding results.jsonl")
    p.add_argument("--write", metavar="DIR", default=None, help="also write results.md and PNG plots into DIR")
    p.add_argument("--debug", action="store_true")
    p.set_defaults(func=run)


def run(args) -> int:
    from pathlib import Path

    from matquant.experiments.report import build_tables, write_report
    from matquant.experiments.runner import store_path_for
    from matquant.experiments.store import ResultStore

    if args.store is None:
        paths = sorted(Path("runs").glob("*/results.jsonl"))
        if not paths:
            raise FileNotFoundError("no results store given and none found under runs/*/results.jsonl; pass the "
                                    "store path (the grid's `store`, default runs/<grid name>/results.jsonl).")
    else:
        paths = [store_path_for(args.store)]
    for p in paths:
        if not p.is_file():
            raise FileNotFoundError(f"results store {p} does not exist; run `matquant experiment GRID.yaml` first.")
        store = ResultStore(p)
        recs = store.records()
        print(f"# {p} ({len(recs)} results)\n")
        print(build_tables(recs) if recs else "(empty)\n")
        if args.write:
            files = write_report(store, args.write, name=p.parent.name)
            print("wrote " + ", ".join(str(f) for f in files.values()))
    return 0
