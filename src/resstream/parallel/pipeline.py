"""Pipeline parallelism on torch.distributed.pipelining, for every residual kind.

Each rank builds the stages the plan puts on it (``StageBody``), wraps each in FSDP (over
"dp", with parallel.fsdp) or DDP (dp > 1), hands it to a ``PipelineStage`` with static
shapes from the cut plan, and runs one of torch's schedules (GPipe, 1F1B, Interleaved 1F1B)
with a microbatch loss of mean cross-entropy / (microbatches x grad_accum), so the summed
gradients equal the single-process ones without rescaling.

    rank r holds stages r, r+P, ..., r+(V-1)P  ──  one RankStore shared by them
    embedding on rank 0 (stage 0), final norm and head on rank P-1 (stage PV-1)
"""
from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B
from torch.nn.parallel import DistributedDataParallel as DDP

from resstream.model.lm import LM
from resstream.parallel.config import ParallelConfig
from resstream.parallel.fsdp import reshard_all, shard
from resstream.parallel.mesh import Mesh
from resstream.parallel.plan import StagePlan, plan_pipeline, stage_layers
from resstream.parallel.stage import RankStore, StageBody, probe_cuts

EVAL_MB = -1  # the store's key for a forward-only pass

# A stage hands on residual sources that are views (identity autograd nodes). FSDP warns that
# an in-place op on a returned view would skip its hook; the pipeline never modifies stage
# outputs in place (it sends them and runs backward from them), so the warning does not apply.
warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")


@dataclass
class Traffic:
    """Tensors and bytes this rank moved between pipeline stages since the last reset, by
    direction: fwd_sent, fwd_recv (activations), bwd_sent, bwd_recv (their gradients)."""

    counts: dict[str, list[int]] = field(default_factory=lambda: {k: [0, 0] for k in Traffic.KEYS})
    KEYS = ("fwd_sent", "fwd_recv", "bwd_sent", "bwd_recv")

    def add(self, key: str, ops: list) -> None:
        for op in ops:
            self.counts[key][0] += 1
            self.counts[key][1] += op.tensor.numel() * op.tensor.element_size()

    def reset(self) -> None:
        for v in self.counts.values():
            v[0] = v[1] = 0

    def as_list(self) -> list[int]:
        return [n for k in self.KEYS for n in self.counts[k]]


