"""One training process's view of the model, whatever the layout: a step's forward and
backward, the gradients no wrapper synchronises, the global gradient norm, evaluation.

    single process / DDP (pp = 1)   LocalRuntime     the whole LM; DDP averages gradients
    FSDP (pp = 1)                   ShardedRuntime   the LM, one FSDP unit per layer
    pipeline (pp > 1)               PipelineRuntime  this rank's stages; FSDP or DDP over dp
    tensor parallel (tp > 1)        TensorRuntime    heads and MLP units split over tp; DDP-like over dp

The trainer sees only this interface: it never learns which layout (or residual kind) runs.
"""
from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel as DDP

from resstream.model.lm import LM
from resstream.parallel.config import ParallelConfig
from resstream.parallel.fsdp import reshard_all, shard
from resstream.parallel.grads import clip_grad_norm, local, sync_replicated, sync_tied
from resstream.parallel.mesh import Mesh
from resstream.parallel.pipeline import Pipeline, Traffic
from resstream.parallel import tensor as tp_


class Runtime:
    """``module``: the parameters this process optimises and checkpoints, named as in the LM.
    ``replica``/``replicas``: this process's data-parallel slot (which slice of a batch it reads).
    ``sharded``: parameters are split over processes (FSDP or pipeline): checkpoints are
    written by every rank (torch.distributed.checkpoint)."""

    module: nn.Module
    sharded: bool = False
    lockstep: bool = False  # evaluation forwards are collective: every replica runs as many

    def __init__(self, mesh: Mesh, device: torch.device) -> None:
        self.mesh, self.device = mesh, device
        self.replica, self.replicas = mesh.dp_rank, mesh.dp

    def start_step(self) -> None:
        """Called before the first forward of each optimizer step."""

    def forward_backward(self, x: Tensor, y: Tensor, scale: float, sync: bool) -> Tensor:
        """Add scale x d(mean loss)/d(params) to .grad; returns scale x mean loss (float64, CPU;
        0 on processes that do not compute the loss). ``sync``: the last one of a step."""
        raise NotImplementedError

    def finish_backward(self) -> None:
        """Synchronise what no wrapper does, once per step after the last backward."""

    def clip_grad_norm(self, max_norm: float) -> float:
        raise NotImplementedError

    def logits(self, x: Tensor) -> Tensor | None:
        """Forward only (no grad); None on processes that do not hold the head."""
        raise NotImplementedError

    def params_finite(self) -> bool:
        """Every parameter finite on every rank (collective: ranks must agree whether to save)."""
        ok = all(bool(torch.isfinite(local(p)).all()) for p in self.module.parameters())
        bad = torch.tensor(0.0 if ok else 1.0, dtype=torch.float64)
        return self.mesh.all_reduce(bad).item() == 0

    def mean_loss(self, loss: Tensor) -> float:
        """The step's loss averaged over replicas, from each process's forward_backward sum."""
        return (self.mesh.all_reduce(loss) / self.replicas).item()

    def full_state(self, opt: torch.optim.Optimizer) -> tuple[dict, dict]:
        """Model and optimizer state dicts of full tensors, for a plain checkpoint (collective
        under tensor parallelism: every rank calls it)."""
        return self.module.state_dict(), opt.state_dict()

    def traffic(self) -> dict | None:
        """Per rank, tensors and bytes sent/received between pipeline stages in the last
        step (collective: every rank calls it); None without a pipeline."""
        return None

    @torch.no_grad()
    def evaluate(self, batches: list, token_bytes: Tensor) -> tuple[float, float]:
        """Validation loss (nats/token) and bits per byte over ``batches``, split over replicas."""
        was_training = self.module.training
        self.module.eval()
        sums = torch.zeros(3, dtype=torch.float64)
        for start in range(0, len(batches), self.replicas):
            j = start + self.replica
            if j >= len(batches) and not self.lockstep:
                continue
            x, y = batches[j] if j < len(batches) else batches[start]  # a stand-in keeps collectives in step
            logits = self.logits(x.to(self.device))
            if logits is None or j >= len(batches):
                continue
            nats = F.cross_entropy(logits.float().flatten(0, 1), y.to(self.device).flatten(), reduction="sum")
            sums += torch.tensor([nats.item(), y.numel(), token_bytes[y.cpu()].sum().item()], dtype=torch.float64)
        sums = self.mesh.all_reduce(sums)
        self.module.train(was_training)
        nats, count, nbytes = sums.tolist()
        return nats / count, nats / math.log(2) / max(nbytes, 1.0)


