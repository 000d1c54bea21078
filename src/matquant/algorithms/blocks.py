"""Layer-sequential (block-wise) execution for calibration-based methods (GPTQ, MatGPTQ, ...).

The pattern every block-wise post-training method shares:

1. run the calibration windows through the model once, up to the first transformer block only, and keep the
   block inputs (hidden states) and the keyword arguments each block receives (attention mask, rotary position
   embeddings, position ids, ...);
2. for each block in order: move it alone to the compute device, let a callback quantize it (the callback can
   collect the inputs of the block's linear layers with forward hooks, as often as it needs), then run the
   inputs through the now-quantized block: its outputs are the next block's inputs. Errors of earlier blocks are
   therefore seen by later ones, as in GPTQ.

Only one block's weights are on the compute device at a time; the block inputs live on `cache_device` (default:
the compute device; pass "cpu" to keep them in host memory). Nothing here needs the whole model on the device,
so per-block weight offloading can be added later without changing the callers.

Generic over Hugging Face decoder-only models: the block list is the model's `nn.ModuleList` whose length is
`config.num_hidden_layers`, and the block arguments are recorded *per block* (so models whose blocks get different
masks, e.g. Gemma-2/3 sliding-window layers, are handled). Tested: Llama (SmolLM2), Qwen2, Mistral, GPT-2, OPT
(tests build tiny ones); Gemma-2/3 and GPT-NeoX follow the same calling convention.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm


def block_stream(model: nn.Module):
    """The BlockStream of a streamed model (algorithms/streaming.py: blocks on the meta device, read from the source
    when a pass reaches them), or None for a model held in memory."""
    return getattr(model, "_matquant_stream", None)


def onload_block(model: nn.Module, blocks: nn.ModuleList, i: int, device) -> nn.Module:
    """Block i on `device`, ready to run: read from the source for a streamed model, moved otherwise."""
    stream = block_stream(model)
    return stream.onload(i, device) if stream is not None else blocks[i].to(device)


def offload_block(model: nn.Module, blocks: nn.ModuleList, i: int, home) -> None:
    """Undo `onload_block`: a streamed block's weights are dropped (back to meta), a held one moves back `home`."""
    stream = block_stream(model)
    if stream is not None:
        stream.release(i)
    else:
        blocks[i].to(home)


def new_results(model: nn.Module) -> dict:
    """Where a method collects its {layer name: QuantizedWeight}: a dict, or for a streamed model a mapping kept on
    disk in the run's work folder (so a 7B model's codes never sit in memory together, and a rerun resumes)."""
    stream = block_stream(model)
    return {} if stream is None else stream.new_results()


def target_weights(model: nn.Module, targets: list[str], skip=()):
    """Yield (name, weight [out, in]) of every target not in `skip`, in order; on a streamed model block by block,
    each block read when its first target comes and dropped after its last (targets must lie inside blocks)."""
    from matquant.models.targets import linear_weight

    mods = dict(model.named_modules())
    stream = block_stream(model)
    if stream is None:
        for name in targets:
            if name not in skip:
                yield name, linear_weight(mods[name]).detach()
        return
    _, blocks, by_block = targets_by_block(model, targets)
    for i in sorted(by_block):
        todo = [n for n in by_block[i] if n not in skip]
        if not todo:
            continue
        onload_block(model, blocks, i, "cpu")
        try:
            for name in todo:
                yield name, linear_weight(mods[name]).detach()
        finally:
            offload_block(model, blocks, i, None)


def _move_real(module: nn.Module, device) -> None:
    """module.to(device) for every tensor that is not on the meta device (a streamed model's blocks, norm and head)."""
    for m in module.modules():
        for k, p in m._parameters.items():
            if p is not None and not p.is_meta and p.device != torch.device(device):
                m._parameters[k] = nn.Parameter(p.data.to(device), requires_grad=p.requires_grad)
        for k, b in m._buffers.items():
            if b is not None and not b.is_meta:
                m._buffers[k] = b.to(device)


class _StopForward(Exception):
    """Raised by the recorder of the last block to stop the capture forward early."""


def decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(name, ModuleList) of the model's transformer blocks."""
    cfg = getattr(model, "config", None)
    n = getattr(cfg, "num_hidden_layers", None)
    cands = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    for name, m in cands:
        if n is not None and len(m) == n:
            return name, m
    raise ValueError(f"could not find the transformer blocks of this {type(model).__name__}: no nn.ModuleList of "
                     f"config.num_hidden_layers={n} modules. Block-wise methods need a standard HF decoder model.")


