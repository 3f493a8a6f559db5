"""The training loop. It knows nothing of residual kinds: it trains an LM from a RunConfig.

    prepare data ─► build model (seeded) ─► [resume] ─► for step: lr, micro-batches,
    backward, clip, AdamW ─► log / evaluate (loss, bits per byte) / checkpoint

Batches are a pure function of (seed, step), so resuming from a checkpoint reproduces the
uninterrupted run step for step, and every kind in a comparison sees the same data.
"""
from __future__ import annotations

import contextlib
import json
import math
import resource
import shutil
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm.auto import tqdm

import resstream
from resstream.config import ConfigError
from resstream.runs.config import RunConfig
from resstream.model import LM
from resstream.train.batches import train_batch, val_batches
from resstream.train.checkpoint import (
    atomic_write_text,
    latest_good_checkpoint,
    load_model_state,
    optimizer_from_tensors,
    save_checkpoint,
)
from resstream.train.distributed import Dist, all_reduce_sum, barrier, init_distributed
from resstream.train.optim import lr_at, make_optimizer

# Settings that may change when resuming (they do not alter the computation of a step).
RESUMABLE_KEYS = {"train.steps", "train.eval_every", "train.save_every", "train.log_every", "train.keep_last"}


@dataclass
class RunResult:
    run_dir: Path
    status: str  # finished | diverged | interrupted
    step: int  # steps completed
    last_good_step: int
    val_loss: float | None
    val_bpb: float | None
    tokens_per_s: float
    peak_mem_mb: float
    wall_s: float


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("cpu")
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


def _prepare_run_dir(out: Path, resume: bool) -> None:
    if resume:
        if not (out / "config.json").is_file():
            raise ConfigError(f"cannot resume: '{out}' is not a run folder (no config.json)")
        return
    if (out / "config.json").exists():
        raise ConfigError(f"'{out}' already holds a run; resume it with --resume {out} or choose another --out")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"cannot write the run folder '{out}': {e.strerror}; choose another --out") from None


def _truncate_metrics(path: Path, step: int) -> None:
    """On resume, drop rows logged after the checkpoint we restart from."""
    if not path.exists():
        return
    rows = [line for line in path.read_text().splitlines() if line.strip()]
    kept = [r for r in rows if json.loads(r).get("step", 0) <= step]
    atomic_write_text(path, "".join(r + "\n" for r in kept))


@torch.no_grad()
def evaluate(model: LM, batches, token_bytes: torch.Tensor, device, dtype, d: Dist) -> tuple[float, float]:
    """Validation loss (nats per token) and bits per byte over fixed batches, split across ranks."""
    was_training = model.training
    model.eval()
    sums = torch.zeros(3, dtype=torch.float64)
    for i, (x, y) in enumerate(batches):
        if i % d.world != d.rank:
            continue
        x, y = x.to(device), y.to(device)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            logits = model(x)
        nats = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="sum")
        sums += torch.tensor([nats.item(), y.numel(), token_bytes[y.cpu()].sum().item()], dtype=torch.float64)
    if d.enabled:
        sums = all_reduce_sum(sums, d)
    model.train(was_training)
    nats, count, nbytes = sums.tolist()
    return nats / count, nats / math.log(2) / max(nbytes, 1.0)


