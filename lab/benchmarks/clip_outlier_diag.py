"""Where a clipping search hurts the int8 master: per FFN matrix, the int8 slice's weight error of two checkpoints of
the same model against its fp32 weights (relative rms, max abs, and the error at the matrix's largest-|w| weight).

    python lab/benchmarks/clip_outlier_diag.py --model qwen2.5-coder-0.5b \\
        WORK/qwen_tables/quality-ffn-g128.* WORK/qwen_tables/matgptq-ffn-g128.*   # saved by qwen_tables.py run

Prints the matrices where the first checkpoint's error is > 1.5x the second's (rms) or its error at the largest
weight is > 3x; used for docs/results.md "Qwen2.5-Coder-0.5B" (the `quality` recipe clipping outlier weights).
"""
from __future__ import annotations

import argparse

import torch


def errors(ck: str, ref: dict, bits: int) -> dict:
    from matquant.format.checkpoint import load_checkpoint
    from matquant.nn.bits import set_bits

    m, _, _ = load_checkpoint(ck)
    set_bits(m, bits, "nested")
    mods = dict(m.named_modules())
    out = {}
    for k, W in ref.items():
        name = k[: -len(".weight")]
        if name not in mods or not hasattr(mods[name], "dense_weight"):
            continue
        d = mods[name].dense_weight(torch.float32) - W.float()
        i = W.abs().argmax()
        out[name] = (float(d.norm() / W.norm()), float(d.abs().max()), float(W.reshape(-1)[i]), float(d.reshape(-1)[i]),
                     mods[name].scales.float())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("first")
    ap.add_argument("second")
    ap.add_argument("--model", default="smollm2-135m", help="the fp32 model both checkpoints were made from")
    ap.add_argument("--bits", type=int, default=8)
    a = ap.parse_args()
    from matquant.models import load_model

    src, _, _ = load_model(a.model)
    ref = {k: v for k, v in src.state_dict().items() if ".mlp." in k and k.endswith("weight")}
    e1, e2 = errors(a.first, ref, a.bits), errors(a.second, ref, a.bits)
    print(f"int{a.bits}: matrix | first rel rms, max abs | second rel rms, max abs | largest |w| and each error there")
    for k in e1:
        x, y = e1[k], e2[k]
        if x[0] > 1.5 * y[0] or abs(x[3]) > 3 * abs(y[3]) + 1e-3:
            print(f"{k} | {x[0]:.2e}, {x[1]:.3e} | {y[0]:.2e}, {y[1]:.3e} | {x[2]:+.3f}: {x[3]:+.3e} vs {y[3]:+.3e}")
    med = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
    print(f"median relative rms: first {med([v[0] for v in e1.values()]):.3e}, "
          f"second {med([v[0] for v in e2.values()]):.3e}")
    at_max = [abs(e1[k][3]) / max(abs(e2[k][3]), 1e-12) for k in e1]
    print(f"error at the largest weight, first / second: median {med(at_max):.1f}x "
          f"(range {min(at_max):.2g}-{max(at_max):.3g}x over {len(at_max)} matrices)")
    ratios = [float((e1[k][4] / e2[k][4]).median()) for k in e1]
    print(f"group scale first / second, per-matrix median: {min(ratios):.3f}-{max(ratios):.3f}")


if __name__ == "__main__":
    main()
