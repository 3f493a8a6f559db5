"""Reading an experiment's run folders into its summary (the report reads runs, not live
models): per run its status, curve, speed and memory; per kind the depth measurements of its
finished runs' final models."""
from __future__ import annotations

import platform
from pathlib import Path

import torch

import resstream
from resstream.data import PreparedData
from resstream.data.batches import val_batches
from resstream.diagnostics import mean_depth, measure_depth
from resstream.runs import folder, load_run
from resstream.runs.config import RunConfig


def machine_line() -> str:
    return (f"{platform.machine()}, {platform.processor() or platform.node()}, {torch.get_num_threads()} threads, "
            f"{'CUDA ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU only'}")


def run_record(run_dir: Path, seed: int) -> dict:
    """One run folder as a summary row: status, final val bpb (finished runs only), curve, speed."""
    status = folder.read_status(run_dir) or {"status": "missing", "last_good_step": 0}
    rows = folder.read_metrics(run_dir)
    curve = [[r["tokens"], r["val_bpb"]] for r in rows if "val_bpb" in r]
    tps = [r["tokens_per_s"] for r in rows if "tokens_per_s" in r]
    ok = status["status"] == "finished"
    return {
        "seed": seed, "status": "ok" if ok else "failed", "reason": status["status"],
        "last_good_step": status.get("last_good_step", 0),
        "final_val_bpb": curve[-1][1] if ok and curve else None,
        "tokens_per_s": sum(tps) / len(tps) if tps else None,
        "peak_mem_mb": max((r.get("peak_mem_mb", 0) for r in rows), default=None),
        "wall_s": status.get("wall_s"), "compile_s": status.get("compile_s"), "curve": curve, "run_dir": str(run_dir),
    }


def run_depth(run_dir: Path, data: PreparedData, n_batches: int) -> dict:
    """Depth measurements of a finished run's final model on the first validation windows."""
    model, run_cfg, _ = load_run(run_dir)
    tc = run_cfg.train
    batches = val_batches(data.val, n_batches, max(1, tc.batch_size // tc.grad_accum), tc.seq_len)
    return measure_depth(model, batches)


def collect(out: Path, base: RunConfig, kinds, seeds, data: PreparedData, baseline: str | None = None) -> dict:
    """The summary of a comparison: setup, and per kind label its runs and mean depth profile."""
    first_meta = None
    kinds_out = {}
    for label, residual in kinds:
        runs, depths = [], []
        params = params_res = None
        for seed in seeds:
            run_dir = out / "runs" / f"{label}-s{seed}"
            meta = folder.read_json(run_dir / folder.CONFIG) or {}
            first_meta = first_meta or meta
            params, params_res = meta.get("params", params), meta.get("params_residual", params_res)
            runs.append(run_record(run_dir, seed))
            if runs[-1]["status"] == "ok":
                depths.append(run_depth(run_dir, data, base.compare.depth_batches))
        kinds_out[label] = {
            "kind": residual["kind"], "residual": residual, "params": params,
            "params_added": params_res, "runs": runs, "depth": mean_depth(depths) if depths else None,
        }
    setup = {
        "model": (first_meta or {}).get("model", {}), "corpus": base.data.corpus, "init_from": base.init_from,
        "tokens_per_run": base.train.steps * base.train.batch_size * base.train.seq_len,
        "steps": base.train.steps, "seeds": seeds, "train": base.train.to_dict(),
        "baseline": baseline if baseline is not None else kinds[0][0],
        "machine": machine_line(), "torch": torch.__version__, "resstream": resstream.__version__,
        "data": data.stats,
    }
    return {"setup": setup, "kinds": kinds_out}
