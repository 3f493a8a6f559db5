"""glibc allocator settings for the benchmarks; imports nothing heavy, so it can re-exec
the interpreter before torch is loaded."""
from __future__ import annotations

import os
import sys

# glibc reads these at process start, so they cannot be set from inside a running Python.
# MALLOC_MMAP_MAX_=0: large tensors come from the heap instead of fresh mmap()s, which would
# otherwise be unmapped on free and page-faulted (zero-filled) again on every step.
# MALLOC_TRIM_THRESHOLD_: never give freed heap back to the OS between steps, for the same reason.
ALLOC_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(64 << 30)}
_REEXEC_FLAG = "RESSTREAM_BENCH_REEXEC"


def ensure_allocator_env() -> None:
    """Re-exec this Python with ALLOC_ENV set, unless the caller already set those variables."""
    missing = {k: v for k, v in ALLOC_ENV.items() if k not in os.environ}
    if missing and os.environ.get(_REEXEC_FLAG) != "1":
        env = {**os.environ, **missing, _REEXEC_FLAG: "1"}
        sys.stdout.flush()
        os.execve(sys.executable, [sys.executable, *sys.argv], env)


def allocator_settings() -> dict[str, str]:
    return {k: os.environ.get(k, "(glibc default)") for k in ALLOC_ENV}
