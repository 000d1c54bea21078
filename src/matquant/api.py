"""The short Python paths: `matquant.load`, `matquant.quantize`, `matquant.set_bits`."""
from __future__ import annotations

import torch

from matquant.algorithms import quantize_model
from matquant.format.checkpoint import load_checkpoint, save_checkpoint
from matquant.models.loading import DEFAULT_MODEL, load_model


def load(ckpt_dir, bits=None, slicing: str | None = None, device: str = "cpu", dtype: torch.dtype = torch.float32):
    """Load a matquant checkpoint; returns (model, tokenizer). `bits`: int or {module pattern: bits}."""
    model, tok, _ = load_checkpoint(ckpt_dir, bits=bits, slicing=slicing, device=device, dtype=dtype)
    return model, tok


def quantize(model: str = DEFAULT_MODEL, out: str | None = None, method: str = "matgptq", overwrite: bool = False,
             calib=None, **kw):
    """Load a full-precision model, quantize it, optionally save the checkpoint. Returns (model, tok, qconfig).

    Data-driven methods (matgptq, gptq, omniquant, qat) calibrate on the embedded 'calib' text with the method's
    default number of windows unless `calib` (token windows [n, seqlen]) is given.
    """
    from matquant.algorithms import CALIBRATED, METHODS
    from matquant.data import token_windows

    m, tok, _ = load_model(model)
    if calib is None and method in CALIBRATED:
        n, seqlen = getattr(METHODS[method], "calib_defaults", (32, 512))
        calib = token_windows(tok, "calib", seqlen, n)
    qcfg = quantize_model(m, method, calib=calib, **kw)
    if out is not None:
        save_checkpoint(m, tok, out, qcfg, overwrite=overwrite)
    return m, tok, qcfg
