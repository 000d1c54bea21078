"""The checkpoint folder and its config.json, checked before any tensor is read (steps 1 and 3 of the load order in
format/validate.py):

- `checkpoint_files(d)`: config.json and the weights (model.safetensors, or the shards a
  model.safetensors.index.json names) are regular files of sane size inside the folder; pickle is never read.
- `read_index(d)`: the shard index, bounded in size, well-formed, naming only plain `.safetensors` files of `d`.
- `looks_like_matquant(d)`: whether a folder is (or was, before corruption) a matquant checkpoint; never raises.
- `read_config(path)`: config.json parsed, bounded in nesting, with a quantization_config.
- `check_config_types(cfg, defaults)`: each value has the type of the architecture's default.
- `check_config_size(cfg, header)`: the model config.json describes is no bigger than the tensors in the file, so a
  hostile `hidden_size: 10000000` or `num_hidden_layers: 100000` is refused before anything is built.
"""
from __future__ import annotations

import json
import math
import stat
from pathlib import Path

from matquant.format.config import CheckpointError

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
CONFIG_NAME = "config.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
MAX_CONFIG_BYTES = 16 * 2**20  # a config.json is a few KB; anything this large is not one
MAX_INDEX_BYTES = 16 * 2**20  # a shard index lists every tensor once: far below this for any real model
# config keys that give a number of layers / a tensor dimension (the families in models/targets.py, and HF's aliases)
LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers", "num_decoder_layers")
DIM_KEYS = ("hidden_size", "intermediate_size", "vocab_size", "n_embd", "n_inner", "ffn_dim", "word_embed_proj_dim",
            "head_dim", "num_attention_heads", "num_key_value_heads", "n_head", "n_positions", "d_model",
            "moe_intermediate_size", "num_experts", "num_local_experts")


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


def checkpoint_files(d) -> tuple[Path, list[Path]]:
    """(config.json, [weight files]) of folder `d`, all regular files; refuses pickle-only folders. The weights are
    model.safetensors when it exists (what transformers picks too), else the shards model.safetensors.index.json
    names (`read_index`)."""
    d = Path(d)
    if not d.is_dir():
        raise CheckpointError(f"{d} is not a folder; pass a matquant checkpoint folder (from `matquant quantize`).")
    cfg = d / CONFIG_NAME
    if not cfg.exists() and not cfg.is_symlink():
        raise CheckpointError(f"{d} has no {CONFIG_NAME}: not a matquant checkpoint.")
    _regular_file(cfg, CONFIG_NAME, MAX_CONFIG_BYTES)
    w = d / WEIGHTS_NAME
    if not w.exists() and not w.is_symlink():
        index = d / INDEX_NAME
        if index.exists() or index.is_symlink():
            return cfg, [d / f for f in sorted(set(read_index(d).values()))]
        pickles = sorted(p.name for p in d.iterdir() if p.suffix in PICKLE_SUFFIXES)
        hint = f" (found pickle file(s) {pickles}; matquant never loads pickle)" if pickles else ""
        raise CheckpointError(f"{d} has no {WEIGHTS_NAME} nor {INDEX_NAME}{hint}; re-create the checkpoint with "
                              "`matquant quantize`.")
    return cfg, [_regular_file(w, WEIGHTS_NAME)]


def weight_map_of(d) -> dict[str, str] | None:
    """The checked {tensor: shard file} of a sharded folder, None for a single-file one (see `checkpoint_files`)."""
    d = Path(d)
    if (d / WEIGHTS_NAME).exists() or (d / WEIGHTS_NAME).is_symlink():
        return None
    return read_index(d)


def _inside(d: Path, p: Path) -> bool:
    """Whether p (symlinks followed) lies in folder d, or in the blob store of the HF cache snapshot d is."""
    try:
        real, root = p.resolve(), d.resolve()
    except (OSError, RuntimeError):  # a symlink loop
        return False
    if real.parent == root:
        return True
    blobs = root.parent.parent / "blobs"  # HF cache: snapshots/<rev>/<file> -> ../../blobs/<sha>
    return root.parent.name == "snapshots" and real.parent == blobs


