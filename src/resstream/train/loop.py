"""The training loop. It knows nothing of residual kinds: it trains an LM from a RunConfig.

    setup (data, model seeded, optimizer) ─► [resume] ─► write config.json ─► for step:
    lr, micro-batches, backward, clip, AdamW ─► log / evaluate (loss, bits per byte) / checkpoint

Batches are a pure function of (seed, step), so resuming from a checkpoint reproduces the
uninterrupted run step for step, and every kind in a comparison sees the same data.
"""
from __future__ import annotations

import math
import shutil
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm.auto import tqdm

from resstream.data.batches import train_batch
from resstream.parallel import tensor as tp_
from resstream.runs import folder
from resstream.config import ConfigError
from resstream.runs.checkpoint import (
    latest_good_checkpoint,
    list_checkpoints,
    load_model_state,
    optimizer_from_tensors,
    save_checkpoint,
)
from resstream.runs.config import RunConfig
from resstream.train.distributed import all_reduce_sum, barrier
from resstream.train.evaluate import evaluate
from resstream.train.optim import lr_at
from resstream.train.setup import Session, peak_memory_mb, setup_session

# Settings that may change when resuming (they do not alter the computation of a step).
# parallel.tp may change too: checkpoints hold full tensors whatever the split.
RESUMABLE_KEYS = {"train.steps", "train.eval_every", "train.save_every", "train.log_every", "train.keep_last", "parallel.tp"}


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


@dataclass
class _Window:
    """Train loss and time accumulated since the last logged row. The open window is saved in
    each checkpoint (``window``), so the first row after a resume averages the same steps as
    the uninterrupted run's."""

    loss: float = 0.0
    steps: int = 0
    time: float = 0.0
    total_time: float = 0.0  # training time of every step of this call
    steps_this_call: int = 0
    last_val: tuple = field(default=(None, None))

    def saved(self) -> dict:
        return {"loss": self.loss, "steps": self.steps, "time": self.time, "last_val": list(self.last_val)}

    @classmethod
    def restored(cls, saved: dict | None) -> "_Window":
        saved = saved or {}
        return cls(loss=float(saved.get("loss", 0.0)), steps=int(saved.get("steps", 0)), time=float(saved.get("time", 0.0)),
                   last_val=tuple(saved.get("last_val", (None, None))))


def train(cfg: RunConfig, out: Path | str | None = None, resume: bool = False, progress: bool = True,
          log: Callable[[str], None] = print, stop_after: int | None = None,
          trust_unverified: bool = False) -> RunResult:
    """Train (or resume) one run into the folder ``out``. ``stop_after`` ends the process's
    work after that many steps as if interrupted (used by tests of exact resume).
    ``trust_unverified``: resume from a checkpoint that records no SHA-256 (refused otherwise)."""
    s = setup_session(cfg, out, resume, log)
    try:
        step, w = _resume(s, trust_unverified) if resume else (0, _Window())
        if resume and step >= cfg.train.steps and _finished(s):
            return _already_finished(s, step)
        if s.d.is_main:
            if resume:
                folder.truncate_metrics(s.out, step)
            _write_metadata(s, step)
        return _run(s, step, progress, stop_after, w)
    except BaseException as e:
        _failed(s, e)
        raise
    finally:
        if s.lock is not None:
            s.lock.release()


def _resume(s: Session, trust_unverified: bool = False) -> tuple[int, _Window]:
    """Load the newest good checkpoint (model, optimizer, RNG, logging window): its step (0 if none)."""
    found = latest_good_checkpoint(s.out, warn=None if s.d.is_main else (lambda m: None), trust_unverified=trust_unverified)
    if found is None and list_checkpoints(s.out):  # restarting would throw the run's history away
        raise ConfigError(f"no checkpoint of {s.out} can be used (see the warnings above); nothing was changed. "
                          "Pass --trust-unverified if they only lack hashes, or start a new run")
    if found is None:
        s.say(f"no checkpoint in {s.out} yet; starting from step 0")
        return 0, _Window()
    _, state, model_sd, opt_sd = found
    load_model_state(s.model, model_sd)
    rng = {k: v for k, v in opt_sd.items() if k.startswith("rng.")}
    optimizer_from_tensors(s.opt, {k: v for k, v in opt_sd.items() if not k.startswith("rng.")}, state["optimizer"])
    torch.set_rng_state(rng["rng.cpu"])
    s.say(f"resuming {s.out} from step {state['step']}")
    return state["step"], _Window.restored(state.get("window"))


def _finished(s: Session) -> bool:
    return (folder.read_status(s.out) or {}).get("status") == "finished"


