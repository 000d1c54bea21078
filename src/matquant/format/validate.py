"""Every check a matquant checkpoint folder must pass, in ONE place, used by `matquant.load` (format/checkpoint.py) and
by `AutoModelForCausalLM.from_pretrained` (integrations/transformers.py).

In load order:
1. `checkpoint_files(d)`: config.json and model.safetensors are regular files of sane size; pickle is never read.
2. `read_header(path)`: names, dtypes and shapes from the safetensors header only (no tensor data).
3. `check_config_size(cfg, header)`: the model config.json describes is no bigger than the tensors in the file, so a
   hostile `hidden_size: 10000000` or `num_hidden_layers: 100000` is refused before anything is built.
4. `check_header(header, expected, qconfig)`: against the (meta-device) skeleton: every tensor present, none extra,
   shapes and dtypes as expected (an integer tensor where a float is expected is refused here).
5. `check_values(name, tensor, qconfig)`: codes < 2^master_bits, no NaN/Inf, scales > 0.
"""
from __future__ import annotations

import json
import math
import re
import stat
from pathlib import Path

import torch

from matquant.format.config import CheckpointError, QuantConfig

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
MAX_CONFIG_BYTES = 16 * 2**20  # a config.json is a few KB; anything this large is not one
CODE_LEAVES = ("qweight", "scales", "zeros")
_PARAM_LEAF = re.compile(r"(scales|zeros)(_int[1-8])?")  # shared group parameters, or a slice's own (int{r})
MAX_ABS = 1e6  # largest |value| accepted in a weight or scale (trained weights are O(1); fp16 cannot exceed 65504)
MAX_ABS_ZERO = 2.0**25  # zero-points: twice float32's 2/eps bound of quant/minmax.py
# config keys that give a number of layers / a tensor dimension (the families in models/targets.py, and HF's aliases)
LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers", "num_decoder_layers")
DIM_KEYS = ("hidden_size", "intermediate_size", "vocab_size", "n_embd", "n_inner", "ffn_dim", "word_embed_proj_dim",
            "head_dim", "num_attention_heads", "num_key_value_heads", "n_head", "n_positions", "d_model",
            "moe_intermediate_size", "num_experts", "num_local_experts")
_DTYPES = {"BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "I32": torch.int32,
           "I64": torch.int64, "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32,
           "F64": torch.float64}


def param_leaf(leaf: str) -> str | None:
    """'scales' / 'zeros' for a quantized layer's group-parameter tensor (shared or slice-own), else None."""
    m = _PARAM_LEAF.fullmatch(leaf)
    return m.group(1) if m else None


def _regular_file(p: Path, what: str, max_bytes: int | None = None) -> Path:
    try:
        st = p.stat()  # follows symlinks (the HF cache links to blobs): what matters is what they point at
    except FileNotFoundError:
        raise CheckpointError(f"{p} is a dangling symlink; re-create or re-download the checkpoint.") from None
    except OSError as e:
        raise CheckpointError(f"{p} cannot be read ({e.strerror or e}).") from None
    if not stat.S_ISREG(st.st_mode):
        raise CheckpointError(f"{p} ({what}) is not a regular file; a checkpoint holds plain files only.")
    if max_bytes is not None and st.st_size > max_bytes:
        raise CheckpointError(f"{p} is {st.st_size} bytes, too large for a {what} (at most {max_bytes}).")
    return p


def checkpoint_files(d) -> tuple[Path, Path]:
    """(config.json, model.safetensors) of folder `d`, both regular files; refuses pickle-only folders."""
    d = Path(d)
    if not d.is_dir():
        raise CheckpointError(f"{d} is not a folder; pass a matquant checkpoint folder (from `matquant quantize`).")
    cfg = d / CONFIG_NAME
    if not cfg.exists() and not cfg.is_symlink():
        raise CheckpointError(f"{d} has no {CONFIG_NAME}: not a matquant checkpoint.")
    _regular_file(cfg, CONFIG_NAME, MAX_CONFIG_BYTES)
    w = d / WEIGHTS_NAME
    if not w.exists() and not w.is_symlink():
        pickles = sorted(p.name for p in d.iterdir() if p.suffix in PICKLE_SUFFIXES)
        hint = f" (found pickle file(s) {pickles}; matquant never loads pickle)" if pickles else ""
        raise CheckpointError(f"{d} has no {WEIGHTS_NAME}{hint}; re-create the checkpoint with `matquant quantize`.")
    return cfg, _regular_file(w, WEIGHTS_NAME)


BOOL_KEYS = ("return_dict", "output_hidden_states", "output_attentions", "use_cache", "tie_word_embeddings")
FLOAT_DTYPE_NAMES = frozenset({"float32", "float16", "bfloat16", "float64", "auto"})
MARK_BYTES = 4 * 2**20  # how much of each file `looks_like_matquant` reads


