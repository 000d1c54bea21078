"""The one quantization pipeline: load -> calibration windows -> the method config's run -> MatQuantLinear layers
-> checkpoint folder. `matquant.quantize`, `matquant quantize`, `matquant demo` and experiment grids all call
`quantize` (or, for a model already in memory, `quantize_loaded`)."""
from __future__ import annotations

import os
import shutil
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from matquant.algorithms.configs.base import MethodConfig
from matquant.algorithms.rotate import rotated_targets
from matquant.format.config import QuantConfig
from matquant.models.targets import find_targets, linear_weight
from matquant.nn.replace import replace_with_matquant
from matquant.quant.minmax import resolve_group_size


@dataclass(frozen=True)
class Calibration:
    """Where calibration windows come from. windows/seqlen None: the method's defaults (its calib_defaults)."""

    text: str = "calib"  # 'calib' (embedded, disjoint from the evaluation text), a file, or 'hf:...'
    windows: int | None = None
    seqlen: int | None = None
    offset: int = 0  # windows of the text skipped first

    def __post_init__(self):
        for flag, v, least in (("--calib-windows", self.windows, 1), ("--calib-seqlen", self.seqlen, 2),
                               ("calibration offset", self.offset, 0)):
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < least):
                raise ValueError(f"{flag} must be an integer >= {least}, got {v!r}.")

    def resolved(self, config: MethodConfig) -> "Calibration":
        n, seqlen = config.calib_defaults
        return replace(self, windows=self.windows or n, seqlen=self.seqlen or seqlen)

    def token_windows(self, tokenizer, config: MethodConfig) -> torch.Tensor:
        from matquant.data import token_windows

        c = self.resolved(config)
        try:
            return token_windows(tokenizer, c.text, c.seqlen, c.windows, offset_windows=c.offset)
        except ValueError as e:
            raise ValueError(f"calibration text too short for method {config.name}: {e} (calibration options: "
                             "--calib-text FILE with more text, or a smaller --calib-seqlen)") from None


def quantize_loaded(model, config: MethodConfig, calib: torch.Tensor | None = None, progress: bool = True,
                    **hooks) -> QuantConfig:
    """Quantize `model` in place with `config` (targets become MatQuantLinear); returns its QuantConfig.
    `calib`: token windows [n, seqlen] when the config reads calibration."""
    from matquant.quant.rotation import make_spec, online_spec

    config.validate()
    if config.data_driven and calib is None:  # (an option that needs calibration: the method's own error)
        raise ValueError(f"method {config.name!r} needs calibration data (calib=token windows).")
    rotation = make_spec(config.rotate, config.group_size, config.rotate_seed)
    online = online_spec(rotation)
    targets = checked_targets(model, config)
    if rotation is not None and rotation["mode"] == "residual":
        from matquant.algorithms.residual_rotation import fold_residual_rotation

        fold_residual_rotation(model, rotation["seed"])
    with rotated_targets(model, targets, online):
        qweights = config.run(model, targets, calib, progress, **hooks)
    qcfg = quant_config(config, targets, qweights, rotation)
    replace_with_matquant(model, qweights, slicing=config.slicing)
    if online is not None:
        for n in targets:
            model.get_submodule(n).set_rotation(online)
    return qcfg


def checked_targets(model, config: MethodConfig) -> list[str]:
    """The config's target layers of `model`, the group size checked against every one before any work."""
    targets = find_targets(model, config.scope, config.modules)
    for n in targets:
        resolve_group_size(linear_weight(model.get_submodule(n)).shape[1], config.group_size)
    return targets


