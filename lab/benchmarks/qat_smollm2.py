"""QAT + MatQuant on SmolLM2-135M (FFN-only, group 64): a short run per configuration, then perplexity of every
slice in the trained slicing mode, plus QAT training throughput (tokens/s) on this machine.

    OMP_NUM_THREADS=1 PYTHONPATH=src python lab/benchmarks/qat_smollm2.py --configs rtn,matquant-nested,... \
        --steps 60 --seqlen 256 --lr 3e-4 --out lab/results/qat_smollm2.json

Each configuration's result is stored in the JSON file as soon as it is done (re-running skips finished ones), so
the run can be split across invocations. `--table` prints the markdown tables from the JSON file.
The fp32 reference is the dequantized GGUF model. Training data: the embedded 'calib' text; evaluation: the
embedded 'eval' text (disjoint).
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import shutil
import tempfile
import time
from pathlib import Path

import torch

CONFIGS = {
    # name: (method, master bits, bits list, lambdas, slicing, distill)
    "rtn": ("rtn", 8, None, None, None, None),
    "matquant-nested": ("qat", 8, "8,4,2", "0.1,0.1,1", "nested", None),
    "matquant-paper": ("qat", 8, "8,4,2", "0.1,0.1,1", "paper", None),
    "matquant-paper-distill": ("qat", 8, None, "0.1,0.1,1", "paper", "[8,4,2,8->2]"),
    "sp-int2-paper": ("qat", 8, "2", "1", "paper", None),
    "dedicated-int2": ("qat", 2, "2", "1", "paper", None),
    "dedicated-int4": ("qat", 4, "4", "1", "paper", None),
    "dedicated-int8": ("qat", 8, "8", "1", "paper", None),
}
EVAL_BITS = (8, 6, 4, 3, 2)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default="rtn,matquant-nested,matquant-paper,dedicated-int2")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--seqlen", type=int, default=256, help="training window length")
    p.add_argument("--train-windows", type=int, default=512)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--eval-windows", type=int, default=8)
    p.add_argument("--eval-seqlen", type=int, default=2048)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="lab/results/qat_smollm2.json")
    p.add_argument("--eval-bits", default="2,4,8,3,6", help="precisions to evaluate, in this order (each <= master)")
    p.add_argument("--ckpt-root", default=None,
                   help="save each trained model here (matquant checkpoint) so a later call can finish its evaluation")
    p.add_argument("--no-ref", action="store_true", help="skip the fp32 reference (another --out file has it)")
    p.add_argument("--table", nargs="*", default=None, metavar="JSON",
                   help="only print the markdown tables of these result files (default: --out)")
    a = p.parse_args(argv)
    out = Path(a.out)
    db = json.loads(out.read_text()) if out.exists() else {"runs": {}}
    if a.table is not None:
        merged = {"runs": {}}
        for f in a.table or [a.out]:
            merged["runs"].update(json.loads(Path(f).read_text())["runs"])
        print(render(merged))
        return 0
    eval_bits = [int(b) for b in a.eval_bits.split(",")]
    torch.set_num_threads(a.threads)
    from matquant.algorithms import quantize_model
    from matquant.data import token_windows
    from matquant.eval.perplexity import perplexity
    from matquant.format.atomic import atomic_write_json
    from matquant.models import load_model
    from matquant.nn.bits import set_bits

    base, tok, _ = load_model("smollm2-135m")
    ev = token_windows(tok, "eval", a.eval_seqlen, a.eval_windows)
    db["setup"] = {"model": "SmolLM2-135M (dequantized Q4_1 GGUF = fp32 reference)", "scope": "ffn", "group_size": 64,
                   "eval": f"{ev.shape[0]} windows x {ev.shape[1]} tokens of 'eval'", "threads": a.threads,
                   "machine": f"{platform.machine()} CPU, {torch.get_num_threads()} torch thread(s)",
                   "torch": torch.__version__}

    def save():
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out, db)

    if "fp32" not in db["runs"] and not a.no_ref:
        t = time.time()
        db["runs"]["fp32"] = {"ppl": {"fp32": perplexity(base, ev, desc="fp32").ppl}, "eval_s": time.time() - t}
        save()
    calib = token_windows(tok, "calib", a.seqlen, a.train_windows)
    from matquant.format.checkpoint import load_checkpoint, save_checkpoint

    for name in a.configs.split(","):
        method, master, bits, lams, slicing, distill = CONFIGS[name]
        key = name if method == "rtn" else f"{name}@{a.steps}x{a.batch * a.grad_accum}x{a.seqlen}-lr{a.lr:g}"
        rec = db["runs"].get(key)
        ck = Path(a.ckpt_root) / key if a.ckpt_root else None
        modes = [slicing] if slicing else ["paper", "nested"]
        todo = [(b, m) for m in modes for b in eval_bits if b < master or (b == master and m == modes[0])]
        if rec and all(f"int{b}/{m}" in rec["ppl"] for b, m in todo):
            print(f"{key}: done already")
            continue
        if rec and ck and ck.exists():  # trained before: evaluate the missing rows from its checkpoint
            model = load_checkpoint(ck)[0]
        else:  # the last configuration trains the loaded model itself (saves one model copy of memory)
            model = copy.deepcopy(base) if name != a.configs.split(",")[-1] else base
            work = Path(tempfile.mkdtemp(prefix="qatbench-"))
            t, c = time.time(), time.process_time()
            kw = {}
            if method == "qat":
                kw = dict(bits_list=bits, lambdas=lams, distill=distill, steps=a.steps, lr=a.lr,
                          batch_size_train=a.batch, grad_accum=a.grad_accum, save_every=0, work_dir=str(work),
                          device="cpu")
            qcfg = quantize_model(model, method, master_bits=master, group_size=64, scope="ffn",
                                  slicing=slicing or "paper", calib=calib if method == "qat" else None, **kw)
            train_s, train_cpu_s = time.time() - t, time.process_time() - c
            hist = []
            if method == "qat":
                from safetensors import safe_open

                from matquant.algorithms.training.qat_loop import latest_checkpoint

                with safe_open(str(latest_checkpoint(work)), framework="pt") as f:  # the final step's unit
                    hist = json.loads(f.metadata()["matquant"])["history"]
            shutil.rmtree(work, ignore_errors=True)
            if ck:
                save_checkpoint(model, tok, ck, qcfg, overwrite=True)
            tokens = a.steps * a.batch * a.grad_accum * a.seqlen if method == "qat" else 0
            rec = {"method": method, "master_bits": master, "bits_list": bits, "lambdas": lams, "distill": distill,
                   "slicing": slicing, "steps": a.steps if method == "qat" else 0, "train_tokens": tokens,
                   "seqlen": a.seqlen, "lr": a.lr if method == "qat" else None, "train_s": train_s,
                   "train_cpu_s": train_cpu_s, "tokens_per_s": tokens / train_s if tokens else None,
                   "loss_first5": _avg(hist[:5]), "loss_last5": _avg(hist[-5:]), "history": hist, "ppl": {}}
            db["runs"][key] = rec
            save()
        for b, mode in todo:
            if f"int{b}/{mode}" in rec["ppl"]:
                continue
            set_bits(model, b, mode)
            t = time.time()
            rec["ppl"][f"int{b}/{mode}"] = perplexity(model, ev, desc=f"{name} int{b} {mode}").ppl
            rec.setdefault("eval_s", {})[f"int{b}/{mode}"] = time.time() - t
            print(f"{key} int{b} {mode}: {rec['ppl'][f'int{b}/{mode}']:.3f}", flush=True)
            save()  # after every row: a killed run keeps what it measured
        del model
    print(render(db))
    return 0


def _avg(h):
    return sum(x["loss"] for x in h) / len(h) if h else None


def render(db) -> str:
    runs = db["runs"]
    ref = runs.get("fp32", {}).get("ppl", {}).get("fp32")
    lines = [f"fp32 reference perplexity: {ref:.3f}" if ref else "", "",
             "| run | trained slicing | train tokens | " + " | ".join(f"int{b}" for b in EVAL_BITS) + " |",
             "|---|---|---|" + "---|" * len(EVAL_BITS)]
    for key, r in runs.items():
        if key == "fp32":
            continue
        modes = [r["slicing"]] if r.get("slicing") else ["paper", "nested"]
        for mode in modes:
            cells = []
            for b in EVAL_BITS:
                v = r["ppl"].get(f"int{b}/{mode}") or r["ppl"].get(f"int{b}/{modes[0]}" if b == r["master_bits"]
                                                                 else "")
                cells.append(f"{v:.2f} ({v / ref:.2f}×)" if v and ref else "—")
            lines.append(f"| {key} | {mode} | {r['train_tokens']} | " + " | ".join(cells) + " |")
    lines += ["", "| run | steps | train tokens | wall s | tokens/s (wall) | CPU s | tokens per CPU-second | "
              "loss first 5 → last 5 steps |", "|---|---|---|---|---|---|---|---|"]
    for key, r in runs.items():
        if key == "fp32" or r.get("method") != "qat":
            continue
        lines.append(f"| {key} | {r['steps']} | {r['train_tokens']} | {r['train_s']:.0f} | {r['tokens_per_s']:.1f} | "
                     f"{r['train_cpu_s']:.0f} | {r['train_tokens'] / r['train_cpu_s']:.1f} | "
                     f"{r['loss_first5']:.3f} → {r['loss_last5']:.3f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
