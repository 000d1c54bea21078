"""Zero-shot accuracy (lm-eval, local data) of fp32 SmolLM2-135M and every RTN int8-sliced slice, both slicing modes.

Resumable: every finished slice is appended to --out (JSONL, one line per slice) and skipped on the next run.
Usage:  OMP_NUM_THREADS=1 PYTHONPATH=src python lab/benchmarks/zeroshot_slices.py --limit 100   # -> WORK/zs/slices.jsonl
Then:   PYTHONPATH=src python lab/benchmarks/zeroshot_slices.py --table-only
WORK is the work folder (--work, else $MATQUANT_WORK, else ./matquant-work; lab/benchmarks/_paths.py).
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from _paths import add_work_option, work_path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--limit", type=int, default=100, help="questions per task (first N); 0 = full sets")
    ap.add_argument("--bits", default="8,4,2,3,6")
    ap.add_argument("--modes", default="paper,nested")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")))
    ap.add_argument("--out", default=None, help="JSONL store (default: WORK/zs/slices.jsonl)")
    add_work_option(ap, "the default --out")
    ap.add_argument("--table-only", action="store_true")
    ap.add_argument("--skip-fp32", action="store_true", help="do not measure the fp32 reference in this process")
    args = ap.parse_args()
    args.out = args.out or str(work_path("zs", "slices.jsonl", work=args.work))

    from matquant.experiments.store import ResultStore

    store = ResultStore(args.out)
    if not args.table_only:
        run(args, store)
    print_table(store)


def run(args, store) -> None:
    import torch

    from matquant.algorithms import quantize_model
    from matquant.eval.zeroshot import wrap_model, zeroshot
    from matquant.eval.zeroshot_tasks import build_tasks
    from matquant.models import load_model
    from matquant.nn.bits import effective_bits, set_bits

    torch.set_num_threads(args.threads)
    limit = args.limit or None
    base = {"model": "smollm2-135m", "limit": limit, "batch_size": args.batch_size}
    jobs = [] if args.skip_fp32 else [dict(base, method="fp32", bits=32, slicing="-")]
    for b in [int(x) for x in args.bits.split(",")]:
        for mode in (args.modes.split(",") if b < 8 else ["any"]):
            jobs.append(dict(base, method="rtn int8 sliced (ffn, g64)", bits=b, slicing=mode))
    todo = [j for j in jobs if not store.done(j)]
    print(f"{len(jobs) - len(todo)} of {len(jobs)} slices already measured; {len(todo)} to go", flush=True)
    if not todo:
        return
    model, tok, _ = load_model("smollm2-135m")
    tasks = build_tasks()
    lm = wrap_model(model, tok, args.batch_size)
    quantized = False
    for j in todo:
        if j["method"] != "fp32" and not quantized:
            quantize_model(model, "rtn", master_bits=8, group_size=64, scope="ffn", slicing="paper")
            quantized = True
        if j["method"] != "fp32":
            set_bits(model, j["bits"], "paper" if j["slicing"] == "any" else j["slicing"])
        t0 = time.time()
        r = zeroshot(model, tok, limit=limit, batch_size=args.batch_size, lm=lm, task_objs=tasks)
        eff = 32.0 if j["method"] == "fp32" else round(effective_bits(model), 4)
        store.append(j, {"zeroshot": r.to_dict(), "effective_bits": eff, "seconds": round(time.time() - t0, 1),
                         "threads": args.threads})
        print(f"{j['method']} int{j['bits']} {j['slicing']}: avg {r.average:.4f} in {r.seconds / 60:.1f} min",
              flush=True)


def print_table(store) -> None:
    from matquant.eval.zeroshot_tasks import TASKS

    recs = store.records()
    print("| model | bits | slicing | eff. bits | " + " | ".join(f"{t} acc / acc_norm" for t in TASKS)
          + " | avg | min/slice |")
    print("|" + "---|" * (len(TASKS) + 6))
    for r in recs:
        c, res = r["config"], r["result"]
        zs = res["zeroshot"]
        cells = [f"{zs['tasks'][t]['acc']:.3f} / {zs['tasks'][t]['acc_norm']:.3f}" for t in TASKS]
        print(f"| {c['method']} | {c['bits']} | {c['slicing']} | {res['effective_bits']} | " + " | ".join(cells)
              + f" | **{zs['average']:.3f}** | {res['seconds'] / 60:.1f} |")


if __name__ == "__main__":
    main()
