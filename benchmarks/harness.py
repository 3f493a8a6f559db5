"""Shared benchmark machinery: variants and their code paths, one training step, the
interleaved timing loop, and peak memory measured in a fresh process per variant.

Used by ``step_time.py``, ``mfu.py`` and ``mixing_cost.py``. Run as a script only as the
memory child (``harness.py --memory-child JSON``), which the parent starts itself.

Paths (the ``path`` column): ``default`` is what ``LM(cfg)`` does with no setting (the depth
mixing in resstream.residual.compiled's "auto" mode: the native C kernels on a CPU, compiled
kernels on CUDA, eager where neither builds); ``eager``, ``native`` and ``inductor`` force the
eager mixing, the native kernels, or the torch.compile mixing kernels; ``compiled``
is the whole model under torch.compile (``train.compile=true``). The variant ``gpt`` is the
plain nanoGPT-style PreNorm GPT of reference_gpt.py, the floor.

Timing protocol: every variant lives in the same process; one round times one training step
(forward + backward + AdamW step) of each variant, the starting variant rotating from round
to round, so that drift from other processes hits all variants alike. The first ``warmup``
rounds are discarded (their compilation is counted apart, see Runner.compile_s). Reported:
the median and IQR of each variant's step times, and the median of the per-round ratio to
PreNorm on the same path, a paired statistic.

Peak memory: each variant runs again in a fresh child process. CUDA:
``torch.cuda.max_memory_allocated`` over build + three steps. CPU: bytes held by torch tensors
at the peak of a step, counted from the allocator's events under the profiler (parameters,
gradients and AdamW state included).
"""
from __future__ import annotations

import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO / "src") not in sys.path:  # runnable from a fresh clone without installing
    sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from machine import describe, machine_info  # noqa: E402,F401
from reference_gpt import GPT  # noqa: E402
from resstream import LM, ModelConfig, ResidualConfig  # noqa: E402
from resstream.config import ConfigError, parse_value  # noqa: E402,F401  (parse_value: step_time's flags)
from resstream.residual import available_kinds, compiled, format_spec, get_kind, parse_spec  # noqa: E402
from resstream.residual.config import split_specs  # noqa: E402
from resstream.runtime import tune_allocator  # noqa: E402,F401

REFERENCE = "gpt"  # the nanoGPT-style floor
PATHS = ("default", "eager", "native", "inductor", "compiled")
MIXING_MODE = {"default": None, "eager": "off", "native": "on", "inductor": "inductor", "compiled": "off"}


@dataclass
class Shape:
    layers: int = 12
    d_model: int = 256
    heads: int = 4
    seq: int = 256
    batch: int = 8
    vocab: int = 4096

    @property
    def tokens(self) -> int:
        return self.batch * self.seq


@dataclass
class Variant:
    """One residual kind with its options (or the reference GPT), run on one code path."""

    kind: str
    options: dict[str, Any] = field(default_factory=dict)  # the kind's options (ResidualConfig fields)
    label_options: dict[str, Any] = field(default_factory=dict)  # the ones named in the label
    path: str = "default"

    @property
    def label(self) -> str:
        if self.kind == REFERENCE:
            return "gpt (nanoGPT-style floor)"
        return format_spec({"kind": self.kind, **self.label_options})

    @property
    def compiled(self) -> bool:
        return self.path == "compiled"

    def path_name(self, device: torch.device) -> str:
        """The path as run: for a kind that mixes depth, 'default' says what it resolved to."""
        if self.path != "default" or self.kind == REFERENCE or not get_kind(self.kind).stream.fused_kernels:
            return self.path
        mode = compiled.get_mode()
        if mode == "inductor" or (mode in ("auto", "on") and device.type == "cuda"):
            return "default (compiled mixing)"
        native_ok = mode in ("auto", "on") and device.type == "cpu" and compiled.native.library()[0] is not None
        return f"default ({'native' if native_ok else 'eager'} mixing)"


def residual_fields() -> list[dataclasses.Field]:
    """Every option of every kind, once (the first kind's default where kinds share a name)."""
    out: dict[str, dataclasses.Field] = {}
    for kind in available_kinds():
        for f in dataclasses.fields(get_kind(kind).options):
            out.setdefault(f.name, f)
    return list(out.values())


