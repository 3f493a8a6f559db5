"""Everything a run needs before its first step: device, precision, processes, data, model,
optimizer. Whatever can fail on bad input fails here, before the run folder is touched."""
from __future__ import annotations

import resource
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Callable

import torch

from resstream.config import ConfigError
from resstream.data import PreparedData, prepare
from resstream.data.batches import train_batch, val_batches
from resstream.model import LM
from resstream.runs import folder
from resstream.runs.checkpoint import list_checkpoints
from resstream.runs.config import RunConfig
from resstream.runs.init import init_weights, resolve_init_from
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


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"train.device: '{name}' requested but CUDA is not available; use train.device=cpu")
    if name == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("train.device: 'mps' requested but MPS is not available; use train.device=cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """bf16 autocast where the device supports it well (CUDA); fp32 elsewhere."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]


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
    if tc.batch_size % (tc.grad_accum * d.world):
        raise ConfigError(
            f"train.batch_size: {tc.batch_size} sequences cannot be split over grad_accum={tc.grad_accum} x "
            f"{d.world} processes; make it a multiple of {tc.grad_accum * d.world}"
        )
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
    vbatches = val_batches(data.val, tc.eval_batches, max(1, tc.batch_size // tc.grad_accum), tc.seq_len)
    train_batch(data.train, tc.seed, 0, 0, 1, 0, 1, tc.batch_size, tc.seq_len)  # fails early if too short
    if d.is_main:
        folder.prepare_run_dir(out, resume)
    barrier(d)
    model = LM(mcfg)
    torch.manual_seed(tc.seed)
    model.reset_parameters()
    if cfg.init_from is not None and not restart:
        init_weights(model, cfg, say)
    model.to(device)
    token_bytes = torch.as_tensor(data.token_bytes, dtype=torch.float64)
    return Session(cfg, out, d, device, dtype, data, model, make_optimizer(model, tc), vbatches, token_bytes, say)
