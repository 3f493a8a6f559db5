"""Tensor parallelism (Megatron-style) with DTensor over a DeviceMesh.

Each attention's heads and each MLP's hidden units are split over the ``tp`` ranks of a
mesh dimension; everything else (embedding, norms, head, every residual parameter and the
residual state itself) stays a plain tensor, replicated and computed identically on every
rank, so every residual kind runs unchanged::

    x_l (replicated) ─► norm ─► h  Replicate DTensor: the backward all-reduce of the
                                │  sublayer's input gradient happens once, here
              ┌─────────────────┼───────────┐
          wq (colwise)      wk (colwise)  wv (colwise)      H/tp query heads, Hkv/tp KV
              └─── attention over this rank's heads ──┘     heads per rank, no comms
                                │
                           wo (rowwise)   partial sums ─► all-reduce (async)
                                ▼
                 y_l: an AsyncCollectiveTensor, waited where it is first read

    MLP: w_gate, w_up colwise (hidden/tp units per rank), w_down rowwise; same pattern.

DTensor's RowwiseParallel launches the output all-reduce with ``async_op=True`` and hands
back an AsyncCollectiveTensor, which waits on its first use. Where that first use is
decides the overlap, and it is the residual stream's choice: PreNorm adds y_l to h right
away (so it waits at once, synchronous in effect), while Ladder-Residual (Zhang et al.,
2025) reads y_l only after sublayer l+1 has run, so the all-reduce of y_l runs beside sublayer
l+1's matmuls. The backward all-reduces are synchronous for every kind.

Composition with data parallelism uses a 2-D mesh (dp, tp), rank = dp_index * tp +
tp_index. With dp > 1 the data-parallel gradient averaging is PyTorch's ``replicate``
(DDP semantics on FSDP2's machinery), because DDP itself does not accept DTensor
parameters (its built-in DDP + TP path drops the sharded parameters from the module
after the first forward in torch 2.13).
"""
from __future__ import annotations

import contextlib
import math
import os
import secrets
from typing import Iterable

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor, Replicate
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    PrepareModuleOutput,
    RowwiseParallel,
    parallelize_module,
)

from resstream.config import ConfigError
from resstream.model.config import ModelConfig
from resstream.model.layers import MLP, Attention

# Sublayer linears split column-wise (output features) and row-wise (input features).
COLWISE = {Attention: ("wq", "wk", "wv"), MLP: ("w_gate", "w_up")}
ROWWISE = {Attention: "wo", MLP: "w_down"}


def check_tp(cfg: ModelConfig, tp: int) -> None:
    """A one-line ConfigError unless tp splits every attention and MLP evenly."""
    for what, n in (("attention heads (model.n_heads)", cfg.n_heads),
                    ("KV heads (model.n_kv_heads)", cfg.kv_heads),
                    ("MLP hidden units (model.mlp_hidden)", cfg.hidden)):
        if n % tp:
            raise ConfigError(f"parallel.tp: {tp} does not divide the {n} {what}; choose a tp that divides "
                              f"n_heads={cfg.n_heads}, n_kv_heads={cfg.kv_heads} and mlp_hidden={cfg.hidden}")


