"""Are MatGPTQ codes deterministic? Same inputs quantized repeatedly at each thread count, compared with 1 thread.

A SmolLM2-sized down_proj-like layer (576 x 1536, random weights, a Hessian from 4096 random tokens with uneven
channel scales), MatGPTQ R = 8,4,3,2, λ = 16,4,2,1, nested, group 64. Prints, per thread count, whether repeated
runs are identical and how many of the 884 736 codes differ from the 1-thread run.

    PYTHONPATH=src python lab/benchmarks/matgptq_threads.py --threads 1,2,3 --repeats 2
"""
from __future__ import annotations

import argparse
import json

import torch

from matquant.algorithms.hessian_pass import HessianAccumulator
from matquant.algorithms.matgptq import MultiSliceRounder, matgptq_quantize_weight


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", default="1,2,3")
    ap.add_argument("--repeats", type=int, default=2)
    a = ap.parse_args()
    g = torch.Generator().manual_seed(0)
    W = torch.randn(576, 1536, generator=g) * 0.02
    X = torch.randn(4096, 1536, generator=g) * (torch.rand(1536, generator=g) * 3)
    acc = HessianAccumulator()
    acc.add(X)
    rounder = MultiSliceRounder(8, (8, 4, 3, 2), (16.0, 4.0, 2.0, 1.0), "nested")
    codes = {}
    for t in [int(x) for x in a.threads.split(",")]:
        torch.set_num_threads(t)
        codes[t] = [matgptq_quantize_weight(W, acc.H, rounder, 64)[0].codes for _ in range(a.repeats)]
    base = codes[min(codes)][0]
    rows = [{"threads": t, "repeats_identical": all(torch.equal(cs[0], c) for c in cs),
             "codes_differing_from_%d_thread" % min(codes): int((cs[0] != base).sum()), "codes": base.numel()}
            for t, cs in codes.items()]
    for r in rows:
        print(json.dumps(r))


if __name__ == "__main__":
    main()
