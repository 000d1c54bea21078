"""Streamed perplexity: evaluate a model that does not fit in memory, one decoder block at a time.

The model is a skeleton on the meta device (a matquant checkpoint's, with its MatQuantLinear layers, or a
full-precision source's: an HF folder or a GGUF). Evaluation goes:

1. the token embedding is read and every window is embedded (`capture_block_inputs` of algorithms/blocks.py, which
   also records each block's arguments: masks, rotary tables); the embedding is dropped unless the head shares it;
2. for each decoder block: the block is read (`BlockStream.onload`: a checkpoint's codes and group parameters or a
   source's weights), every window batch of every evaluated slice runs through it (`BlockContext.run`), the outputs
   are kept (on disk above the memory cap: `BlockStream.hidden_sink`, `SpilledBatches`) and the block is dropped;
3. the final norm and the output head are read and the loss is computed from the last hidden states a chunk of
   tokens at a time (eval/perplexity.py `hidden_nll`).

A checkpoint block is read once for all requested slices: each slice (`--bits`, slicing mode, bits map) carries its
own hidden states through the block. The result equals the in-memory `perplexity` up to float32 rounding (the
same computations, batch for batch). Peak memory is about one block (codes plus the dequantized slice of one layer at
a time for the reference backend), the hidden states of every window (up to the cap) and the embedding or the head.
"""
from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from matquant.algorithms.blocks import (BlockContext, capture_block_inputs, check_finite_activations, decoder_blocks,
                                        offload_block, onload_block)
from matquant.algorithms.streaming import DEFAULT_CALIB_MEMORY, BlockStream, read_tensor
from matquant.eval.perplexity import PerplexityResult, base_model, hidden_nll, result_from_sum
from matquant.nn.bits import matquant_modules, set_bits
from matquant.nn.linear import MatQuantLinear
from matquant.nn.memory import release_freed_memory

DEFAULT_HIDDEN_MEMORY = DEFAULT_CALIB_MEMORY  # hidden states of all evaluated slices above this go to disk
FIT_FRACTION = 0.6  # load the whole model only when it needs at most this share of the available memory


def is_checkpoint(spec) -> bool:
    """True for a folder whose config.json declares a matquant quantization_config."""
    cfg = Path(spec) / "config.json"
    if not cfg.is_file():
        return False
    try:
        q = json.loads(cfg.read_text()).get("quantization_config") or {}
    except (OSError, ValueError, AttributeError):
        return False  # not ours to judge here: the checkpoint reader reports a corrupt config
    return isinstance(q, dict) and q.get("quant_method") == "matquant"


def is_full_precision_model(spec) -> bool:
    """True for what `load_model` reads as a full-precision model: an embedded or assembled model's name, a .gguf
    file, an HF folder that is not a matquant checkpoint, a folder of GGUF files. Anything else is read as a checkpoint
    (whose reader says what is wrong with it)."""
    from matquant.models.assembled import ASSEMBLED
    from matquant.models.loading import EMBEDDED

    p = Path(spec)
    if str(spec) in EMBEDDED or str(spec) in ASSEMBLED or (p.is_file() and p.suffix == ".gguf"):
        return True
    if p.is_dir():
        return (p / "config.json").is_file() and not is_checkpoint(p) or (
            not (p / "config.json").exists() and any(p.glob("*.gguf")))
    return False


def _set_tensor(module: nn.Module, leaf: str, t: torch.Tensor) -> None:
    """Put `t` in place of the (meta) parameter or buffer `leaf` of `module`, in that tensor's dtype."""
    old = module._parameters.get(leaf) if leaf in module._parameters else module._buffers[leaf]
    if t.is_floating_point() and old.is_floating_point():
        t = t.to(old.dtype)
    if leaf in module._parameters:
        module._parameters[leaf] = nn.Parameter(t, requires_grad=False)
    else:
        module._buffers[leaf] = t
    if isinstance(module, MatQuantLinear):
        module._cached = None
        module.compute_backend.clear()


def _to_meta(module: nn.Module, leaf: str) -> None:
    store = module._parameters if leaf in module._parameters else module._buffers
    t = store[leaf]
    meta = torch.empty(t.shape, dtype=t.dtype, device="meta")
    store[leaf] = nn.Parameter(meta, requires_grad=False) if leaf in module._parameters else meta
    if isinstance(module, MatQuantLinear):
        module._cached = None
        module.compute_backend.clear()