class _Stage(PipelineStage):
    """A PipelineStage that tells the rank's store which microbatch runs, releases a
    microbatch's stored tensors after the rank's last backward of it, and counts traffic."""

    def __init__(self, *args, store: RankStore, traffic: Traffic, releases: bool, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.store, self.traffic, self.releases = store, traffic, releases

    def forward_one_chunk(self, fwd_chunk_id: int, *args, **kwargs):
        self.store.mb = fwd_chunk_id
        return super().forward_one_chunk(fwd_chunk_id, *args, **kwargs)

    def backward_one_chunk(self, bwd_chunk_id: int, *args, **kwargs):
        out = super().backward_one_chunk(bwd_chunk_id, *args, **kwargs)
        if self.releases:  # the rank's lowest stage runs the rank's last backward of a microbatch
            self.store.release(bwd_chunk_id)
        return out

    def get_fwd_send_ops(self, fwd_chunk_id: int):
        ops = super().get_fwd_send_ops(fwd_chunk_id)
        self.traffic.add("fwd_sent", ops)
        return ops

    def get_fwd_recv_ops(self, fwd_chunk_id: int):
        ops = super().get_fwd_recv_ops(fwd_chunk_id)
        self.traffic.add("fwd_recv", ops)
        return ops

    def get_bwd_send_ops(self, bwd_chunk_id: int):
        ops = super().get_bwd_send_ops(bwd_chunk_id)
        self.traffic.add("bwd_sent", ops)
        return ops

    def get_bwd_recv_ops(self, bwd_chunk_id: int):
        ops = super().get_bwd_recv_ops(bwd_chunk_id)
        self.traffic.add("bwd_recv", ops)
        return ops


class RankModule(nn.Module):
    """The parameters one pipeline rank holds, named as in the LM (``sublayers.{l}.*``, ...)."""

    def __init__(self, model: LM, bodies: list[StageBody]) -> None:
        super().__init__()
        self.cfg = model.cfg
        if any(b.is_first for b in bodies):
            self.embed = model.embed
        self.sublayers = nn.ModuleDict({k: m for b in bodies for k, m in b.sublayers.items()})
        self.residual = model.residual
        if any(b.is_last for b in bodies):
            self.final_norm, self.head = model.final_norm, model.head


class Pipeline:
    """This rank's part of a pipeline over the LM ``model`` (built identically on every rank,
    then only this rank's stages are kept). ``microbatch``: (sequences, seq_len) per microbatch."""

    def __init__(self, model: LM, p: ParallelConfig, mesh: Mesh, device: torch.device, microbatch: tuple[int, int],
                 dtype: torch.dtype) -> None:
        self.p, self.mesh, self.device, self.M = p, mesh, device, p.n_microbatches
        n_stages = p.n_stages
        # bf16: FSDP's layers compute in it through their policy, otherwise autocast does; the
        # embedding is fp32 either way
        use_autocast = dtype != torch.float32 and not p.fsdp
        self.autocast = lambda: torch.autocast(device.type, dtype=dtype) if use_autocast else contextlib.nullcontext()
        self.logits_dtype = dtype if use_autocast else torch.float32  # FSDP's root (the head) stays fp32
        model.residual.to(device)
        bounds = stage_layers(model.cfg.n_layers, n_stages)
        cuts = probe_cuts(model.residual, [lo for lo, _ in bounds[1:]], model.cfg.d_model, device, torch.float32, dtype)
        self.plan: list[StagePlan] = plan_pipeline(cuts, bounds, p.pp, p.pp_cache)
        mine = [s for s in self.plan if s.rank == mesh.pp_rank]
        self.store, self.traffic = RankStore(), Traffic()
        self.bodies = [StageBody(model, s, n_stages, self.store) for s in mine]
        self.module = RankModule(model, self.bodies).to(device)
        self.has_first = any(b.is_first for b in self.bodies)
        self.has_last = any(b.is_last for b in self.bodies)
        self.loss_scale = 1.0
        self.stages = [self._stage(b, microbatch, model.cfg.vocab_size, dtype) for b in self.bodies]
        # the loss is scaled by the caller (1 / (microbatches x grad_accum)): no rescaling after
        if p.schedule == "interleaved_1f1b":
            self.schedule = ScheduleInterleaved1F1B(self.stages, self.M, loss_fn=self._loss, scale_grads=False)
        else:
            cls = ScheduleGPipe if p.schedule == "gpipe" else Schedule1F1B
            self.schedule = cls(self.stages[0], self.M, loss_fn=self._loss, scale_grads=False)

    def _stage(self, body: StageBody, microbatch: tuple[int, int], vocab: int, dtype: torch.dtype) -> _Stage:
        s, mesh = body.plan, self.mesh
        B, T = microbatch
        if self.p.fsdp:
            layers = range(s.lo // 2, s.hi // 2)
            shard(body, body.sublayers, layers, mesh.dp_mesh, dtype, reshard_after_forward=False)
            submod = body
        elif mesh.dp > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            submod = DDP(body, device_ids=ids, process_group=mesh.dp_group, forward_sync_buffers=False)
        else:
            submod = body
        act = lambda e: torch.empty((B, T, *e.shape), dtype=e.dtype, device=self.device, requires_grad=True)  # noqa: E731
        inputs = ((torch.zeros((B, T), dtype=torch.long, device=self.device),) if body.is_first
                  else tuple(act(e) for e in s.hop_in.sent_entries()))
        outputs = ((torch.empty((B, T, vocab), dtype=self.logits_dtype, device=self.device, requires_grad=True),) if body.is_last
                   else tuple(act(e) for e in s.hop_out.sent_entries()))
        lowest = s.index == min(b.plan.index for b in self.bodies)
        return _Stage(submod, s.index, self.p.n_stages, self.device, input_args=inputs, output_args=outputs,
                      group=mesh.pp_group, store=self.store, traffic=self.traffic, releases=lowest)

    def _loss(self, logits: Tensor, targets: Tensor) -> Tensor:
        return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-1) * self.loss_scale

    def step(self, x: Tensor, y: Tensor, scale: float) -> Tensor:
        """Forward and backward of one batch (this replica's share) in M microbatches; the
        gradients are summed into .grad with weight ``scale``. Returns scale x mean loss on
        the rank holding the last stage, 0 elsewhere (float64, CPU)."""
        self.loss_scale = scale / self.M
        losses: list[Tensor] = []
        args = (x,) if self.has_first else ()
        with self.autocast():
            self.schedule.step(*args, target=y if self.has_last else None, losses=losses, return_outputs=False)
        assert len(self.store) == 0, "stored tensors outlived their microbatch"
        return torch.stack([l.detach().double().cpu() for l in losses]).sum() if losses else torch.zeros((), dtype=torch.float64)

    @torch.no_grad()
    def forward(self, x: Tensor) -> Tensor | None:
        """Logits of x through the whole pipeline, on the rank holding the last stage (None
        elsewhere): the stages run in order, each handing its cut to the next rank."""
        B, T = x.shape
        out: tuple | Tensor = (x,)
        self.store.mb = EVAL_MB
        for stage, body in zip(self.stages, self.bodies):
            s = body.plan
            if not body.is_first:
                src = self.mesh.global_rank((s.rank - 1) % self.mesh.pp)
                out = tuple(torch.empty((B, T, *e.shape), dtype=e.dtype, device=self.device) for e in s.hop_in.sent_entries())
                for t in out:
                    dist.recv(t, src=src)
            with self.autocast():
                out = stage.submod(*out)
            if not body.is_last:
                dst = self.mesh.global_rank((s.rank + 1) % self.mesh.pp)
                for t in out:
                    dist.send(t.contiguous(), dst=dst)
        self.store.release(EVAL_MB)
        for body in self.bodies:
            reshard_all(body)
        return out if self.has_last else None
