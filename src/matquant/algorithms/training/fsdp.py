"""FSDP2 for QAT (`--shard fsdp`): shard a transformers model with `torch.distributed.fsdp.fully_shard` (one unit
per decoder block, then the root for the rest), move full tensors in and out of the sharded layout, and turn the
sharded model back into an ordinary one after training.

While sharded, each rank holds 1/world of every parameter (and of the trainable weights' gradients and AdamW
moments); one decoder block's parameters are all-gathered around its forward and again for its backward.
`unshard_model` gathers the parameters one tensor at a time and puts plain tensors back into the modules: after it
every rank holds the model as loaded (what the pipeline's replace-and-save on rank 0 needs), never more than one
extra full tensor in flight.
"""
from __future__ import annotations

import torch
from torch import nn


def decoder_blocks(model: nn.Module) -> list[nn.Module]:
    """The decoder blocks of a transformers model: the modules whose class is named in `_no_split_modules`."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    if not blocks:
        raise ValueError(f"--shard fsdp found no decoder blocks in {type(model).__name__} (no module class named in "
                         "its _no_split_modules); use --shard ddp for this model.")
    return blocks


def shard_model(model: nn.Module, device: torch.device, world: int) -> list[nn.Module]:
    """fully_shard each decoder block, then the root (embeddings, final norm, head); returns the FSDP modules."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (world,))
    units = decoder_blocks(model)
    for block in units:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return [*units, model]


def is_fsdp(model: nn.Module) -> bool:
    """Whether `shard_model` is in effect on `model` (or one of its modules)."""
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in model.modules())


def is_sharded(t) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def full_tensor(t: torch.Tensor, device="cpu") -> torch.Tensor:
    """The whole tensor on `device` (a collective for a sharded one: every rank must call it in the same order)."""
    if is_sharded(t):
        t = t.full_tensor()
    return t.detach().to(device)


def like_param(full: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """`full` in the layout of `param` (this rank's shard of it when `param` is sharded; no communication)."""
    if not is_sharded(param) or full.shape != param.shape:
        return full.to(param.device) if torch.is_tensor(full) and full.dim() else full
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(full.to(param.to_local().device), param.device_mesh, param.placements,
                             src_data_rank=None)


def unshard_model(model: nn.Module, device, gather: bool = True) -> None:
    """Undo `shard_model` in place: every FSDP module gets its own class back and loses FSDP's hooks; with
    `gather` every sharded parameter is all-gathered (one at a time, every rank in the same order) and put back as
    a plain parameter on `device`. Without `gather` (after an error on one rank, when collectives could hang) the
    parameters stay sharded and the model must be reloaded."""
    from torch.distributed.fsdp import FSDPModule

    fsdp_modules = [m for m in model.modules() if isinstance(m, FSDPModule)]
    if gather:
        for m in fsdp_modules:
            m.reshard()  # (a no-grad forward can leave the root unsharded)
    for m in fsdp_modules:
        state = m._get_fsdp_state()
        handles = {id(h): h for h in (state._pre_forward_hook_handle, state._post_forward_hook_handle)
                   if h is not None}
        for group in state._fsdp_param_groups:
            for table in (group._module_to_pre_save_state_dict_hook_handle,
                          group._module_to_pre_load_state_dict_hook_handle):
                handles.update({id(h): h for h in table.values()})
            for fp in group.fsdp_params:
                if getattr(fp, "_post_load_hook_handle", None) is not None:
                    handles[id(fp._post_load_hook_handle)] = fp._post_load_hook_handle
        for h in handles.values():
            h.remove()
        m.__class__ = next(c for c in type(m).__bases__ if not issubclass(c, FSDPModule))
        for attr in ("_is_fsdp_managed_module", "_fsdp_use_orig_params"):
            m.__dict__.pop(attr, None)
        _forget_composable_state(m)
    for sub in model.modules():
        for attr in ("_is_fsdp_managed_module", "_fsdp_use_orig_params"):
            sub.__dict__.pop(attr, None)
        if not gather:
            continue
        for name, p in list(sub._parameters.items()):
            if p is not None and is_sharded(p):
                sub._parameters[name] = nn.Parameter(full_tensor(p, device), requires_grad=p.requires_grad)


def _forget_composable_state(m: nn.Module) -> None:
    """Drop fully_shard's registry entries for `m` (private torch state; absent ones are skipped)."""
    try:
        from torch.distributed import _composable_state
        from torch.distributed._composable.contract import REGISTRY_KEY, STATE_KEY

        _composable_state._module_state_mapping.pop(m, None)
        for key in (STATE_KEY, REGISTRY_KEY):
            table = m.__dict__.get(key)
            if isinstance(table, dict):
                for k in [k for k in table if getattr(k, "__name__", k) == "fully_shard"]:
                    del table[k]
    except (ImportError, AttributeError):
        pass