def meta_tensors(root: nn.Module, prefix: str = ""):
    """(module, leaf, full name) of every parameter and buffer of `root` still on the meta device; a tensor shared by
    two modules (a tied head) once, under its first name (`tie_weights` shares it again once it is read)."""
    seen = set()
    for mname, mod in root.named_modules():
        for store in (mod._parameters, mod._buffers):
            for leaf, t in store.items():
                if t is not None and t.is_meta and id(t) not in seen:
                    seen.add(id(t))
                    yield mod, leaf, ".".join(x for x in (prefix, mname, leaf) if x)


class CheckpointBlocks(BlockStream):
    """A BlockStream over a matquant checkpoint (integrations/export_slices.CheckpointSource): block i's codes, group
    parameters and plain tensors are read from the checkpoint when its turn comes (value-checked) and dropped after;
    the layers keep their precision and backend."""

    def onload(self, i: int, device) -> nn.Module:
        for mod, leaf, full in list(meta_tensors(self.blocks[i], f"{self.prefix}.{i}")):
            _set_tensor(mod, leaf, self.source.read(full).to(device))
        return self.blocks[i]

    def release(self, i: int) -> None:
        for mod in self.blocks[i].modules():
            for leaf in [k for k, t in list(mod._parameters.items()) + list(mod._buffers.items())
                         if t is not None and not t.is_meta and k in self._stored(mod)]:
                _to_meta(mod, leaf)
        release_freed_memory()

    @staticmethod
    def _stored(mod: nn.Module) -> set[str]:
        """The leaves a checkpoint stores (parameters and persistent buffers): non-persistent buffers (rotary
        tables) were built with the skeleton and stay."""
        return set(mod._parameters) | (set(mod._buffers) - mod._non_persistent_buffers_set)


@dataclass
class EvalModel:
    """What `matquant eval` evaluates: a matquant checkpoint or a full-precision model, as a meta-device skeleton
    until `streamed_perplexity` (or `load`) reads it."""

    spec: str
    model: nn.Module  # meta skeleton
    tokenizer: object
    qconfig: object = None  # QuantConfig of a checkpoint, None for a full-precision model
    source: object = None  # CheckpointSource or WeightSource
    _closed: bool = field(default=False, repr=False)

    @property
    def quantized(self) -> bool:
        return self.qconfig is not None

    def read(self, name: str) -> torch.Tensor:
        if self.quantized:
            return self.source.read(name)
        return read_tensor(self.source, name, torch.float32)

    def in_memory_bytes(self) -> int:
        """Estimated bytes of the whole model loaded for evaluation: its tensors as held (tied ones once) plus, for
        a checkpoint on the reference backend, each layer's dequantized float32 slice (cached by the layer)."""
        seen, total = set(), 0
        for t in list(self.model.parameters()) + list(self.model.buffers()):
            if id(t) not in seen:
                seen.add(id(t))
                total += t.numel() * t.element_size()
        for m in matquant_modules(self.model).values():
            if m.backend == "torch":
                total += m.in_features * m.out_features * 4
        return total

    def close(self) -> None:
        if self.quantized and not self._closed:
            self.source.close()
        self._closed = True


def open_eval_model(spec, bits=None, slicing: str | None = None) -> EvalModel:
    """The EvalModel of a checkpoint folder (precision set as `load_checkpoint` sets it) or of a full-precision model
    (name, HF folder, .gguf file): its config, tokenizer and checked headers read, no weight."""
    if not is_full_precision_model(spec):
        from matquant.integrations.export_slices import CheckpointSource

        ck = CheckpointSource(spec, bits, slicing, need_tokenizer=False)
        ck.model.eval()
        return EvalModel(str(spec), ck.model, ck.tokenizer, ck.qconfig, ck)
    from accelerate import init_empty_weights

    from matquant.format.checkpoint import build_model
    from matquant.format.source import open_source

    src = open_source(str(spec))
    with init_empty_weights(include_buffers=False):
        model = build_model(src.config, torch.float32)
    model.eval()
    return EvalModel(str(spec), model, src.tokenizer(), None, src)


def available_memory() -> int:
    import psutil

    return int(psutil.virtual_memory().available)


