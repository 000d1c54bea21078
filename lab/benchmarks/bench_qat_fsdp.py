"""QAT memory and speed: 1 process vs 2 (torchrun, gloo, CPU) with --shard ddp / fsdp, with and without activation
checkpointing, on the tiny Llama of tests/qat_worker.py or SmolLM2-135M (FFN targets, MatQuant [8,4,2]).

    OMP_NUM_THREADS=1 PYTHONPATH=src python lab/benchmarks/bench_qat_fsdp.py --model smollm2-135m --steps 4
    python lab/benchmarks/bench_qat_fsdp.py --table      # the markdown table of the stored results

Each configuration starts fresh processes (`python` for 1 process, `torchrun --nproc_per_node 2` for 2); every
rank samples its own resident set (psutil, every 10 ms) and reports its peak during training (after the model is
loaded) and over the whole process (kernel high-water mark, which includes loading), and the wall time of every
optimizer step; rank 0's steps after the first are the step time. The global batch is the same for every
configuration (--global-batch), so each step does the same work whatever the number of processes.
Results: <work>/bench_qat_fsdp.json (work folder: lab/benchmarks/_paths.py).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _paths  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = {  # name: (processes, threads per process, shard, activation checkpointing)
    "1 proc x 1 thread": (1, 1, None, False),
    "1 proc x 2 threads": (1, 2, None, False),
    "1 proc x 1 thread + AC": (1, 1, None, True),
    "2 procs DDP": (2, 1, "ddp", False),
    "2 procs FSDP": (2, 1, "fsdp", False),
    "2 procs FSDP + AC": (2, 1, "fsdp", True),
}


class PeakRSS(threading.Thread):
    def __init__(self):
        import psutil

        super().__init__(daemon=True)
        self.proc, self.peak, self.running = psutil.Process(), 0, True

    def reset(self):
        self.peak = self.proc.memory_info().rss

    def run(self):
        while self.running:
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.01)


def rank_main(a) -> int:
    """One process of a configuration: load, train, report {rank: ...} as JSON on the last stdout line."""
    import torch

    torch.set_num_threads(a.threads)
    sampler = PeakRSS()
    sampler.start()
    from matquant.algorithms.training.distributed import init_distributed
    from matquant.algorithms.training.objective import build_objective
    from matquant.algorithms.training.qat_config import make_config
    from matquant.algorithms.training.qat_loop import train_qat
    from matquant.models.targets import find_targets

    d = init_distributed("cpu")
    if a.model == "tiny":
        sys.path.insert(0, str(ROOT / "tests"))
        from qat_worker import structured_windows, tiny_llama

        model, calib = tiny_llama(0), structured_windows(16, a.seqlen)
    else:
        from matquant.data.text import token_windows
        from matquant.models import load_model

        model, tok, _ = load_model(a.model)
        calib = token_windows(tok, "calib", seqlen=a.seqlen, n_windows=16)  # the embedded calibration text
    rss_loaded = sampler.proc.memory_info().rss
    cfg = make_config(steps=a.steps, lr=1e-4, global_batch=a.global_batch, save_every=0, work_dir=None,
                      device="cpu", shard=a.shard, activation_checkpointing=a.ac)
    obj = build_objective("8,4,2", "0.1,0.1,1", None, slicing="nested")
    stamps = []
    sampler.reset()
    t0 = time.time()
    train_qat(model, find_targets(model, "ffn"), calib, obj, cfg, group_size=64 if a.model != "tiny" else 32,
              symmetric=False, param_dtype=torch.float16, progress=False, keep_weights=False,
              step_callback=lambda step, _m: stamps.append(time.time()))
    t_end = time.time()
    sampler.running = False
    steps = [b - a_ for a_, b in zip([t0, *stamps[:-1]], stamps)]
    rep = {"rank": d.rank, "world": d.world, "rss_loaded_mib": rss_loaded / 2**20,
           "peak_rss_train_mib": sampler.peak / 2**20,
           "peak_rss_process_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
           "step_s": steps, "train_and_gather_s": t_end - t0}
    print("RESULT " + json.dumps(rep), flush=True)
    if d.initialized_here:
        import torch.distributed as dist

        dist.destroy_process_group()
    return 0


def run_config(name, a) -> dict:
    procs, threads, shard, ac = CONFIGS[name]
    args = [str(Path(__file__).resolve()), "--rank-main", "--model", a.model, "--steps", str(a.steps), "--seqlen",
            str(a.seqlen), "--global-batch", str(a.global_batch), "--threads", str(threads)]
    if shard:
        args += ["--shard", shard]
    if ac:
        args += ["--ac"]
    cmd = [sys.executable, *args] if procs == 1 else [sys.executable, "-m", "torch.distributed.run",
                                                      "--nproc_per_node", str(procs), "--master_port", "29641", *args]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": str(threads)}
    t0 = time.time()
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"{name} failed:\n{r.stderr[-3000:]}")
    ranks = sorted((json.loads(line[7:]) for line in r.stdout.splitlines() if line.startswith("RESULT ")),
                   key=lambda x: x["rank"])
    return {"ranks": ranks, "wall_s": time.time() - t0}


def table(db: dict) -> str:
    lines = []
    for model, runs in db["models"].items():
        lines += [f"**{model}** ({runs['meta']})", "",
                  "| configuration | step time (s, median) | peak RSS in training, per rank (MiB) | "
                  "process peak RSS, per rank (MiB) |", "|---|---|---|---|"]
        for name, r in runs["configs"].items():
            steps = r["ranks"][0]["step_s"][1:] or r["ranks"][0]["step_s"]
            lines.append(f"| {name} | {statistics.median(steps):.2f} | "
                         + " / ".join(f"{x['peak_rss_train_mib']:.0f}" for x in r["ranks"]) + " | "
                         + " / ".join(f"{x['peak_rss_process_mib']:.0f}" for x in r["ranks"]) + " |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny", help="tiny, or a model matquant loads (e.g. smollm2-135m)")
    p.add_argument("--configs", default=",".join(CONFIGS))
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--seqlen", type=int, default=128)
    p.add_argument("--global-batch", type=int, default=2)
    p.add_argument("--out", default=None, help="results JSON (default <work>/bench_qat_fsdp.json)")
    p.add_argument("--table", action="store_true", help="only print the table of the stored results")
    p.add_argument("--rank-main", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--shard", default=None, help=argparse.SUPPRESS)
    p.add_argument("--ac", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.rank_main:
        return rank_main(a)
    out = Path(a.out) if a.out else _paths.work_path("bench_qat_fsdp.json")
    db = json.loads(out.read_text()) if out.exists() else {"models": {}}
    if not a.table:
        meta = (f"{a.steps} steps, {a.seqlen} tokens per window, global batch {a.global_batch}, [8,4,2] nested, "
                f"FFN targets; {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                f"{time.strftime('%Y-%m-%d')}")
        entry = db["models"].setdefault(a.model, {"meta": meta, "configs": {}})
        entry["meta"] = meta
        for name in a.configs.split(","):
            print(f"{a.model}: {name} ...", flush=True)
            entry["configs"][name] = run_config(name, a)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(db, indent=1))
    print(table(db))
    return 0


if __name__ == "__main__":
    sys.exit(main())