def parse_variants(spec: str, common: dict[str, Any], paths: tuple[str, ...] = ("default",)) -> list[Variant]:
    """'prenorm,block_attnres:block_size=8' -> Variants on each of ``paths`` (the residual-spec grammar
    of resstream.residual.config; ``gpt`` is the reference floor). ``common`` options apply to every
    variant whose kind has them. Paths that change nothing for a kind (native for PreNorm) are run once."""
    out = []
    for item in split_specs(spec):
        if item.strip() == REFERENCE:
            out += [Variant(REFERENCE, path=p) for p in dict.fromkeys("compiled" if p == "compiled" else "default" for p in paths)]
            continue
        try:
            own = parse_spec(item)
        except ConfigError as e:
            raise SystemExit(str(e)) from None
        kind = own.pop("kind")
        options = get_kind(kind).option_defaults()
        opts = {**{k: v for k, v in common.items() if k in options}, **own}
        mixes = get_kind(kind).stream.fused_kernels
        kind_paths = dict.fromkeys(p if mixes or p == "compiled" else "default" for p in paths)
        out += [Variant(kind, opts, own, p) for p in kind_paths]
    return out


def model_config(shape: Shape, v: Variant) -> ModelConfig:
    residual = ResidualConfig() if v.kind == REFERENCE else ResidualConfig(kind=v.kind, **v.options)
    return ModelConfig(vocab_size=shape.vocab, d_model=shape.d_model, n_layers=shape.layers, n_heads=shape.heads,
                       max_seq_len=shape.seq, residual=residual)


def build_model(shape: Shape, v: Variant, device: torch.device) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = model_config(shape, v)
    return (GPT(cfg) if v.kind == REFERENCE else LM(cfg)).to(device)


# ----------------------------------------------------------------------------- one training step


def make_optimizer(model: torch.nn.Module) -> tuple[torch.optim.Optimizer, str]:
    """AdamW, fused where this torch supports it (the same for every variant)."""
    for flavour in ("fused", "foreach"):
        try:
            return torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, **{flavour: True}), flavour
        except (RuntimeError, TypeError, ValueError):
            continue
    return torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1), "for-loop"


def make_batch(shape: Shape, device: torch.device, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    data = torch.randint(0, shape.vocab, (shape.batch, shape.seq + 1), generator=g).to(device)
    return data[:, :-1].contiguous(), data[:, 1:].contiguous()


@dataclass
class Runner:
    variant: Variant
    model: torch.nn.Module
    step_fn: Callable[[], None]
    optimizer: torch.optim.Optimizer
    flavour: str  # fused / foreach / for-loop AdamW
    batch: tuple[torch.Tensor, torch.Tensor]
    compile_s: list[float] = field(default_factory=lambda: [0.0])  # one-time compilation, counted apart
    first_steps_s: list[float] = field(default_factory=list)


def build_runner(shape: Shape, v: Variant, device: torch.device, batch) -> Runner:
    model = build_model(shape, v, device)
    opt, flavour = make_optimizer(model)
    fwd = torch.compile(model) if v.compiled else model
    idx, tgt = batch
    mode = MIXING_MODE[v.path]
    runner = Runner(v, model, lambda: None, opt, flavour, batch)

    def step() -> None:
        previous = compiled.get_mode()
        if mode is not None:
            compiled.set_mode(mode)
        c0, t0 = compiled.compile_seconds(), time.perf_counter()
        try:
            _, loss = fwd(idx, tgt)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        finally:
            compiled.set_mode(previous)
        runner.compile_s[0] += compiled.compile_seconds() - c0
        if len(runner.first_steps_s) < 2:  # whole-model compilation: the first step minus the second
            runner.first_steps_s.append(time.perf_counter() - t0)

    runner.step_fn = step
    return runner


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------- interleaved timing


@dataclass
class Timing:
    label: str
    path: str
    times: list[float]  # seconds per step, timed rounds only
    ratios: list[float] = field(default_factory=list)  # per-round ratio to the baseline

    @staticmethod
    def quartiles(xs: list[float]) -> tuple[float, float, float]:
        if len(xs) < 2:
            return (xs[0], xs[0], xs[0]) if xs else (float("nan"),) * 3
        q = statistics.quantiles(xs, n=4, method="inclusive")
        return q[0], statistics.median(xs), q[2]

    @property
    def median(self) -> float:
        return self.quartiles(self.times)[1]

    @property
    def iqr(self) -> float:
        q1, _, q3 = self.quartiles(self.times)
        return q3 - q1


CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.process_time}