def should_stream(ev: EvalModel, available: int | None = None) -> tuple[bool, str]:
    """(stream?, why): stream when the whole model would need more than FIT_FRACTION of the available memory (the
    rest is for activations, the window batch and the loss)."""
    need = ev.in_memory_bytes()
    avail = available_memory() if available is None else available
    gib = 2**30
    if need > FIT_FRACTION * avail:
        return True, (f"evaluating one block at a time: the whole model needs about {need / gib:.1f} GiB, "
                      f"{avail / gib:.1f} GiB of memory is available (--in-memory loads it anyway)")
    return False, (f"loading the whole model: it needs about {need / gib:.1f} GiB, {avail / gib:.1f} GiB of memory is "
                   "available (--stream evaluates one block at a time)")


def _head_shares_embedding(model: nn.Module) -> bool:
    out = model.get_output_embeddings()
    return out is not None and getattr(out, "weight", None) is model.get_input_embeddings().weight


def _real_outside_to(model: nn.Module, block_prefix: str, device) -> None:
    """Move every tensor outside the blocks that is not on the meta device to `device` (the final pass runs there)."""
    for mname, mod in model.named_modules():
        if mname.startswith(block_prefix):
            continue
        for k, p in mod._parameters.items():
            if p is not None and not p.is_meta and p.device != device:
                mod._parameters[k] = nn.Parameter(p.data.to(device), requires_grad=False)
        for k, b in mod._buffers.items():
            if b is not None and not b.is_meta and b.device != device:
                mod._buffers[k] = b.to(device)
    if getattr(model.config, "tie_word_embeddings", False) and hasattr(model, "tie_weights"):
        model.tie_weights()


class _Inject(nn.Module):
    """Stands in for block 0 in the final pass: returns the given last-block outputs whatever it is called with."""

    def __init__(self, hidden: torch.Tensor):
        super().__init__()
        self.hidden = hidden

    def forward(self, *args, **kwargs):
        return self.hidden


class _Pass(nn.Module):
    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


def final_hidden(model: nn.Module, blocks: nn.ModuleList, last: torch.Tensor) -> torch.Tensor:
    """The base model's output for last-block outputs `last` [b, s, h]: whatever follows the blocks (the final norm)
    applied by the model's own forward, the blocks standing in (block 0 yields `last`, the others pass it on)."""
    saved = list(blocks)
    try:
        for i in range(len(blocks)):
            blocks[i] = _Inject(last) if i == 0 else _Pass()
        return base_model(model)(inputs_embeds=torch.zeros_like(last), use_cache=False).last_hidden_state
    finally:
        for i, b in enumerate(saved):
            blocks[i] = b


@dataclass
class _Job:
    bits: object  # int, bits map or None (full precision)
    mode: str | None
    hidden: object = None  # list of batches or SpilledBatches
    pass_no: int = 0
    eff_sum: float = 0.0
    weights: int = 0


def _apply_precision(model: nn.Module, job: _Job) -> None:
    if job.bits is not None:
        set_bits(model, job.bits, job.mode)