def _to(obj, device):
    """Move every tensor inside nested tuples/lists/dicts to `device` (other objects are returned as is)."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(_to(x, device) for x in obj)
    if isinstance(obj, list):
        return [_to(x, device) for x in obj]
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


def check_finite_activations(x: torch.Tensor, where: str) -> None:
    if not torch.isfinite(x).all():
        raise FloatingPointError(
            f"NaN/Inf activations at the input of {where}: the model overflows on the calibration text (try "
            "float32, check the source model's weights, or use other calibration text). Nothing was written.")


class _Recorder(nn.Module):
    """Stands in for block i during the capture pass: records its arguments, returns its input unchanged."""

    def __init__(self, index: int, last: bool, store: dict):
        super().__init__()
        self.index, self.last, self.store = index, last, store

    def forward(self, *args, **kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        rest = args[1:]
        for k in ("past_key_values", "past_key_value", "layer_past"):  # replayed calls must not grow a KV cache
            if k in kwargs:
                kwargs[k] = None
        if "use_cache" in kwargs:
            kwargs["use_cache"] = False
        self.store.setdefault(self.index, []).append((rest, kwargs))
        if self.index == 0:
            self.store.setdefault("hidden", []).append(hidden.detach())
        if self.last:
            raise _StopForward
        return hidden


@torch.no_grad()
def capture_block_inputs(model: nn.Module, calib: torch.Tensor, device, batch_size: int = 1,
                         cache_device=None) -> tuple[torch.Tensor | list, list[list[tuple]]]:
    """Hidden states entering block 0 (list of batches) and the arguments of every block (per block, per batch).

    The blocks are temporarily replaced by recorders, so no block weight is touched; the rest of the model
    (embeddings, rotary embeddings, final norm) is moved to `device` for the pass and moved back afterwards.
    """
    if not isinstance(calib, torch.Tensor) or calib.dim() != 2 or calib.dtype not in (torch.long, torch.int32):
        raise ValueError("calibration data must be a 2-D integer tensor [n_windows, seqlen] of token ids "
                         "(e.g. matquant.data.token_windows(tok, 'calib', seqlen, n)).")
    if calib.shape[0] < 1 or calib.shape[1] < 2:
        raise ValueError(f"calibration data has shape {tuple(calib.shape)}: need at least one window of >= 2 tokens.")
    cache_device = device if cache_device is None else cache_device
    name, blocks = decoder_blocks(model)
    orig = list(blocks)
    streamed = block_stream(model) is not None
    move = _move_real if streamed else (lambda m, d: m.to(d))
    home = next(p.device for p in model.parameters() if not p.is_meta)
    store: dict = {}
    for i in range(len(blocks)):
        blocks[i] = _Recorder(i, i == len(blocks) - 1, store)
    try:
        move(model, device)
        for s in range(0, calib.shape[0], batch_size):
            try:
                model(input_ids=calib[s: s + batch_size].to(device), use_cache=False)
            except _StopForward:
                pass
    finally:
        for i, b in enumerate(orig):
            blocks[i] = b
        move(model, home)
        if not streamed:
            for i, b in enumerate(orig):  # the blocks were not attached during model.to(home); keep them home too
                b.to(home)
    if "hidden" not in store:
        raise RuntimeError("the capture pass never reached the first transformer block.")
    hidden = [h.to(cache_device) for h in store.pop("hidden")]
    for j, h in enumerate(hidden):
        check_finite_activations(h, f"transformer block 0 (calibration batch {j}; the embedding output)")
    # the block arguments stay where they were made (the compute device): they are small and shared by
    # identity across blocks (one rotary table, one mask), which a copy per block would break
    per_block = [store[i] for i in range(len(blocks))]
    return hidden, per_block


@dataclass
class BlockContext:
    """What a block callback sees: the block (already on the compute device), its targets and its inputs."""

    index: int
    name: str  # e.g. "model.layers.3"
    block: nn.Module
    targets: dict[str, nn.Module]  # full module name -> linear module inside this block
    hidden: list[torch.Tensor]
    args: list[tuple]
    device: torch.device
    # set by a callback that ran the block unchanged with keep_outputs: reused as the next block's inputs
    outputs: list[torch.Tensor] | None = None

    @torch.no_grad()
    def run(self, hooks: dict[str, Callable[[str, torch.Tensor], None]] | None = None,
            keep_outputs: bool = False, sink=None) -> list[torch.Tensor] | None:
        """Forward every calibration batch through the block; `hooks[name](name, x)` gets each target's input.

        Inputs of hooked layers are checked for NaN/Inf. Returns the block outputs when `keep_outputs` (appended
        to `sink` when given, e.g. a list kept on disk).
        """
        handles = []
        for n, fn in (hooks or {}).items():
            def hook(mod, inp, out, n=n, fn=fn):
                x = inp[0].detach()
                check_finite_activations(x, n)
                fn(n, x)
            handles.append(self.targets[n].register_forward_hook(hook))
        outs = (sink if sink is not None else []) if keep_outputs else None
        try:
            for h, (rest, kw) in zip(self.hidden, self.args):
                y = self.block(h.to(self.device), *_to(rest, self.device), **_to(kw, self.device))
                if isinstance(y, tuple):
                    y = y[0]
                if keep_outputs:
                    outs.append(y.detach())
        finally:
            for hd in handles:
                hd.remove()
        return outs

    def input_groups(self, names: Iterable[str] | None = None) -> list[list[str]]:
        """Targets grouped by shared input, in execution order (e.g. [q,k,v], [o], [gate,up], [down]).

        Found by running the first calibration batch once with hooks that note which input tensor each layer saw.
        Quantizing group by group, re-collecting inputs after each, is GPTQ's "true sequential" order.
        """
        names = list(self.targets) if names is None else list(names)
        # Hold every input tensor until grouping is done: comparing bare data_ptr()s would be wrong once a freed
        # input's memory is reused by the next one (seen in CI: o_proj's input recycled for gate/up's).
        order: list[tuple[str, torch.Tensor]] = []
        handles = []
        for n in names:
            def hook(mod, inp, out, n=n):
                order.append((n, inp[0]))
            handles.append(self.targets[n].register_forward_hook(hook))
        try:
            with torch.no_grad():
                rest, kw = self.args[0]
                self.block(self.hidden[0].to(self.device), *_to(rest, self.device), **_to(kw, self.device))
        finally:
            for hd in handles:
                hd.remove()
        groups: list[list[str]] = []
        seen, last = set(), None
        for n, x in order:
            if n in seen:
                continue
            seen.add(n)
            if groups and last is not None and _same_tensor(x, last):
                groups[-1].append(n)
            else:
                groups.append([n])
            last = x
        missing = [n for n in names if n not in seen]
        if missing:  # layers the forward never reached (unused) still get quantized, as their own group
            groups.append(missing)
        return groups


def _same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same data (both alive, so equal pointers cannot be a recycled allocation), shape and strides."""
    return a is b or (a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride())


