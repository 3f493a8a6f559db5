"""One writer per run folder: an exclusive lock on RUN_DIR/.lock, held while a run trains.

The lock is flock(2) on the open file, so the kernel drops it when the holding process dies,
even by SIGKILL: a lock left behind by a killed run is no lock at all and the next
``train --resume`` simply takes it. The file itself only records the holder's process id,
for the message a second writer gets. Where fcntl is missing (Windows) runs are unlocked.
"""
from __future__ import annotations

import os
from pathlib import Path

from resstream.config import ConfigError

try:
    import fcntl
except ImportError:  # pragma: no cover - not on POSIX
    fcntl = None

LOCK = ".lock"


class RunLock:
    """``acquire()`` or a ConfigError naming the holder; ``release()`` when the run ends."""

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / LOCK
        self.fd: int | None = None
        self.created_dir = False  # set by runs.folder.claim_run_dir

    def acquire(self) -> "RunLock":
        if fcntl is None:  # pragma: no cover
            return self
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise ConfigError(
                f"run folder '{self.path.parent}' is in use by process {holder} (another train or --resume "
                "of this run); wait for it to end, or choose another --out"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None