def make_mesh(device_type: str, tp: int) -> DeviceMesh:
    """The 2-D (dp, tp) mesh over every process of the launch; dp = world size / tp. Joins
    torchrun's process group first if this process has not yet."""
    if not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    world = dist.get_world_size() if dist.is_initialized() else 1
    if world == 1 or world % tp:
        raise ConfigError(f"tensor parallelism (parallel.tp, --tp) of {tp} needs a multiple of {tp} processes, got "
                          f"{world}; launch with torchrun --nproc_per_node={tp} (or a multiple)")
    return init_device_mesh(device_type, (world // tp, tp), mesh_dim_names=("dp", "tp"))


def tp_plan(model: nn.Module) -> dict[str, ParallelStyle]:
    """The parallelize_module plan: fully-qualified module name -> style."""
    plan: dict[str, ParallelStyle] = {}
    for i, sub in enumerate(model.sublayers):
        p = f"sublayers.{i}"
        # The normed input becomes a Replicate DTensor shared by the colwise linears: their
        # input gradients then add up as one Partial DTensor and are all-reduced once.
        plan[f"{p}.norm"] = PrepareModuleOutput(
            output_layouts=Replicate(), desired_output_layouts=Replicate(), use_local_output=False
        )
        for name in COLWISE[type(sub)]:
            plan[f"{p}.{name}"] = ColwiseParallel()
        plan[f"{p}.{ROWWISE[type(sub)]}"] = RowwiseParallel()
    return plan


def parallelize(model: nn.Module, tp_mesh: DeviceMesh) -> nn.Module:
    """Split ``model`` (an LM, on the mesh's device, same weights on every rank) over the
    1-D mesh ``tp_mesh`` in place and return it. Sharded weights become DTensors; the
    attention modules keep only their rank's heads (n_heads, n_kv become per-rank counts,
    which is also what the decoding KV caches hold)."""
    tp = tp_mesh.size()
    check_tp(model.cfg, tp)
    if any(isinstance(p, DTensor) for p in model.parameters()):
        raise ValueError("model is already parallelized")
    for sub in model.sublayers:
        if isinstance(sub, Attention):
            sub.n_heads, sub.n_kv = sub.n_heads // tp, sub.n_kv // tp
    parallelize_module(model, tp_mesh, tp_plan(model))
    return model


def replicate_over_dp(model: nn.Module, dp_mesh: DeviceMesh) -> nn.Module:
    """Data parallelism over ``dp_mesh`` for a tensor-parallel model: gradients averaged
    over the dp ranks after backward, like DDP; every parameter becomes a DTensor."""
    from torch.distributed._composable.replicate_with_fsdp import replicate

    replicate(model, mesh=dp_mesh)
    return model


@contextlib.contextmanager
def gradient_sync(module: nn.Module, enabled: bool):
    """Skip (enabled=False) or do the data-parallel gradient reduction of the backward
    passes inside: DDP's no_sync, or replicate's set_requires_gradient_sync."""
    if enabled:
        yield
    elif hasattr(module, "no_sync"):
        with module.no_sync():
            yield
    elif hasattr(module, "set_requires_gradient_sync"):
        module.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            module.set_requires_gradient_sync(True)
    else:
        yield


def clip_grad_norm(params: Iterable[Tensor], max_norm: float) -> float:
    """torch.nn.utils.clip_grad_norm_ for parameters that may be DTensors on any meshes.

    Each rank adds its local squared gradient norms, weighted so that one all-reduce over
    all processes counts every shard once and every replicated tensor once:
    weight = (number of shards) / (world size). Returns the total norm (before clipping);
    the gradients are scaled by min(1, max_norm / (norm + 1e-6)) as torch does.
    """
    grads = [p.grad for p in params if p.grad is not None]
    world = dist.get_world_size() if dist.is_initialized() else 1
    total = torch.zeros((), dtype=torch.float64, device=grads[0].device if grads else "cpu")
    for g in grads:
        shards = 1
        if isinstance(g, DTensor):
            if any(pl.is_partial() for pl in g.placements):
                g = g.redistribute(placements=[Replicate() if pl.is_partial() else pl for pl in g.placements])
            shards = math.prod(g.device_mesh.size(i) for i, pl in enumerate(g.placements) if pl.is_shard())
            g = g.to_local()
        total += g.double().square().sum() * (shards / world)
    if world > 1:
        dist.all_reduce(total)
    norm = total.sqrt().item()
    coef = min(1.0, max_norm / (norm + 1e-6))
    if coef < 1.0:
        with torch.no_grad():
            for g in grads:
                g.mul_(coef)
    return norm


def full_state(state: dict) -> dict:
    """A copy of a model or optimizer state dict with every DTensor gathered into a full
    plain tensor (a collective: every rank calls it, in the same order). Tensors that share
    storage (tied weights) stay shared, so they are still saved once."""
    memo: dict[tuple, Tensor] = {}

    def full(v):
        if isinstance(v, DTensor):
            key = (v.to_local().data_ptr(), tuple(v.shape))
            if key not in memo:
                memo[key] = v.full_tensor()
            return memo[key]
        if isinstance(v, dict):
            return {k: full(x) for k, x in v.items()}
        if isinstance(v, list):
            return [full(x) for x in v]
        return v

    return full(state)


def is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def shared_seed(seed: int | None) -> int:
    """The sampling seed every rank uses: ``seed``, or one drawn on rank 0 and broadcast,
    so that tensor-parallel ranks sample the same tokens."""
    if seed is not None:
        return seed
    box = [secrets.randbits(62) if dist.get_rank() == 0 else 0]  # the global RNG is left alone
    dist.broadcast_object_list(box, src=0)
    return box[0]
