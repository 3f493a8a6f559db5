"""torchrun integration: one process per rank, DDP over gloo (CPU) or nccl (GPU)."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class Dist:
    """This process's place in the launch. ``data_rank`` / ``data_world``: its place among
    the processes that read different batches (all of them, unless tensor-parallel peers
    share a batch: then world / tp)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    data_rank: int = 0
    data_world: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def init_distributed(device_type: str) -> Dist:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    return Dist(rank=rank, world=world, local_rank=int(os.environ.get("LOCAL_RANK", "0")), data_rank=rank, data_world=world)


def all_reduce_sum(x: torch.Tensor, d: Dist) -> torch.Tensor:
    if d.enabled:
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def barrier(d: Dist) -> None:
    if d.enabled:
        dist.barrier()


def shutdown(d: Dist) -> None:
    if d.enabled and dist.is_initialized():
        dist.destroy_process_group()
