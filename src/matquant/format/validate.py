"""Every check a matquant checkpoint folder must pass, in ONE place, used by `matquant.load` (format/checkpoint.py) and
by `AutoModelForCausalLM.from_pretrained` (integrations/transformers.py). The folder and config.json checks live in
format/folder.py; this module checks the tensors.

In load order:
1. `checkpoint_files(d)`: config.json and the weights (model.safetensors, or the shards of
   model.safetensors.index.json: `read_index`) are regular files of sane size in the folder; pickle is never read.
2. `read_header(path)` per file: names, dtypes and shapes from the safetensors header only (no tensor data);
   `read_headers(paths, weight_map)`: no tensor in two files, every shard agreeing with the index.
3. `check_config_size(cfg, header)`: the model config.json describes is no bigger than the tensors in the file, so a
   hostile `hidden_size: 10000000` or `num_hidden_layers: 100000` is refused before anything is built.
4. `check_header(header, expected, qconfig)`: against the (meta-device) skeleton: every tensor present, none extra,
   shapes and dtypes as expected (an integer tensor where a float is expected is refused here).
5. `check_values(name, tensor, qconfig)`: codes < 2^master_bits, no NaN/Inf, scales > 0, each tensor as it is
   read (`iter_tensors`: one tensor in memory at a time, read with plain file reads, not memory-mapped, so what a
   loader has read and dropped is not resident).
"""
from __future__ import annotations

import json
import math
import re
import struct
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open

from matquant.format.config import CheckpointError, QuantConfig
from matquant.format.folder import INDEX_NAME, WEIGHTS_NAME, _regular_file

_PARAM_LEAF = re.compile(r"(scales|zeros)(_int[1-8])?")  # shared group parameters, or a slice's own (int{r})
MAX_ABS = 1e6  # largest |value| accepted in a weight or scale (trained weights are O(1); fp16 cannot exceed 65504)
MAX_ABS_ZERO = 2.0**25  # zero-points: twice float32's 2/eps bound of quant/minmax.py
_DTYPES = {"BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "I32": torch.int32,
           "I64": torch.int64, "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32,
           "F64": torch.float64}


def param_leaf(leaf: str) -> str | None:
    """'scales' / 'zeros' for a quantized layer's group-parameter tensor (shared or slice-own), else None."""
    m = _PARAM_LEAF.fullmatch(leaf)
    return m.group(1) if m else None


def read_header(path: Path) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """{name: (dtype, shape)} from the safetensors header alone (the library checks offsets against the file size)."""
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            out = {}
            for k in f.keys():
                sl = f.get_slice(k)
                dt = sl.get_dtype()
                if dt not in _DTYPES:
                    raise CheckpointError(f"tensor {k} in {path} has dtype {dt}, which no matquant checkpoint holds.")
                out[k] = (_DTYPES[dt], tuple(int(s) for s in sl.get_shape()))
            return out
    except CheckpointError:
        raise
    except Exception as e:  # SafetensorError / OSError: a malformed header, offsets beyond the file, ...
        msg = str(e).splitlines()[0][:300] if str(e) else type(e).__name__
        raise CheckpointError(f"{path} is corrupt or truncated ({msg}); re-create the checkpoint.") from None


def expected_tensors(model, tied: set[str]) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """{name: (dtype, shape)} the skeleton (meta or real) expects from the file; tied copies are not stored."""
    return {k: (t.dtype, tuple(t.shape)) for k, t in model.state_dict().items() if k not in tied}


def _dtype_name(dt: torch.dtype) -> str:
    return str(dt).replace("torch.", "")


def check_header(header, expected, qconfig: QuantConfig, path: Path | str = WEIGHTS_NAME) -> None:
    """Names, shapes and dtypes of the file against what the skeleton expects (no tensor data read)."""
    missing = sorted(k for k in expected if k not in header)
    if missing:
        raise CheckpointError(f"{path} is missing {len(missing)} tensor(s), e.g. {missing[:3]}.")
    unexpected = sorted(set(header) - set(expected))
    if unexpected:
        raise CheckpointError(f"{path} has tensor(s) this model does not use, e.g. {unexpected[:3]}.")
    pdtype = getattr(torch, qconfig.param_dtype)
    quantized = set(qconfig.modules)
    for k, (dt, shape) in header.items():
        edt, eshape = expected[k]
        if shape != eshape:
            raise CheckpointError(f"tensor {k} in {path} has shape {shape}, expected {eshape}.")
        module, _, leaf = k.rpartition(".")
        if module in quantized and leaf == "qweight":
            want = torch.uint8
        elif module in quantized and param_leaf(leaf):
            want = pdtype
        elif edt.is_floating_point:
            if not dt.is_floating_point:
                raise CheckpointError(f"tensor {k} in {path} has dtype {_dtype_name(dt)}, expected a floating-point "
                                      "tensor; the file is corrupt.")
            continue
        else:
            want = edt
        if dt != want:
            extra = " codes" if leaf == "qweight" else f" (param_dtype {qconfig.param_dtype})" if want == pdtype else ""
            raise CheckpointError(f"tensor {k} in {path} has dtype {_dtype_name(dt)}, expected "
                                  f"{_dtype_name(want)}{extra}.")


