"""Running many training runs for one experiment (a comparison, a sweep, a scaling study):
each in its own process (so its peak memory is its own), each an ordinary run folder under
OUT/runs/; re-running the same command skips finished runs and resumes partial ones."""
from __future__ import annotations

import json
import multiprocessing as mp
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from resstream.config import ConfigError
from resstream.runs import folder
from resstream.runs.config import RunConfig

FINGERPRINT = "comparison.json"


def claim_output(out: Path, fingerprint: dict, force: bool) -> None:
    """Make ``out`` the folder of this experiment: a folder holding the same experiment (same
    fingerprint) is reused (finished runs are kept), a different one only with ``force``, which
    moves the earlier runs aside to runs.replaced-<time>/ (never deletes them)."""
    previous = folder.read_json(out / FINGERPRINT)
    if previous is not None and previous != json.loads(json.dumps(fingerprint)):
        if not force:
            raise ConfigError(f"'{out}' holds a different comparison; choose another --out or pass --force to replace it")
        if (out / "runs").exists():
            aside = out / f"runs.replaced-{datetime.now(timezone.utc).strftime('%Y%m%d-%H%M%S-%f')}"
            (out / "runs").rename(aside)
            print(f"--force: the earlier experiment's runs were moved to {aside}", file=sys.stderr)
    elif previous is None and out.exists() and any(out.iterdir()) and not force:
        raise ConfigError(f"'{out}' exists and is not a resstream comparison; choose another --out or pass --force")
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / FINGERPRINT).write_text(json.dumps(fingerprint, indent=1))
    except OSError as e:
        raise ConfigError(f"cannot write the output folder '{out}': {e.strerror}") from None


def _run_one(cfg_dict: dict, run_dir: str, resume: bool, progress: bool) -> None:
    """Child-process entry: one training run."""
    from resstream.train import train

    train(RunConfig.from_dict(cfg_dict), Path(run_dir), resume=resume, progress=progress)


def _check_same_run(run_dir: Path, cfg_dict: dict) -> None:
    """A run folder already there is reused only if it was trained with the planned config (its
    config hash): a copied or edited run is never taken for this experiment's silently. Runs
    continuing a pretrained model record the model's resolved shape, so they are not compared."""
    if not folder.is_run_dir(run_dir):
        return
    planned = RunConfig.from_dict(cfg_dict)
    saved = (folder.read_json(run_dir / folder.CONFIG) or {}).get("config_hash")
    if planned.init_from is None and saved is not None and saved != planned.hash():
        raise ConfigError(f"'{run_dir}' was trained with another config than this experiment plans for it; "
                          "move it away (or choose another --out) and re-run")


def run_jobs(jobs: list[tuple[str, Path, dict]], progress: bool, log: Callable[[str], None] = print) -> None:
    """Train each (title, run folder, RunConfig dict) in a child process, in order. A run that
    finished or diverged already is skipped; a partial one is resumed. A child that fails
    otherwise stops the experiment with one line saying how to resume it."""
    ctx = mp.get_context("spawn")
    for n, (title, run_dir, cfg_dict) in enumerate(jobs, 1):
        _check_same_run(run_dir, cfg_dict)
        status = folder.read_status(run_dir) or {}
        if status.get("status") in ("finished", "diverged"):
            log(f"[{n}/{len(jobs)}] {title}: {status['status']} already, skipping")
            continue
        resume = folder.is_run_dir(run_dir)
        log(f"[{n}/{len(jobs)}] {title}: {'resuming' if resume else 'training'} -> {run_dir}")
        proc = ctx.Process(target=_run_one, args=(cfg_dict, str(run_dir), resume, progress))
        proc.start()
        proc.join()
        if proc.exitcode != 0 and (folder.read_status(run_dir) or {}).get("status") != "diverged":
            raise RuntimeError(f"run {run_dir} failed (exit code {proc.exitcode}); see the output above, then re-run the same command to resume")


def publish(out: Path, summary: dict, write_report: Callable[[dict, Path], tuple], table: str,
            log: Callable[[str], None]) -> None:
    """An experiment's results: OUT/summary.json (every number), the report written by
    ``write_report(summary, out)`` (-> (md path, html path)), and the table printed."""
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    md, html = write_report(summary, out)
    log("")
    log(table)
    log(f"\nreport: {html}\n        {md}")