def read_index(d) -> dict[str, str]:
    """{tensor name: shard file} of `d`'s model.safetensors.index.json, checked: a bounded regular JSON file holding
    {"metadata": {...}, "weight_map": {name: file}}, every file a plain `.safetensors` name in `d` (no path, no
    symlink out of the folder) that exists and is a regular file."""
    d = Path(d)
    path = _regular_file(d / INDEX_NAME, INDEX_NAME, MAX_INDEX_BYTES)
    try:
        index = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({str(e).splitlines()[0][:200]}); the index is corrupt: "
                              "re-create the checkpoint.") from None
    wm = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(wm, dict) or not wm:
        raise CheckpointError(f"{path} has no weight_map object of tensor names to shard files; the index is "
                              "corrupt: re-create the checkpoint.")
    if not isinstance(index.get("metadata"), dict):  # transformers' loader requires it too
        raise CheckpointError(f"{path} has no metadata object (HF indexes hold {{\"total_size\": bytes}}); the "
                              "index is corrupt: re-create the checkpoint.")
    dt = index["metadata"].get("dtype")
    if dt is not None and not (isinstance(dt, str) and dt in FLOAT_DTYPE_NAMES):  # transformers may use it
        raise CheckpointError(f"{path}: metadata.dtype is {dt!r:.60}, not one of {sorted(FLOAT_DTYPE_NAMES)}; the "
                              "index is corrupt: re-create the checkpoint.")
    files = set()
    for name, f in wm.items():
        if not isinstance(f, str):
            raise CheckpointError(f"{path}: tensor {name!r:.80} maps to {f!r:.40}, not a file name; the index is "
                                  "corrupt: re-create the checkpoint.")
        files.add(f)
    for f in sorted(files):
        if not f.endswith(".safetensors") or Path(f).name != f or f.startswith(".") or "\\" in f or "\0" in f:
            raise CheckpointError(f"{path} names shard {f!r:.80}, which is not a .safetensors file of this folder "
                                  "(shards are plain file names next to the index); the index is corrupt or hostile: "
                                  "re-create the checkpoint.")
        p = d / f
        if not p.exists() and not p.is_symlink():
            raise CheckpointError(f"{path} names shard {f} but {d} has no such file; copy the missing shard (or the "
                                  "whole checkpoint) again.")
        if p.is_symlink() and not _inside(d, p):
            raise CheckpointError(f"shard {p} is a symlink to a file outside the checkpoint folder; copy the shard "
                                  "into the folder instead of linking it.")
        _regular_file(p, "weights shard")
    return {str(k): v for k, v in wm.items()}


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
    not match); for a sharded folder, the index or the first shard's header. Never raises; reads at most a few MiB."""
    try:
        d = Path(d)
        if not d.is_dir():
            return False
    except (OSError, TypeError, ValueError):
        return False
    cfg = _head_bytes(d / CONFIG_NAME)
    if b'"matquant"' in cfg or (b'"master_bits"' in cfg and b'"slicing"' in cfg):  # also with quant_method edited
        return True
    head = _head_bytes(d / WEIGHTS_NAME) + _head_bytes(d / INDEX_NAME)
    if b'.qweight"' in head and b'.zeros"' in head:
        return True
    first = d / "model-00001-of-"  # a sharded folder whose index is gone: its first shard's header
    try:
        shards = sorted(p for p in d.iterdir() if p.name.startswith(first.name) and p.suffix == ".safetensors")[:1]
    except OSError:
        return False
    head = b"".join(_head_bytes(p) for p in shards)
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
                raise CheckpointError(f"{path}: {where}{k} = {v} but the weights hold {n_layers} block(s); the "
                                      "config does not match the weights (edited or corrupt config.json).")
            if k in DIM_KEYS and v > max_dim:
                raise CheckpointError(f"{path}: {where}{k} = {v} exceeds every tensor dimension in the weights file "
                                      f"(largest {max_dim}); the config does not match the weights.")
            if abs(v) >= 2**31:
                raise CheckpointError(f"{path}: {where}{k} = {v} is out of range for a model config.")

    walk(cfg, "")
