"""The process layout: a DeviceMesh with dimensions ("pp", "dp", "tp") and the groups cut from it.

    world = pp x dp x tp;  rank = (pp_rank * dp + dp_rank) * tp + tp_rank   (pp outermost, tp innermost)

The first dimension is the pipeline: ranks with the same dp_rank form one pipeline (one
replica of the model, cut into stages); ranks with the same pp_rank hold the same stages
and split the batch (DDP or FSDP over "dp"). The tensor-parallel dimension is innermost, so a
TP group stays on neighbouring ranks (one node's GPUs); its ranks read the same batch.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from resstream.parallel.config import ParallelConfig


@dataclass
class Mesh:
    """Coordinates of this process. ``device_mesh`` is None for a single process."""

    world: int
    rank: int
    pp: int
    dp: int
    device_mesh: DeviceMesh | None
    device: torch.device = torch.device("cpu")  # where collectives' tensors live (nccl: the GPU)
    tie_group: dist.ProcessGroup | None = None  # first and last pipeline rank of this replica
    tp: int = 1

    @property
    def pp_rank(self) -> int:
        return self.rank // (self.dp * self.tp)

    @property
    def dp_rank(self) -> int:
        return self.rank // self.tp % self.dp

    @property
    def pp_group(self) -> dist.ProcessGroup | None:
        return self.device_mesh.get_group("pp") if self.device_mesh is not None else None

    @property
    def dp_group(self) -> dist.ProcessGroup | None:
        return self.device_mesh.get_group("dp") if self.device_mesh is not None else None

    @property
    def dp_mesh(self) -> DeviceMesh:
        return self.device_mesh["dp"]

    @property
    def tp_mesh(self) -> DeviceMesh:
        return self.device_mesh["tp"]

    def all_reduce(self, t: Tensor, group: dist.ProcessGroup | None = None) -> Tensor:
        """Sum of t over the group (default: every rank), computed where the backend wants it."""
        if self.world == 1:
            return t
        on = t.to(self.device)
        dist.all_reduce(on, group=group)
        return on.to(t.device)

    def global_rank(self, pp_rank: int, dp_rank: int | None = None) -> int:
        return (pp_rank * self.dp + (self.dp_rank if dp_rank is None else dp_rank)) * self.tp + self.rank % self.tp


def build_mesh(p: ParallelConfig, device: torch.device) -> Mesh:
    """The mesh of the current process group (a single-process Mesh when there is none).
    Every rank must call this (it creates process groups)."""
    if not (dist.is_available() and dist.is_initialized()):
        return Mesh(world=1, rank=0, pp=1, dp=1, device_mesh=None, device=device)
    world, rank = dist.get_world_size(), dist.get_rank()
    dp = world // (p.pp * p.tp)
    device_mesh = init_device_mesh(device.type, (p.pp, dp, p.tp), mesh_dim_names=("pp", "dp", "tp"))
    mesh = Mesh(world, rank, p.pp, dp, device_mesh, device, tp=p.tp)
    if p.pp > 1:
        # tied embedding and head live on the first and last pipeline rank: their gradients
        # are summed over this pair (new_group is collective: every rank creates every pair)
        for d in range(dp):
            group = dist.new_group([mesh.global_rank(0, d), mesh.global_rank(p.pp - 1, d)])
            if d == mesh.dp_rank:
                mesh.tie_group = group
    return mesh
