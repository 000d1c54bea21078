"""What every exporter reads from a checkpoint: per quantized module, the r-bit slice as integer codes and the
per-group affine constants of `kernels.cpu.slice_params` (W = q_r·A + B), plus the slice itself as matquant
computes it (the reference every export is measured against); and every other tensor in fp32.

Exporters read through a *source*, one tensor at a time, so they never hold the whole model:

- `CheckpointSource(dir, bits)`: a checkpoint folder (single file or shards) read lazily: the model skeleton on the
  meta device (its config, the per-module precision), every header checked against it up front (format/validate.py),
  then each tensor read from disk with plain file reads when asked for, value-checked, and dropped by the caller.
- `ModelSource(model, tokenizer)`: a model already in memory (what `load_for_export` returns), same interface.

Both give `slice_names` / `plain_names` (state-dict order), `layout(name)` (a slice's type and shape without its
data), `slice(name)` (a `SliceTensor`) and `plain(name)` (an fp32 tensor; a tied name reads its stored twin).
"""
from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from matquant.format.checkpoint import load_checkpoint, read_quant_config
from matquant.kernels.cpu import slice_params
from matquant.nn.bits import matquant_modules
from matquant.quant.slicing import slice_codes

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


_NO_TOKENIZER = ("{ckpt_dir} has quantized codes but no tokenizer (none of " + ", ".join(TOKENIZER_FILES) + "); an "
                 "exported model needs one. Copy the source model's tokenizer files into the checkpoint folder "
                 "(tokenizer.save_pretrained(DIR)) and run export again.")


class ExportError(ValueError):
    """The requested export cannot be written as asked (message says why and what to do)."""


@dataclass
class SliceTensor:
    module: str            # HF module name, e.g. model.layers.0.mlp.gate_proj
    codes: torch.Tensor    # uint8 [out, in]: the r-bit codes q_r (0..levels-1)
    a: torch.Tensor        # fp32 [out, n_groups]: A (scale of one code step)
    b: torch.Tensor        # fp32 [out, n_groups]: B (value of code 0)
    group_size: int
    bits: int
    mode: str
    levels: int            # 2^r, or 2^r + 1 for `extra` slicing below the master bits
    reference: torch.Tensor  # fp32 [out, in]: the slice exactly as matquant's layer computes it

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)


@dataclass
class SliceLayout:
    """What a module's slice will be, known from the skeleton before any of its tensors is read."""
    module: str
    shape: tuple[int, int]  # [out, in]
    group_size: int
    bits: int
    mode: str
    levels: int


def module_layout(name: str, m) -> SliceLayout:
    c, r, mode = m.master_bits, m.bits, m.slicing
    levels = 2**r + (1 if (mode == "extra" and r < c) else 0)
    return SliceLayout(name, (m.out_features, m.in_features), m.group_size, r, mode, levels)


def module_slice(name: str, m) -> SliceTensor:
    """The current (bits, slicing) slice of one MatQuantLinear."""
    c, r, mode = m.master_bits, m.bits, m.slicing
    q = slice_codes(m.master_codes(), c, r, mode)
    levels = 2**r + (1 if (mode == "extra" and r < c) else 0)
    a, b = slice_params(*m.group_params(r, mode), c, r, mode)
    ref = m.dequantized_weight(torch.float32).detach().float().cpu()
    return SliceTensor(name, q.to(torch.uint8).cpu(), a.cpu(), b.cpu(), m.group_size, r, mode, levels, ref)


def model_slices(model) -> dict[str, SliceTensor]:
    return {n: module_slice(n, m) for n, m in matquant_modules(model).items()}


def plain_tensors(model) -> dict[str, torch.Tensor]:
    """Every tensor of the model that is not a quantized module's codes/scales/zeros (norms, embeddings, biases)."""
    qmods = matquant_modules(model)
    skip = {f"{n}.{t}" for n, m in qmods.items() for t in m.code_tensor_names()}
    return {k: v.detach().float().cpu() for k, v in model.state_dict().items() if k not in skip}


def load_for_export(ckpt_dir, bits, slicing: str | None = None):
    """(model, tokenizer, qconfig) of the checkpoint at `bits` (int or bits map); refuses a checkpoint without a
    tokenizer (an exported model without one cannot be served)."""
    read_quant_config(ckpt_dir)  # clear error for a non-checkpoint before anything heavy
    if not any(Path(ckpt_dir, n).exists() for n in TOKENIZER_FILES):
        raise ExportError(_NO_TOKENIZER.format(ckpt_dir=ckpt_dir))
    return load_checkpoint(ckpt_dir, bits=bits, slicing=slicing)


def check_out_path(out, overwrite: bool) -> Path:
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; pass --overwrite or choose another --out.")
    return out


def output_head_name(model) -> str | None:
    """The state-dict name of the model's output head weight (lm_head.weight), None if it has none."""
    out = model.get_output_embeddings()
    return next((f"{n}.weight" for n, m in model.named_modules() if m is out), None) if out is not None else None


