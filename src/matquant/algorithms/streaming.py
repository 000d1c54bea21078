"""Streaming execution: quantize a model that does not fit in memory, one decoder block at a time.

The model is built on the meta device from the source's config (nothing allocated); only the tensors the
calibration capture needs before block 0 (the token embedding) are read. A `BlockStream` attached to the model lets
every block-wise pass (algorithms/blocks.py: `run_blockwise`, `target_weights`) read block i's weights from the
source when its turn comes (`format/source.py`: safetensors shards or a GGUF, one tensor at a time) and drop them
after. The methods' results go to a work folder beside the output (`SpilledResults`), so the codes of all layers
never sit in memory together, and each resumable pass saves the next block's inputs after every block: a rerun of
the same command after a kill resumes after the last finished block. The checkpoint is then written block by block
(`write_checkpoint`), sharded (format/shards.py), the folder appearing atomically.

Peak memory is about one block in float32, its method state (Hessians), the calibration hidden states and the
embedding, whatever the depth (docs/benchmarks.md, "Streaming").
"""
from __future__ import annotations

import json
import os
import shutil
from collections.abc import MutableMapping, Sequence
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load, load_file, save_file
from torch import nn

from matquant.algorithms.blocks import decoder_blocks, targets_by_block
from matquant.nn.memory import release_freed_memory
from matquant.quant.minmax import QuantizedWeight

WORK_SUFFIX = ".stream-work"
DEFAULT_CALIB_MEMORY = 2 * 2**30  # calibration hidden states above this many bytes are kept on disk


def work_folder(out) -> Path:
    """The streaming run's work folder for output `out` (beside it, removed after success)."""
    out = Path(out)
    return out.with_name(out.name + WORK_SUFFIX)


def _atomic_save(tensors: dict, path: Path, metadata: dict | None = None) -> None:
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    os.replace(tmp, path)


