"""torchrun helpers for QAT: join the process group set up by torchrun (WORLD_SIZE > 1; gloo on CPU, nccl on CUDA),
pick this rank's device, and leave the group after rank 0 has written its output."""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    initialized_here: bool = False

    @property
    def on(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device_pref: str = "auto") -> Dist:
    """Join the torch.distributed job set up by torchrun (WORLD_SIZE > 1); a no-op for a single process."""
    if dist.is_available() and dist.is_initialized():
        return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    use_cuda = torch.cuda.is_available() and device_pref != "cpu"
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local)
    dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), local, initialized_here=True)


SHARD_MODES = ("ddp", "fsdp")  # how several processes split the training (one process: neither)
DEFAULT_SHARD = "ddp"  # docs/qat.md "Sharding": the faster of the two wherever the model fits on every device


def planned_world_size() -> int:
    """The number of processes of this job: the joined group's, else torchrun's WORLD_SIZE (1 without torchrun)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def check_shard(shard: str | None, world: int) -> str:
    """The validated --shard mode for `world` processes (None: the default)."""
    shard = DEFAULT_SHARD if shard is None else shard
    if shard not in SHARD_MODES:
        raise ValueError(f"--shard must be one of {', '.join(SHARD_MODES)}, got {shard!r}.")
    if shard == "fsdp" and world <= 1:
        raise ValueError("--shard fsdp needs several processes: start it with torchrun (e.g. torchrun "
                         "--nproc_per_node 2 -m matquant quantize ...); one process trains unsharded, without "
                         "--shard.")
    return shard


def is_main_process() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


FINISH_KEY = "matquant/finished/"


def finish_distributed(timeout_s: float = 1800.0) -> None:
    """Wait for every rank, then leave the process group (call once, after rank 0 has written its output).

    The wait goes through torchrun's key-value store, not a gloo barrier: a rank that leaves right after a barrier
    can close its sockets while a peer is still finishing that barrier, and the peer then fails with "Connection
    closed by peer" (a known gloo shutdown race, pytorch/gloo#155). After the store wait no collective is in
    flight anywhere."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    store = getattr(dist.distributed_c10d, "_get_default_store", lambda: None)()
    if store is None:
        dist.barrier()
    else:
        rank, world = dist.get_rank(), dist.get_world_size()
        store.set(f"{FINISH_KEY}{rank}", "1")
        store.wait([f"{FINISH_KEY}{r}" for r in range(world)], timedelta(seconds=timeout_s))
    dist.destroy_process_group()


def barrier(d: Dist) -> None:
    if d.on:
        dist.barrier()


def pick_device(pref: str, d: Dist) -> torch.device:
    if pref == "auto":
        pref = "cuda" if torch.cuda.is_available() else "cpu"
    if pref.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError("--device cuda requested but no CUDA GPU is available; use --device cpu.")
        return torch.device(f"cuda:{d.local_rank}") if pref == "cuda" else torch.device(pref)
    return torch.device(pref)