class ModelSource:
    """A model in memory (any precision set on it), read like a checkpoint: one slice / tensor when asked."""

    def __init__(self, model, tokenizer=None):
        self.model, self.tokenizer, self.config = model, tokenizer, model.config
        self.qmods = matquant_modules(model)
        skip = {f"{n}.{t}" for n, m in self.qmods.items() for t in m.code_tensor_names()}
        self._state = {k: v for k, v in model.state_dict().items() if k not in skip}
        self.slice_names = list(self.qmods)
        self.plain_names = list(self._state)
        self.output_head = output_head_name(model)
        self.ckpt_dir = None

    def layout(self, name: str) -> SliceLayout:
        return module_layout(name, self.qmods[name])

    def slice(self, name: str) -> SliceTensor:
        return module_slice(name, self.qmods[name])

    def dense_weight(self, name: str) -> torch.Tensor:
        """The slice as a plain fp32 weight of the original input basis (an online rotation folded back)."""
        return self.qmods[name].dense_weight(torch.float32).detach().clone()

    def plain(self, name: str) -> torch.Tensor:
        return self._state[name].detach().float().cpu()

    def out_shard_bytes(self) -> int | None:
        """The shard size an exported folder is written with: None (one model.safetensors) for a model in memory."""
        return None

    def close(self) -> None:
        pass


class CheckpointSource(ModelSource):
    """A checkpoint folder (either layout) read one tensor at a time (see the module docstring): at most one
    quantized module's tensors and its slice are held, whatever the depth of the model."""

    def __init__(self, ckpt_dir, bits=None, slicing: str | None = None, need_tokenizer: bool = True):
        from matquant.format.checkpoint import load_tokenizer, open_checkpoint, tied_keys, weight_headers
        from matquant.format.folder import checkpoint_files, weight_map_of
        from matquant.format.validate import check_weights

        self.ckpt_dir = Path(ckpt_dir)
        if need_tokenizer and not any((self.ckpt_dir / n).exists() for n in TOKENIZER_FILES):
            read_quant_config(ckpt_dir)  # a non-checkpoint gets that error first
            raise ExportError(_NO_TOKENIZER.format(ckpt_dir=ckpt_dir))
        weight_headers(ckpt_dir)  # folder, index and shard headers, before a skeleton is built
        skeleton, self.qconfig = open_checkpoint(ckpt_dir, bits, slicing)
        super().__init__(skeleton, load_tokenizer(ckpt_dir))
        tied = tied_keys(skeleton)
        _, files = checkpoint_files(ckpt_dir)
        headers = check_weights(files, skeleton, self.qconfig, tied, weight_map_of(ckpt_dir))
        self._where: dict[str, tuple] = {}  # name -> (file, data start, bytes, dtype, shape)
        for path, header in headers.items():
            start, raw = _data_region(path)
            for k, (dt, shape) in header.items():
                a, b = (int(x) for x in raw[k]["data_offsets"])
                self._where[k] = (path, start + a, b - a, dt, shape)
        inp = skeleton.get_input_embeddings()
        emb = next((f"{n}.weight" for n, m in skeleton.named_modules() if m is inp), None)
        self._twin = {k: emb for k in tied}  # tied names are stored once, under the input embedding
        self._files: dict[Path, object] = {}
        self.shard_bytes = max(p.stat().st_size for p in files)
        self.sharded = len(files) > 1

    def read(self, name: str) -> torch.Tensor:
        """One stored tensor, read with plain file reads (nothing stays memory-mapped) and value-checked."""
        from matquant.format.config import CheckpointError
        from matquant.format.validate import check_values

        path, start, n, dt, shape = self._where[self._twin.get(name, name)]
        t = torch.empty(shape, dtype=dt)
        if t.numel() * t.element_size() != n:
            raise CheckpointError(f"tensor {name} in {path} changed while exporting; run the export again.")
        if n:
            f = self._files.get(path) or self._files.setdefault(path, open(path, "rb"))
            f.seek(start)
            if f.readinto(memoryview(t.reshape(-1).view(torch.uint8).numpy())) != n:
                raise CheckpointError(f"tensor {name} in {path} cannot be read; file truncated?")
        check_values(self._twin.get(name, name), t, self.qconfig, path)
        return t

    def _loaded(self, name: str):
        """The skeleton's module `name` with its code tensors read in (put back on the meta device by `_unload`)."""
        m = self.qmods[name]
        for leaf in m.code_tensor_names():
            t = self.read(f"{name}.{leaf}")
            setattr(m, leaf, t.to(getattr(m, leaf).dtype) if t.is_floating_point() else t)
        m._cached = None
        return m

    def _unload(self, m) -> None:
        for leaf in m.code_tensor_names():
            t = getattr(m, leaf)
            setattr(m, leaf, torch.empty(t.shape, dtype=t.dtype, device="meta"))
        m._cached = None
        m.compute_backend.clear()

    def slice(self, name: str) -> SliceTensor:
        m = self._loaded(name)
        try:
            return module_slice(name, m)
        finally:
            self._unload(m)

    def dense_weight(self, name: str) -> torch.Tensor:
        m = self._loaded(name)
        try:
            return m.dense_weight(torch.float32).detach().clone()
        finally:
            self._unload(m)

    def plain(self, name: str) -> torch.Tensor:
        return self.read(name).float()

    def out_shard_bytes(self) -> int | None:
        """Sharded like the checkpoint: shards of at most its largest weight file; None (one file) when it has one."""
        return self.shard_bytes if self.sharded else None

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _data_region(path: Path) -> tuple[int, dict]:
    """(where the data region starts, the raw header JSON) of a safetensors file format/validate.py accepted."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return 8 + n, json.loads(f.read(n))


def as_source(model_or_source, tokenizer=None):
    """A source for the exporters: a CheckpointSource/ModelSource as given, a model wrapped in a ModelSource."""
    return model_or_source if isinstance(model_or_source, ModelSource) else ModelSource(model_or_source, tokenizer)
