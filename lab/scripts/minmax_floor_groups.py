"""How many MinMax groups of SmolLM2-135M's FFN weights the dtype-safe floors of quant/minmax.py change (vs the old
clamp_min(1e-8)), once α and z are stored in float16. Expected: 0 (every real group contains 0, so the floors never
bind), i.e. results are unchanged by the fp16-epsilon fix.

    PYTHONPATH=src python lab/scripts/minmax_floor_groups.py
"""
import torch

from matquant.models.loading import load_model
from matquant.quant.minmax import grouped, minmax_params

model, _, _ = load_model("smollm2-135m")
n = changed = 0
for name, mod in model.named_modules():
    if isinstance(mod, torch.nn.Linear) and ".mlp." in name:
        g = grouped(mod.weight.detach().float(), 64)
        lo, hi = g.amin(-1), g.amax(-1)
        s_old = ((hi - lo) / 255).clamp_min(1e-8)
        z_old = -lo / s_old
        s, z = minmax_params(mod.weight.detach(), 8, 64, False, torch.float16)
        n += s.numel()
        changed += int(((s.half() != s_old.half()) | (z.half() != z_old.half())).sum())
print(f"groups {n}, groups whose float16 (alpha, z) changed: {changed}")
