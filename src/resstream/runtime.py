"""Process settings for training speed that live outside the model: the glibc allocator.

A training step allocates and frees the same large activations every step. glibc serves
allocations above its mmap threshold (128 KiB to 32 MiB, adaptive) with fresh mmap()s and
gives freed heap tops back to the OS, so every step page-faults its activations in again,
zero-filled: 30-60 thousand faults per step at the demo shape, more for kinds that allocate
more (measured with getrusage, benchmarks/step_time.py prints them). ``tune_allocator`` keeps
large blocks on the heap and the heap from shrinking, the runtime twin of
MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=<large>. ``resstream train`` (and so compare and
``make demo``) calls it; call it yourself in your own training loop. The cost: the process
keeps its peak heap until it exits.
"""
from __future__ import annotations

import ctypes
import os
import platform
from pathlib import Path

_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc malloc.h
_ENV = ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_")
_done: list[str] = []


def cache_root() -> Path:
    """Where resstream caches what it builds or fetches: $RESSTREAM_CACHE, default ~/.cache/resstream."""
    return Path(os.environ.get("RESSTREAM_CACHE") or Path.home() / ".cache" / "resstream").expanduser()


def tune_allocator() -> str:
    """Keep freed memory for the next step (see the module docstring). Linux with glibc only;
    leaves settings the environment already made alone. Returns what it did, "" if nothing."""
    if _done:
        return _done[0]
    what = ""
    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc" and not any(k in os.environ for k in _ENV):
        try:
            libc = ctypes.CDLL("libc.so.6")
            if libc.mallopt(_M_MMAP_MAX, 0) and libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1):
                what = "glibc malloc: no mmap for large blocks, no trimming (resstream.runtime.tune_allocator)"
        except (OSError, AttributeError):
            what = ""
    elif any(k in os.environ for k in _ENV):
        what = "glibc malloc: " + " ".join(f"{k}={os.environ[k]}" for k in _ENV if k in os.environ) + " (environment)"
    _done.append(what)
    return what
