"""Everything a run needs before its first step: device, precision, processes and their
layout, data, model, optimizer. Whatever can fail on bad input fails here, before the run
folder is touched."""
from __future__ import annotations

import resource
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Callable

import torch

from resstream.config import DTYPES, ConfigError, DataConfig, TrainConfig
from resstream.data import PreparedData, prepare
from resstream.data.batches import train_batch, val_batches
from resstream.model import LM
from resstream.model.config import ModelConfig
from resstream.model.memory import check_memory
from resstream.parallel.config import check_layout
from resstream.parallel.mesh import build_mesh
from resstream.parallel.runtime import Runtime, make_runtime
from resstream.parallel.tensor import check_tp
from resstream.runs import folder
from resstream.runs.checkpoint import list_checkpoints
from resstream.runs.config import RunConfig
from resstream.runs.lock import RunLock
from resstream.runtime import tune_allocator
from resstream.runs.init import init_weights, resolve_init_from
from resstream.train.distributed import Dist, barrier, init_distributed
from resstream.train.optim import make_optimizer


@dataclass
class Session:
    """One run's live objects, shared by the loop's steps. ``rt`` runs the model, whatever
    the layout (parallel/runtime.py); ``model_meta``: the whole model's config and sizes."""

    cfg: RunConfig
    out: Path
    d: Dist
    device: torch.device
    dtype: torch.dtype
    data: PreparedData
    rt: Runtime
    model_meta: dict
    opt: torch.optim.Optimizer
    vbatches: list
    token_bytes: torch.Tensor
    say: Callable[[str], None]
    lock: RunLock | None = None  # the run folder's, held by the main rank until the run ends


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"train.device: '{name}' requested but CUDA is not available; use train.device=cpu")
    if name == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("train.device: 'mps' requested but MPS is not available; use train.device=cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """The autocast precision: ``auto`` is bf16 where the device supports it well (CUDA) and
    fp32 elsewhere; bf16/bfloat16 asks for bf16 autocast on any device (CPU included)."""
    name = DTYPES[name]
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    return getattr(torch, name)


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB -> MiB


def default_run_dir(cfg: RunConfig) -> Path:
    return Path("runs") / f"{cfg.name}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


def _processes(cfg: RunConfig) -> tuple[Dist, torch.device, torch.dtype]:
    tc = cfg.train
    device = resolve_device(tc.device)
    dtype = resolve_dtype(tc.dtype, device)
    d = init_distributed(device.type)
    if d.enabled and device.type == "cuda":
        device = torch.device("cuda", d.local_rank)
        torch.cuda.set_device(device)
    n_layers = cfg.model_config(cfg.model.get("vocab_size", 2)).n_layers  # any vocabulary gives the depth
    check_layout(cfg.parallel, d.world, n_layers, tc.batch_size, tc.grad_accum, tc.compile)
    return d, device, dtype


def setup_session(cfg: RunConfig, out: Path | str | None, resume: bool, log: Callable[[str], None]) -> Session:
    """Prepare data and check the shapes (on every rank), then the run folder (main rank), then
    build the model: the same seed gives every residual kind the same non-residual weights (the
    stream initialises its own parameters after the rest), which sharpens paired comparisons."""
    out = Path(out) if out is not None else default_run_dir(cfg)
    restart = resume and bool(list_checkpoints(out))  # the saved config is resolved; the checkpoint has every weight
    if not restart:
        cfg = resolve_init_from(cfg)  # a pretrained model's shape and tokenizer, when continuing one
    tc = cfg.train
    tune_allocator()  # activations reused from step to step instead of page-faulted in again
    d, device, dtype = _processes(cfg)
    say = log if d.is_main else (lambda s: None)
    if d.is_main:
        data = prepare(cfg.data, log=say)
    barrier(d)
    if not d.is_main:
        data = prepare(cfg.data, log=None)
    mcfg = cfg.model_config(data.vocab_size)
    if tc.seq_len > mcfg.max_seq_len:
        raise ConfigError(f"train.seq_len: {tc.seq_len} exceeds model.max_seq_len {mcfg.max_seq_len}; raise model.max_seq_len")
    if cfg.parallel.tp > 1:
        check_tp(mcfg, cfg.parallel.tp)
    check_run_memory(tc, mcfg, d.world // (cfg.parallel.pp * cfg.parallel.tp), device)
    vbatches = val_batches(data.val, tc.eval_batches, max(1, tc.batch_size // tc.grad_accum), tc.seq_len)
    train_batch(data.train, tc.seed, 0, 0, 1, 0, 1, tc.batch_size, tc.seq_len)  # fails early if too short
    lock = folder.claim_run_dir(out, resume) if d.is_main else None
    try:
        barrier(d)
        rt, meta = _runtime(cfg, mcfg, device, dtype, say if cfg.init_from is not None and not restart else None)
    except BaseException:
        if lock is not None:
            folder.discard_unstarted(out, lock)
            lock.release()
        raise
    token_bytes = torch.as_tensor(data.token_bytes, dtype=torch.float64)
    return Session(cfg, out, d, device, dtype, data, rt, meta, make_optimizer(rt.module, tc), vbatches, token_bytes, say, lock)


def _runtime(cfg: RunConfig, mcfg: ModelConfig, device: torch.device, dtype: torch.dtype,
             init_say: Callable[[str], None] | None = None) -> tuple[Runtime, dict]:
    """The whole model, built the same way on every rank, handed to the runtime of the run's
    layout (which keeps this rank's part); plus what config.json records about the model.
    ``init_say``: given when the weights come from cfg.init_from (a new run continuing a
    pretrained model), which is told what was loaded."""
    tc, p = cfg.train, cfg.parallel
    model = LM(mcfg)
    torch.manual_seed(tc.seed)
    model.reset_parameters()
    if init_say is not None:
        init_weights(model, cfg, init_say)
    meta = {"model": mcfg.to_dict(), "params": model.num_params(), "params_residual": model.num_params(residual_only=True)}
    mesh = build_mesh(p, device)
    per_replica = tc.batch_size // (tc.grad_accum * mesh.dp)
    microbatch = (per_replica // p.n_microbatches if p.pp > 1 else per_replica, tc.seq_len)
    return make_runtime(model, p, mesh, device, dtype, microbatch, tc.compile), meta


def check_run_memory(tc: TrainConfig, mcfg: ModelConfig, world: int, device: torch.device) -> None:
    """Refuse, before anything is allocated, a model and batch that cannot fit (model/memory.py).
    ``world``: the processes a batch is split over. The whole model is counted on each process,
    which overestimates what FSDP or a pipeline leaves on one."""
    knobs = {
        "data.vocab_size": (mcfg.vocab_size, DataConfig.vocab_size, {"weights": 1, "activations": 1}),
        "train.batch_size": (tc.batch_size, TrainConfig.batch_size, {"activations": 1}),
        "train.seq_len": (tc.seq_len, TrainConfig.seq_len, {"activations": 1}),
    }
    check_memory(mcfg, max(1, tc.batch_size // (tc.grad_accum * world)), tc.seq_len, device, training=True, knobs=knobs)
