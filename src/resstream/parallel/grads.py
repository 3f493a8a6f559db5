"""Gradients that no wrapper synchronises, and the global gradient norm.

Under FSDP or a pipeline the residual stream's parameters are replicated on every rank (they
are small: AttnRes adds 2(L+1)D) and left out of FSDP/DDP. Each pipeline stage adds the
gradient of the rows it used; data-parallel ranks saw different data. After backward one
all-reduce over every rank, divided by the data-parallel degree, gives each rank the
gradient a single process would have. A tied embedding/head cut apart by the pipeline (the
first and last stage) adds its two halves over the pair of ranks that hold them.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors
from torch.distributed.tensor import DTensor

from resstream.parallel.mesh import Mesh


def local(t: Tensor) -> Tensor:
    """This rank's part of a (possibly sharded) tensor, sharing its storage."""
    return t.to_local() if isinstance(t, DTensor) else t


def sync_replicated(params: list[nn.Parameter], mesh: Mesh) -> None:
    """Sum the gradients of replicated parameters over every rank, then divide by dp."""
    if mesh.world == 1 or not params:
        return
    for p in params:
        if p.grad is None:  # a stage that did not use it still takes part in the sum
            p.grad = torch.zeros_like(p)
    grads = [p.grad for p in params]
    flat = _flatten_dense_tensors(grads)
    dist.all_reduce(flat)
    flat.div_(mesh.dp)
    for g, new in zip(grads, _unflatten_dense_tensors(flat, grads)):
        g.copy_(new)


def sync_tied(param: nn.Parameter | None, mesh: Mesh) -> None:
    """Add the gradients of a weight the first and last pipeline stage share (embedding/head)."""
    if param is not None and mesh.tie_group is not None:
        if param.grad is None:
            param.grad = torch.zeros_like(param)
        dist.all_reduce(local(param.grad), group=mesh.tie_group)


@torch.no_grad()
def clip_grad_norm(module: nn.Module, max_norm: float, mesh: Mesh, replicated: set[int], skip: set[int],
                   sharded: bool) -> float:
    """torch.nn.utils.clip_grad_norm_ over a model spread across ranks: the norm of every
    gradient of the whole model, each counted once, then the same scaling on every rank.

    replicated: ids of parameters every rank holds with equal gradients (counted once);
    skip: ids of copies counted on another rank (the tied head on the last pipeline rank);
    sharded: FSDP, each data-parallel rank holds a different shard (else they hold copies)."""
    own = torch.zeros((), dtype=torch.float64)
    rep = torch.zeros((), dtype=torch.float64)
    grads = []
    for p in dict.fromkeys(module.parameters()):
        if p.grad is None:
            continue
        grads.append(p.grad)
        if id(p) in skip:
            continue
        sq = torch.linalg.vector_norm(local(p.grad), dtype=torch.float64).square().cpu()
        if id(p) in replicated:
            rep += sq
        else:
            own += sq
    if mesh.world > 1:
        own = mesh.all_reduce(own)
        if not sharded:
            own /= mesh.dp
    total = math.sqrt((own + rep).item())
    coef = max_norm / (total + 1e-6)
    if coef < 1.0:
        for g in grads:
            local(g).mul_(coef)
    return total
