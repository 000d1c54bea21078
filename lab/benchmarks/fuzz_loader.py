"""Fuzz the checkpoint loader: mutate a real (tiny) matquant checkpoint and load every mutant through
`matquant.load`, `AutoModelForCausalLM.from_pretrained` (after `import matquant`) and `matquant info` (and, for every
`--eval-every`-th mutant, `matquant eval`).

    PYTHONPATH=src python lab/benchmarks/fuzz_loader.py --inputs 5000 [--seed 0] [--out lab/results/fuzz.json]

Allowed outcomes: success (with finite logits) or `CheckpointError` with a one-line message; for the CLI, exit 0 or
a one-line error with exit 1/2 and no traceback. Anything else is a *crash*, reported with the seed that reproduces it
(`--replay SEED` re-runs one mutant in-process and shows the traceback). Each mutant runs in a worker process
watched by this one: a mutant using more than `--timeout` CPU seconds or `--wall-timeout` wall seconds (hang) or a worker over `--max-rss-gib` (memory)
is killed and reported as a crash too, and the worker restarts at the next seed.

`from_pretrained` errors raised by transformers *before* any matquant code runs (its own config.json parsing: an
unknown model_type, a config value its dataclass validation refuses, a non-matquant quant_method) on a folder that
no longer looks like a matquant checkpoint (`format.folder.looks_like_matquant`: no matquant mark left in
config.json or the weights header) are out of matquant's reach and are counted separately ("transformers-config"),
not hidden; on a folder that still looks like one (so `import matquant`'s pre-check ran) they are crashes.

Mutations (1-3 per input, all drawn from the seed): config.json values and types (any key, the quantization_config's
too), config.json bytes, the safetensors header JSON (dtype, shape, data_offsets, entries added/dropped/renamed,
__metadata__), its length prefix, data bytes, truncation/appending, missing/extra files (a pickle, tokenizer files),
and symlinks (dangling, to a directory, to /dev/zero, a FIFO, a loop). A share of the inputs (`SHARDED_SHARE`)
start from the same checkpoint saved as HF shards + model.safetensors.index.json: the mutations above then edit one
shard, and two more apply: the index (its bytes, size and nesting; weight_map entries naming files out of the folder,
absent shards or tensors, moved or dropped entries) and the shards against it (deleted, linked out of the folder, a
tensor moved to or copied into another shard, shards swapped or renamed). Every `--stream-every`-th input is also
loaded with `matquant.load(bits=4, keep_master=False)` (the streaming load, "load_stream").
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import io
import json
import os
import platform
import random
import select
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
WEIGHTS, CONFIG, INDEX = "model.safetensors", "config.json", "model.safetensors.index.json"
SHARDED_SEED = "seed-sharded"  # next to the seed: the same checkpoint saved as HF shards + index
SHARD_BYTES = 24_000  # the tiny seed's ~130 KB of tensors in a handful of shards
SHARDED_SHARE = 0.4  # of the mutants start from the sharded seed
MARK = "@@fuzz "
TEXT = ("The quick brown fox jumps over the lazy dog. Matryoshka dolls nest inside each other, "
        "and so do the bits of an integer: the top two bits of an eight bit code are a two bit code. ")


# ---------------------------------------------------------------- the seed checkpoint

def build_seed(out: Path) -> Path:
    """A real checkpoint from `matquant quantize`'s code path: a tiny random Llama, RTN, group 16, tokenizer."""
    import torch
    import transformers as T
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from matquant.algorithms import quantize_model
    from matquant.format.checkpoint import save_checkpoint

    torch.manual_seed(0)
    cfg = T.LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                        tie_word_embeddings=True)
    model = T.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator([TEXT * 20], trainers.BpeTrainer(vocab_size=297, special_tokens=["<unk>", "<s>", "</s>"],
                                                           initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = T.PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    twin = copy.deepcopy(model)
    qcfg = quantize_model(model, "rtn", group_size=16, scope="ffn+attn", progress=False)
    save_checkpoint(model, tok, out, qcfg, overwrite=True)
    # the sharded seed at group 32, which the packed CPU runtime takes (group 16 it declines): its streaming loads
    # (load_stream) pack each layer and free its master codes, where the single-file seed's keep them
    qcfg = quantize_model(twin, "rtn", group_size=32, scope="ffn+attn", progress=False)
    save_checkpoint(twin, tok, out.parent / SHARDED_SEED, qcfg, overwrite=True, max_shard_bytes=SHARD_BYTES)
    (out.parent / "eval.txt").write_text(TEXT * 4)
    return out


# ---------------------------------------------------------------- mutations

ODD_VALUES = [0, -1, 1, 2, 3, 7, 8, 9, 16, 64, 255, 256, 10**5, 10**7, 2**31, 2**63, -2**31, 0.5, -0.0, 1e308,
              float("nan"), float("inf"), "", "x", "nested", "paper", "float16", "int8", "llama", None, True, False,
              [], [1], ["model.layers.0.mlp.up_proj"], {}, {"a": 1}, "model.layers.0.mlp.up_proj", "1", "8"]
SAFE_DTYPES = ["F32", "F16", "BF16", "U8", "I8", "I16", "I32", "I64", "BOOL", "F64", "F8_E4M3", "F8_E5M2", "U16",
               "U32", "U64", "C64", "garbage", "", 7, None]


_TARGET = {"weights": WEIGHTS}  # the weights file this mutant's mutations edit (a random shard when sharded)


def _w() -> str:
    return _TARGET["weights"]


def _paths(obj, prefix=()):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield prefix + (k,)
            yield from _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield prefix + (i,)
            yield from _paths(v, prefix + (i,))


def _set(obj, path, value, delete=False):
    for p in path[:-1]:
        obj = obj[p]
    if delete:
        del obj[path[-1]]
    else:
        obj[path[-1]] = value


def _odd(rng: random.Random, old=None):
    r = rng.random()
    if r < 0.6:
        return rng.choice(ODD_VALUES)
    if r < 0.75 and isinstance(old, (int, float)) and not isinstance(old, bool):
        return type(old)(old * rng.choice([2, 10, 1000, -1, 0.5])) if old else rng.choice([1, -1, 10**6])
    if r < 0.85:
        return rng.randint(-2**40, 2**40)
    if r < 0.95:
        return "".join(rng.choice("abc.0_*\\n\"") for _ in range(rng.randint(0, 12)))
    deep = v = []
    for _ in range(rng.randint(1, 5000)):  # deep nesting
        v.append([])
        v = v[0]
    return deep


def mut_config_value(d: Path, rng):
    cfg = json.loads((d / CONFIG).read_text())
    paths = list(_paths(cfg))
    qpaths = [p for p in paths if p[0] == "quantization_config"]
    path = rng.choice(qpaths if (qpaths and rng.random() < 0.6) else paths)
    op = rng.random()
    if op < 0.2:
        _set(cfg, path, None, delete=True)
        what = f"del {'.'.join(map(str, path))}"
    elif op < 0.3 and isinstance(cfg.get(path[0]), dict):
        cfg[path[0]][rng.choice(["surprise", "bits", "slicing", "modules", "quant_method"])] = _odd(rng)
        what = f"add key under {path[0]}"
    else:
        old = cfg
        try:
            for p in path:
                old = old[p]
        except (KeyError, IndexError, TypeError):
            old = None
        v = _odd(rng, old)
        _set(cfg, path, v)
        what = f"set {'.'.join(map(str, path))} = {repr(v)[:40]}"  # repr: False and 'False' look different
    (d / CONFIG).write_text(json.dumps(cfg, allow_nan=True))
    return what


def mut_config_bytes(d: Path, rng):
    raw = bytearray((d / CONFIG).read_bytes())
    op = rng.randrange(5)
    if op == 0:
        raw = raw[: rng.randrange(len(raw))]
    elif op == 1:
        for _ in range(rng.randint(1, 4)):
            raw[rng.randrange(len(raw))] = rng.randrange(256)
    elif op == 2:
        raw = bytearray(rng.choice([b"[]", b"1", b'"x"', b"null", b"{}", b"\xff\xfe", b"[" * 100000, b"{\"a\":" * 3000]))
    elif op == 3:
        raw = raw + b"garbage"
    else:
        raw = bytearray(b'{"quantization_config": {"quant_method": "matquant"}, "model_type": "llama"}')
    (d / CONFIG).write_bytes(bytes(raw))
    return f"config bytes op {op}"


def _split(raw: bytes):
    n = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8: 8 + n]), raw[8 + n:]