def _autocast(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    return torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()


class LocalRuntime(Runtime):
    """The whole model in every process; DDP averages gradients when there are several."""

    def __init__(self, model: LM, mesh: Mesh, device: torch.device, dtype: torch.dtype, compile: bool) -> None:
        super().__init__(mesh, device)
        self.module = model
        ids = [device.index] if device.type == "cuda" else None
        self.fwd = DDP(model, device_ids=ids) if mesh.world > 1 else model
        if compile:
            self.fwd = torch.compile(self.fwd)
        self.autocast = lambda: _autocast(device, dtype)

    def forward_backward(self, x: Tensor, y: Tensor, scale: float, sync: bool) -> Tensor:
        no_sync = self.fwd.no_sync() if self.mesh.world > 1 and not sync else contextlib.nullcontext()
        with no_sync:
            with self.autocast():
                _, loss = self.fwd(x, y)
            (loss * scale).backward()
        return loss.detach().double().cpu() * scale

    def clip_grad_norm(self, max_norm: float) -> float:
        return torch.nn.utils.clip_grad_norm_(self.module.parameters(), max_norm).item()

    def logits(self, x: Tensor) -> Tensor:
        with self.autocast():
            return self.module(x)


class ShardedRuntime(Runtime):
    """FSDP2 over every process: one unit per transformer layer, the rest in the root; the
    residual stream's parameters replicated (see parallel.grads)."""

    sharded = lockstep = True

    def __init__(self, model: LM, mesh: Mesh, device: torch.device, dtype: torch.dtype) -> None:
        super().__init__(mesh, device)
        self.replicated = list(model.residual.parameters())
        shard(model, model.sublayers, range(model.cfg.n_layers), mesh.dp_mesh, dtype, reshard_after_forward=True,
              ignored=set(self.replicated))
        self.module = model

    def forward_backward(self, x: Tensor, y: Tensor, scale: float, sync: bool) -> Tensor:
        _, loss = self.module(x, y)
        (loss * scale).backward()
        return loss.detach().double().cpu() * scale

    def finish_backward(self) -> None:
        sync_replicated(self.replicated, self.mesh)

    def clip_grad_norm(self, max_norm: float) -> float:
        return clip_grad_norm(self.module, max_norm, self.mesh, {id(p) for p in self.replicated}, set(), sharded=True)

    def logits(self, x: Tensor) -> Tensor:
        logits = self.module(x)
        reshard_all(self.module)
        return logits


class PipelineRuntime(Runtime):
    """This rank's pipeline stages (see parallel.pipeline)."""

    sharded = lockstep = True

    def __init__(self, model: LM, p: ParallelConfig, mesh: Mesh, device: torch.device, dtype: torch.dtype,
                 microbatch: tuple[int, int]) -> None:
        super().__init__(mesh, device)
        self.pipe = Pipeline(model, p, mesh, device, microbatch, dtype)
        self.module, self.fsdp = self.pipe.module, p.fsdp
        self.replicated = list(model.residual.parameters())
        # a tied embedding/head is cut apart: stage 0 holds it as embed, the last stage as head
        tied = model.cfg.tie_embeddings
        self.tied = (self.module.embed.weight if self.pipe.has_first else self.module.head.weight
                     if self.pipe.has_last else None) if tied else None
        self.tied_copy = {id(self.module.head.weight)} if tied and self.pipe.has_last else set()

    def start_step(self) -> None:
        self.pipe.traffic.reset()

    def forward_backward(self, x: Tensor, y: Tensor, scale: float, sync: bool) -> Tensor:
        return self.pipe.step(x, y, scale)

    def finish_backward(self) -> None:
        sync_replicated(self.replicated, self.mesh)
        sync_tied(self.tied, self.mesh)

    def clip_grad_norm(self, max_norm: float) -> float:
        return clip_grad_norm(self.module, max_norm, self.mesh, {id(p) for p in self.replicated}, self.tied_copy,
                              sharded=self.fsdp)

    def logits(self, x: Tensor) -> Tensor | None:
        return self.pipe.forward(x)

    def traffic(self) -> dict:
        counts = torch.tensor(self.pipe.traffic.as_list(), dtype=torch.float64)
        everyone = torch.zeros(self.mesh.world, counts.numel(), dtype=torch.float64)
        everyone[self.mesh.rank] = counts
        everyone = self.mesh.all_reduce(everyone).long()
        names = [f"pp_{k}_{u}" for k in Traffic.KEYS for u in ("tensors", "bytes")]
        return {name: everyone[:, i].tolist() for i, name in enumerate(names)}


class TensorRuntime(Runtime):
    """Tensor parallelism (parallel.tensor): every rank holds its heads and MLP units as
    DTensors, the rest replicated; TP peers read the same batch, dp replicas different ones."""

    lockstep = True

    def __init__(self, model: LM, mesh: Mesh, device: torch.device, dtype: torch.dtype) -> None:
        super().__init__(mesh, device)
        self.module = tp_.parallelize(model, mesh.tp_mesh)
        if mesh.dp > 1:  # before the optimizer is built: replicate swaps in new parameters
            tp_.replicate_over_dp(model, mesh.dp_mesh)
        self.autocast = lambda: _autocast(device, dtype)

    def forward_backward(self, x: Tensor, y: Tensor, scale: float, sync: bool) -> Tensor:
        with tp_.gradient_sync(self.module, enabled=sync):
            with self.autocast():
                _, loss = self.module(x, y)
            (loss * scale).backward()
        return loss.detach().double().cpu() * scale

    def mean_loss(self, loss: Tensor) -> float:
        return (self.mesh.all_reduce(loss) / self.mesh.world).item()  # TP peers hold the same loss

    def clip_grad_norm(self, max_norm: float) -> float:
        return tp_.clip_grad_norm(self.module.parameters(), max_norm)  # DTensors: each shard counted once

    def logits(self, x: Tensor) -> Tensor:
        with self.autocast():
            return self.module(x)

    def full_state(self, opt: torch.optim.Optimizer) -> tuple[dict, dict]:
        return tp_.full_state(self.module.state_dict()), tp_.full_state(opt.state_dict())


def make_runtime(model: LM, p: ParallelConfig, mesh: Mesh, device: torch.device, dtype: torch.dtype,
                 microbatch: tuple[int, int], compile: bool = False) -> Runtime:
    """The runtime for ``p`` on ``mesh``. ``model``: the full LM, built and initialised the same
    way on every rank; ``microbatch``: (sequences, seq_len) per pipeline microbatch."""
    if p.pp > 1:  # only this rank's stages move to the device
        return PipelineRuntime(model, p, mesh, device, dtype, microbatch)
    model.to(device)
    if p.tp > 1:
        return TensorRuntime(model, mesh, device, dtype)
    if p.fsdp and mesh.world > 1:
        return ShardedRuntime(model, mesh, device, dtype)
    return LocalRuntime(model, mesh, device, dtype, compile)