def check_values(name: str, t: torch.Tensor, qconfig: QuantConfig, path: Path | str = WEIGHTS_NAME) -> None:
    """The values of one tensor: codes below 2^master_bits, floats finite, scales positive."""
    module, _, leaf = name.rpartition(".")
    is_code = module in set(qconfig.modules) and (leaf == "qweight" or param_leaf(leaf) is not None)
    kind = param_leaf(leaf) if is_code else None
    if is_code and leaf == "qweight" and t.numel() and int(t.max()) >= 2**qconfig.master_bits:
        raise CheckpointError(f"tensor {name} in {path} holds codes >= 2^{qconfig.master_bits} (master_bits); "
                              "the file is corrupt.")
    lo = hi = None
    if t.is_floating_point() and t.numel():
        # one reduction, no temporary as large as the tensor (isfinite / abs would each allocate one); NaN propagates
        lo, hi = (float(v) for v in torch.aminmax(t))
        if not (math.isfinite(lo) and math.isfinite(hi)):
            raise CheckpointError(f"tensor {name} in {path} contains NaN/Inf values.")
        # finite but absurd (a flipped exponent bit): no trained weight or MinMax α comes near MAX_ABS, and the
        # zero-points stay within the dtype's 2/eps (quant/minmax.py param_limits); such values overflow in forward
        bound = MAX_ABS_ZERO if kind == "zeros" else MAX_ABS
        big = max(abs(lo), abs(hi))
        if big > bound:
            raise CheckpointError(f"tensor {name} in {path} holds a value of magnitude {big:.3g} (> {bound:.0e}), "
                                  "far beyond any trained weight: the file is corrupt.")
    if kind == "scales" and t.numel() and not (lo > 0 if lo is not None else bool((t > 0).all())):
        raise CheckpointError(f"tensor {name} in {path} has scales <= 0; the file is corrupt.")


def read_headers(paths, weight_map: dict[str, str] | None = None) -> dict[Path, dict]:
    """{file: its header} of the weight file(s), checked across files: safetensors only, no tensor in two files, and
    for a sharded folder (`weight_map` from its index) every shard holding exactly the tensors the index gives it."""
    paths = [Path(p) for p in ([paths] if isinstance(paths, (str, Path)) else paths)]
    bad = [p.name for p in paths if p.suffix != ".safetensors"]
    if bad:
        raise CheckpointError(f"weights {bad} are not safetensors; matquant never loads pickle. Re-create the "
                              "checkpoint with `matquant quantize`.")
    headers = {p: read_header(_regular_file(p, "weights file")) for p in paths}
    where: dict[str, Path] = {}
    for p, h in headers.items():
        for k in h:
            if k in where:
                raise CheckpointError(f"tensor {k} is stored in two weights files, {where[k].name} and {p.name}; "
                                      "the checkpoint is corrupt: re-create it.")
            where[k] = p
    if weight_map is not None:
        check_index(headers, weight_map)
    return headers


def check_index(headers: dict[Path, dict], weight_map: dict[str, str]) -> None:
    """Every tensor the index lists is in the shard it names, and every shard's tensors are listed there."""
    for p, h in headers.items():
        for k in h:
            listed = weight_map.get(k)
            if listed is None:
                raise CheckpointError(f"tensor {k} is in shard {p.name} but not listed in {INDEX_NAME}; the index "
                                      "does not match the shards: re-create the checkpoint.")
            if listed != p.name:
                raise CheckpointError(f"tensor {k} is in shard {p.name} but {INDEX_NAME} says {listed}; the index "
                                      "does not match the shards: re-create the checkpoint.")
    names = {p.name: h for p, h in headers.items()}
    for k, f in weight_map.items():
        if k not in names.get(f, ()):
            raise CheckpointError(f"{INDEX_NAME} lists tensor {k!r:.120} in {f}, which does not hold it; the index "
                                  "does not match the shards: re-create the checkpoint.")


def check_weights(paths, model, qconfig: QuantConfig, tied: set[str], weight_map: dict[str, str] | None = None):
    """Headers of the weight file(s) against each other, the index and the skeleton `model` (no tensor data read);
    returns {file: header} for `iter_tensors`."""
    headers = read_headers(paths, weight_map)
    merged = {k: v for h in headers.values() for k, v in h.items()}
    first = next(iter(headers))
    check_header(merged, expected_tensors(model, tied), qconfig, first if len(headers) == 1 else first.parent)
    return headers


def _data_offsets(path: Path) -> tuple[int, dict]:
    """(where the data region starts, the raw header JSON) of a safetensors file that `read_header` accepted."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return 8 + n, json.loads(f.read(n))


def iter_tensors(headers: dict[Path, dict], qconfig: QuantConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of every tensor, file by file, each value-checked as it is read; only the tensor handed out is
    held (plain reads into a fresh tensor: nothing stays memory-mapped)."""
    for path, header in headers.items():
        try:
            start, raw = _data_offsets(path)
            f = open(path, "rb")
        except (OSError, ValueError, struct.error, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path} cannot be read again ({str(e)[:200]}); was it changed while "
                                  "loading?") from None
        with f:
            for k, (dt, shape) in header.items():
                t = torch.empty(shape, dtype=dt, device="cpu")  # (transformers may load under a meta device context)
                try:
                    a, b = (int(x) for x in raw[k]["data_offsets"])
                except (KeyError, TypeError, ValueError):
                    a, b = 0, -1
                n = t.numel() * t.element_size()
                if b - a != n or a < 0:  # safetensors checked this: only a file changed since then gets here
                    raise CheckpointError(f"tensor {k} in {path} changed while loading; load it again.")
                if n:
                    f.seek(start + a)
                    got = f.readinto(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
                    if got != n:
                        raise CheckpointError(f"tensor {k} in {path} cannot be read ({got} of {n} bytes); file "
                                              "truncated?")
                check_values(k, t, qconfig, path)
                yield k, t


def validate_tensors(paths, model, qconfig: QuantConfig, tied: set[str],
                     weight_map: dict[str, str] | None = None) -> dict[str, torch.Tensor]:
    """Headers and values of the weight file(s) against the skeleton `model`; returns the (checked) tensors."""
    return dict(iter_tensors(check_weights(paths, model, qconfig, tied, weight_map), qconfig))