def _head_bytes(p: Path, n: int = MARK_BYTES) -> bytes:
    """The first n bytes of p if it is a regular file (never opens a FIFO or a device), else b""."""
    try:
        if not stat.S_ISREG(p.stat().st_mode):
            return b""
        with open(p, "rb") as f:
            return f.read(n)
    except (OSError, ValueError):
        return b""


def looks_like_matquant(d) -> bool:
    """Whether local folder `d` is (or was, before corruption) a matquant checkpoint: its config.json names matquant
    or holds matquant's own quantization_config keys (master_bits and slicing), or its safetensors header holds
    matquant's code tensors (`<module>.qweight` with `<module>.zeros`; GPTQ/AWQ folders store `qzeros`, so they do
    not match). Never raises; reads at most a few MiB."""
    try:
        d = Path(d)
        if not d.is_dir():
            return False
    except (OSError, TypeError, ValueError):
        return False
    cfg = _head_bytes(d / CONFIG_NAME)
    if b'"matquant"' in cfg or (b'"master_bits"' in cfg and b'"slicing"' in cfg):  # also with quant_method edited
        return True
    head = _head_bytes(d / WEIGHTS_NAME)
    return b'.qweight"' in head and b'.zeros"' in head


MAX_CONFIG_DEPTH = 32  # JSON nesting levels of config.json (real configs: 3-4)


def _depth(v, limit: int = MAX_CONFIG_DEPTH + 1) -> int:
    """Nesting depth of a JSON value (a scalar is 0), counted without recursion and capped at `limit`."""
    best, stack = 0, [(v, 0)]
    while stack:
        x, d = stack.pop()
        if isinstance(x, (dict, list)):
            if d + 1 > best:
                best = d + 1
                if best >= limit:
                    return best
            stack.extend((c, d + 1) for c in (x.values() if isinstance(x, dict) else x))
    return best