class SpilledResults(MutableMapping):
    """{layer name: QuantizedWeight} kept as one safetensors file per layer in `folder` (read back on access)."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)

    def _path(self, name: str) -> Path:
        return self.folder / f"{name}.safetensors"

    def __setitem__(self, name: str, qw: QuantizedWeight) -> None:
        t = {"codes": qw.codes, "scales": qw.scales, "zeros": qw.zeros}
        for r, (s, z) in (qw.slice_params or {}).items():
            t[f"scales_{r}"], t[f"zeros_{r}"] = s, z
        t = {k: v.detach().contiguous().cpu() for k, v in t.items()}
        _atomic_save(t, self._path(name), {"bits": str(qw.bits), "group_size": str(qw.group_size)})

    def __getitem__(self, name: str) -> QuantizedWeight:
        p = self._path(name)
        if not p.exists():
            raise KeyError(name)
        with safe_open(str(p), framework="pt") as f:
            meta = f.metadata()
        t = load(p.read_bytes())  # read, not memory-mapped (a mapping could outlive the layer in the RSS)
        own = {int(k[7:]): (t[k], t[f"zeros_{k[7:]}"]) for k in t if k.startswith("scales_")}
        return QuantizedWeight(t["codes"], t["scales"], t["zeros"], int(meta["bits"]), int(meta["group_size"]),
                               dict(sorted(own.items(), reverse=True)) or None)

    def __contains__(self, name) -> bool:
        return self._path(name).exists()

    def __delitem__(self, name: str) -> None:
        self._path(name).unlink()

    def __iter__(self):
        return iter(sorted(p.name[:-len(".safetensors")] for p in self.folder.glob("*.safetensors")))

    def __len__(self) -> int:
        return sum(1 for _ in self.folder.glob("*.safetensors"))


class SpilledBatches(Sequence):
    """Calibration hidden states kept on disk, one safetensors file per batch, read back one batch at a time (the
    block inputs of a streamed run whose states exceed its memory cap)."""

    def __init__(self, folder: Path, fresh: bool = True):
        self.folder = Path(folder)
        if fresh:
            shutil.rmtree(self.folder, ignore_errors=True)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.n = len(list(self.folder.glob("*.safetensors")))

    def append(self, t: torch.Tensor) -> None:
        _atomic_save({"h": t.detach().contiguous().cpu()}, self.folder / f"{self.n}.safetensors")
        self.n += 1

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, j):
        if isinstance(j, slice):
            return [self[k] for k in range(*j.indices(self.n))]
        if not -self.n <= j < self.n:
            raise IndexError(j)
        return load_file(str(self.folder / f"{j % self.n}.safetensors"))["h"]


class BlockStream:
    """Reads the decoder blocks of a meta-device `model` from `source` on demand; owns the run's work folder."""

    def __init__(self, model: nn.Module, source, work: Path, dtype: torch.dtype = torch.float32,
                 hidden_cap_bytes: int | None = None):
        self.model, self.source, self.work, self.dtype = model, source, Path(work), dtype
        self.hidden_cap = hidden_cap_bytes
        self.prefix, self.blocks = decoder_blocks(model)
        self.passes = 0
        self.result_sets = 0

    def _params(self, i: int):
        for mname, mod in self.blocks[i].named_modules():
            for pname, p in mod._parameters.items():
                if p is not None:
                    yield mod, pname, p, ".".join(x for x in (self.prefix, str(i), mname, pname) if x)

    def onload(self, i: int, device) -> nn.Module:
        for mod, pname, p, full in self._params(i):
            if p.is_meta:
                mod._parameters[pname] = nn.Parameter(read_tensor(self.source, full, self.dtype).to(device),
                                                      requires_grad=p.requires_grad)
        return self.blocks[i]

    def release(self, i: int) -> None:
        for mod, pname, p, _ in self._params(i):
            if not p.is_meta:
                mod._parameters[pname] = nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device="meta"),
                                                      requires_grad=p.requires_grad)
        release_freed_memory()  # else glibc keeps the freed block-sized buffers and RSS creeps up with depth

    def new_results(self) -> SpilledResults:
        self.result_sets += 1
        return SpilledResults(self.work / f"results-{self.result_sets}")

    def begin_pass(self) -> int:
        self.passes += 1
        return self.passes

    def _resume_path(self, pass_no: int) -> Path:
        return self.work / f"pass-{pass_no}-inputs.safetensors"

    def hidden_sink(self, pass_no: int, block: int, inputs) -> SpilledBatches | None:
        """Where block `block`'s outputs go: None (memory), or a SpilledBatches on disk once the states exceed the
        cap (a pass's two folders alternate: one holds the block's inputs while the other takes its outputs)."""
        if isinstance(inputs, SpilledBatches) or (
                self.hidden_cap is not None and sum(h.numel() * h.element_size() for h in inputs) > self.hidden_cap):
            return SpilledBatches(self.work / f"pass-{pass_no}-states-{block % 2}")
        return None

    def save_resume_point(self, pass_no: int, next_block: int, hidden) -> None:
        if isinstance(hidden, SpilledBatches):  # already on disk: record where
            _atomic_save({}, self._resume_path(pass_no), {"next_block": str(next_block),
                                                          "spilled": hidden.folder.name})
            return
        _atomic_save({f"h{j}": h.detach().contiguous().cpu() for j, h in enumerate(hidden)},
                     self._resume_path(pass_no), {"next_block": str(next_block)})

    def resume_point(self, pass_no: int):
        """(next block, its input hidden states) saved by an earlier run of this pass, or None."""
        p = self._resume_path(pass_no)
        if not p.exists():
            return None
        with safe_open(str(p), framework="pt") as f:
            meta = f.metadata()
            n = int(meta["next_block"])
            if "spilled" in meta:
                return n, SpilledBatches(self.work / meta["spilled"], fresh=False)
            hidden = [f.get_tensor(f"h{j}") for j in range(len(list(f.keys())))]
        return n, hidden