def quant_config(config: MethodConfig, targets: list[str], qweights, rotation=None) -> QuantConfig:
    """The checkpoint's QuantConfig for a finished run of `config` (one slice-own parameter set for every layer)."""
    own = {tuple(sorted(qweights[n].slice_params or ())) for n in targets}
    if len(own) > 1:
        raise RuntimeError(f"the layers got different slice-own parameter sets {sorted(own)}; a bug, please report it.")
    return QuantConfig(master_bits=config.master_bits, group_size=config.group_size, symmetric=config.symmetric,
                       slicing=config.slicing, scope=config.scope if config.modules is None else "custom",
                       modules=list(targets), default_bits=config.master_bits, method=config.name,
                       method_args=config.method_args(), param_dtype=config.param_dtype, rotation=rotation,
                       slice_params=list(own.pop()) or None).validate()


def quantize(source, config: MethodConfig, *, out=None, overwrite: bool = False, calib=None, tokenizer=None,
             threads: int | None = None, device: str = "cpu", progress: bool = True, log=print,
             stream: bool | None = None, max_shard_bytes: int | None = None,
             calib_memory_bytes: int | None = None, **hooks):
    """Load `source` (a model name/path, or a model already in memory with `tokenizer`), calibrate, quantize with
    `config`, save to `out` if given; returns (model, tokenizer, QuantConfig).

    `calib`: a Calibration (default: the embedded calibration text at the method's default size) or token windows
    [n, seqlen]. `threads`: torch CPU threads (results are deterministic per thread count). Under torchrun every
    rank runs the method and rank 0 writes.

    `stream` (default: whenever `source` is a path and `out` is given and the config allows it): read and quantize
    one decoder block at a time and write the checkpoint block by block (algorithms/streaming.py), so the model
    never sits in memory whole; the returned model is then None (load the checkpoint with `matquant.load(out)`).
    A rerun of a killed streamed run resumes after its last finished block. `max_shard_bytes`: the checkpoint's
    shard size (default format/shards.DEFAULT_MAX_SHARD_BYTES). `calib_memory_bytes`: a streamed run keeps the
    calibration hidden states on disk (read a batch at a time) once they exceed this (default
    streaming.DEFAULT_CALIB_MEMORY)."""
    from matquant.algorithms.training.distributed import finish_distributed, is_main_process

    config.validate()
    if out is not None and Path(out).exists() and not overwrite:
        raise FileExistsError(f"{out} already exists (a complete checkpoint: it is written atomically, so an "
                              "interrupted run leaves either nothing or all of it there); pass --overwrite "
                              "(overwrite=True) or choose another output folder.")
    is_path = isinstance(source, (str, os.PathLike))
    forced = stream is True
    if stream and (not is_path or out is None):
        raise ValueError("stream=True needs a model path or name as the source and an output folder (out=...).")
    if stream is None:
        stream = is_path and out is not None and is_main_process() and config.name != "qat"
    if stream:
        done = quantize_streamed(str(source), config, out, overwrite=overwrite, calib=calib, threads=threads,
                                 device=device, progress=progress, log=log, max_shard_bytes=max_shard_bytes,
                                 calib_memory_bytes=calib_memory_bytes, required=forced, **hooks)
        if done is not None:
            return done
    default_work = out is not None and getattr(config, "work_dir", None) is None
    config = config.for_output(out)
    set_threads(threads)
    t0 = time.time()
    if isinstance(source, (str, os.PathLike)):
        from matquant.models import load_model

        log(f"loading {source} ...")
        model, tokenizer, _ = load_model(str(source), device=device)
    else:
        model = source
    windows = None
    if config.needs_calibration():
        if isinstance(calib, torch.Tensor):
            windows = calib
        elif tokenizer is None:
            raise ValueError("a model passed in memory needs its tokenizer (tokenizer=...) or calibration windows "
                             "(calib=tensor) for a method that reads calibration text.")
        else:
            windows = (calib or Calibration()).token_windows(tokenizer, config)
    qcfg = quantize_loaded(model, config, windows, progress, **hooks)
    main = is_main_process()  # asked before finish_distributed: after it every process looks like rank 0
    if out is not None and main:
        from matquant.format.checkpoint import save_checkpoint

        save_checkpoint(model, tokenizer, out, qcfg, overwrite=overwrite)
        log(f"wrote {out}: {len(qcfg.modules)} layers, {config.name}, int{qcfg.master_bits} master, group "
            f"{qcfg.group_size}, slicing {qcfg.slicing} ({time.time() - t0:.0f}s, {torch.get_num_threads()} threads)")
    finish_distributed()
    work = getattr(config, "work_dir", None)
    if out is not None and main and work and Path(work).exists():
        if default_work and not getattr(config, "keep_work_dir", False):
            remove_tree(work)
            log(f"removed the training state {work} (pass --keep-work-dir to keep it)")
        else:
            size = sum(f.stat().st_size for f in Path(work).rglob("*") if f.is_file())
            log(f"training state kept in {work} ({size / 2**20:.0f} MiB); delete it when done")
    return model, tokenizer, qcfg