def train(
    cfg: RunConfig,
    out: Path | str | None = None,
    resume: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = print,
    stop_after: int | None = None,
) -> RunResult:
    """Train (or resume) one run into the folder ``out``. ``stop_after`` ends the process's
    work after that many steps as if interrupted (used by tests of exact resume)."""
    from resstream.data import prepare

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
    out = Path(out) if out is not None else default_run_dir(cfg)
    say = log if d.is_main else (lambda s: None)

    # Everything that can fail on bad input happens before the run folder is touched.
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
        _prepare_run_dir(out, resume)
    barrier(d)

    model = LM(mcfg)
    # Same seed -> same non-residual weights for every residual kind (the stream initialises
    # its own parameters after the rest), which makes paired comparisons sharper.
    torch.manual_seed(tc.seed)
    model.reset_parameters()
    model.to(device)
    opt = make_optimizer(model, tc)
    token_bytes = torch.as_tensor(data.token_bytes, dtype=torch.float64)

    step = 0
    if resume:
        found = latest_good_checkpoint(out, warn=say)
        if found is not None:
            _, state, model_sd, opt_sd = found
            load_model_state(model, model_sd)
            rng = {k: v for k, v in opt_sd.items() if k.startswith("rng.")}
            optimizer_from_tensors(opt, {k: v for k, v in opt_sd.items() if not k.startswith("rng.")}, state["optimizer"])
            torch.set_rng_state(rng["rng.cpu"])
            step = state["step"]
            say(f"resuming {out} from step {step}")
        else:
            say(f"no usable checkpoint in {out}; starting from step 0")
        if d.is_main:
            _truncate_metrics(out / "metrics.jsonl", step)
    if d.is_main:
        meta = {
            "run": cfg.to_dict(),
            "model": mcfg.to_dict(),
            "data_dir": str(data.dir),
            "data_stats": data.stats,
            "config_hash": cfg.hash(),
            "resstream": resstream.__version__,
            "torch": torch.__version__,
            "world_size": d.world,
            "device": str(device),
            "dtype": str(dtype).replace("torch.", ""),
            "params": model.num_params(),
            "params_residual": model.num_params(residual_only=True),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        atomic_write_text(out / "config.json", json.dumps(meta, indent=1))
        if data.tokenizer_path != out / "tokenizer.json":
            shutil.copyfile(data.tokenizer_path, out / "tokenizer.json")
        _write_status(out, "running", step)

    fwd = DDP(model) if d.enabled else model
    if tc.compile:
        fwd = torch.compile(fwd)
    n_micro = tc.grad_accum
    tokens_per_step = tc.batch_size * tc.seq_len
    metrics_path = out / "metrics.jsonl"
    bar = tqdm(total=tc.steps, initial=step, disable=not (progress and d.is_main), unit="step", dynamic_ncols=True, file=sys.stderr)
    train_time, window_loss, window_steps, window_time = 0.0, 0.0, 0, 0.0
    status, last_val = "finished", (None, None)
    t_start = time.perf_counter()
    last_good = step
    steps_this_call = 0
    try:
        while step < tc.steps:
            t0 = time.perf_counter()
            lr = lr_at(step, tc)
            for g in opt.param_groups:
                g["lr"] = lr
            loss_sum = torch.zeros((), dtype=torch.float64)
            for micro in range(n_micro):
                x, y = train_batch(data.train, tc.seed, step, micro, n_micro, d.rank, d.world, tc.batch_size, tc.seq_len)
                x, y = x.to(device), y.to(device)
                sync = contextlib.nullcontext() if (not d.enabled or micro == n_micro - 1) else fwd.no_sync()
                with sync:
                    with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                        _, loss = fwd(x, y)
                    (loss / n_micro).backward()
                loss_sum += loss.detach().double().cpu() / n_micro
            clip = tc.grad_clip if tc.grad_clip > 0 else float("inf")
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip).item()
            train_loss = (all_reduce_sum(loss_sum, d) / d.world).item()
            if not (math.isfinite(train_loss) and math.isfinite(grad_norm)):
                status = "diverged"
                say(f"run diverged at step {step} (loss {train_loss}, grad norm {grad_norm}); last good step {last_good}")
                break
            opt.step()
            opt.zero_grad(set_to_none=True)
            dt = time.perf_counter() - t0
            step += 1
            steps_this_call += 1
            last_good = step
            train_time += dt
            window_loss, window_steps, window_time = window_loss + train_loss, window_steps + 1, window_time + dt
            row = {}
            if step % tc.log_every == 0 or step == tc.steps:
                row.update(
                    train_loss=window_loss / window_steps, lr=lr, grad_norm=grad_norm,
                    tokens_per_s=window_steps * tokens_per_step / window_time,
                )
                window_loss, window_steps, window_time = 0.0, 0, 0.0
            if step % tc.eval_every == 0 or step == tc.steps:
                last_val = evaluate(model, vbatches, token_bytes, device, dtype, d)
                row.update(val_loss=last_val[0], val_bpb=last_val[1])
            if row and d.is_main:
                row = {"step": step, "tokens": step * tokens_per_step, **row,
                       "peak_mem_mb": peak_memory_mb(device), "elapsed_s": time.perf_counter() - t_start}
                with open(metrics_path, "a") as f:
                    f.write(json.dumps(row) + "\n")
                bar.set_postfix({k: f"{row[k]:.3f}" for k in ("train_loss", "val_bpb") if k in row}
                                | ({"tok/s": f"{row['tokens_per_s']:.0f}"} if "tokens_per_s" in row else {}))
            if d.is_main and (step % tc.save_every == 0 or step == tc.steps):
                save_checkpoint(out, step, model, opt, {"tokens": step * tokens_per_step, "config_hash": cfg.hash()}, tc.keep_last)
            bar.update(1)
            if stop_after is not None and steps_this_call >= stop_after and step < tc.steps:
                status = "interrupted"
                break
    except KeyboardInterrupt:
        status = "interrupted"
        say(f"\ninterrupted at step {step}; resume with: resstream train --resume {out}")
    finally:
        bar.close()
    if d.is_main and status == "interrupted" and step > 0:
        save_checkpoint(out, step, model, opt, {"tokens": step * tokens_per_step, "config_hash": cfg.hash()}, tc.keep_last)
    wall = time.perf_counter() - t_start
    tps = (steps_this_call * tokens_per_step / train_time) if train_time > 0 else 0.0
    if d.is_main:
        _write_status(out, status, last_good, val_bpb=last_val[1], tokens_per_s=tps, wall_s=wall)
    return RunResult(out, status, step, last_good, last_val[0], last_val[1], tps, peak_memory_mb(device), wall)


def _write_status(out: Path, status: str, last_good_step: int, **extra) -> None:
    atomic_write_text(out / "status.json", json.dumps({"status": status, "last_good_step": last_good_step, **extra}, indent=1))
