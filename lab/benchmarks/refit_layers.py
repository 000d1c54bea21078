"""Layer-level effect of MatGPTQ's `refit` option (quant/refit.py) on real SmolLM2 FFN layers.

    PYTHONPATH=src python lab/benchmarks/refit_layers.py [--layers 3,20] [--calib-windows 16] [--out FILE.json]

For each chosen layer's FFN matrices, the inputs of the full-precision model on `calib` windows give H = XᵀX; the
layer is quantized by MatGPTQ (the `quality` recipe's options: clip='weighted', R = 8,4,3,2, default λ) with and
without the refit, and each slice's relative output error ‖(W − Ŵ_r)X‖² / ‖WX‖² is reported (the objective the
refit minimises, λ-weighted over the slices). Not a perplexity: the end-to-end number needs a full `quantize`.
"""
from __future__ import annotations

import argparse
import json
import time


def main(argv=None):
    import torch

    from matquant.algorithms.matgptq import MultiSliceRounder, matgptq_quantize_weight
    from matquant.data import token_windows
    from matquant.models.loading import load_model
    from matquant.quant.minmax import dequantize

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", default="3,20")
    p.add_argument("--calib-windows", type=int, default=16)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, tok, _ = load_model()
    calib = token_windows(tok, "calib", 512, args.calib_windows)
    names = [f"model.layers.{i}.mlp.{m}" for i in map(int, args.layers.split(",")) for m in ("up_proj", "down_proj")]
    mods = dict(model.named_modules())
    H = {}

    def hook(n):
        def f(m, inp, out):
            x = inp[0].reshape(-1, inp[0].shape[-1]).double()
            H[n] = H.get(n, 0) + x.T @ x
        return f

    handles = [mods[n].register_forward_hook(hook(n)) for n in names]
    with torch.no_grad():
        for w in calib:
            model(w[None])
    for h in handles:
        h.remove()
    bits = (8, 4, 3, 2)
    rows = []
    for n in names:
        W, Hn = mods[n].weight.detach().float(), H[n].float()
        rounder = MultiSliceRounder(8, bits, None, "nested", "weighted")
        row = {"layer": n}
        for refit in (False, True):
            t = time.time()
            qw, _ = matgptq_quantize_weight(W, Hn, rounder, 64, False, torch.float16, 0.01, False, "minmax", 128, n,
                                            "weighted", refit)
            row[f"seconds_refit_{refit}"] = round(time.time() - t, 2)
            ref = float(((W.double() @ Hn.double()) * W.double()).sum())
            for b in bits:
                E = (W - dequantize(qw, b, "nested")).double()
                row[f"int{b}_refit_{refit}"] = float(((E @ Hn.double()) * E).sum()) / ref
        rows.append(row)
        print(n, "  ".join(f"int{b} {row[f'int{b}_refit_False']:.3e} -> {row[f'int{b}_refit_True']:.3e} "
                           f"({row[f'int{b}_refit_True'] / row[f'int{b}_refit_False']:.3f})" for b in bits), flush=True)
    if args.out:
        from matquant.format.atomic import atomic_write_text

        atomic_write_text(args.out, json.dumps({"calib_windows": args.calib_windows, "seqlen": 512, "rows": rows},
                                               indent=2) + "\n")


if __name__ == "__main__":
    main()