def interleaved_timing(
    entries: list[tuple[str, str, Callable[[], None]]], steps: int, warmup: int, device: torch.device,
    baseline: dict[str, int] | None = None, log: Callable[[str], None] = print, clock: str = "wall",
) -> list[Timing]:
    """Time each entry's callable once per round, rotating the starting entry every round.

    ``baseline`` maps a path to the index of the entry that ratios are taken against. ``clock``:
    "wall", or "cpu" (this process's CPU time, all threads: with one thread on a shared machine
    it counts the work done rather than the time spent waiting for a core).
    """
    now = CLOCKS[clock]
    n = len(entries)
    times: list[list[float]] = [[] for _ in entries]
    for r in range(warmup + steps):
        round_t = [0.0] * n
        for j in range(n):
            i = (r + j) % n
            sync(device)
            t0 = now()
            entries[i][2]()
            sync(device)
            round_t[i] = now() - t0
        if r >= warmup:
            for i in range(n):
                times[i].append(round_t[i])
        tag = "warm-up" if r < warmup else "timed"
        log(f"  round {r + 1}/{warmup + steps} ({tag}): " + "  ".join(f"{entries[i][0]}[{entries[i][1]}] {1e3 * round_t[i]:.0f}" for i in range(n)))
    out = [Timing(label, path, ts) for (label, path, _), ts in zip(entries, times)]
    for t in out:
        b = (baseline or {}).get(t.path)
        if b is not None:
            t.ratios = [a / c for a, c in zip(t.times, out[b].times)]
    return out


# ----------------------------------------------------------------------------- peak memory (child process)


def _live_bytes(model: torch.nn.Module, opt: torch.optim.Optimizer, batch) -> int:
    seen: set[int] = set()
    tensors = [p for p in model.parameters()] + [p.grad for p in model.parameters() if p.grad is not None]
    tensors += [v for st in opt.state.values() for v in st.values() if torch.is_tensor(v)] + list(model.buffers()) + list(batch)
    total = 0
    for t in tensors:
        s = t.untyped_storage()
        if s.data_ptr() not in seen:
            seen.add(s.data_ptr())
            total += s.nbytes()
    return total


def memory_child(payload: dict) -> dict:
    """Build one variant in this fresh process and measure its peak (see module docstring)."""
    shape = Shape(**payload["shape"])
    v = Variant(payload["kind"], payload["options"], {}, payload["path"])
    device = torch.device(payload["device"])
    if payload.get("threads"):
        torch.set_num_threads(payload["threads"])
    if payload.get("tune_allocator"):
        tune_allocator()
    batch = make_batch(shape, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        r = build_runner(shape, v, device, batch)
        for _ in range(3):
            r.step_fn()
        sync(device)
        return {"alloc_mib": torch.cuda.max_memory_allocated(device) / 2**20, "method": "torch.cuda.max_memory_allocated"}
    from torch.profiler import ProfilerActivity, profile

    r = build_runner(shape, v, device, batch)
    for _ in range(2):
        r.step_fn()
    live = _live_bytes(r.model, r.optimizer, batch)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        r.step_fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    running = peak = 0
    for _, nb in events:
        running += nb
        peak = max(peak, running)
    return {"alloc_mib": (live + peak) / 2**20, "method": "profiler allocator events"}


def measure_memory(shape: Shape, v: Variant, device: torch.device, threads: int | None = None,
                   tune: bool = True, timeout: float = 1800) -> dict:
    payload = {"shape": dataclasses.asdict(shape), "kind": v.kind, "options": v.options, "path": v.path,
               "device": str(device), "threads": threads, "tune_allocator": tune}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--memory-child", json.dumps(payload)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=os.environ.copy())
    if res.returncode != 0:
        return {"error": res.stderr.strip().splitlines()[-1] if res.stderr.strip() else f"exit {res.returncode}"}
    return json.loads(res.stdout.strip().splitlines()[-1])


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "--memory-child":
    print(json.dumps(memory_child(json.loads(sys.argv[2]))))