def _already_finished(s: Session, step: int) -> RunResult:
    """A finished run resumed with nothing left to do: say so and change nothing on disk."""
    st = folder.read_status(s.out) or {}
    s.say(f"{s.out} already finished at step {step} (train.steps={s.cfg.train.steps}); nothing to do. "
          f"To train longer: resstream train --resume {s.out} train.steps=N")
    return RunResult(s.out, "finished", step, int(st.get("last_good_step", step)), st.get("val_loss"), st.get("val_bpb"),
                     float(st.get("tokens_per_s", 0.0)), peak_memory_mb(s.device), float(st.get("wall_s", 0.0)))


def _failed(s: Session, e: BaseException) -> None:
    """An error ended the run: status.json says so (never a stale "running"); a folder that
    never got its config.json is removed."""
    if not s.d.is_main:
        return
    if not folder.is_run_dir(s.out):
        folder.discard_unstarted(s.out, s.lock)
        return
    st = folder.read_status(s.out) or {}
    if st.get("status") == "running":
        reason = "interrupted" if isinstance(e, KeyboardInterrupt) else "failed"
        folder.write_status(s.out, reason, int(st.get("last_good_step", 0)),
                            error=f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}")


def _write_metadata(s: Session, step: int) -> None:
    import resstream

    meta = {
        "run": s.cfg.to_dict(), "model": s.model.cfg.to_dict(), "data_dir": str(s.data.dir),
        "data_stats": s.data.stats, "config_hash": s.cfg.hash(), "resstream": resstream.__version__,
        "torch": torch.__version__, "world_size": s.d.world, "device": str(s.device),
        "dtype": str(s.dtype).replace("torch.", ""), "params": s.model.num_params(),
        "params_residual": s.model.num_params(residual_only=True),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    folder.write_run_config(s.out, meta)
    if s.data.tokenizer_path != s.out / folder.TOKENIZER:
        shutil.copyfile(s.data.tokenizer_path, s.out / folder.TOKENIZER)
    folder.write_status(s.out, "running", step)


def _step(s: Session, fwd, step: int) -> tuple[float, float, float]:
    """One optimizer step's forward and backward over its micro-batches: (mean loss, grad norm, lr).
    The optimizer itself is stepped by the caller, once the loss is known to be finite."""
    tc, d = s.cfg.train, s.d
    lr = lr_at(step, tc)
    for g in s.opt.param_groups:
        g["lr"] = lr
    loss_sum = torch.zeros((), dtype=torch.float64)
    n_micro = tc.grad_accum
    for micro in range(n_micro):
        x, y = train_batch(s.data.train, tc.seed, step, micro, n_micro, d.data_rank, d.data_world, tc.batch_size, tc.seq_len)
        x, y = x.to(s.device), y.to(s.device)
        with tp_.gradient_sync(fwd, enabled=micro == n_micro - 1):
            with torch.autocast(s.device.type, dtype=s.dtype, enabled=s.dtype != torch.float32):
                _, loss = fwd(x, y)
            (loss / n_micro).backward()
        loss_sum += loss.detach().double().cpu() / n_micro
    clip = tc.grad_clip if tc.grad_clip > 0 else float("inf")
    if s.mesh is None:
        grad_norm = torch.nn.utils.clip_grad_norm_(s.model.parameters(), clip).item()
    else:  # DTensor parameters: the norm counts each shard once
        grad_norm = tp_.clip_grad_norm(s.model.parameters(), clip)
    # Tensor-parallel peers hold the same loss: the mean over all processes is the dp mean.
    return (all_reduce_sum(loss_sum, d) / d.world).item(), grad_norm, lr


def _record(s: Session, step: int, w: _Window, lr: float, grad_norm: float, t_start: float) -> dict:
    """The metrics row of ``step`` (logging window and/or evaluation), appended by the main rank."""
    tc = s.cfg.train
    tokens_per_step = tc.batch_size * tc.seq_len
    row: dict = {}
    if step % tc.log_every == 0 or step == tc.steps:
        row.update(train_loss=w.loss / w.steps, lr=lr, grad_norm=grad_norm, tokens_per_s=w.steps * tokens_per_step / w.time)
        w.loss, w.steps, w.time = 0.0, 0, 0.0
    if step % tc.eval_every == 0 or step == tc.steps:
        w.last_val = evaluate(s.model, s.vbatches, s.token_bytes, s.device, s.dtype, s.d)
        row.update(val_loss=w.last_val[0], val_bpb=w.last_val[1])
    if row and s.d.is_main:
        row = {"step": step, "tokens": step * tokens_per_step, **row,
               "peak_mem_mb": peak_memory_mb(s.device), "elapsed_s": time.perf_counter() - t_start}
        folder.append_metrics(s.out, row)
    return row


def _params_finite(s: Session) -> bool:
    """Every parameter finite, on every rank (under tensor parallelism each rank sees its shards;
    the ranks agree, so they all save or all skip)."""
    return tp_.on_every_rank(all(bool(torch.isfinite(tp_.local(p)).all()) for p in s.model.parameters()))


def _save(s: Session, step: int, w: _Window) -> bool:
    """Checkpoint ``step`` if every parameter is finite (every rank checks; the main rank
    writes). A non-finite model is never written: the newest checkpoint stays a good one."""
    if not _params_finite(s):
        s.say(f"parameters are not finite after step {step}; no checkpoint written")
        return False
    # DTensors are gathered into full tensors first: a collective every process takes part in.
    model_sd, opt_sd = tp_.full_state(s.model.state_dict()), tp_.full_state(s.opt.state_dict())
    if s.d.is_main:
        tc = s.cfg.train
        extra = {"tokens": step * tc.batch_size * tc.seq_len, "config_hash": s.cfg.hash(), "window": w.saved()}
        save_checkpoint(s.out, step, model_sd, opt_sd, extra, tc.keep_last)
        folder.write_status(s.out, "running", step)  # a killed run's status still names its newest checkpoint
    return True


def _run(s: Session, step: int, progress: bool, stop_after: int | None, w: _Window | None = None) -> RunResult:
    """The steps from ``step`` to train.steps, then the final status. "last good step" is the
    newest step whose checkpoint was written (finite), never a step that diverged."""
    tc, d = s.cfg.train, s.d
    fwd = DDP(s.model) if d.enabled and s.mesh is None else s.model  # dp x tp: replicated in setup
    if tc.compile:
        fwd = torch.compile(fwd)
    bar = tqdm(total=tc.steps, initial=step, disable=not (progress and d.is_main), unit="step", dynamic_ncols=True, file=sys.stderr)
    w = w or _Window()
    status, last_good, t_start = "finished", step, time.perf_counter()
    try:
        while step < tc.steps:
            t0 = time.perf_counter()
            train_loss, grad_norm, lr = _step(s, fwd, step)
            if not (math.isfinite(train_loss) and math.isfinite(grad_norm)):
                status = "diverged"
                s.say(f"run diverged at step {step + 1} (loss {train_loss}, grad norm {grad_norm}); last good step {last_good}")
                break
            s.opt.step()
            s.opt.zero_grad(set_to_none=True)
            dt = time.perf_counter() - t0
            step += 1
            w.total_time, w.steps_this_call = w.total_time + dt, w.steps_this_call + 1
            w.loss, w.steps, w.time = w.loss + train_loss, w.steps + 1, w.time + dt
            row = _record(s, step, w, lr, grad_norm, t_start)
            if row and d.is_main:
                bar.set_postfix({k: f"{row[k]:.3f}" for k in ("train_loss", "val_bpb") if k in row}
                                | ({"tok/s": f"{row['tokens_per_s']:.0f}"} if "tokens_per_s" in row else {}))
            if step % tc.save_every == 0 or step == tc.steps:
                if not _save(s, step, w):
                    status = "diverged"
                    break
                last_good = step
            bar.update(1)
            if stop_after is not None and w.steps_this_call >= stop_after and step < tc.steps:
                status = "interrupted"
                break
    except KeyboardInterrupt:
        status = "interrupted"
        s.say(f"\ninterrupted at step {step}; resume with: resstream train --resume {s.out}")
    finally:
        bar.close()
    return _finish(s, status, step, last_good, w, t_start)


def _finish(s: Session, status: str, step: int, last_good: int, w: _Window, t_start: float) -> RunResult:
    if status == "interrupted" and step > last_good:
        if _save(s, step, w):
            last_good = step
        else:
            status = "diverged"
    wall = time.perf_counter() - t_start
    tokens_per_step = s.cfg.train.batch_size * s.cfg.train.seq_len
    tps = (w.steps_this_call * tokens_per_step / w.total_time) if w.total_time > 0 else 0.0
    if s.d.is_main:
        folder.write_status(s.out, status, last_good, val_loss=w.last_val[0], val_bpb=w.last_val[1],
                            tokens_per_s=tps, wall_s=wall)
    barrier(s.d)  # every process returns once the run folder is complete
    return RunResult(s.out, status, step, last_good, w.last_val[0], w.last_val[1], tps, peak_memory_mb(s.device), wall)