def read_tensor(source, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """One source tensor, checked like `load_model` checks the whole model."""
    t = source.get(name, dtype)
    if t.is_floating_point() and not torch.isfinite(t).all():
        raise ValueError(f"the source model has NaN/Inf values in {name}; refusing to quantize a broken model.")
    return t


def skeleton(source, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The source's model with its decoder blocks and its output head on the meta device (a tied head shares the
    embedding read here); every other parameter (the input embedding, position embeddings such as GPT-2's, the final
    norm) read from the source, since the capture pass runs them before block 0. Buffers (rotary tables) are real."""
    from accelerate import init_empty_weights

    from matquant.format.checkpoint import build_model

    with init_empty_weights(include_buffers=False):
        model = build_model(source.config, dtype)
    model.eval()
    prefix, _ = decoder_blocks(model)
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    head = model.get_output_embeddings()
    head_name = next((f"{n}.weight" for n, m in model.named_modules() if m is head), None) if head is not None else None
    for name, _p in list(model.named_parameters(remove_duplicate=False)):
        if name.startswith(prefix + ".") or name == head_name:  # (a tied head is tied back below)
            continue
        owner, _, leaf = name.rpartition(".")
        module = model.get_submodule(owner) if owner else model
        setattr(module, leaf, nn.Parameter(read_tensor(source, name, dtype), requires_grad=False))
    if tied and hasattr(model, "tie_weights"):
        model.tie_weights()
    return model


def streamable(config, model: nn.Module, targets: list[str]) -> str | None:
    """Why `config` on `model` cannot run streamed (None: it can)."""
    if config.name == "qat":
        return "QAT trains the whole model at once (use torchrun with --shard fsdp for large models)"
    if config.rotate not in (None, "none"):
        return f"--rotate {config.rotate} rotates every layer before the method runs"
    if getattr(config, "let", False):
        return "omniquant --let changes the norms in front of each block"
    if getattr(config, "work_dir", None):
        return "omniquant --work-dir keeps its own resume state"
    try:
        targets_by_block(model, targets)
    except ValueError as e:
        return str(e)
    return None


def run_settings(config, source, targets, calib, threads: int) -> dict:
    """What a resumed run must share with the killed one (else its work folder is stale and is discarded)."""
    import dataclasses

    from matquant.algorithms.training.workdir import tensor_sha256

    files = []
    src = getattr(source, "folder", None) or getattr(source, "path", None)
    if src is not None:
        p = Path(src)
        for f in sorted([p] if p.is_file() else p.iterdir()):
            if f.is_file():
                st = f.stat()
                files.append([f.name, st.st_size, st.st_mtime_ns])
    cfg = {k: v for k, v in dataclasses.asdict(config).items()}
    return json.loads(json.dumps({"config": cfg, "method": config.name, "source": source.describe(),
                                  "source_files": files, "targets": list(targets), "threads": threads,
                                  "calib_sha256": None if calib is None else tensor_sha256(calib)}, default=str))


def open_work(work: Path, settings: dict, log=print) -> bool:
    """Prepare the work folder; True when it holds a killed run of the same settings (which is then resumed)."""
    sfile = work / "settings.json"
    if work.exists():
        try:
            same = json.loads(sfile.read_text()) == settings
        except (OSError, ValueError):
            same = False
        if same:
            log(f"resuming the interrupted run from {work} (delete it to start over)")
            return True
        log(f"discarding {work}: it holds an interrupted run with other settings")
        shutil.rmtree(work)
    work.mkdir(parents=True)
    tmp = sfile.with_name("settings.json.tmp")
    tmp.write_text(json.dumps(settings, indent=1) + "\n")
    os.replace(tmp, sfile)
    return False


def write_checkpoint(model: nn.Module, source, qweights, tokenizer, out, qconfig, *, slicing: str,
                     overwrite: bool = False, max_shard_bytes: int | None = None, progress: bool = True,
                     dtype: torch.dtype = torch.float32) -> Path:
    """Write the checkpoint of a streamed run: the same tensors (names, dtypes, values) `save_checkpoint` writes for
    the model held in memory, read and written one block at a time. Atomic: the folder appears whole or not at all."""
    from tqdm.auto import tqdm

    from matquant.format.checkpoint import tied_keys, write_checkpoint_folder
    from matquant.format.shards import DEFAULT_MAX_SHARD_BYTES
    from matquant.nn.replace import replace_with_matquant

    qconfig.validate()
    prefix, blocks, by_block = targets_by_block(model, list(qconfig.modules))
    tied = tied_keys(model)
    emb = model.get_input_embeddings().weight
    def tensors():
        block_prefix = f"{prefix}."
        for name, t in model.state_dict(keep_vars=True).items():  # everything outside the blocks
            if name.startswith(block_prefix) or name in tied:
                continue
            if t is emb and not t.is_meta:
                yield name, t.detach()
            elif isinstance(t, nn.Parameter) or t.is_meta:
                yield name, read_tensor(source, name, dtype)
            else:  # a persistent buffer, as built
                yield name, t.detach()
        for i in tqdm(range(len(blocks)), desc="writing", disable=not progress):
            BlockStream(model, source, Path(out), dtype).onload(i, "cpu")
            replace_with_matquant(model, {n: qweights[n] for n in by_block.get(i, [])}, slicing=slicing)
            for key, t in blocks[i].state_dict().items():
                yield f"{prefix}.{i}.{key}", t
            # freed: the skeleton is not used again. Its tensors go first, so that a reference cycle among the
            # modules (freed only by a later garbage collection) cannot keep a block's weights alive
            blocks[i].to_empty(device="meta")
            blocks[i] = nn.Module()
            release_freed_memory()

    return write_checkpoint_folder(out, model, tokenizer, qconfig, tensors(), overwrite=overwrite,
                                   max_shard_bytes=max_shard_bytes or DEFAULT_MAX_SHARD_BYTES)
