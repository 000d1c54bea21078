"""Probe (fake-quant): how much do input-side randomized Hadamard rotations help the MatQuant slices?

For each FFN linear W [out, in] of SmolLM2-135M: W' = W·R with R = D·Hᵀ/√n (D random signs, H the Hadamard
of quant/hadamard.py), RTN MinMax int8 master of W' (group 64), nested (or paper) slice r, and the forward weight
Ŵ'_r·Rᵀ (dense, so this measures quality only, not the online-transform cost). `full`: R over the whole input
dimension (576 = 12·12·4, 1536 = 12·128); `block`: block-diagonal H_G per group of G = 64 input weights.
Writes one JSON row per (rotation, bits) to --out as it goes (resumes from it).

    python lab/scripts/rotation_probe.py --out lab/results/rotation_probe.jsonl
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from matquant.data import token_windows
from matquant.eval.perplexity import perplexity
from matquant.models import find_targets, load_model
from matquant.quant.hadamard import apply_hadamard, random_signs
from matquant.quant.minmax import dequantize_codes, quantize_minmax
from matquant.quant.slicing import slice_master


def rotate_rows(w: torch.Tensor, kind: str, seed: int, group: int, inverse: bool = False) -> torch.Tensor:
    """w·R (inverse: w·Rᵀ) along the input dim, R = D·Hᵀ/√n (full) or block-diagonal per group."""
    n = w.shape[1]
    s = random_signs(n, seed).to(w.dtype)
    if kind == "full":
        return apply_hadamard(w, transpose=True) * s if inverse else apply_hadamard(w * s)
    blocks = lambda t: t.reshape(t.shape[0], n // group, group)  # noqa: E731
    if inverse:
        return apply_hadamard(blocks(w), transpose=True).reshape(w.shape) * s
    return apply_hadamard(blocks(w * s)).reshape(w.shape)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--bits", default="8,4,3,2")
    ap.add_argument("--rotations", default="none,full,block")
    ap.add_argument("--slicing", default="nested")
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--scope", default="ffn")
    ap.add_argument("--windows", type=int, default=6)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    out = Path(args.out)
    done = set()
    if out.exists():
        done = {(r["rotation"], r["bits"]) for r in map(json.loads, out.read_text().splitlines()) if r}
    model, tok, _ = load_model("smollm2-135m")
    windows = token_windows(tok, "eval", 2048, args.windows)
    mods = dict(model.named_modules())
    targets = find_targets(model, args.scope)
    orig = {n: mods[n].weight.data.clone() for n in targets}
    if ("fp32", 16) not in done:
        r = perplexity(model, windows, progress=False)
        rows = [{"rotation": "fp32", "bits": 16, "ppl": r.ppl}]
    else:
        rows = []
    for row in rows:
        out.parent.mkdir(parents=True, exist_ok=True)
        with out.open("a") as f:
            f.write(json.dumps(row) + "\n")
    for rot in args.rotations.split(","):
        masters = {}
        for i, n in enumerate(targets):
            w = orig[n]
            wr = w if rot == "none" else rotate_rows(w, rot, args.seed + i, args.group_size)
            masters[n] = quantize_minmax(wr, 8, args.group_size)
        for b in map(int, args.bits.split(",")):
            if (rot, b) in done:
                continue
            t0 = time.time()
            for i, n in enumerate(targets):
                qw = masters[n]
                wq = dequantize_codes(slice_master(qw.codes, 8, b, args.slicing), qw.scales, qw.zeros)
                if rot != "none":
                    wq = rotate_rows(wq, rot, args.seed + i, args.group_size, inverse=True)
                mods[n].weight.data.copy_(wq)
            r = perplexity(model, windows, progress=False)
            row = {"rotation": rot, "bits": b, "ppl": r.ppl, "slicing": args.slicing, "group_size": args.group_size,
                   "scope": args.scope, "windows": args.windows, "seconds": round(time.time() - t0, 1)}
            print(row, flush=True)
            with out.open("a") as f:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
