"""Size of the zero-shot workload: scored continuations and model tokens, for a `limit` subset and the full sets.

Builds lm-eval's requests exactly as an evaluation does (local data, no model run) and tokenizes context +
continuation with the model's tokenizer. Used to extrapolate a measured subset time to the full validation sets:
time_full ≈ time_subset × tokens_full / tokens_subset (forward cost is ~linear in tokens at these lengths).
Usage: PYTHONPATH=src python lab/benchmarks/zeroshot_cost.py --limit 100
"""
from __future__ import annotations

import argparse


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--limit", type=int, default=100)
    ap.add_argument("--model", default="smollm2-135m")
    args = ap.parse_args()
    from transformers import AutoTokenizer

    from matquant.eval.zeroshot_tasks import TASKS, build_tasks
    from matquant.models.loading import resolve_model

    src = resolve_model(args.model)
    tok = AutoTokenizer.from_pretrained(src.path, **({"gguf_file": src.gguf_file} if src.gguf_file else {}))
    tasks = build_tasks()
    print("| task | questions (subset / full) | continuations (subset / full) | tokens (subset / full) |")
    print("|---|---|---|---|")
    tot = [0, 0, 0, 0, 0, 0]
    for name in TASKS:
        t = tasks[name]
        out = []
        for lim in (args.limit, None):
            t.build_all_requests(limit=lim, rank=0, world_size=1)
            inst = t.instances
            docs = len({i.doc_id for i in inst})
            ntok = sum(len(tok(c + x, add_special_tokens=False).input_ids) for c, x in (i.args for i in inst))
            out.append((docs, len(inst), ntok))
        (a, b, c), (d, e, f) = out
        tot = [x + y for x, y in zip(tot, (a, d, b, e, c, f))]
        print(f"| {name} | {a} / {d} | {b} / {e} | {c:,} / {f:,} |")
    print(f"| **all six** | {tot[0]} / {tot[1]} | {tot[2]} / {tot[3]} | {tot[4]:,} / {tot[5]:,} "
          f"(×{tot[5] / tot[4]:.1f}) |")


if __name__ == "__main__":
    main()