def targets_by_block(model: nn.Module, targets: list[str]) -> tuple[str, nn.ModuleList, dict[int, list[str]]]:
    """(block list name, the blocks, {block index: [full target names in that block]}); every target must be
    inside a block (block-wise methods quantize only linear layers inside the transformer blocks)."""
    prefix, blocks = decoder_blocks(model)
    by_block: dict[int, list[str]] = {}
    for t in targets:
        head, _, rest = t[len(prefix) + 1:].partition(".")
        if not t.startswith(prefix + ".") or not head.isdigit() or not rest:
            raise ValueError(f"{t} is not inside a transformer block ({prefix}.N.…); block-wise methods quantize "
                             "only linear layers inside the blocks: choose them with --scope / --modules.")
        by_block.setdefault(int(head), []).append(t)
    return prefix, blocks, by_block


def run_blockwise(model: nn.Module, calib: torch.Tensor, targets: list[str],
                  quantize_block: Callable[[BlockContext], None], *, device=None, batch_size: int = 1,
                  cache_device=None, progress: bool = True, desc: str = "blocks", resumable: bool = False) -> None:
    """Call `quantize_block(ctx)` for every block that holds a target, in order, propagating the inputs.

    After the callback, the block's forward (with whatever weights the callback left in it) produces the next
    block's inputs (or `ctx.outputs`, when the callback set them). Blocks after the last one holding a target are not
    run. On a streamed model each block is read from the source when its turn comes and dropped after; with
    `resumable` (a pass whose callback keeps its results in `new_results(model)`), the inputs of the next block are
    saved after each block, so a rerun after a kill starts after the last finished block.
    """
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    cache_device = device if cache_device is None else torch.device(cache_device)
    prefix, blocks, names = targets_by_block(model, targets)
    mods = dict(model.named_modules())
    by_block = {i: {t: mods[t] for t in ts} for i, ts in names.items()}
    if not by_block:
        return
    last = max(by_block)
    stream = block_stream(model)
    pass_no = stream.begin_pass() if stream is not None else None
    hidden, per_block = capture_block_inputs(model, calib, device, batch_size, cache_device)
    start = 0
    if stream is not None and resumable:
        resumed = stream.resume_point(pass_no)
        if resumed is not None:
            start, saved = resumed
            if isinstance(saved, list):
                hidden = [h.to(cache_device) for h in saved] if saved else hidden
            else:  # spilled to disk: read a batch at a time
                hidden = saved
            if progress and start:
                print(f"{desc}: resumed after block {start - 1} from {stream.work}", flush=True)
    home = None if stream is not None else next(blocks[0].parameters()).device
    for i in tqdm(range(start, last + 1), desc=desc, disable=not progress, initial=start, total=last + 1):
        block = onload_block(model, blocks, i, device)
        ctx = BlockContext(i, f"{prefix}.{i}", block, by_block.get(i, {}), hidden, per_block[i], device)
        try:
            if ctx.targets:
                quantize_block(ctx)
            if i < last:
                sink = stream.hidden_sink(pass_no, i, hidden) if stream is not None else None
                outs = ctx.outputs if ctx.outputs is not None else ctx.run(keep_outputs=True, sink=sink)
                hidden = outs if sink is not None and outs is sink else [o.to(cache_device) for o in outs]
                for j, h in enumerate(hidden):
                    check_finite_activations(h, f"block {i + 1} (output of block {i}, calibration batch {j})")
        finally:
            offload_block(model, blocks, i, home)
        if stream is not None and resumable:
            stream.save_resume_point(pass_no, i + 1, hidden if i < last else [])
        if device.type == "cuda":
            torch.cuda.empty_cache()
