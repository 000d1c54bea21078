"""The short Python paths: `matquant.load`, `matquant.quantize`, `matquant.set_bits`."""
from __future__ import annotations

import torch

from matquant.algorithms import quantize_model
from matquant.format.checkpoint import load_checkpoint, save_checkpoint
from matquant.models.loading import DEFAULT_MODEL, load_model


def load(ckpt_dir, bits=None, slicing: str | None = None, device: str = "cpu", dtype: torch.dtype = torch.float32,
         backend: str | None = None, keep=None, keep_master: bool | None = None, budget=None,
         high_format: str | None = None):
    """Load a matquant checkpoint; returns (model, tokenizer). `bits`: int or {module pattern: bits}.

    `backend` (default: 'auto' on CPU = the packed runtime, 'torch' elsewhere): on CPU each quantized layer then
    holds its current slice as packed 4-bit codes (r > 4: two planes; `kernels.cpu_packed`), packed here at load
    time; no dense weight. Pass 'torch' for the bit-exact reference path.

    - `keep`: precisions also packed now and kept resident, so `set_bits` among them costs nothing (e.g. [8, 4]).
    - `keep_master=False`: free the uint8 master codes after packing; an int4 model then holds ~4.5 bits/weight,
      but only the resident precisions (`bits`, `keep`) can be switched to (set_bits raises otherwise).
      Default: True, or False when `budget` is given.
    - `budget`: '100MB' / '95MiB' (total resident bytes of the model) or average storage bits ('6.0'): picks the
      pyramid Mix'n'Match map on (int4, int8) that fits (`mixnmatch.runtime_fit`; overrides `bits`) and checks the
      measured resident memory after loading (ValueError if over).
    - `high_format`: 'int4x2' (default) or 'bf16' for slices above 4 bits (see docs/runtime.md).
    """
    from matquant.nn.bits import set_backend, set_bits
    from matquant.nn.memory import drop_master, prepare_packed, quantized_resident_bytes, resident_bytes

    if keep_master is None:
        keep_master = budget is None
    if backend is None:
        backend = "auto" if torch.device(device).type == "cpu" else "torch"
    model, tok, _ = load_checkpoint(ckpt_dir, bits=bits, slicing=slicing, device=device, dtype=dtype)
    set_backend(model, backend, keep=keep, high_format=high_format)
    packed_here = backend in ("packed", "auto") and torch.device(device).type == "cpu"
    if (budget is not None or not keep_master) and not packed_here:
        raise ValueError("budget= and keep_master=False need the packed CPU runtime: device='cpu' and backend "
                         "'auto' or 'packed'.")
    if budget is not None:
        from matquant.mixnmatch.runtime_fit import fit_bits_map

        fixed = resident_bytes(model) - quantized_resident_bytes(model)
        bits_map, predicted = fit_bits_map(model, budget, fixed, high_format or "int4x2", keep_master)
        set_bits(model, bits_map)
        model.matquant_budget = {"budget": str(budget), "predicted_bytes": predicted, "bits_map": bits_map}
    if packed_here:
        if keep_master:
            prepare_packed(model, keep or ())
        else:
            drop_master(model, keep or ())
    if budget is not None:
        from matquant.mixnmatch.budget import parse_budget

        b = parse_budget(budget)
        measured = resident_bytes(model)
        model.matquant_budget["measured_bytes"] = measured
        if b.kind == "bytes" and measured > b.value:
            raise ValueError(f"the model holds {measured} bytes after loading, above the budget {budget} "
                             f"({b.value:.0f} bytes; predicted {model.matquant_budget['predicted_bytes']}): "
                             "a bug in the runtime memory model; please report it.")
    return model, tok


# quantize_model's own keyword arguments (everything else is an option of the method)
QUANTIZE_MODEL_ARGS = ("master_bits", "group_size", "scope", "modules", "symmetric", "slicing", "param_dtype", "progress",
                       "rotate", "rotate_seed")


def quantize(model: str = DEFAULT_MODEL, out: str | None = None, method: str | None = None, overwrite: bool = False,
             calib=None, recipe: str | None = None, calib_windows: int | None = None, **kw):
    """Load a full-precision model, quantize it, optionally save the checkpoint. Returns (model, tok, qconfig).

    `method` defaults to 'matgptq'. `recipe` (algorithms/recipes.py: 'fast', 'quality', 'balanced') fills in the options it
    sets that are not given here, e.g. `quantize(out="ck", recipe="quality")` = MatGPTQ + clip='weighted'. Data-driven methods (matgptq, gptq, omniquant, qat; and clip='weighted') calibrate on the
    embedded 'calib' text with the method's default number of windows (or `calib_windows`) unless `calib` (token
    windows [n, seqlen]) is given.
    """
    from matquant.algorithms import METHODS, check_method_options, needs_calibration
    from matquant.algorithms.recipes import apply_recipe
    from matquant.data import token_windows

    opts = apply_recipe(recipe, {"method": method, "clip": kw.pop("clip", None), "rotate": kw.pop("rotate", None),
                                 "clip_lambdas": kw.pop("clip_lambdas", None), "calib_windows": calib_windows,
                                 "slice_params": kw.pop("slice_params", None)})
    method, calib_windows = opts.pop("method") or "matgptq", opts.pop("calib_windows")
    kw.update({k: v for k, v in opts.items() if v is not None})
    check_method_options(method, {k: v for k, v in kw.items() if k not in QUANTIZE_MODEL_ARGS})  # before loading
    m, tok, _ = load_model(model)
    if calib is None and needs_calibration(method, kw):
        n, seqlen = getattr(METHODS[method], "calib_defaults", (32, 512))
        calib = token_windows(tok, "calib", seqlen, calib_windows or n)
    qcfg = quantize_model(m, method, calib=calib, **kw)
    if out is not None:
        save_checkpoint(m, tok, out, qcfg, overwrite=overwrite)
    return m, tok, qcfg