def set_threads(n: int | None) -> int:
    """Fix torch's CPU thread count (None: leave torch's default); returns the count in use."""
    if n is not None:
        if n < 1:
            raise ValueError(f"--threads must be >= 1, got {n}.")
        torch.set_num_threads(n)
    return torch.get_num_threads()


def remove_tree(path) -> None:
    """Delete a folder so that a kill never leaves it half-deleted: renamed away first, then removed."""
    path = Path(path)
    trash = Path(tempfile.mkdtemp(prefix=f".{path.name}.deleting-", dir=path.parent))
    os.replace(path, trash / "w")
    shutil.rmtree(trash, ignore_errors=True)


def quantize_streamed(source: str, config: MethodConfig, out, *, overwrite: bool = False, calib=None,
                      threads: int | None = None, device: str = "cpu", progress: bool = True, log=print,
                      max_shard_bytes: int | None = None, calib_memory_bytes: int | None = None,
                      required: bool = False, **hooks):
    """`quantize` one decoder block at a time (algorithms/streaming.py); (None, tokenizer, QuantConfig), or None
    when the config cannot run streamed and `required` is False (the caller then loads the whole model)."""
    from matquant.algorithms import streaming
    from matquant.format.source import open_source

    set_threads(threads)
    t0 = time.time()
    src = open_source(source)
    model = streaming.skeleton(src)
    targets = checked_targets(model, config)
    why = streaming.streamable(config, model, targets)
    if why is not None:
        if required:
            raise ValueError(f"cannot quantize {source} streamed: {why}.")
        log(f"loading the whole model ({why}) ...")
        return None
    tokenizer = src.tokenizer()
    windows = None
    if config.needs_calibration():
        windows = calib if isinstance(calib, torch.Tensor) else (calib or Calibration()).token_windows(tokenizer, config)
    work = streaming.work_folder(out)
    settings = streaming.run_settings(config, src, targets, windows, torch.get_num_threads())
    streaming.open_work(work, settings, log)
    cap = streaming.DEFAULT_CALIB_MEMORY if calib_memory_bytes is None else calib_memory_bytes
    stream = model._matquant_stream = streaming.BlockStream(model, src, work, hidden_cap_bytes=cap)
    log(f"streaming {src.describe()}: {len(targets)} target layers, {len(stream.blocks)} blocks read one at a time "
        f"(work folder {work})")
    qweights = config.run(model, targets, windows, progress, **hooks)
    qcfg = quant_config(config, targets, qweights)
    streaming.write_checkpoint(model, src, qweights, tokenizer, out, qcfg, slicing=config.slicing,
                               overwrite=overwrite, max_shard_bytes=max_shard_bytes, progress=progress)
    remove_tree(work)
    log(f"wrote {out}: {len(qcfg.modules)} layers, {config.name}, int{qcfg.master_bits} master, group "
        f"{qcfg.group_size}, slicing {qcfg.slicing} ({time.time() - t0:.0f}s, {torch.get_num_threads()} threads, "
        "streamed)")
    return None, tokenizer, qcfg
