"""Run any quantization method on input-rotated layers (quantize_model(..., rotate='input'|'block')).

Before the method runs, each target's weight W becomes W·V and a forward pre-hook feeds it x·V (quant/rotation.py),
so the float model computes exactly what it computed before (V orthogonal) and every method — RTN, GPTQ, MatGPTQ,
OmniQuant, QAT — quantizes the rotated weight with rotated calibration activations, with no change inside it.
Afterwards the hooks are removed and the method's MatQuantLinear layers get the same transform online.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch

from matquant.models.targets import linear_weight
from matquant.quant.rotation import InputRotation, input_rotation


def _set_linear_weight(m, w: torch.Tensor) -> None:
    """Write a [out, in] weight into a Linear or Conv1D (which stores [in, out])."""
    w = w.t() if type(m).__name__ == "Conv1D" else w
    m.weight.data.copy_(w)


@contextmanager
def rotated_targets(model, targets: list[str], spec: dict | None):
    """Rotate the targets' weights and inputs for the duration of the block; yields {name: InputRotation}.

    On an exception the weights of targets that are still the original layers are rotated back (W·V·Vᵀ, exact to
    fp32 rounding); the hooks are always removed.
    """
    if spec is None:
        yield {}
        return
    mods = dict(model.named_modules())
    rots: dict[str, InputRotation] = {}
    for n in targets:  # every transform built (and checked) before any weight changes
        rots[n] = input_rotation(spec, linear_weight(mods[n]).shape[1])
    handles, done = [], []
    ok = False
    try:
        with torch.no_grad():
            for n, r in rots.items():
                _set_linear_weight(mods[n], r.rotate_weight(linear_weight(mods[n]).detach()))
                done.append(n)

                def pre_hook(_mod, args, r=r):
                    return (r(args[0]), *args[1:])
                handles.append(mods[n].register_forward_pre_hook(pre_hook))
        yield rots
        ok = True
    finally:
        for h in handles:
            h.remove()
        if not ok:
            with torch.no_grad():
                for n in done:
                    r, m = rots[n], model.get_submodule(n)
                    if m is mods[n]:
                        _set_linear_weight(m, r.unrotate_weight(linear_weight(m).detach()))
