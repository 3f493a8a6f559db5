"""The files of a run folder besides its checkpoints, and the one place that reads and writes them::

    RUN_DIR/config.json      resolved RunConfig ("run"), model config ("model"), data location, versions
    RUN_DIR/tokenizer.json   copy of the run's tokenizer (generation needs nothing else)
    RUN_DIR/metrics.jsonl    one JSON object per logged step
    RUN_DIR/status.json      running | finished | diverged | interrupted, with the last good step
    RUN_DIR/checkpoints/     see runs/checkpoint.py

Every write is atomic (temporary file, fsync, rename), so a killed process leaves either the
old file or the new one, never half of one.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from resstream.config import ConfigError

CONFIG, STATUS, METRICS, TOKENIZER = "config.json", "status.json", "metrics.jsonl", "tokenizer.json"


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def read_json(path: Path) -> dict | None:
    """A JSON file's content, or None when it is missing or unreadable."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return None


# ----------------------------------------------------------------------------- config.json


def is_run_dir(run_dir: Path | str) -> bool:
    return (Path(run_dir) / CONFIG).is_file()


def read_run_config(run_dir: Path | str) -> dict:
    """The run's config.json: {"run": RunConfig dict, "model": ModelConfig dict, ...}."""
    path = Path(run_dir) / CONFIG
    if not path.is_file():
        raise ConfigError(f"'{run_dir}' is not a resstream run folder (no config.json); pass a folder made by `resstream train`")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"'{path}' is corrupt ({e}); the run cannot be read") from None


def write_run_config(run_dir: Path, meta: dict) -> None:
    atomic_write_text(Path(run_dir) / CONFIG, json.dumps(meta, indent=1))


def prepare_run_dir(out: Path, resume: bool) -> None:
    """Check that ``out`` can hold a new run (or is a run to resume) and is writable."""
    if resume:
        if not is_run_dir(out):
            raise ConfigError(f"cannot resume: '{out}' is not a run folder (no config.json)")
        return
    if (out / CONFIG).exists():
        raise ConfigError(f"'{out}' already holds a run; resume it with --resume {out} or choose another --out")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"cannot write the run folder '{out}': {e.strerror}; choose another --out") from None


# ----------------------------------------------------------------------------- status.json


def write_status(run_dir: Path, status: str, last_good_step: int, **extra) -> None:
    atomic_write_text(Path(run_dir) / STATUS, json.dumps({"status": status, "last_good_step": last_good_step, **extra}, indent=1))


def read_status(run_dir: Path) -> dict | None:
    return read_json(Path(run_dir) / STATUS)


# ----------------------------------------------------------------------------- metrics.jsonl


def append_metrics(run_dir: Path, row: dict) -> None:
    with open(Path(run_dir) / METRICS, "a") as f:
        f.write(json.dumps(row) + "\n")


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / METRICS
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def truncate_metrics(run_dir: Path, step: int) -> None:
    """On resume, drop rows logged after the checkpoint the run restarts from."""
    path = Path(run_dir) / METRICS
    if not path.exists():
        return
    rows = [line for line in path.read_text().splitlines() if line.strip()]
    kept = [r for r in rows if json.loads(r).get("step", 0) <= step]
    atomic_write_text(path, "".join(r + "\n" for r in kept))
