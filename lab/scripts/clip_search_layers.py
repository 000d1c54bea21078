"""Layer-level check of the clipping search's slice weights λ (quant/clip_search.py, DEFAULT_SERVED_LAMBDAS).

For six SmolLM2-135M FFN matrices (blocks 3, 15, 27; up_proj and down_proj), int8 master, group 64, nested, fp16
parameters: the relative weight error ‖W − Ŵ_r‖²/‖W‖² of every served slice r ∈ {8, 6, 4, 3, 2}, averaged over the
matrices, for MinMax and for the data-free search (h = 1) with equal λ, λ = 4^(r−2) and λ = 2^(r−2). One JSON row
per weighting to --out.

    OMP_NUM_THREADS=1 PYTHONPATH=src python lab/scripts/clip_search_layers.py --out lab/results/clip_search_layers.jsonl
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from matquant.models.loading import load_model
from matquant.quant.clip_search import clip_search
from matquant.quant.minmax import dequantize_codes, minmax_params, quantize_codes
from matquant.quant.slicing import slice_master

R = (8, 6, 4, 3, 2)
WEIGHTINGS = {"minmax": None, "equal": (1.0,) * 5, "4^(r-2)": tuple(4.0 ** (r - 2) for r in R),
              "2^(r-2)": tuple(2.0 ** (r - 2) for r in R)}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--slicing", default="nested")
    args = ap.parse_args()
    model, _, _ = load_model("smollm2-135m")
    mods = dict(model.named_modules())
    names = [f"model.layers.{i}.mlp.{p}" for i in (3, 15, 27) for p in ("up_proj", "down_proj")]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for label, lam in WEIGHTINGS.items():
        t0 = time.time()
        tot = [0.0] * len(R)
        for n in names:
            w = mods[n].weight.detach().float()
            if lam is None:
                s, z = minmax_params(w, 8, 64)
            else:
                res = clip_search(w, None, bits=8, group_size=64, slicing=args.slicing, slices=R, lambdas=lam)
                s, z = res.scale, res.zero
            s, z = s.half(), z.half()
            q = quantize_codes(w, s, z, 8)
            for k, r in enumerate(R):
                e = dequantize_codes(slice_master(q, 8, r, args.slicing), s, z) - w
                tot[k] += float((e * e).sum() / (w * w).sum()) / len(names)
        row = {"weighting": label, "slicing": args.slicing, "layers": names,
               **{f"rel_err_int{r}": v for r, v in zip(R, tot)}, "seconds": round(time.time() - t0, 2),
               "load": round(os.getloadavg()[0], 2), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
        print(json.dumps(row), flush=True)
        with out.open("a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
