"""Everything a run needs before its first step: device, precision, processes, data, model,
optimizer. Whatever can fail on bad input fails here, before the run folder is touched."""
from __future__ import annotations

import dataclasses
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
from resstream.parallel import tensor as tp_
from resstream.runs import folder
from resstream.runs.config import RunConfig
from resstream.runs.lock import RunLock
from resstream.train.distributed import Dist, barrier, init_distributed
from resstream.train.optim import make_optimizer


@dataclass
class Session:
    """One run's live objects, shared by the loop's steps."""

    cfg: RunConfig
    out: Path
    d: Dist
    device: torch.device
    dtype: torch.dtype
    data: PreparedData
    model: LM
    opt: torch.optim.Optimizer
    vbatches: list
    token_bytes: torch.Tensor
    say: Callable[[str], None]
    lock: RunLock | None = None  # the run folder's, held by the main rank until the run ends
    mesh: object = None  # the (dp, tp) DeviceMesh under tensor parallelism, else None


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


def _processes(cfg: RunConfig) -> tuple[Dist, torch.device, torch.dtype, object]:
    tc = cfg.train
    device = resolve_device(tc.device)
    dtype = resolve_dtype(tc.dtype, device)
    d = init_distributed(device.type)
    if d.enabled and device.type == "cuda":
        device = torch.device("cuda", d.local_rank)
        torch.cuda.set_device(device)
    mesh = None
    if cfg.parallel.tp > 1:  # tensor-parallel peers share their batch: data splits over dp
        mesh = tp_.make_mesh(device.type, cfg.parallel.tp)
        d = dataclasses.replace(d, data_rank=mesh["dp"].get_local_rank(), data_world=mesh["dp"].size())
    if tc.batch_size % (tc.grad_accum * d.data_world):
        raise ConfigError(
            f"train.batch_size: {tc.batch_size} sequences cannot be split over grad_accum={tc.grad_accum} x "
            f"{d.data_world} data-parallel processes; make it a multiple of {tc.grad_accum * d.data_world}"
        )
    return d, device, dtype, mesh


def setup_session(cfg: RunConfig, out: Path | str | None, resume: bool, log: Callable[[str], None]) -> Session:
    """Prepare data and check the shapes (on every rank), then the run folder (main rank), then
    build the model: the same seed gives every residual kind the same non-residual weights (the
    stream initialises its own parameters after the rest), which sharpens paired comparisons."""
    tc = cfg.train
    d, device, dtype, mesh = _processes(cfg)
    out = Path(out) if out is not None else default_run_dir(cfg)
    say = log if d.is_main else (lambda s: None)
    if d.is_main:
        data = prepare(cfg.data, log=say)
    barrier(d)
    if not d.is_main:
        data = prepare(cfg.data, log=None)
    mcfg = cfg.model_config(data.vocab_size)
    if tc.seq_len > mcfg.max_seq_len:
        raise ConfigError(f"train.seq_len: {tc.seq_len} exceeds model.max_seq_len {mcfg.max_seq_len}; raise model.max_seq_len")
    if mesh is not None:
        tp_.check_tp(mcfg, cfg.parallel.tp)
    check_run_memory(tc, mcfg, d.data_world, device)
    vbatches = val_batches(data.val, tc.eval_batches, max(1, tc.batch_size // tc.grad_accum), tc.seq_len)
    train_batch(data.train, tc.seed, 0, 0, 1, 0, 1, tc.batch_size, tc.seq_len)  # fails early if too short
    lock = folder.claim_run_dir(out, resume) if d.is_main else None
    try:
        barrier(d)
        model = LM(mcfg)
        torch.manual_seed(tc.seed)
        model.reset_parameters()
        model.to(device)
        if mesh is not None:
            tp_.parallelize(model, mesh["tp"])
            if mesh["dp"].size() > 1:  # before the optimizer: replicate swaps in new parameters
                tp_.replicate_over_dp(model, mesh["dp"])
    except BaseException:
        if lock is not None:
            folder.discard_unstarted(out, lock)
            lock.release()
        raise
    token_bytes = torch.as_tensor(data.token_bytes, dtype=torch.float64)
    return Session(cfg, out, d, device, dtype, data, model, make_optimizer(model, tc), vbatches, token_bytes, say, lock, mesh)


def check_run_memory(tc: TrainConfig, mcfg: ModelConfig, world: int, device: torch.device) -> None:
    """Refuse, before anything is allocated, a model and batch that cannot fit (model/memory.py)."""
    knobs = {
        "data.vocab_size": (mcfg.vocab_size, DataConfig.vocab_size, {"weights": 1, "activations": 1}),
        "train.batch_size": (tc.batch_size, TrainConfig.batch_size, {"activations": 1}),
        "train.seq_len": (tc.seq_len, TrainConfig.seq_len, {"activations": 1}),
    }
    check_memory(mcfg, max(1, tc.batch_size // (tc.grad_accum * world)), tc.seq_len, device, training=True, knobs=knobs)
