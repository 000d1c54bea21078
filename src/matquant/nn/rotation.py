"""Which layers of a loaded model run an online input rotation, and the refusal message for engines that cannot."""
from __future__ import annotations

from matquant.nn.bits import matquant_modules


def online_rotations(model) -> dict[str, dict]:
    """{module name: rotation spec} of the MatQuantLinear layers that rotate their input online."""
    return {n: m.rotation for n, m in matquant_modules(model).items() if getattr(m, "rotation", None)}


def online_rotation_refusal(model, engine: str) -> str | None:
    """None if `model` needs no online transform; else the message an exporter for `engine` raises."""
    rots = online_rotations(model)
    if not rots:
        return None
    name, spec = next(iter(rots.items()))
    return (f"this checkpoint was quantized with an online input rotation (rotation mode {spec['mode']!r} on "
            f"{len(rots)} layers, e.g. {name}): each of those layers must transform its input (x -> x·V) before "
            f"the matmul, which {engine} cannot run. Re-quantize with `matquant quantize --rotate none ...` to export "
            "it, or serve this checkpoint with matquant (matquant.load / from_pretrained). A plain dense export "
            "(matquant slice) folds the rotation back into the weights.")