@torch.inference_mode()
def streamed_perplexity(ev: EvalModel, windows: torch.Tensor, slices=((None, None),), *, batch_size: int = 1,
                        device: str = "cpu", hidden_memory_bytes: int | None = None, work_dir=None,
                        progress: bool = True) -> list[tuple[PerplexityResult, float | None]]:
    """(PerplexityResult, effective bits per weight or None) of every (bits, slicing mode) in `slices` (bits: int,
    bits map, or None for the model as it is), evaluated block by block (see the module docstring). The hidden
    states go to a temporary folder (in `work_dir` or the system's) once they exceed `hidden_memory_bytes` in all."""
    if not isinstance(windows, torch.Tensor) or windows.dim() != 2 or windows.shape[1] < 2:
        raise ValueError("windows must be a 2-D tensor [n_windows, seqlen >= 2] of token ids.")
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}.")
    model, device = ev.model, torch.device(device)
    jobs = [_Job(b, m) for b, m in slices]
    if not jobs:
        raise ValueError("no slice to evaluate.")
    if not ev.quantized and any(j.bits is not None for j in jobs):
        raise ValueError(f"{ev.spec} is a full-precision model: it has no --bits to choose.")
    saved = {n: (m.bits, m.slicing) for n, m in matquant_modules(model).items()}
    for j in jobs:  # every precision checked before any work
        _apply_precision(model, j)
    cap = DEFAULT_HIDDEN_MEMORY if hidden_memory_bytes is None else hidden_memory_bytes
    if work_dir is not None:
        Path(work_dir).mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="matquant-eval-", dir=work_dir))
    stream_cls = CheckpointBlocks if ev.quantized else BlockStream
    stream = stream_cls(model, ev.source, work, hidden_cap_bytes=cap // len(jobs))
    prefix, blocks = decoder_blocks(model)
    model._matquant_stream = stream
    try:
        emb, head = model.get_input_embeddings(), model.get_output_embeddings()
        block_prefix = f"{prefix}."
        if getattr(model.config, "tie_word_embeddings", False) and hasattr(model, "tie_weights"):
            model.tie_weights()
        untied_head = not _head_shares_embedding(model)
        head_tensors = {id(t) for t in [*head.parameters(), *head.buffers()]} if untied_head else set()

        def outside(skip_head: bool):  # the meta tensors outside the blocks (the output head when asked)
            for mod, leaf, full in list(meta_tensors(model)):
                t = mod._parameters.get(leaf, mod._buffers.get(leaf))
                if not full.startswith(block_prefix) and not (skip_head and id(t) in head_tensors):
                    yield mod, leaf, full

        for mod, leaf, full in outside(skip_head=True):  # embeddings, final norm (small): what runs before block 0
            _set_tensor(mod, leaf, ev.read(full))
        if getattr(model.config, "tie_word_embeddings", False) and hasattr(model, "tie_weights"):
            model.tie_weights()
        hidden, per_block = capture_block_inputs(model, windows, device, batch_size, cache_device="cpu")
        if untied_head:  # the input embedding is not needed again (the final pass starts after it)
            for mod, leaf in [(m, k) for m in emb.modules() for k, t in m._parameters.items() if t is not None]:
                _to_meta(mod, leaf)
            release_freed_memory()
        for j in jobs:
            j.hidden, j.pass_no = hidden, stream.begin_pass()
        del hidden
        for i in tqdm(range(len(blocks)), desc="blocks", disable=not progress):
            block = onload_block(model, blocks, i, device)
            try:
                for j in jobs:
                    _apply_precision(model, j)
                    for m in matquant_modules(block).values():
                        j.eff_sum += m.effective_bits() * m.qweight.numel()
                        j.weights += m.qweight.numel()
                    ctx = BlockContext(i, f"{prefix}.{i}", block, {}, j.hidden, per_block[i], device)
                    sink = stream.hidden_sink(j.pass_no, i, j.hidden)
                    outs = ctx.run(keep_outputs=True, sink=sink)
                    j.hidden = outs if sink is not None else [o.to("cpu") for o in outs]
                    for k, h in enumerate(j.hidden):
                        check_finite_activations(h, f"the block after block {i} (its output, window batch {k})")
            finally:
                offload_block(model, blocks, i, None)
        for mod, leaf, full in outside(skip_head=False):  # the output head (and nothing of the embedding: unused)
            if not any(t is mod._parameters.get(leaf) for t in emb.parameters()):
                _set_tensor(mod, leaf, ev.read(full))
        _real_outside_to(model, block_prefix, device)
        for mname, mod in model.named_modules():  # the model's own non-block layers at the evaluated precision
            if isinstance(mod, MatQuantLinear) and not mname.startswith(block_prefix):
                for j in jobs:
                    _apply_precision(model, j)
                    j.eff_sum += mod.effective_bits() * mod.qweight.numel()
                    j.weights += mod.qweight.numel()
        out = []
        n, seqlen = windows.shape
        for j in jobs:
            _apply_precision(model, j)
            nll_sum = 0.0
            for k, h in enumerate(j.hidden):
                x = windows[k * batch_size: (k + 1) * batch_size]
                try:
                    nll_sum += hidden_nll(model, final_hidden(model, blocks, h.to(device)), x.to(device))
                except FloatingPointError:
                    raise FloatingPointError(f"non-finite loss in window batch {k}: the model produces NaN/Inf "
                                             "logits.") from None
            res = result_from_sum(nll_sum, n * (seqlen - 1), n, seqlen)
            out.append((res, j.eff_sum / j.weights if j.weights else None))
        return out
    finally:
        del model._matquant_stream
        for n, (b, m) in saved.items():
            model.get_submodule(n).set_bits(b, m)
        shutil.rmtree(work, ignore_errors=True)
