"""Throughput of the Mix'n'Match search's inner loop: forward + log-softmax over calibration windows, and the cost
of switching precisions with set_bits (dequantization of the changed layers).

    OMP_NUM_THREADS=1 PYTHONPATH=src python lab/benchmarks/mixnmatch_speed.py CHECKPOINT [--threads 1]
"""
from __future__ import annotations

import argparse
import time

import torch

from matquant.data import token_windows
from matquant.format.checkpoint import load_checkpoint
from matquant.nn import matquant_modules, set_bits


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("checkpoint")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--tokens", type=int, default=4096)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, tok, _ = load_checkpoint(args.checkpoint)
    for seqlen in (256, 512, 2048):
        w = token_windows(tok, "calib", seqlen, max(1, args.tokens // seqlen))
        with torch.inference_mode():
            model(input_ids=w[:1], use_cache=False)
            t = time.time()
            for i in range(w.shape[0]):
                model(input_ids=w[i: i + 1], use_cache=False).logits.log_softmax(-1)
            dt = time.time() - t
        print(f"seqlen {seqlen}: {1000 * dt / w.numel():.2f} ms/token ({w.numel()} tokens, {args.threads} threads)")
    mods = matquant_modules(model)
    t = time.time()
    set_bits(model, 3)
    for m in mods.values():
        m.dequantized_weight()
    print(f"switch all {len(mods)} layers to int3: {time.time() - t:.3f}s")
    name = next(iter(mods))
    t = time.time()
    set_bits(model, {name: 4})
    for m in mods.values():
        m.dequantized_weight()
    print(f"switch one layer: {time.time() - t:.4f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
