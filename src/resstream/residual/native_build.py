"""Building and loading the native mixing kernels (native_kernels.c; the wrappers are in
native.py): built once per machine with the system C compiler, cached by content, compiler and
CPU under ``$RESSTREAM_CACHE/kernels`` (default ~/.cache/resstream), loaded through ctypes. A
build that fails, or a cached library that does not load, is reported, never raised: callers
fall back to the other paths of attnres/fused.py.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from resstream.runtime import cache_root

SOURCE = Path(__file__).with_name("native_kernels.c")
_P = ctypes.c_void_p
_L, _I, _F = ctypes.c_long, ctypes.c_int, ctypes.c_float
_SIGNATURES = {
    "rs_mix": [_L, _L, _I, _I, _P, _P, _P, _P, _P, _I],
    "rs_softmax_mix": [_L, _L, _I, _P, _P, _P, _P, _I],
    "rs_normed_logits": [_L, _L, _I, _P, _P, _F, _P, _L, _I],
    "rs_phase1_backward": [_L, _L, _I, _I, _P, _P, _P, _P, _P, _P, _I],
    "rs_dots": [_L, _L, _I, _I, _P, _P, _P, _I],
    "rs_merge_forward": [_L, _L, _P, _P, _P, _P, _F, _P, _P, _P, _P, _I],
    "rs_merge_backward": [_L, _L, _P, _P, _P, _P, _P, _P, _P, _P, _P, _P, _P, _I],
    "rs_streams_read": [_L, _L, _I, _P, _L, _P, _P, _I],
    "rs_streams_write": [_L, _L, _I, _P, _L, _P, _L, _P, _P, _P, _I],
    "rs_streams_write_backward": [_L, _L, _I, _P, _L, _P, _L, _P, _P, _P, _P, _P, _P, _P, _I],
    "rs_streams_read_backward": [_L, _L, _I, _P, _L, _P, _P, _P, _P, _P, _I],
    "rs_sinkhorn": [_L, _I, _I, _P, _P, _I],
    "rs_sinkhorn_backward": [_L, _I, _I, _P, _P, _P, _I],
    "rs_source_backward": [_L, _L, _I, _P, _P, _P, _P, _P, _P, _P, _P, _P, _P, _I],
}
_lib: dict[str, object] = {}


def compiler() -> str | None:
    """The C compiler to build with: $CC, else cc, gcc or clang on the PATH (None: none found)."""
    for c in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if c and shutil.which(c):
            return c
    return None


def _cpu_id() -> str:
    """What -march=native depends on: the CPU's model and feature flags (a shared home folder may
    serve machines with different CPUs)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
        lines = [ln for ln in info.splitlines() if ln.startswith(("model name", "flags", "Features"))]
        return "\n".join(sorted(set(lines)))
    except OSError:
        return platform.processor() or platform.machine()


def _attempts(cc: str) -> list[list[str]]:
    base = ["-O3", "-std=c99", "-shared", "-fPIC"]
    # OpenMP and -march=native where the compiler takes them, plain C where it does not
    return [base + ["-march=native", "-fopenmp"], base + ["-fopenmp"], base + ["-march=native"], base]


def _build(cc: str) -> Path:
    source = SOURCE.read_bytes()
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=60).stdout
    key = hashlib.sha256(source + version.encode() + _cpu_id().encode() + platform.machine().encode()).hexdigest()[:20]
    folder = cache_root() / "kernels"
    target = folder / f"mixing-{key}.so"
    if target.exists():
        return target
    folder.mkdir(parents=True, exist_ok=True)
    errors = []
    for flags in _attempts(cc):
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".so", dir=folder)
        os.close(fd)
        done = subprocess.run([cc, *flags, "-o", tmp, str(SOURCE), "-lm"], capture_output=True, text=True, timeout=300)
        if done.returncode == 0:
            os.replace(tmp, target)  # atomic: a concurrent build of the same key writes the same file
            return target
        os.unlink(tmp)
        errors.append(done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}")
    raise RuntimeError(errors[-1])


def _load(path: Path, cc: str):
    """Load a built library; one that does not load or lacks a kernel (a damaged cache file) is
    removed and built again, once."""
    for attempt in (0, 1):
        try:
            lib = ctypes.CDLL(str(path))
            for name, args in _SIGNATURES.items():
                getattr(lib, name).argtypes = args
                getattr(lib, name).restype = None
            return lib
        except (OSError, AttributeError):
            if attempt:
                raise
            path.unlink(missing_ok=True)
            path = _build(cc)


def library() -> tuple[object | None, float, str]:
    """The loaded kernels (None where they cannot be built), the seconds this call spent building
    them (0 once loaded), and why not (when None)."""
    if "lib" in _lib:
        return _lib["lib"], 0.0, _lib["why"]
    t0, lib, why = time.perf_counter(), None, ""
    cc = compiler()
    if cc is None:
        why = "no C compiler found (install gcc or set CC)"
    else:
        try:
            lib = _load(_build(cc), cc)
        except (OSError, RuntimeError, subprocess.SubprocessError, AttributeError) as e:
            lib, why = None, f"building the CPU mixing kernels with {cc} failed: {str(e).strip() or type(e).__name__}"
    _lib.update(lib=lib, why=why)
    return lib, time.perf_counter() - t0, why
