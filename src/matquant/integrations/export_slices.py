"""What every exporter reads from a checkpoint: per quantized module, the r-bit slice as integer codes and the
per-group affine constants of `kernels.cpu.slice_params` (W = q_r·A + B), plus the slice itself as matquant
computes it (the reference every export is measured against)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from matquant.format.checkpoint import load_checkpoint, read_quant_config
from matquant.kernels.cpu import slice_params
from matquant.nn.bits import matquant_modules
from matquant.quant.slicing import slice_codes

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


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
        raise ExportError(f"{ckpt_dir} has quantized codes but no tokenizer (none of {', '.join(TOKENIZER_FILES)}); "
                          "an exported model needs one. Copy the source model's tokenizer files into the checkpoint "
                          "folder (tokenizer.save_pretrained(DIR)) and run export again.")
    return load_checkpoint(ckpt_dir, bits=bits, slicing=slicing)


def check_out_path(out, overwrite: bool) -> Path:
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; pass --overwrite or choose another --out.")
    return out
