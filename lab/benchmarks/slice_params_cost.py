"""What `--slice-params own` adds to a GPTQ/MatGPTQ quantization: the time of the slice-own fit
(quant/refit.refit_params with separate=True: the 4 slices 6,4,3,2 and the master's refit, as the option runs it) next to the layer's MatGPTQ column loop, side by side in one run, on
SmolLM2-135M's FFN shapes (gate/up 1536 × 576, down 576 × 1536) and Qwen2.5-0.5B's (4864 × 896, 896 × 4864), g64.

Weights and H = XᵀX are synthetic (timing depends on the shapes only). One thread by default, as the grids run.

    PYTHONPATH=src python lab/benchmarks/slice_params_cost.py [--threads 1] [--repeat 3]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))

SHAPES = {"smollm2 gate/up": (1536, 576), "smollm2 down": (576, 1536),
          "qwen2.5 gate/up": (4864, 896), "qwen2.5 down": (896, 4864)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", default=None, help="also write the rows as JSON")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    from matquant.algorithms.matgptq import MultiSliceRounder, matgptq_quantize_weight
    from matquant.quant.refit import refit_params

    rows = []
    print("| layer | out × in | MatGPTQ column loop s | own params (8; 6,4,3,2) s | ratio |")
    print("|---|---|---|---|---|")
    for name, (n, k) in SHAPES.items():
        g = torch.Generator().manual_seed(0)
        W = torch.randn(n, k, generator=g) * 0.02
        X = torch.randn(2 * k, k, generator=g)
        H = X.T @ X
        rounder = MultiSliceRounder(8, None, None, "nested", "weighted")
        t_gptq, t_own = [], []
        for _ in range(a.repeat):  # interleaved, so both see the same machine load
            t0 = time.perf_counter()
            qw, _ = matgptq_quantize_weight(W, H, rounder, 64)
            t_gptq.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            refit_params(W, H, qw.codes, qw.scales, qw.zeros, master_bits=8, group_size=64, slicing="nested",
                         slices=(8, 6, 4, 3, 2), separate=True)
            t_own.append(time.perf_counter() - t0)
        tg, to = min(t_gptq), min(t_own)
        rows.append({"layer": name, "shape": [n, k], "matgptq_s": tg, "own_s": to})
        print(f"| {name} | {n} × {k} | {tg:.2f} | {to:.2f} | {to / tg:.2f} |", flush=True)
    print(f"\ntorch {torch.__version__}, {torch.get_num_threads()} thread(s), best of {a.repeat}")
    if a.out:
        Path(a.out).write_text(json.dumps({"threads": a.threads, "torch": torch.__version__, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
