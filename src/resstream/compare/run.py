"""`resstream compare`: train every residual kind x seed under identical conditions.

Fairness: every run shares the model shape, data, token budget, hyperparameters and seed
set; seed s gives every kind the same batches in the same order and the same non-residual
initial weights, so differences between kinds can be tested per seed (paired). Each run is
a separate process (so its peak memory is its own) writing an ordinary run folder under
OUT/runs/; re-running the same command skips finished runs and resumes partial ones.
"""
from __future__ import annotations

import json
import math
import multiprocessing as mp
import platform
import shutil
from dataclasses import dataclass
from pathlib import Path

import resstream
from resstream.config import ConfigError, apply_overrides, parse_value
from resstream.residual.config import ResidualConfig
from resstream.runs.config import RunConfig


@dataclass
class CompareOptions:
    residuals: str | None = None  # "prenorm,attnres,block_attnres:block_size=4"
    seeds: int | None = None
    steps: int | None = None
    tokens: int | None = None
    out: Path | None = None
    force: bool = False
    progress: bool = True


def parse_residuals(specs: list[str] | tuple[str, ...]) -> list[tuple[str, dict]]:
    """'block_attnres:block_size=4' -> ('block_attnres-block_size=4', {'kind': ..., 'block_size': 4})."""
    out, labels = [], set()
    for spec in specs:
        spec = spec.strip()
        if not spec:
            continue
        kind, _, opts = spec.partition(":")
        residual = {"kind": kind.strip()}
        for item in filter(None, (o.strip() for o in opts.split(","))):
            if "=" not in item:
                raise ConfigError(f"--residuals: bad option '{item}' in '{spec}'; write kind:key=value,key=value")
            k, _, v = item.partition("=")
            residual[k.strip()] = parse_value(v.strip())
        ResidualConfig.from_dict(residual, prefix="model.residual.")  # unknown kinds/keys fail here
        label = spec.replace(":", "-").replace(",", "-")
        if label in labels:
            raise ConfigError(f"--residuals: '{spec}' is listed twice")
        labels.add(label)
        out.append((label, residual))
    if not out:
        raise ConfigError("--residuals: name at least one residual kind")
    return out


def _run_one(cfg_dict: dict, run_dir: str, resume: bool, progress: bool) -> None:
    """Child-process entry: one training run (its own process, so its own peak memory)."""
    from resstream.train import train

    train(RunConfig.from_dict(cfg_dict), Path(run_dir), resume=resume, progress=progress)


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plan(cfg: RunConfig, opts: CompareOptions) -> tuple[RunConfig, list[tuple[str, dict]], list[int]]:
    """Resolve kinds, seeds and the token budget into one base config."""
    specs = opts.residuals.split(",") if opts.residuals else list(cfg.compare.residuals)
    # options after ':' may themselves contain commas: re-join pieces that are options
    merged: list[str] = []
    for piece in specs:
        if merged and ":" in merged[-1] and "=" in piece and ":" not in piece:
            merged[-1] += "," + piece
        else:
            merged.append(piece)
    kinds = parse_residuals(merged)
    n_seeds = opts.seeds if opts.seeds is not None else cfg.compare.seeds
    if n_seeds < 1:
        raise ConfigError(f"--seeds: must be >= 1, got {n_seeds}")
    overrides = []
    if opts.steps is not None:
        if opts.steps < 1:
            raise ConfigError(f"--steps: must be >= 1, got {opts.steps}")
        overrides.append(f"train.steps={opts.steps}")
    if opts.tokens is not None:
        per_step = cfg.train.batch_size * cfg.train.seq_len
        if opts.tokens < per_step:
            raise ConfigError(f"--tokens: {opts.tokens} is less than one step ({per_step} tokens)")
        overrides.append(f"train.steps={math.ceil(opts.tokens / per_step)}")
    base = RunConfig.from_dict(apply_overrides(cfg.to_dict(), overrides))
    seeds = [base.train.seed + i for i in range(n_seeds)]
    return base, kinds, seeds