def read_config(path: Path) -> dict:
    """config.json as a dict with a quantization_config object (not yet validated)."""
    try:
        cfg = json.loads(Path(path).read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({str(e).splitlines()[0][:200]}); the file is corrupt.") from None
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{path} must hold a JSON object, got {type(cfg).__name__}; the file is corrupt.")
    if _depth(cfg) > MAX_CONFIG_DEPTH:  # transformers' config copy recurses per level (fuzz seed 17 #20234: RecursionError)
        raise CheckpointError(f"{path} nests values more than {MAX_CONFIG_DEPTH} levels deep; a model config nests a "
                              "few levels at most: edited or corrupt file.")
    if "quantization_config" not in cfg:
        raise CheckpointError(f"{path} has no quantization_config: this is a plain model, not a matquant "
                              "checkpoint. Quantize it with `matquant quantize --model DIR`.")
    return cfg


def read_header(path: Path) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """{name: (dtype, shape)} from the safetensors header alone (the library checks offsets against the file size)."""
    from safetensors import safe_open

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


def header_numel(header) -> int:
    return sum(math.prod(shape) for _, shape in header.values())


def _layer_count(header) -> int:
    """The number of blocks the file holds: the largest count of integer-indexed siblings under one prefix."""
    seen: dict[str, set[int]] = {}
    for k in header:
        parts = k.split(".")
        for i, p in enumerate(parts):
            if p.isdigit():
                seen.setdefault(".".join(parts[:i]), set()).add(int(p))
    return max((len(v) for v in seen.values()), default=0)


def check_config_types(cfg: dict, defaults: dict, path: Path | str = CONFIG_NAME) -> None:
    """Each config.json value has the type of the architecture's default for that key (int where a float is
    expected is fine; null is always allowed; token ids may be lists): a string where transformers expects a bool
    would otherwise load and fail later, inside the first forward pass."""
    if cfg.get("return_dict") is False:
        # transformers 5's causal-LM heads read their inner model's output as an object, so a model whose config
        # says return_dict: false loads and then fails in its first forward (AttributeError, fuzz seed 15 #12412)
        raise CheckpointError(f"{path} sets return_dict: false, with which transformers' causal-LM forward fails "
                              "(it reads the inner model's output object); remove the key or set it to true, and "
                              "pass return_dict=False to a call to get tuples.")
    for k, v in cfg.items():
        if isinstance(v, float) and not math.isfinite(v):  # rms_norm_eps: NaN loaded fine and gave NaN logits
            raise CheckpointError(f"{path}: {k} is {v}; a model config holds finite numbers only (corrupt file).")
        if k in ("dtype", "torch_dtype") and v is not None and \
                not (isinstance(v, str) and v in FLOAT_DTYPE_NAMES):  # (a list or dict is unhashable)
            # transformers resolves it to a torch dtype before any matquant hook (fuzz: "nested" -> TypeError)
            raise CheckpointError(f"{path}: {k} is {v!r:.60}, not one of {sorted(FLOAT_DTYPE_NAMES)} or null; "
                                  "edited or corrupt config.json.")
        d = defaults.get(k, True if k in BOOL_KEYS else None)  # some flags are missing from to_dict()
        if v is None or d is None or k.endswith("token_id") or k == "quantization_config":
            continue
        if isinstance(d, bool):
            ok = isinstance(v, bool)
        elif isinstance(d, int):
            ok = isinstance(v, int) and not isinstance(v, bool)
        elif isinstance(d, float):
            ok = isinstance(v, (int, float)) and not isinstance(v, bool)
        elif isinstance(d, (str, list, dict)):
            ok = isinstance(v, type(d))
        else:
            continue
        if not ok:
            raise CheckpointError(f"{path}: {k} is {type(v).__name__} {v!r:.60}, expected {type(d).__name__} (like "
                                  f"the default {d!r:.40}); edited or corrupt config.json.")


def check_config_size(cfg: dict, header, path: Path | str = CONFIG_NAME) -> None:
    """Refuse a config.json describing a model larger than the tensors actually stored, before building anything."""
    max_dim = max((max(shape, default=1) for _, shape in header.values()), default=0)
    n_layers = _layer_count(header)

    def walk(d, where):
        for k, v in d.items():
            if k == "quantization_config":
                continue
            if isinstance(v, dict):
                walk(v, f"{where}{k}.")
                continue
            if not isinstance(v, int) or isinstance(v, bool):
                continue
            if (k in LAYER_KEYS or k in DIM_KEYS) and v < 1:
                raise CheckpointError(f"{path}: {where}{k} = {v} must be at least 1 (edited or corrupt config.json).")
            if k in LAYER_KEYS and v > max(n_layers, 1):
                raise CheckpointError(f"{path}: {where}{k} = {v} but the weights file holds {n_layers} block(s); the "
                                      "config does not match the weights (edited or corrupt config.json).")
            if k in DIM_KEYS and v > max_dim:
                raise CheckpointError(f"{path}: {where}{k} = {v} exceeds every tensor dimension in the weights file "
                                      f"(largest {max_dim}); the config does not match the weights.")
            if abs(v) >= 2**31:
                raise CheckpointError(f"{path}: {where}{k} = {v} is out of range for a model config.")

    walk(cfg, "")


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
    if t.is_floating_point() and t.numel():
        if not torch.isfinite(t).all():
            raise CheckpointError(f"tensor {name} in {path} contains NaN/Inf values.")
        # finite but absurd (a flipped exponent bit): no trained weight or MinMax α comes near MAX_ABS, and the
        # zero-points stay within the dtype's 2/eps (quant/minmax.py param_limits); such values overflow in forward
        bound = MAX_ABS_ZERO if kind == "zeros" else MAX_ABS
        big = float(t.abs().max())
        if big > bound:
            raise CheckpointError(f"tensor {name} in {path} holds a value of magnitude {big:.3g} (> {bound:.0e}), "
                                  "far beyond any trained weight: the file is corrupt.")
    if kind == "scales" and t.numel() and not bool((t > 0).all()):
        raise CheckpointError(f"tensor {name} in {path} has scales <= 0; the file is corrupt.")


def read_tensors(path: Path, header, qconfig: QuantConfig) -> dict[str, torch.Tensor]:
    """Every tensor of the file, each value-checked (call after `check_header`)."""
    from safetensors import safe_open

    out = {}
    try:
        f = safe_open(str(path), framework="pt", device="cpu")
    except Exception as e:
        raise CheckpointError(f"{path} is corrupt or truncated ({str(e)[:300]}); re-create the checkpoint.") from None
    with f:
        for k in header:
            try:
                t = f.get_tensor(k)
            except Exception as e:  # truncated data region
                raise CheckpointError(f"tensor {k} in {path} cannot be read ({str(e)[:200]}); file truncated?") from None
            check_values(k, t, qconfig, path)
            out[k] = t
    return out


def validate_tensors(paths, model, qconfig: QuantConfig, tied: set[str]) -> dict[str, torch.Tensor]:
    """Headers and values of the weights file(s) against the skeleton `model`; returns the (checked) tensors."""
    paths = [Path(p) for p in ([paths] if isinstance(paths, (str, Path)) else paths)]
    bad = [p.name for p in paths if p.suffix != ".safetensors"]
    if bad:
        raise CheckpointError(f"weights {bad} are not safetensors; matquant never loads pickle. Re-create the "
                              "checkpoint with `matquant quantize`.")
    headers = {p: read_header(_regular_file(p, "weights file")) for p in paths}
    merged: dict = {}
    for p, h in headers.items():
        twice = sorted(set(h) & set(merged))
        if twice:
            raise CheckpointError(f"tensor {twice[0]} is stored in more than one weights file.")
        merged.update(h)
    check_header(merged, expected_tensors(model, tied), qconfig, paths[0] if len(paths) == 1 else paths[0].parent)
    out = {}
    for p, h in headers.items():
        out.update(read_tensors(p, h, qconfig))
    return out

