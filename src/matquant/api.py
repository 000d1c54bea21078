"""The short Python paths: `matquant.load`, `matquant.quantize`, `matquant.set_bits`."""
from __future__ import annotations

import os

import torch

from matquant.format.checkpoint import load_checkpoint
from matquant.models.loading import DEFAULT_MODEL


def load(ckpt_dir, bits=None, slicing: str | None = None, device: str = "cpu", dtype: torch.dtype = torch.float32,
         backend: str | None = None, keep=None, keep_master: bool | None = None, budget=None,
         high_format: str | None = None, quantize_embeddings: bool | None = None):
    """Load a matquant checkpoint; returns (model, tokenizer). `bits`: int or {module pattern: bits}.

    `backend` (default: 'auto' on CPU = the packed runtime, 'torch' elsewhere): on CPU each quantized layer then
    holds its current slice as packed 4-bit codes (r > 4: two planes; `kernels.cpu_packed`), packed here at load
    time; no dense weight. Pass 'torch' for the bit-exact reference path.

    - `keep`: precisions also packed now and kept resident, so `set_bits` among them costs nothing (e.g. [8, 4]).
    - `keep_master=False`: free the uint8 master codes after packing; an int4 model then holds ~4.5 bits/weight,
      but only the resident precisions (`bits`, `keep`) can be switched to (set_bits raises otherwise).
      Default: True, or False when `budget` is given. Without a budget each layer is packed as it is read and its
      master codes freed at once, so loading never holds more than one layer's master codes.
    - `budget`: '100MB' / '95MiB' (total resident bytes of the model) or average storage bits ('6.0'): picks the
      pyramid Mix'n'Match map on (int4, int8) that fits (`mixnmatch.runtime_fit`; overrides `bits`) and checks the
      measured resident memory after loading (ValueError if over).
    - `high_format`: 'int4x2' (default) or 'bf16' for slices above 4 bits (see docs/runtime.md).
    - `quantize_embeddings`: hold the token embedding and the output head as one int8 per-row table (shared when
      tied; `nn.quantized_embedding`) instead of the checkpoint's float weights. Default: True with `budget`
      (the budget then counts the int8 tables), else False. Do not save such a model as a checkpoint.
    """
    from matquant.nn.bits import set_backend, set_bits
    from matquant.nn.memory import drop_master, prepare_packed, quantized_resident_bytes, resident_bytes

    if keep_master is None:
        keep_master = budget is None
    if quantize_embeddings is None:
        quantize_embeddings = budget is not None
    if backend is None:
        backend = "auto" if torch.device(device).type == "cpu" else "torch"
    packed_here = backend in ("packed", "auto") and torch.device(device).type == "cpu"
    if (budget is not None or not keep_master) and not packed_here:
        raise ValueError("budget= and keep_master=False need the packed CPU runtime: device='cpu' and backend "
                         "'auto' or 'packed'.")
    if not keep_master and budget is None:
        return _load_streaming(ckpt_dir, bits, slicing, dtype, backend, keep, high_format, quantize_embeddings)
    model, tok, _ = load_checkpoint(ckpt_dir, bits=bits, slicing=slicing, device=device, dtype=dtype)
    set_backend(model, backend, keep=keep, high_format=high_format)
    if quantize_embeddings:
        _quantize_embeddings(model)
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


def _quantize_embeddings(model) -> None:
    from matquant.nn.memory import release_freed_memory
    from matquant.nn.quantized_embedding import quantize_embeddings

    quantize_embeddings(model)
    release_freed_memory()


def _load_streaming(ckpt_dir, bits, slicing, dtype, backend, keep, high_format, quantize_embeddings=False):
    """`load(keep_master=False)` without a budget: the meta skeleton gets its precisions and backend first, then each
    quantized layer is packed and its master codes freed as soon as its tensors are read (format/checkpoint.py
    `load_state(on_layer=...)`); the same model as loading everything and then `drop_master`."""
    from matquant.format.checkpoint import load_state, load_tokenizer, open_checkpoint
    from matquant.nn.bits import set_backend
    from matquant.nn.memory import drop_layer_master, release_freed_memory

    def pack(name, layer):
        drop_layer_master(layer, keep or ())
        release_freed_memory()

    model, qconfig = open_checkpoint(ckpt_dir, bits, slicing, dtype)
    set_backend(model, backend, keep=keep, high_format=high_format)
    load_state(model, ckpt_dir, qconfig, on_layer=pack)
    if quantize_embeddings:
        _quantize_embeddings(model)
    model.eval()
    return model, load_tokenizer(ckpt_dir)


def quantize(model=DEFAULT_MODEL, config=None, out=None, method: str | None = None, overwrite: bool = False,
             calib=None, recipe: str | None = None, calib_windows: int | None = None, tokenizer=None,
             threads: int | None = None, progress: bool = True, stream: bool | None = None, **options):
    """Quantize a model with one method config; returns (model, tokenizer, QuantConfig). The one pipeline
    (algorithms/pipeline.py) behind `matquant quantize`, `matquant demo` and experiment grids.

        matquant.quantize("smollm2-135m", matquant.MatGPTQConfig(clip="weighted"), out="ckpt")
        matquant.quantize(hf_model, matquant.recipe_config("quality"), tokenizer=tok)   # in memory, in place
        matquant.quantize("smollm2-135m", out="ckpt", method="rtn", group_size=64)    # keyword form

    `model`: the embedded 'smollm2-135m' (default), 'qwen2.5-coder-0.5b', an HF folder, a .gguf file, a hub id, or
    a model in memory (quantized in place; pass its `tokenizer` when the method reads calibration text).
    `config`: a MethodConfig; or build one from `method` / `recipe` and keyword `options` (neither method nor
    recipe: the 'quality' recipe; a recipe fills in only the options not given). `calib`: token windows
    [n, seqlen] or a Calibration; `calib_windows`: how many windows of the embedded calibration text (default:
    the method's). `out`: write the checkpoint folder there (atomically).

    `stream` (default: when `model` is a name or path and `out` is given): read, quantize and write one decoder block
    at a time, so a model larger than memory can be quantized (algorithms/streaming.py); the returned model is then
    None: load the checkpoint with `matquant.load(out)`. `stream=False` loads the whole model and returns it."""
    from matquant.algorithms import Calibration, MethodConfig, resolve_config
    from matquant.algorithms.pipeline import quantize as run_pipeline

    if config is not None and not isinstance(config, MethodConfig):
        if out is not None or not isinstance(config, (str, os.PathLike)):
            raise TypeError(f"config must be a MethodConfig (e.g. matquant.MatGPTQConfig()), got {config!r}.")
        config, out = None, config  # the old positional form quantize(model, out)
    if config is None:
        config = resolve_config(method, recipe, **options)
    elif method or recipe or options:
        raise ValueError("pass either a config or method/recipe/options, not both (config.replace(**options) "
                         "changes a config).")
    if calib is None and calib_windows is not None:
        calib = Calibration(windows=calib_windows)
    return run_pipeline(model, config, out=out, overwrite=overwrite, calib=calib, tokenizer=tokenizer,
                        threads=threads, progress=progress, log=print if progress else (lambda *_: None),
                        stream=stream)
