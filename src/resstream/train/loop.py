"""The training loop. It knows nothing of residual kinds, nor of how the model is laid out
over processes (single, DDP, FSDP, pipeline: the session's runtime, see parallel/runtime.py).

    setup (data, model seeded, runtime, optimizer) ─► [resume] ─► write config.json ─► for step:
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
from tqdm.auto import tqdm

from resstream.data.batches import train_batch
from resstream.residual.compiled import compile_seconds
from resstream.runs import folder
from resstream.config import ConfigError
from resstream.runs.checkpoint import list_checkpoints, save_checkpoint, save_sharded_checkpoint
from resstream.runs.config import RunConfig
from resstream.train.distributed import barrier
from resstream.train.optim import lr_at
from resstream.train.resume import load_checkpoint
from resstream.train.setup import Session, peak_memory_mb, setup_session

# Settings that may change when resuming (they do not alter the computation of a step; the
# process layout only changes the order of floating-point sums).
RESUMABLE_KEYS = {"train.steps", "train.eval_every", "train.save_every", "train.log_every", "train.keep_last",
                  *(f"parallel.{k}" for k in ("fsdp", "pp", "virtual_stages", "schedule", "microbatches", "pp_cache", "tp"))}


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
    compile_s: float = 0.0  # one-time compilation, not counted in tokens_per_s


@dataclass
class _Window:
    """Train loss and time accumulated since the last logged row. The open window is saved in
    each checkpoint (``window``), so the first row after a resume averages the same steps as
    the uninterrupted run's."""

    loss: float = 0.0
    steps: int = 0
    time: float = 0.0
    total_time: float = 0.0  # training time of every step of this call
    compile_s: float = 0.0  # compilation inside those steps, counted apart
    timed: int = 0  # steps of the window whose time counts (not a step that was all compilation)
    timed_this_call: int = 0
    steps_this_call: int = 0
    last_val: tuple = field(default=(None, None))

    def saved(self) -> dict:
        return {"loss": self.loss, "steps": self.steps, "time": self.time, "timed": self.timed,
                "last_val": list(self.last_val)}

    @classmethod
    def restored(cls, saved: dict | None) -> "_Window":
        saved = saved or {}
        steps = int(saved.get("steps", 0))
        return cls(loss=float(saved.get("loss", 0.0)), steps=steps, time=float(saved.get("time", 0.0)),
                   timed=int(saved.get("timed", steps)), last_val=tuple(saved.get("last_val", (None, None))))


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
    state = load_checkpoint(s, trust_unverified)
    if state is None and list_checkpoints(s.out):  # restarting would throw the run's history away
        raise ConfigError(f"no checkpoint of {s.out} can be used (see the warnings above); nothing was changed. "
                          "Pass --trust-unverified if they only lack hashes, or start a new run")
    if state is None:
        s.say(f"no checkpoint in {s.out} yet; starting from step 0")
        return 0, _Window()
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
        "run": s.cfg.to_dict(), "model": s.model_meta["model"], "data_dir": str(s.data.dir),
        "data_stats": s.data.stats, "config_hash": s.cfg.hash(), "resstream": resstream.__version__,
        "torch": torch.__version__, "world_size": s.d.world, "device": str(s.device),
        "dtype": str(s.dtype).replace("torch.", ""), "params": s.model_meta["params"],
        "params_residual": s.model_meta["params_residual"],
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    folder.write_run_config(s.out, meta)
    if s.data.tokenizer_path != s.out / folder.TOKENIZER:
        shutil.copyfile(s.data.tokenizer_path, s.out / folder.TOKENIZER)
    folder.write_status(s.out, "running", step)


def _step(s: Session, step: int) -> tuple[float, float, float]:
    """One optimizer step's forward and backward over its micro-batches: (mean loss, grad norm, lr).
    The optimizer itself is stepped by the caller, once the loss is known to be finite."""
    tc, rt = s.cfg.train, s.rt
    lr = lr_at(step, tc)
    for g in s.opt.param_groups:
        g["lr"] = lr
    rt.start_step()
    loss_sum = torch.zeros((), dtype=torch.float64)
    n_micro = tc.grad_accum
    for micro in range(n_micro):
        x, y = train_batch(s.data.train, tc.seed, step, micro, n_micro, rt.replica, rt.replicas, tc.batch_size, tc.seq_len)
        loss_sum += rt.forward_backward(x.to(s.device), y.to(s.device), 1.0 / n_micro, sync=micro == n_micro - 1)
    rt.finish_backward()
    grad_norm = rt.clip_grad_norm(tc.grad_clip if tc.grad_clip > 0 else float("inf"))
    return rt.mean_loss(loss_sum), grad_norm, lr


