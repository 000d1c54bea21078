"""Layer-level proxy for choosing MatGPTQ's options on real activations (fast; no perplexity).

Captures the calibration inputs of a few SmolLM2-135M FFN layers (fp32 model, first `--windows` x 512 tokens of the
'calib' text), then reports, per slice, the relative output error ||X(W − Ŵ_r)ᵀ||² / ||XWᵀ||² on held-out
calibration tokens (the second half of the captured tokens) for RTN, GPTQ and MatGPTQ variants.

    OMP_NUM_THREADS=1 PYTHONPATH=src python lab/benchmarks/gptq_layer_proxy.py
    OMP_NUM_THREADS=1 PYTHONPATH=src python lab/benchmarks/gptq_layer_proxy.py --diag   # the R = {4} diagnosis
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))

from matquant.algorithms.gptq import gptq_quantize_weight  # noqa: E402
from matquant.algorithms.hessian_pass import HessianAccumulator  # noqa: E402
from matquant.algorithms.matgptq import MultiSliceRounder, matgptq_quantize_weight  # noqa: E402
from matquant.data import token_windows  # noqa: E402
from matquant.models import load_model  # noqa: E402
from matquant.quant.minmax import dequantize, quantize_minmax  # noqa: E402

VARIANTS = [("weighted", (0.1, 0.1, 1.0), "minmax"), ("mean", (0.1, 0.1, 1.0), "minmax"),
            ("master", (0.1, 0.1, 1.0), "minmax"), ("weighted", (16, 4, 1), "minmax"),
            ("weighted", (4, 2, 1), "minmax")]


def capture(layers: list[str], windows: int):
    """Per layer: (W, held-out inputs Xt, Hessian accumulator over the first half of the tokens)."""
    model, tok, _ = load_model("smollm2-135m")
    xs = {n: [] for n in layers}
    hs = [model.get_submodule(n).register_forward_hook(lambda m, i, o, n=n: xs[n].append(i[0][0].detach()))
          for n in layers]
    with torch.no_grad():
        for w in token_windows(tok, "calib", 512, windows):
            model(input_ids=w[None], use_cache=False)
    for h in hs:
        h.remove()
    out = {}
    for n in layers:
        X = torch.cat(xs[n])
        acc = HessianAccumulator()
        acc.add(X[: len(X) // 2])
        out[n] = (model.get_submodule(n).weight.detach(), X[len(X) // 2:], acc)
    return out


def diag(layers: dict) -> None:
    """MatGPTQ with R = {4} alone vs dedicated GPTQ int4: is the per-layer search/feedback right? (docs/results.md)"""
    for n, (W, Xt, acc) in layers.items():
        ref = (Xt @ W.T).pow(2).mean()

        def err(Wq):
            return (((Xt @ (W - Wq).T) ** 2).mean() / ref).item()

        print(n)
        print(" GPTQ int4 dedicated", err(dequantize(gptq_quantize_weight(W, acc.H, 4, 64)[0], 4, "paper")))
        print(" RTN int4 dedicated", err(dequantize(quantize_minmax(W, 4, 64), 4, "paper")))
        print(" RTN int8 nested->4", err(dequantize(quantize_minmax(W, 8, 64), 4, "nested")))
        for R, lam in [((4,), (1.0,)), ((8, 4, 3, 2), (16, 4, 2, 1)), ((8, 4, 2), (16, 4, 1))]:
            qw = matgptq_quantize_weight(W, acc.H, MultiSliceRounder(8, R, lam, "nested", "weighted"), 64)[0]
            print(f" MatGPTQ R={R}", " ".join(f"int{b} {err(dequantize(qw, b, 'nested')):.2e}" for b in (8, 4, 3, 2)))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", default="model.layers.15.mlp.up_proj,model.layers.15.mlp.down_proj")
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--diag", action="store_true", help="only the R = {4} diagnosis (MatGPTQ vs dedicated GPTQ int4)")
    a = ap.parse_args()
    torch.set_num_threads(1)
    layers = capture(a.layers.split(","), a.windows)
    if a.diag:
        diag(layers)
        return
    bits = (8, 6, 4, 3, 2)
    for n, (W, Xt, acc) in layers.items():
        ref = (Xt @ W.T).pow(2).mean()

        def err(qw, r, mode):
            return ((Xt @ (W - dequantize(qw, r, mode)).T) ** 2).mean().item() / ref.item()

        print(f"\n{n} {tuple(W.shape)}: relative output error per slice " + " ".join(f"int{b}" for b in bits))
        for mode in ("paper", "nested"):
            rows = {"RTN int8 sliced": quantize_minmax(W, 8, 64),
                    "GPTQ int8 sliced": gptq_quantize_weight(W, acc.H, 8, 64)[0]}
            for fb, lam, gp in VARIANTS:
                rows[f"MatGPTQ {fb} λ={lam} {gp}"] = matgptq_quantize_weight(
                    W, acc.H, MultiSliceRounder(8, (8, 4, 2), lam, mode, fb), 64, group_params=gp)[0]
            for k, qw in rows.items():
                print(f"  {mode:6s} {k:44s} " + " ".join(f"{err(qw, r, mode):.1e}" for r in bits))
        for b in (4, 3, 2):
            print(f"  dedicated GPTQ int{b}: {err(gptq_quantize_weight(W, acc.H, b, 64)[0], b, 'paper'):.1e}")


if __name__ == "__main__":
    main()
