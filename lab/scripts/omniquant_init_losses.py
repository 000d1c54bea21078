"""Per-precision OmniQuant block loss at the starting clipping (what `--loss-balance initial` divides by), on a few
SmolLM2-135M blocks: shows how much larger the int2 term is than int8's in the paper's Σ λ_r·loss_r.

    PYTHONPATH=src python lab/scripts/omniquant_init_losses.py --blocks 0,15,29 --slicing nested
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from matquant.algorithms.blocks import capture_block_inputs
from matquant.algorithms.training.lwc import BlockQuant, run_block
from matquant.data import token_windows
from matquant.models import load_model


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--blocks", default="0,15,29")
    ap.add_argument("--bits", default="8,4,2")
    ap.add_argument("--slicing", default="nested", choices=("paper", "nested", "extra"))
    ap.add_argument("--windows", type=int, default=4, help="calibration windows of 256 tokens ('calib' text)")
    a = ap.parse_args()
    show, bits = {int(b) for b in a.blocks.split(",")}, [int(b) for b in a.bits.split(",")]
    model, tok, _ = load_model("smollm2-135m")
    hidden, block_args = capture_block_inputs(model, token_windows(tok, "calib", 256, a.windows), "cpu")
    x = torch.stack(hidden)  # [windows, 1, seq, hidden]
    targets = ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
    print("| block | " + " | ".join(f"int{r} loss" for r in bits) + " | " +
          " | ".join(f"int{r} / int{bits[-1]}" for r in bits[:-1]) + " |")
    print("|---" * (2 * len(bits)) + "|")
    with torch.no_grad():
        for i, block in enumerate(model.model.layers[: max(show) + 1]):
            args = block_args[i]  # per window: (positional args, keyword args)
            y = torch.stack([run_block(block, {}, xx, *args[j]) for j, xx in enumerate(x)])  # fp stream, as the default loss target
            if i in show:
                bq = BlockQuant(block, targets, max(bits), 64, False, False)
                norm = y.pow(2).mean()
                loss = {r: sum(F.mse_loss(run_block(block, bq.fake_params(r, a.slicing), x[j], *args[j]), y[j])
                               for j in range(len(x))).item() / len(x) / norm.item() for r in bits}
                print(f"| {i} | " + " | ".join(f"{loss[r]:.3g}" for r in bits) + " | " +
                      " | ".join(f"{loss[r] / loss[bits[-1]]:.2g}" for r in bits[:-1]) + " |")
            x = y


if __name__ == "__main__":
    main()