def _record(s: Session, step: int, w: _Window, lr: float, grad_norm: float, t_start: float) -> dict:
    """The metrics row of ``step`` (logging window and/or evaluation), appended by the main rank."""
    tc = s.cfg.train
    tokens_per_step = tc.batch_size * tc.seq_len
    row: dict = {}
    if step % tc.log_every == 0 or step == tc.steps:
        tps = w.timed * tokens_per_step / w.time if w.timed else None
        row.update(train_loss=w.loss / w.steps, lr=lr, grad_norm=grad_norm, **({"tokens_per_s": tps} if tps else {}))
        row.update(s.rt.traffic() or {})  # pipeline: per rank, tensors and bytes between stages in the step
        w.loss, w.steps, w.time, w.timed = 0.0, 0, 0.0, 0
    if step % tc.eval_every == 0 or step == tc.steps:
        w.last_val = s.rt.evaluate(s.vbatches, s.token_bytes)
        row.update(val_loss=w.last_val[0], val_bpb=w.last_val[1])
    if row and s.d.is_main:
        row = {"step": step, "tokens": step * tokens_per_step, **row,
               "peak_mem_mb": peak_memory_mb(s.device), "elapsed_s": time.perf_counter() - t_start}
        folder.append_metrics(s.out, row)
    return row


def _save(s: Session, step: int, w: _Window) -> bool:
    """Checkpoint ``step`` if every parameter is finite (every rank checks its own and they
    agree). A non-finite model is never written: the newest checkpoint stays a good one. Every
    rank calls it: a sharded checkpoint is written by all, a plain one by the main rank."""
    if not s.rt.params_finite():
        s.say(f"parameters are not finite after step {step}; no checkpoint written")
        return False
    tc = s.cfg.train
    extra = {"tokens": step * tc.batch_size * tc.seq_len, "config_hash": s.cfg.hash(), "window": w.saved(),
             "world_size": s.d.world}
    if s.rt.sharded:
        save_sharded_checkpoint(s.out, step, s.rt.module, s.opt, extra, tc.keep_last)
    else:
        model_sd, opt_sd = s.rt.full_state(s.opt)  # under TP a collective: every rank gathers
        if s.d.is_main:
            save_checkpoint(s.out, step, model_sd, opt_sd, extra, tc.keep_last)
    if s.d.is_main:
        folder.write_status(s.out, "running", step)  # a killed run's status still names its newest checkpoint
    return True


def _run(s: Session, step: int, progress: bool, stop_after: int | None, w: _Window | None = None) -> RunResult:
    """The steps from ``step`` to train.steps, then the final status. "last good step" is the
    newest step whose checkpoint was written (finite), never a step that diverged."""
    tc, d = s.cfg.train, s.d
    bar = tqdm(total=tc.steps, initial=step, disable=not (progress and d.is_main), unit="step", dynamic_ncols=True, file=sys.stderr)
    w = w or _Window()
    status, last_good, t_start = "finished", step, time.perf_counter()
    try:
        while step < tc.steps:
            t0, c0 = time.perf_counter(), compile_seconds()
            train_loss, grad_norm, lr = _step(s, step)
            if not (math.isfinite(train_loss) and math.isfinite(grad_norm)):
                status = "diverged"
                s.say(f"run diverged at step {step + 1} (loss {train_loss}, grad norm {grad_norm}); last good step {last_good}")
                break
            s.opt.step()
            s.opt.zero_grad(set_to_none=True)
            dt = time.perf_counter() - t0
            # one-time compilation is reported apart: the compiled mixing counts its own, and with
            # train.compile the first step of a call is all compilation (and not a timed step)
            compiling = dt if tc.compile and w.steps_this_call == 0 else min(dt, compile_seconds() - c0)
            timed = int(compiling < dt)
            dt, w.compile_s = dt - compiling, w.compile_s + compiling
            step += 1
            w.total_time, w.steps_this_call, w.timed_this_call = w.total_time + dt, w.steps_this_call + 1, w.timed_this_call + timed
            w.loss, w.steps, w.time, w.timed = w.loss + train_loss, w.steps + 1, w.time + dt, w.timed + timed
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
    tps = (w.timed_this_call * tokens_per_step / w.total_time) if w.total_time > 0 else 0.0
    if s.d.is_main:
        folder.write_status(s.out, status, last_good, val_loss=w.last_val[0], val_bpb=w.last_val[1],
                            tokens_per_s=tps, wall_s=wall, compile_s=w.compile_s)
    barrier(s.d)  # every process returns once the run folder is complete
    return RunResult(s.out, status, step, last_good, w.last_val[0], w.last_val[1], tps, peak_memory_mb(s.device), wall,
                     w.compile_s)