def _join(header: dict, data: bytes, pad=True) -> bytes:
    h = json.dumps(header, allow_nan=True).encode()
    if pad:
        h += b" " * (-len(h) % 8)
    return struct.pack("<Q", len(h)) + h + data


def mut_header(d: Path, rng):
    raw = (d / _w()).read_bytes()
    header, data = _split(raw)
    names = [k for k in header if k != "__metadata__"]
    k = rng.choice(names)
    op = rng.randrange(9)
    e = header[k]
    if op == 0:
        e["dtype"] = rng.choice(SAFE_DTYPES)
    elif op == 1:
        s = list(e["shape"])
        choice = rng.randrange(5)
        if choice == 0 and s:
            s[rng.randrange(len(s))] = rng.choice([0, 1, -1, 2**40, s[0] * 2, s[-1] // 2 or 1])
        elif choice == 1:
            s = s[::-1]
        elif choice == 2:
            s = s + [1]
        elif choice == 3:
            s = []
        else:
            s = rng.choice(["x", None, [1.5], [[2]], 7])
        e["shape"] = s
    elif op == 2:
        a, b = e["data_offsets"]
        e["data_offsets"] = rng.choice([[b, a], [a, b + 1], [a - 1, b], [0, b - a], [a, len(data) + 8],
                                        [a, 2**62], [-1, b], [a], "x", [a, b, 0]])
    elif op == 3:
        del header[k]
    elif op == 4:
        header[k + rng.choice(["x", ".extra", ""]) + "2"] = dict(e)
    elif op == 5:
        header[rng.choice(["model.bad", k.replace("qweight", "weight"), k.upper()])] = header.pop(k)
    elif op == 6:
        header["__metadata__"] = rng.choice([{"format": "pt"}, {"format": 1}, [], "x", {"matquant_format_version": "9"}])
    elif op == 7:
        e[rng.choice(["extra", "dtype", "shape"])] = _odd(rng)
    else:
        del e[rng.choice(["dtype", "shape", "data_offsets"])]
    (d / _w()).write_bytes(_join(header, data, pad=rng.random() < 0.8))
    return f"header op {op} on {k}"


def mut_length_prefix(d: Path, rng):
    raw = bytearray((d / _w()).read_bytes())
    n = struct.unpack("<Q", raw[:8])[0]
    new = rng.choice([0, 1, n - 1, n + 1, n + 8, len(raw), 2**63, 2**32, rng.randrange(2**64)])
    raw[:8] = struct.pack("<Q", new)
    (d / _w()).write_bytes(bytes(raw))
    return f"length prefix {n} -> {new}"


def mut_data_bytes(d: Path, rng):
    raw = bytearray((d / _w()).read_bytes())
    header, data = _split(bytes(raw))
    start = len(raw) - len(data)
    names = [k for k in header if k != "__metadata__"]
    k = rng.choice(names)
    a, b = header[k]["data_offsets"]
    for _ in range(rng.randint(1, 8)):
        if b > a:
            i = start + rng.randrange(a, b)
            raw[i] = rng.choice([0x00, 0xFF, 0x7C, 0x7E, 0xFC, 0x80, rng.randrange(256)])
    (d / _w()).write_bytes(bytes(raw))
    return f"data bytes of {k}"


def mut_truncate(d: Path, rng):
    p = d / (_w() if rng.random() < 0.8 else rng.choice([CONFIG, "tokenizer.json"]))
    if not p.exists():
        return "truncate (absent)"
    raw = p.read_bytes()
    if rng.random() < 0.7:
        p.write_bytes(raw[: rng.randrange(len(raw) + 1)])
        return f"truncate {p.name}"
    p.write_bytes(raw + rng.randbytes(rng.randint(1, 64)))  # (os.urandom made --replay irreproducible)
    return f"append to {p.name}"


def mut_files(d: Path, rng):
    op = rng.randrange(8)
    if op == 0:
        name = rng.choice([CONFIG, _w(), "tokenizer.json", "tokenizer_config.json", "generation_config.json"])
        if (d / name).exists():
            (d / name).unlink()
        return f"delete {name}"
    if op == 1:
        (d / "pytorch_model.bin").write_bytes(b"\x80\x04\x95not a real pickle")
        if rng.random() < 0.5:
            (d / _w()).unlink()
        return "pickle file"
    if op == 2:
        p = d / rng.choice(["model-00001-of-00002.safetensors", "model.safetensors.index.json", "extra.txt",
                            "adapter_config.json"])
        if p.is_symlink() or (p.exists() and not p.is_file()):
            p.unlink()  # (a FIFO made by an earlier mutation: opening it to write would block the mutator)
        p.write_bytes(rng.choice([b"{}", b"garbage", b'{"weight_map": {}}']))
        return "extra file"
    if op == 3:
        (d / "tokenizer.json").write_bytes(rng.choice([b"{}", b"garbage", b'{"model": 1}', b""]))
        return "tokenizer.json corrupt"
    if op == 4:
        (d / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": rng.choice(["Nope", 1, "GPT2Tokenizer"])}))
        return "tokenizer_config corrupt"
    target = rng.choice([_w(), CONFIG])
    (d / target).unlink()
    kind = rng.choice(["dangling", "dir", "devzero", "fifo", "loop", "self"])
    if kind == "dangling":
        (d / target).symlink_to(d / "nowhere")
    elif kind == "dir":
        (d / target).symlink_to(d)
    elif kind == "devzero":
        (d / target).symlink_to("/dev/zero")
    elif kind == "fifo":
        os.mkfifo(d / target)
    elif kind == "loop":
        (d / target).symlink_to(d / target)
    else:
        (d / target).symlink_to(d / (CONFIG if target == _w() else _w()))
    return f"{target} -> {kind}"


def _read_st(p: Path) -> tuple[dict, dict[str, bytes]]:
    header, data = _split(p.read_bytes())
    meta = header.pop("__metadata__", None)
    tensors = {k: data[e["data_offsets"][0]: e["data_offsets"][1]] for k, e in header.items()}
    return {"meta": meta, "entries": header}, tensors


def _write_st(p: Path, info: dict, tensors: dict[str, bytes]) -> None:
    """A valid safetensors file of `tensors` (entries' dtype/shape from info), data packed in order."""
    header, data, off = {}, b"", 0
    if info["meta"] is not None:
        header["__metadata__"] = info["meta"]
    for k, raw in tensors.items():
        e = dict(info["entries"][k])
        e["data_offsets"] = [off, off + len(raw)]
        header[k] = e
        data += raw
        off += len(raw)
    p.write_bytes(_join(header, data))


def _shards(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir() if p.name.startswith("model-") and p.suffix == ".safetensors")


def mut_index(d: Path, rng):
    """The shard index: its bytes, its weight_map (paths out of the folder, wrong/absent shards, entries added,
    dropped or moved), its metadata, its size and nesting."""
    p = d / INDEX
    index = json.loads(p.read_text())
    wm = index["weight_map"]
    names = sorted(wm)
    k = rng.choice(names)
    op = rng.randrange(14)
    if op == 0:
        wm[k] = rng.choice(["../" + wm[k], "/etc/passwd", "/dev/zero", str((d / wm[k]).resolve()), "sub/" + wm[k],
                            "..", ".", "", "./" + wm[k], wm[k] + "/", "\\x.safetensors", "x\0.safetensors",
                            "../seed/" + WEIGHTS, "../" + SHARDED_SEED + "/" + wm[k]])
        what = f"weight_map[{k}] = {wm[k]!r}"
    elif op == 1:
        wm[k] = rng.choice([s for s in _shards(d) if s != wm[k]] or ["model-00009-of-00009.safetensors"])
        what = f"weight_map[{k}] moved to {wm[k]}"
    elif op == 2:
        wm[k] = "model-00099-of-00099.safetensors"
        what = "weight_map names a missing shard"
    elif op == 3:
        del wm[k]
        what = f"weight_map drops {k}"
    elif op == 4:
        wm[rng.choice([k + ".extra", "model.ghost.qweight", k.replace("qweight", "weight"), ""])] = wm[k]
        what = "weight_map lists an absent tensor"
    elif op == 5:
        wm[k] = _odd(rng, wm[k])
        what = f"weight_map[{k}] = {repr(wm[k])[:40]}"
    elif op == 6:
        index["weight_map"] = rng.choice([[], None, {}, "x", 1, [[k, wm[k]]], {"a": {"b": 1}}])
        what = f"weight_map = {repr(index['weight_map'])[:40]}"
    elif op == 7:
        if rng.random() < 0.5:
            index["metadata"] = _odd(rng, index.get("metadata"))
        else:
            index["metadata"][rng.choice(["dtype", "total_size", "format"])] = _odd(rng)
        what = "metadata odd"  # (no repr: the value may be nested thousands of levels deep)
    elif op == 8:
        del index[rng.choice(list(index))]
        what = "index key deleted"
    elif op == 9:
        raw = bytearray(p.read_bytes())
        sub = rng.randrange(4)
        if sub == 0:
            raw = raw[: rng.randrange(len(raw))]
        elif sub == 1:
            for _ in range(rng.randint(1, 4)):
                raw[rng.randrange(len(raw))] = rng.randrange(256)
        elif sub == 2:
            raw = bytearray(rng.choice([b"[]", b"null", b"{}", b"\xff\xfe", b"[" * 100000, b'{"weight_map":' * 3000]))
        else:
            raw = raw + b"garbage"
        p.write_bytes(bytes(raw))
        return f"index bytes op {sub}"
    elif op == 10:
        index["padding"] = "x" * rng.choice([17 * 2**20, 100])  # beyond the index size bound (or not)
        what = f"index padded by {len(index['padding'])}"
    elif op == 11:
        p.unlink()
        p.symlink_to(rng.choice(["/dev/zero", str(d / CONFIG), str(d / "nowhere"), str(d)]))
        return "index is a symlink"
    elif op == 12:
        a, b = rng.sample(names, 2) if len(names) > 1 else (k, k)
        wm[a], wm[b] = wm[b], wm[a]
        what = f"weight_map swaps {a} and {b}"
    else:
        p.write_text(json.dumps(index) + json.dumps(index))
        return "index written twice"
    try:
        text = json.dumps(index, allow_nan=True)
    except RecursionError:  # a value nested deeper than json.dumps goes: the same nesting, written by hand
        text = '{"weight_map": {"%s": "%s"}, "metadata": %s}' % (names[0], _shards(d)[0], "[" * 5000 + "]" * 5000)
        what = "index nested 5000 levels deep"
    p.write_text(text)
    return what


def mut_shards(d: Path, rng):
    """The shard files against the index: one deleted, linked out of the folder, a tensor moved to another shard
    or copied into a second one, two shards swapped, an unlisted shard added, a tensor renamed in a shard."""
    shards = _shards(d)
    a = rng.choice(shards)
    op = rng.randrange(8)
    if op == 0:
        (d / a).unlink()
        return f"shard {a} deleted"
    if op == 1:
        raw = (d / a).read_bytes()
        outside = d.parent / f"outside-{a}"
        outside.write_bytes(raw)
        (d / a).unlink()
        (d / a).symlink_to(rng.choice([outside, Path("..") / outside.name]))
        return f"shard {a} is a symlink out of the folder"
    if op == 2:
        raw = (d / a).read_bytes()
        (d / a).unlink()
        (d / f"real-{a}").write_bytes(raw)
        (d / a).symlink_to(f"real-{a}")
        return f"shard {a} is a symlink inside the folder"
    if op in (3, 4) and len(shards) > 1:
        b = rng.choice([s for s in shards if s != a])
        ia, ta = _read_st(d / a)
        ib, tb = _read_st(d / b)
        if not ta:
            return "shard empty (skipped)"
        k = rng.choice(sorted(ta))
        tb[k] = ta[k]
        ib["entries"][k] = ia["entries"][k]
        if op == 3:
            del ta[k]
            _write_st(d / a, ia, ta)
        _write_st(d / b, ib, tb)
        return f"tensor {k} {'moved' if op == 3 else 'copied'} from {a} to {b}"
    if op == 5 and len(shards) > 1:
        b = rng.choice([s for s in shards if s != a])
        (d / a).rename(d / "swap.tmp")
        (d / b).rename(d / a)
        (d / "swap.tmp").rename(d / b)
        return f"shards {a} and {b} swapped"
    if op == 6:
        shutil.copyfile(d / a, d / "model-00042-of-00042.safetensors")
        return "an unlisted shard added"
    info, tensors = _read_st(d / a)
    if not tensors:
        return "shard empty (skipped)"
    k = rng.choice(sorted(tensors))
    new = rng.choice([k + "x", "model.bad", k.upper()])
    tensors = {(new if n == k else n): v for n, v in tensors.items()}
    info["entries"][new] = info["entries"].pop(k)
    _write_st(d / a, info, tensors)
    return f"tensor {k} renamed to {new} in {a}"


MUTATIONS = [(mut_config_value, 6), (mut_config_bytes, 1), (mut_header, 5), (mut_length_prefix, 1),
             (mut_data_bytes, 4), (mut_truncate, 1), (mut_files, 2)]


SHARDED_MUTATIONS = MUTATIONS + [(mut_index, 6), (mut_shards, 4)]


def mutate(seed_dir: Path, d: Path, seed: int) -> list[str]:
    """Mutate a copy of the seed (or, for a share of the seeds, of the sharded seed next to it) into `d`. The layout
    and the shard to edit are drawn from their own stream, so a single-file mutant is the same as before shards."""
    rng = random.Random(seed)
    layout = random.Random(seed * 7919 + 1)
    sharded = seed_dir.parent / SHARDED_SEED
    use_shards = sharded.is_dir() and layout.random() < SHARDED_SHARE
    src = sharded if use_shards else seed_dir
    if d.exists():
        shutil.rmtree(d)
    for p in d.parent.glob("outside-*"):
        p.unlink()
    shutil.copytree(src, d, symlinks=True)
    _TARGET["weights"] = layout.choice(_shards(src)) if use_shards else WEIGHTS
    done = ["sharded seed"] if use_shards else []
    fns, weights = zip(*(SHARDED_MUTATIONS if use_shards else MUTATIONS))
    for _ in range(rng.choice([1, 1, 1, 2, 3])):
        fn = rng.choices(fns, weights)[0]
        if fn is not mut_files and not all((d / n).is_file() and not (d / n).is_symlink() for n in (CONFIG, _w())):
            done.append(f"{fn.__name__} skipped (not a regular file)")  # never read /dev/zero or a FIFO here
            continue
        if fn in (mut_index, mut_shards) and not ((d / INDEX).is_file() and not (d / INDEX).is_symlink() and
                                                  all((d / n).is_file() and not (d / n).is_symlink()
                                                      for n in _shards(d))):
            done.append(f"{fn.__name__} skipped (not a regular file)")
            continue
        try:
            done.append(fn(d, rng))
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError, json.JSONDecodeError, struct.error,
                KeyError, ValueError, TypeError, IndexError, OSError, RecursionError):
            done.append(f"{fn.__name__} skipped (file already broken)")
    return done


# ---------------------------------------------------------------- targets and outcomes

class _Entered:
    """Set when matquant's transformers hooks are entered (so errors before that are transformers' own)."""
    flag = False


def _instrument():
    from matquant.integrations import transformers as hf

    orig = hf.MatQuantHfConfig.__init__

    def init(self, **kw):
        _Entered.flag = True
        print(MARK + json.dumps({"entered": True}), flush=True)  # the supervisor attributes a kill after this to us
        orig(self, **kw)

    hf.MatQuantHfConfig.__init__ = init


def _logits_finite(model) -> bool:
    import torch

    with torch.no_grad():
        out = model(torch.tensor([[1, 5, 9, 2]]))
        return bool(torch.isfinite(out[0] if isinstance(out, tuple) else out.logits).all())  # return_dict: false


def _classify(fn, hf: bool, folder=None):
    from matquant.format.config import CheckpointError
    from matquant.format.folder import looks_like_matquant

    _Entered.flag = False
    ours = hf and looks_like_matquant(folder)  # the pre-check's own test, before transformers touches the folder
    try:
        out = fn()
    except CheckpointError as e:
        return "checkpoint-error" if "\n" not in str(e) and str(e) else "crash:CheckpointError-not-one-line", None
    except Exception as e:
        if hf and not _Entered.flag and ours:
            # a folder matquant recognises (so its pre-check ran) still reached transformers' own error: ours to fix
            return f"crash:transformers-on-matquant-folder-{type(e).__name__}", traceback.format_exc()
        if hf and not _Entered.flag:
            return "transformers-config", f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
        return f"crash:{type(e).__name__}", traceback.format_exc()
    model = out[0] if isinstance(out, tuple) else out
    from matquant.nn import MatQuantLinear

    if not any(isinstance(m, MatQuantLinear) for m in model.modules()):
        return "ok-plain-model", None  # from_pretrained of a folder whose quantization_config was removed
    try:
        # a checkpoint that loads "fine" but computes NaN/Inf is a silent failure: counted as a crash
        return ("ok" if _logits_finite(model) else "crash:nonfinite-logits"), None
    except Exception as e:
        return f"crash:forward-{type(e).__name__}", traceback.format_exc()


def _cli(argv):
    from matquant.cli import main

    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            rc = main(argv)
    except SystemExit as e:
        rc = e.code
    except Exception:
        return "crash:cli-exception", traceback.format_exc()
    # the error line(s) the CLI printed (progress bars and library warnings also go to stderr: not counted)
    lines = [ln for ln in err.getvalue().replace("\r", "\n").splitlines() if ln.startswith(("matquant", "Traceback"))]
    if rc == 0:
        return "ok", None
    if rc in (1, 2) and len(lines) == 1 and "Traceback" not in err.getvalue():
        return "cli-error", None
    return f"crash:cli-rc{rc}-{len(lines)}lines", err.getvalue()[-2000:]


def run_targets(d: Path, eval_text: Path, do_eval: bool, do_hf: bool = True, do_stream: bool = False) -> dict:
    import matquant
    from transformers import AutoModelForCausalLM

    res = {}
    res["load"] = _classify(lambda: matquant.load(d), hf=False)
    if do_stream:  # the streaming load: each layer packed as it is read, its master codes freed
        res["load_stream"] = _classify(lambda: matquant.load(d, bits=4, keep_master=False), hf=False)
    if do_hf:
        print(MARK + json.dumps({"target": "from_pretrained"}), flush=True)
        res["from_pretrained"] = _classify(lambda: AutoModelForCausalLM.from_pretrained(str(d)), hf=True, folder=d)
        print(MARK + json.dumps({"target": None}), flush=True)
    res["info"] = _cli(["info", str(d), "--modules"])
    if do_eval:
        res["eval"] = _cli(["eval", str(d), "--bits", "8,2", "--eval-text", str(eval_text), "--windows", "1",
                            "--seqlen", "16"])
    return res


# ---------------------------------------------------------------- worker and supervisor

def worker(args):
    import logging
    import warnings

    import torch

    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    os.environ["TRANSFORMERS_VERBOSITY"] = "error"
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    _instrument()
    import functools

    from matquant import cli

    # one parser for the whole worker: building it is a noticeable part of a mutant's time; parse_args keeps no
    # state between calls (no append actions, no mutable defaults), so every mutant sees the same CLI as a user
    cli.build_parser = functools.lru_cache(maxsize=1)(cli.build_parser)
    work = Path(args.work)
    seed_dir, eval_text = work / "seed", work / "eval.txt"
    d = work / "mutant"
    run_targets(seed_dir, eval_text, True, True, True)  # warm up (imports, lazy inits) before the per-mutant clock starts
    print(MARK + json.dumps({"ready": True}), flush=True)
    for i in range(args.start, args.end):
        print(MARK + json.dumps({"start": i}), flush=True)
        muts = mutate(seed_dir, d, args.seed * 10**9 + i)
        res = run_targets(d, eval_text, args.eval_every > 0 and i % args.eval_every == 0,
                          args.hf_every > 0 and i % args.hf_every == 0,
                          args.stream_every > 0 and i % args.stream_every == 0)
        print(MARK + json.dumps({"i": i, "mutations": muts, "results": res}), flush=True)


def supervise(args) -> dict:
    import psutil

    work = Path(args.work or tempfile.mkdtemp(prefix="matquant-fuzz-"))
    if not (work / "seed" / WEIGHTS).exists() or not (work / SHARDED_SEED).exists():
        build_seed(work / "seed")
    counts: dict[str, dict[str, int]] = {}
    crashes: dict[str, dict] = {}
    tf_errors: dict[str, int] = {}
    done, nxt, t0 = 0, args.first, time.time()
    saved = t0
    while nxt < args.inputs and time.time() - t0 < args.time_limit:
        cmd = [sys.executable, __file__, "--worker", "--work", str(work), "--start", str(nxt), "--end",
               str(args.inputs), "--seed", str(args.seed), "--eval-every", str(args.eval_every), "--hf-every", str(args.hf_every),
               "--stream-every", str(args.stream_every)]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                env={**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"},
                                preexec_fn=lambda: os.nice(args.nice))
        fd = proc.stdout.fileno()
        current, started, buf = None, time.time(), ""
        target_now, entered = None, False
        ps = psutil.Process(proc.pid)
        killed = None
        while True:
            ready = select.select([fd], [], [], 0.05)[0]
            chunk = os.read(fd, 1 << 16).decode("utf-8", "replace") if ready else ""
            if chunk:
                buf += chunk
                while "\n" in buf:
                    line, buf = buf.split("\n", 1)
                    if not line.startswith(MARK):
                        continue  # something printed by the code under test
                    rec = json.loads(line[len(MARK):])
                    if "ready" in rec:
                        continue
                    if "target" in rec:
                        target_now, entered = rec["target"], False
                        continue
                    if "entered" in rec:
                        entered = True
                        continue
                    if "start" in rec:
                        current, started = rec["start"], time.time()
                        try:
                            cpu0 = sum(ps.cpu_times()[:2])
                        except psutil.NoSuchProcess:
                            cpu0 = 0.0
                        continue
                    done += 1
                    nxt = rec["i"] + 1
                    for target, (outcome, detail) in rec["results"].items():
                        counts.setdefault(target, {}).setdefault(outcome, 0)
                        counts[target][outcome] += 1
                        if outcome == "transformers-config":
                            key = detail.split(":")[0]
                            e = tf_errors.setdefault(key, {"count": 0, "examples": []})
                            e["count"] += 1
                            if len(e["examples"]) < 3:
                                e["examples"].append({"seed": rec["i"], "mutations": rec["mutations"],
                                                      "error": detail})
                        if outcome.startswith("crash"):
                            key = f"{target}:{outcome}:{_where(detail)}"
                            c = crashes.setdefault(key, {"count": 0, "seed": rec["i"], "mutations": rec["mutations"],
                                                         "trace": (detail or "")[-1500:]})
                            c["count"] += 1
                    current = None
                    if args.out and args.save_every > 0 and time.time() - saved > args.save_every:
                        # a long run keeps its counts on disk: a killed supervisor loses at most save_every seconds
                        # (written after this mutant's outcomes are counted, so inputs == the outcomes' sum)
                        write_summary(summary_of(done, time.time() - t0, counts, tf_errors, crashes, args, False),
                                      args.out)
                        saved = time.time()
            if ready and not chunk:  # EOF: the worker exited
                proc.wait()
                break
            if current is not None:
                try:
                    rss = ps.memory_info().rss
                except psutil.NoSuchProcess:
                    rss = 0
                try:  # CPU seconds of this mutant (a shared, niced machine stretches wall time, not CPU time)
                    cpu = sum(ps.cpu_times()[:2]) - cpu0
                except psutil.NoSuchProcess:
                    cpu = 0.0
                if cpu > args.timeout or time.time() - started > args.wall_timeout:
                    killed = "hang"
                elif rss > args.max_rss_gib * 2**30:
                    killed = "memory"
                if killed:
                    proc.kill()
                    proc.wait()
                    if target_now == "from_pretrained" and not entered:
                        # transformers itself (e.g. building a default-size 7B Llama for a config.json whose
                        # quant_method is not matquant): out of matquant's reach, counted apart, not hidden
                        e = tf_errors.setdefault(f"killed:{killed}", {"count": 0, "examples": []})
                        e["count"] += 1
                        if len(e["examples"]) < 3:
                            e["examples"].append({"seed": current, "mutations": None, "error": killed})
                        done += 1
                        nxt = current + 1
                        break
                    key = f"{target_now or 'any'}:{killed}"
                    c = crashes.setdefault(key, {"count": 0, "seed": current, "seeds": [], "mutations": None,
                                                 "trace": ""})
                    c["count"] += 1
                    c["seeds"].append(current)
                    done += 1
                    nxt = current + 1
                    break
            if time.time() - t0 > args.time_limit:
                proc.kill()
                proc.wait()
                killed = "time-limit"  # our own stop: the mutant in flight is not counted (it was a crash before)
                break
        if proc.poll() is not None and not killed and current is not None:  # the worker died on its own
            key = f"any:worker-died-rc{proc.returncode}"
            crashes.setdefault(key, {"count": 0, "seed": current, "mutations": None, "trace": ""})
            crashes[key]["count"] += 1
            done += 1
            nxt = current + 1
    return summary_of(done, time.time() - t0, counts, tf_errors, crashes, args, final=True)


def summary_of(done, secs, counts, tf_errors, crashes, args, final) -> dict:
    return {"inputs": done, "seconds": round(secs, 1), "inputs_per_second": round(done / max(secs, 1e-9), 2),
            "seed": args.seed, "first": args.first, "next": args.first + done, "final": final,
            "outcomes": counts, "transformers_config_errors": tf_errors, "crashes": crashes,
            "crash_count": sum(c["count"] for c in crashes.values()), "timeout_cpu_s": args.timeout,
            "timeout_wall_s": args.wall_timeout,
            "max_rss_gib": args.max_rss_gib}


def write_summary(summary: dict, out) -> str:
    import torch
    import transformers

    summary["machine"] = {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
                          "torch": torch.__version__, "transformers": transformers.__version__,
                          "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                          "load": os.getloadavg()}
    text = json.dumps(summary, indent=2)
    if out:
        from matquant.format.atomic import atomic_write_text

        atomic_write_text(out, text + "\n")
    return text


def _where(trace: str | None) -> str:
    """The innermost frame in matquant (else the innermost frame) of a traceback: the crash's dedup key."""
    if not trace:
        return "?"
    frames = [ln.strip() for ln in trace.splitlines() if ln.strip().startswith("File ")]
    ours = [f for f in frames if "/matquant/" in f and "fuzz_loader" not in f]
    f = (ours or frames or ["?"])[-1]
    return f.replace('File "', "").split('", in ')[0].split("/")[-1] + ":" + f.split(", line ")[-1].split(",")[0]


def replay(args):
    work = Path(args.work)
    _instrument()
    d = work / "replay"
    print(mutate(work / "seed", d, args.seed * 10**9 + args.replay))
    for target, (outcome, detail) in run_targets(d, work / "eval.txt", True, True, True).items():
        print(target, outcome)
        if detail and outcome.startswith("crash"):
            print(detail)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--inputs", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--first", type=int, default=0, help="index of the first mutant (to rerun a range)")
    p.add_argument("--timeout", type=float, default=10.0, help="CPU seconds per mutant before it counts as a hang")
    p.add_argument("--wall-timeout", type=float, default=120.0,
                   help="wall seconds per mutant before it counts as a hang (catches blocking reads, which use no CPU)")
    p.add_argument("--max-rss-gib", type=float, default=2.0)
    p.add_argument("--eval-every", type=int, default=50, help="also run `matquant eval` on every N-th mutant (0: never)")
    p.add_argument("--hf-every", type=int, default=1, help="run from_pretrained on every N-th mutant (0: never)")
    p.add_argument("--stream-every", type=int, default=2,
                   help="also load every N-th mutant with keep_master=False (the streaming load; 0: never)")
    p.add_argument("--time-limit", type=float, default=float("inf"), help="stop after this many seconds")
    p.add_argument("--nice", type=int, default=10)
    p.add_argument("--work", default=None, help="work folder (the seed checkpoint is built there once)")
    p.add_argument("--out", default=None, help="write the summary JSON here")
    p.add_argument("--save-every", type=float, default=120.0,
                   help="also rewrite --out every this many seconds during the run (partial counts, final: false)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--start", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--end", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--replay", type=int, default=None, help="re-run mutant N of --seed in-process, with tracebacks")
    args = p.parse_args(argv)
    if args.worker:
        return worker(args)
    if args.replay is not None:
        return replay(args)
    summary = supervise(args)
    print(write_summary(summary, args.out))
    return 1 if summary["crash_count"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
