"""The ``[parallel]`` config section: how one run spreads over the processes torchrun starts.

Data-parallel degree = world size / (pp x tp). What can be checked without knowing the world size
is checked here; ``check_layout`` checks the rest once the processes are known.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from resstream.config import ConfigBase, ConfigError, require

SCHEDULES = ("gpipe", "1f1b", "interleaved_1f1b")


@dataclass
class ParallelConfig(ConfigBase):
    """fsdp: shard parameters, gradients and optimizer state over the data-parallel ranks (FSDP2).
    pp: pipeline degree P, processes per pipeline; the model is cut into pp * virtual_stages stages.
    virtual_stages: stages per process V (needs schedule=interleaved_1f1b when > 1).
    schedule: gpipe, 1f1b or interleaved_1f1b (torch.distributed.pipelining schedules).
    microbatches: microbatches per pipeline step (None: pp).
    pp_cache: AttnRes cross-stage caching: a stage boundary carries only the residual-history
    tensors the receiving process has not seen (paper section 4.1); false sends the full state.
    tp: tensor-parallel degree (ranks that split each attention's heads and each MLP's hidden
    units, resstream.parallel.tensor); 1 = off. Composes with data parallelism (DDP semantics).
    """

    fsdp: bool = False
    pp: int = 1
    virtual_stages: int = 1
    schedule: str = "1f1b"
    microbatches: Optional[int] = None
    pp_cache: bool = True
    tp: int = 1

    def validate(self) -> None:
        require(self.pp >= 1, f"parallel.pp: must be >= 1 (pipeline stages), got {self.pp}")
        require(self.virtual_stages >= 1, f"parallel.virtual_stages: must be >= 1, got {self.virtual_stages}")
        require(self.schedule in SCHEDULES, f"parallel.schedule: must be one of {', '.join(SCHEDULES)}, got '{self.schedule}'")
        require(self.tp >= 1, f"parallel.tp: must be >= 1 (1 = no tensor parallelism), got {self.tp}")
        require(self.tp == 1 or not (self.fsdp or self.pp > 1),
                f"parallel.tp: tensor parallelism ({self.tp}) composes with data parallelism only, not yet with "
                "parallel.fsdp or parallel.pp > 1; set parallel.tp=1 or use DDP (fsdp=false, pp=1)")
        require(self.microbatches is None or self.microbatches >= 1, f"parallel.microbatches: must be >= 1, got {self.microbatches}")
        if self.pp == 1:
            require(self.virtual_stages == 1, "parallel.virtual_stages: needs parallel.pp > 1 (stages are cut per pipeline process)")
            require(self.microbatches is None, "parallel.microbatches: only used with parallel.pp > 1; use train.grad_accum to split a step")
        require(self.virtual_stages == 1 or self.schedule == "interleaved_1f1b",
                f"parallel.virtual_stages: {self.virtual_stages} needs parallel.schedule=interleaved_1f1b "
                f"({self.schedule} runs one stage per process)")

    @property
    def n_microbatches(self) -> int:
        return self.pp if self.microbatches is None else self.microbatches

    @property
    def n_stages(self) -> int:
        return self.pp * self.virtual_stages

    @property
    def distributed_model(self) -> bool:
        """True when parameters are split over processes (FSDP or pipeline), so checkpoints are sharded."""
        return self.fsdp or self.pp > 1


def check_layout(p: ParallelConfig, world: int, n_layers: int, batch_size: int, grad_accum: int, compile: bool) -> None:
    """Everything about ``p`` that depends on the number of processes and the model; one-line ConfigErrors."""
    procs = f"{world} process" + ("es" if world != 1 else "")
    require(world % p.tp == 0 and (p.tp == 1 or world > 1),
            f"parallel.tp: tensor parallelism of {p.tp} needs a multiple of {p.tp} processes, got the {procs}; "
            f"launch with torchrun --nproc_per_node={p.tp} (or a multiple) or set parallel.tp=1")
    require(world % p.pp == 0, f"parallel.pp: {p.pp} pipeline stages do not divide the {procs}; "
            f"launch a multiple of {p.pp} (torchrun --nproc_per_node=N) or change parallel.pp")
    require(p.n_stages <= n_layers, f"parallel.pp x parallel.virtual_stages = {p.n_stages} stages but model.n_layers = "
            f"{n_layers}: every stage needs at least one transformer layer; use fewer stages or more layers")
    if p.pp > 1 and p.schedule == "interleaved_1f1b":
        rounds = max(1, p.n_microbatches // p.pp)
        require(p.n_microbatches % rounds == 0, f"parallel.microbatches: interleaved_1f1b needs a multiple of "
                f"{rounds} (rounds of {p.pp} microbatches), got {p.n_microbatches}")
    dp = world // (p.pp * p.tp)
    split = grad_accum * dp * (p.n_microbatches if p.pp > 1 else 1)
    if batch_size % split:
        raise ConfigError(f"train.batch_size: {batch_size} sequences cannot be split into grad_accum={grad_accum} x "
                          f"{dp} data-parallel ranks x {p.n_microbatches if p.pp > 1 else 1} microbatches; "
                          f"make it a multiple of {split}")
    require(not (compile and (p.fsdp or p.pp > 1 or p.tp > 1)), "train.compile: not supported with parallel.fsdp, "
            "parallel.pp > 1 or parallel.tp > 1 "
            "(untested combination); set train.compile=false")
