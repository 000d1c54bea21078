"""MatGPTQ vs GPTQ on single SmolLM2 layers (layer 15 up/down_proj): relative output error on held-out calibration
tokens of dedicated GPTQ/RTN int4, the nested int4 slice of RTN int8, and MatGPTQ with R = {4}, {8,4,3,2}, {8,4,2}.

    PYTHONPATH=src python benchmarks/gptq_layer_diag.py
"""
import sys

import torch

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1] / "src"))
from matquant.algorithms.gptq import HessianAccumulator, gptq_quantize_weight
from matquant.algorithms.matgptq import MultiSliceRounder, matgptq_quantize_weight
from matquant.data import token_windows
from matquant.models import load_model
from matquant.quant import dequantize, quantize_minmax


def main():
    torch.set_num_threads(1)
    model, tok, _ = load_model("smollm2-135m")
    names = ["model.layers.15.mlp.up_proj", "model.layers.15.mlp.down_proj"]
    xs = {n: [] for n in names}
    hs = [model.get_submodule(n).register_forward_hook(lambda m, i, o, n=n: xs[n].append(i[0][0].detach())) for n in names]
    with torch.no_grad():
        for w in token_windows(tok, "calib", 512, 8):
            model(input_ids=w[None], use_cache=False)
    for n in names:
        X = torch.cat(xs[n])
        Xc, Xt = X[: len(X) // 2], X[len(X) // 2:]
        acc = HessianAccumulator()
        acc.add(Xc)
        W = model.get_submodule(n).weight.detach()
        ref = (Xt @ W.T).pow(2).mean()
        def err(Wq):
            return (((Xt @ (W - Wq).T) ** 2).mean() / ref).item()

        g4 = gptq_quantize_weight(W, acc.H, 4, 64)[0]
        print(n)
        print(" GPTQ int4 dedicated", err(dequantize(g4, 4, "paper")))
        print(" RTN int4 dedicated", err(dequantize(quantize_minmax(W, 4, 64), 4, "paper")))
        print(" RTN int8 nested->4", err(dequantize(quantize_minmax(W, 8, 64), 4, "nested")))
        for R, lam in [((4,), (1.0,)), ((8, 4, 3, 2), (16, 4, 2, 1)), ((8, 4, 2), (16, 4, 1))]:
            qw = matgptq_quantize_weight(W, acc.H, MultiSliceRounder(8, R, lam, "nested", "weighted"), 64)[0]
            print(f" MatGPTQ R={R}", " ".join(f"int{b} {err(dequantize(qw, b, 'nested')):.2e}" for b in (8, 4, 3, 2)))


if __name__ == "__main__":
    main()
