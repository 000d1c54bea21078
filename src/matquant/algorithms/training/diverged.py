"""The error both training routes raise when the loss becomes NaN/Inf (the CLI shows it as one line, exit 2)."""
from __future__ import annotations

import math


class TrainingDiverged(FloatingPointError, ValueError):
    """The training loss became NaN/Inf; the message says where, what was kept and what to try."""


def check_finite_loss(value: float, where: str, kept: str, lr_hint: str) -> None:
    """Raise TrainingDiverged unless `value` is finite. `where`: e.g. 'block 3, epoch 0, int2'; `kept`: what
    survives in the work dir; `lr_hint`: which learning rate to lower, with a suggested value."""
    if math.isfinite(value):
        return
    raise TrainingDiverged(
        f"non-finite loss ({value}) in {where}: training diverged. {kept} Try {lr_hint}, and check the model's "
        "weights and the calibration text for NaN/Inf; a rerun with other settings needs a new --work-dir.")
