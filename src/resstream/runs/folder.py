"""The files of a run folder besides its checkpoints, and the one place that reads and writes them::

    RUN_DIR/config.json      resolved RunConfig ("run"), model config ("model"), data location, versions
    RUN_DIR/tokenizer.json   copy of the run's tokenizer (generation needs nothing else)
    RUN_DIR/metrics.jsonl    one JSON object per logged step
    RUN_DIR/status.json      running | finished | diverged | interrupted, with the last good step
    RUN_DIR/checkpoints/     see runs/checkpoint.py
    RUN_DIR/.lock            held by the process writing the run (runs/lock.py)

Every write is atomic (temporary file, fsync, rename), so a killed process leaves either the
old file or the new one, never half of one.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from resstream.config import ConfigError
from resstream.runs.lock import LOCK, RunLock

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
    """The run's config.json: {"run": RunConfig dict, "model": ModelConfig dict, ...}, checked
    to be that shape (the values themselves are validated by whoever builds configs from it)."""
    path = Path(run_dir) / CONFIG
    if not path.is_file():
        raise ConfigError(f"'{run_dir}' is not a resstream run folder (no config.json); pass a folder made by `resstream train`")
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"'{path}' is corrupt ({e}); the run cannot be read") from None
    if not isinstance(meta, dict):
        raise ConfigError(f"'{path}': expected a JSON object with 'run' and 'model' tables, got a {type(meta).__name__}")
    for key in ("run", "model"):
        if not isinstance(meta.get(key), dict):
            raise ConfigError(f"'{path}': the '{key}' table is missing or not a table; the run's config.json was edited or damaged")
    return meta


def write_run_config(run_dir: Path, meta: dict) -> None:
    atomic_write_text(Path(run_dir) / CONFIG, json.dumps(meta, indent=1))


def claim_run_dir(out: Path, resume: bool) -> RunLock:
    """Lock ``out`` for this process: a new run's folder (created here, and removed again on a
    refusal) or a run to resume. Leftovers of a killed writer are removed under the lock."""
    out = Path(out)
    if resume and not is_run_dir(out):
        raise ConfigError(f"cannot resume: '{out}' is not a run folder (no config.json)")
    created = _make_dir(out)
    try:
        lock = RunLock(out).acquire()
    except ConfigError:
        if created:
            shutil.rmtree(out, ignore_errors=True)
        raise
    if not resume and (out / CONFIG).exists():
        lock.release()
        raise ConfigError(f"'{out}' already holds a run; resume it with --resume {out} or choose another --out")
    remove_stale_temps(out)
    lock.created_dir = created
    return lock


def _make_dir(out: Path) -> bool:
    """Create ``out`` (True) or find it there (False); ConfigError when it cannot be written."""
    try:
        out.mkdir(parents=True)
        created = True
    except FileExistsError:
        created = False
    except OSError as e:
        raise ConfigError(f"cannot write the run folder '{out}': {e.strerror}; choose another --out") from None
    if not out.is_dir() or not os.access(out, os.W_OK | os.X_OK):
        raise ConfigError(f"cannot write the run folder '{out}'; choose another --out")
    return created


def remove_stale_temps(run_dir: Path) -> None:
    """Temporary files and checkpoint folders of a writer that was killed (the caller holds
    the run's lock, so none of them belongs to a live process)."""
    run_dir = Path(run_dir)
    for p in [*run_dir.glob(".*.tmp-*"), *(run_dir / "checkpoints").glob(".tmp-*")]:
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)


def discard_unstarted(run_dir: Path, lock: RunLock) -> None:
    """Remove the folder ``lock`` created for a run that never wrote its config.json (nothing
    but the lock and temporaries in it): a failure before the first step leaves no empty folder."""
    run_dir = Path(run_dir)
    if lock.created_dir and run_dir.is_dir() and not (run_dir / CONFIG).exists():
        if all(p.name == LOCK or ".tmp-" in p.name for p in run_dir.iterdir()):
            shutil.rmtree(run_dir, ignore_errors=True)


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