def compare(cfg: RunConfig, opts: CompareOptions, log=print) -> dict:
    """Train every (kind, seed), measure depth use, and write summary.json and the report."""
    from resstream.compare.report import format_table, write_report
    from resstream.compare.stats import summarize

    base, kinds, seeds = plan(cfg, opts)
    out = opts.out or Path(f"compare-{base.name}")
    fingerprint = {"base": {k: v for k, v in base.to_dict().items() if k != "compare"},
                   "kinds": kinds, "seeds": seeds}
    fp_path = out / "comparison.json"
    previous = _read_json(fp_path)
    if previous is not None and previous != json.loads(json.dumps(fingerprint)):
        if not opts.force:
            raise ConfigError(f"'{out}' holds a different comparison; choose another --out or pass --force to replace it")
        shutil.rmtree(out / "runs", ignore_errors=True)
    elif previous is None and out.exists() and any(out.iterdir()) and not opts.force:
        raise ConfigError(f"'{out}' exists and is not a resstream comparison; choose another --out or pass --force")
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / "comparison.json").write_text(json.dumps(fingerprint, indent=1))
    except OSError as e:
        raise ConfigError(f"cannot write the output folder '{out}': {e.strerror}") from None

    # Prepare the data once, in this process, so every child finds it cached.
    from resstream.data import prepare

    data = prepare(base.data, log=log)
    ctx = mp.get_context("spawn")
    jobs = [(seed, label, residual) for seed in seeds for label, residual in kinds]
    for n, (seed, label, residual) in enumerate(jobs, 1):
        run_dir = out / "runs" / f"{label}-s{seed}"
        status = _read_json(run_dir / "status.json") or {}
        if status.get("status") in ("finished", "diverged"):
            log(f"[{n}/{len(jobs)}] {label} seed {seed}: {status['status']} already, skipping")
            continue
        resume = (run_dir / "config.json").exists()
        log(f"[{n}/{len(jobs)}] {label} seed {seed}: {'resuming' if resume else 'training'} -> {run_dir}")
        run_cfg = apply_overrides(base.to_dict(), [f"train.seed={seed}", f"name={json.dumps(f'{label}-s{seed}')}"])
        run_cfg["model"]["residual"] = residual
        proc = ctx.Process(target=_run_one, args=(run_cfg, str(run_dir), resume, opts.progress))
        proc.start()
        proc.join()
        if proc.exitcode != 0:
            status = _read_json(run_dir / "status.json") or {}
            if status.get("status") != "diverged":
                raise RuntimeError(f"run {run_dir} failed (exit code {proc.exitcode}); see the output above, then re-run the same command to resume")

    summary = collect(out, base, kinds, seeds, data, log=log)
    summary = summarize(summary)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    md, html = write_report(summary, out)
    log("")
    log(format_table(summary))
    log(f"\nreport: {html}\n        {md}")
    return summary


def collect(out: Path, base: RunConfig, kinds, seeds, data, log=print) -> dict:
    """Read every run folder (the report reads runs, not live models) into the summary."""
    import torch

    from resstream.diagnostics import mean_depth, measure_depth
    from resstream.train.batches import val_batches
    from resstream.train.checkpoint import load_run

    first_meta = None
    kinds_out = {}
    for label, residual in kinds:
        runs, depths = [], []
        params = params_res = None
        for seed in seeds:
            run_dir = out / "runs" / f"{label}-s{seed}"
            meta = _read_json(run_dir / "config.json") or {}
            first_meta = first_meta or meta
            params, params_res = meta.get("params", params), meta.get("params_residual", params_res)
            status = _read_json(run_dir / "status.json") or {"status": "missing", "last_good_step": 0}
            rows = _metrics(run_dir)
            curve = [[r["tokens"], r["val_bpb"]] for r in rows if "val_bpb" in r]
            tps = [r["tokens_per_s"] for r in rows if "tokens_per_s" in r]
            ok = status["status"] == "finished"
            runs.append({
                "seed": seed, "status": "ok" if ok else "failed", "reason": status["status"],
                "last_good_step": status.get("last_good_step", 0),
                "final_val_bpb": curve[-1][1] if ok and curve else None,
                "tokens_per_s": sum(tps) / len(tps) if tps else None,
                "peak_mem_mb": max((r.get("peak_mem_mb", 0) for r in rows), default=None),
                "wall_s": status.get("wall_s"), "curve": curve, "run_dir": str(run_dir),
            })
            if ok:
                model, run_cfg, _ = load_run(run_dir)
                tc = run_cfg.train
                batches = val_batches(data.val, base.compare.depth_batches, max(1, tc.batch_size // tc.grad_accum), tc.seq_len)
                depths.append(measure_depth(model, batches))
        kinds_out[label] = {
            "kind": residual["kind"], "residual": residual, "params": params,
            "params_added": params_res, "runs": runs, "depth": mean_depth(depths) if depths else None,
        }
    model_cfg = (first_meta or {}).get("model", {})
    setup = {
        "model": model_cfg, "corpus": base.data.corpus,
        "tokens_per_run": base.train.steps * base.train.batch_size * base.train.seq_len,
        "steps": base.train.steps, "seeds": seeds,
        "train": base.train.to_dict(),
        "machine": f"{platform.machine()}, {platform.processor() or platform.node()}, {torch.get_num_threads()} threads, "
                   f"{'CUDA ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU only'}",
        "torch": torch.__version__, "resstream": resstream.__version__,
        "data": data.stats,
    }
    return {"setup": setup, "kinds": kinds_out}
