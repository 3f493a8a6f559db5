"""Compiled regions around the depth mixing: small tensor functions (the bodies of the mixing
kernels) compiled once per shape by ``torch.compile`` and reused by every sublayer that has
that shape, with a clean fallback to eager.

Why only the mixing: eager PyTorch runs one kernel, one pass over a [B, T, D] tensor, per
operator; a compiled kernel runs one pass per reduction group, so a mixture of k sources reads
each once and the dots of a gradient are one pass instead of two. The kernels are small and
few (their arity is fixed, see attnres/fused.py), so they compile in seconds and are reused
by every sublayer; inductor's on-disk cache makes later processes reuse them too. Everything
else stays eager: compiling the whole model (``train.compile``) takes minutes on a CPU.

    mode  "auto" (default): on a CPU the fused C kernels of residual/native.py (built in about
          a second with the system C compiler; eager with one line saying so if there is none),
          on CUDA these compiled kernels (where Triton is installed; else eager, one line);
          "on": the same, raising instead of falling back when no compiler is found;
          "inductor": these torch.compile kernels on any device (a C++ compiler on CPU): the
          GPU path, runnable on a CPU (tests, benchmarks' ``inductor`` path);
          "off": eager only. Set by ``set_mode`` or the environment variable
          RESSTREAM_COMPILE_MIXING.

Why not inductor on a CPU by default: its kernels measured no faster than eager in training
steps here (a compiled call costs tens of microseconds of guards and wrappers), and
compiling costs 10-30 s per process; the C kernels cost a few microseconds per call.

A kernel that fails to compile says so in one line on stderr and runs eager from then on. The
time spent in calls that compiled (first call per input signature) is summed in
``compile_seconds()``, so a training loop can report it apart from its step times.
"""
from __future__ import annotations

import os
import shutil
import sys
import time
from typing import Callable

import torch

from resstream.residual import native

MODES = ("auto", "on", "inductor", "off")
_state = {"mode": os.environ.get("RESSTREAM_COMPILE_MIXING", "auto"), "seconds": 0.0, "said": set()}
if _state["mode"] not in MODES:
    print(f"resstream: RESSTREAM_COMPILE_MIXING={_state['mode']!r} is not one of {', '.join(MODES)}; using 'auto'",
          file=sys.stderr)
    _state["mode"] = "auto"


def set_mode(mode: str) -> None:
    """Choose how the depth mixing runs: "auto", "on" or "off" (see the module docstring)."""
    if mode not in MODES:
        raise ValueError(f"compile mode must be one of {', '.join(MODES)}, got {mode!r}")
    _state["mode"] = mode


def get_mode() -> str:
    return _state["mode"]


def compile_seconds() -> float:
    """Seconds spent so far in calls of compiled kernels that compiled (first call per signature)."""
    return _state["seconds"]


def _say_once(key: str, message: str) -> None:
    if key not in _state["said"]:
        _state["said"].add(key)
        print(f"resstream: {message}", file=sys.stderr)


def compiler_available(device: torch.device) -> tuple[bool, str]:
    """Whether torch.compile can build kernels for ``device`` here, and if not, why (cached)."""
    found = _state.setdefault("compilers", {})
    if device.type not in found:
        found[device.type] = _find_compiler(device)
    return found[device.type]


def _find_compiler(device: torch.device) -> tuple[bool, str]:
    if device.type == "cpu":
        ok = any(shutil.which(c) for c in (os.environ.get("CXX") or "g++", "g++", "clang++", "c++"))
        return ok, "no C++ compiler found (install g++ or set CXX)"
    if device.type == "cuda":
        from torch.utils._triton import has_triton

        return has_triton(), "Triton is not installed"
    return False, f"no compiled kernels for device type {device.type}"


def _eligible(args: tuple) -> torch.device | None:
    """The device of a call that may run compiled, or None: plain tensors only, outside an
    outer torch.compile (which traces the eager body itself) and outside inference mode."""
    device = None
    for a in args:
        if isinstance(a, torch.Tensor):
            if type(a) is not torch.Tensor and not isinstance(a, torch.nn.Parameter):
                return None  # tensor subclasses (DTensor, ...) stay eager
            device = a.device
    if device is None or torch.compiler.is_compiling() or torch.is_inference_mode_enabled():
        return None
    return device


def _signature(args: tuple) -> tuple:
    return tuple((tuple(a.shape), a.stride(), a.dtype, a.device) if isinstance(a, torch.Tensor) else a for a in args)


class Kernel:
    """``fn`` (a pure tensor function, no autograd inside) run compiled when the mode and the
    machine allow, eager otherwise. ``fn`` is also the eager fallback, so both compute the same
    formula and differ only by float rounding."""

    def __init__(self, fn: Callable) -> None:
        self.fn = fn
        self.name = fn.__name__
        self._compiled: Callable | None = None
        self._seen: set[tuple] = set()
        self._failed = False

    def active(self, device: torch.device | None) -> bool:
        """Whether a call on ``device`` runs compiled."""
        mode = _state["mode"]
        if device is None or mode == "off" or self._failed or (mode != "inductor" and device.type != "cuda"):
            return False
        ok, why = compiler_available(device)
        if not ok:
            if mode != "auto":
                raise RuntimeError(f"compiled depth mixing asked (mode {mode!r}) but {why}")
            _say_once(f"nocompiler-{device.type}", f"depth mixing runs eager on {device.type}: {why}")
        return ok

    def usable(self, *tensors: torch.Tensor) -> bool:
        """Whether a call on these tensors runs compiled (callers pick their eager path otherwise)."""
        return self.active(_eligible(tensors))

    def __call__(self, *args):
        if not self.active(_eligible(args)):
            return self.fn(*args)
        # Detached aliases: the graph never depends on requires_grad (callers are autograd
        # Functions), and a tensor passed twice is two inputs, not an aliasing guard.
        args = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
        if self._compiled is None:
            self._compiled = torch.compile(self.fn, fullgraph=True)
        sig = _signature(args)
        if sig in self._seen:
            return self._compiled(*args)
        t0 = time.perf_counter()
        try:
            # a kernel meets a few dtype mixes and shapes (autocast, evaluation batches): allow
            # more graphs per kernel than dynamo's default of 8 before giving up on it
            with torch._dynamo.config.patch(recompile_limit=64):
                out = self._compiled(*args)
        except Exception as e:  # noqa: BLE001  (any compiler failure: fall back, say it once)
            if _state["mode"] != "auto":
                raise
            self._failed = True
            _say_once(f"failed-{self.name}", f"compiling the depth mixing ({self.name}) failed, running eager: "
                      f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}")
            return self.fn(*args)
        self._seen.add(sig)
        _state["seconds"] += time.perf_counter() - t0
        return out


def kernel(fn: Callable) -> Kernel:
    """Decorator: ``fn`` becomes a Kernel (compiled where possible, see the module docstring)."""
    return Kernel(fn)


def native_kernels(*tensors: torch.Tensor):
    """The fused C kernels of residual/native.py if the mode allows them for these tensors
    (plain float32 CPU tensors) and they are built, else None (callers run their other path)."""
    mode = _state["mode"]
    if mode not in ("auto", "on") or not native.eligible(*tensors):
        return None
    lib, seconds, why = native.library()
    _state["seconds"] += seconds
    if lib is None:
        if mode == "on":
            raise RuntimeError(f"compiled depth mixing asked (mode 'on') but {why}")
        _say_once("native", f"depth mixing runs eager on cpu: {why}")
    return lib
