"""FSDP2 (``torch.distributed.fsdp.fully_shard``) over the data-parallel ranks.

One shard unit per transformer layer (its attention and MLP sublayers together), then the
root (embedding, final norm, head). Parameters are all-gathered before a unit runs and
resharded after; gradients are reduce-scattered. The residual stream's parameters are left
out (replicated, see ``parallel.grads``): its methods run between the units, outside any
module forward FSDP could hook. With bf16 the layers compute in bf16 and reduce gradients in
fp32 (MixedPrecisionPolicy) while the root stays fp32, so the embedding is fp32 and the
residual stream never accumulates in bf16: the precision contract of bf16 autocast.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard


def mixed_precision(dtype: torch.dtype) -> MixedPrecisionPolicy:
    """bf16 compute with fp32 gradient reduction, or full precision."""
    if dtype == torch.float32:
        return MixedPrecisionPolicy()
    return MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)


def shard(root: nn.Module, sublayers, layer_range: range, mesh: DeviceMesh, dtype: torch.dtype,
          reshard_after_forward: bool, ignored: set[nn.Parameter] | None = None) -> None:
    """fully_shard each transformer layer k in ``layer_range`` (sublayers[2k], sublayers[2k+1]),
    then ``root`` for what is left. ``sublayers`` is indexed by sublayer number (a ModuleList,
    or a stage's ModuleDict keyed by str(l))."""
    mp = mixed_precision(dtype)
    get = (lambda l: sublayers[l]) if isinstance(sublayers, nn.ModuleList) else (lambda l: sublayers[str(l)])
    for k in layer_range:
        fully_shard([get(2 * k), get(2 * k + 1)], mesh=mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)
    root_mp = MixedPrecisionPolicy(reduce_dtype=torch.float32)  # no compute cast: see the module docstring
    fully_shard(root, mesh=mesh, mp_policy=root_mp, reshard_after_forward=reshard_after_forward, ignored_params=ignored)


def reshard_all(module: nn.Module) -> None:
    """Back to shards after a forward without backward: FSDP leaves gathered the parameters of
    units told not to reshard after forward (a pipeline stage's, the root's) for the backward
    that training runs next; an evaluation or a checkpoint must not see them so."""
    for m in module.modules():
        if isinstance(m, FSDPModule):
            m.reshard()
