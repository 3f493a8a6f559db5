"""Shared benchmark machinery: allocator settings, variants, the interleaved timing loop, and
peak memory measured in a fresh process per variant.

Used by ``step_time.py`` and ``mfu.py``. Run as a script only as the memory child
(``harness.py --memory-child JSON``), which the parent starts itself.

Timing protocol: every variant lives in the same process; one round times one training step
(forward + backward + AdamW step) of each variant, the starting variant rotating from round
to round, so that drift from other processes on shared cores hits all variants alike. The
first ``warmup`` rounds are discarded. Reported: the median and IQR of each variant's step
times, and the median (and IQR) of the per-round ratio to PreNorm, a paired statistic.

Peak memory: each variant runs again in a fresh child process, so nothing one variant
allocated can hide another's peak.
- CUDA: ``torch.cuda.max_memory_allocated`` over model build and three training steps.
- CPU, "alloc": bytes held by torch tensors at the peak of a training step, counted exactly
  from the allocator's events under ``torch.profiler(profile_memory=True)`` (the CPU analogue of
  max_memory_allocated): parameters + optimizer state + batch live before the step, plus the
  highest running total of allocations minus frees during the step. Two unprofiled warm-up
  steps come first, so AdamW's state exists.
- CPU, "RSS": VmHWM - VmRSS of the child over build + two steps, the high-water mark reset
  (``/proc/self/clear_refs``) just before the build (after one tiny step of the same kind has
  loaded the kernels); includes allocator slack and fragmentation, so it depends on the glibc
  settings printed in the header.
"""
from __future__ import annotations

import dataclasses
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from alloc_env import ALLOC_ENV, allocator_settings, ensure_allocator_env  # noqa: F401

# Import torch only after the re-exec decision: callers run ensure_allocator_env() first.
import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
if str(REPO / "src") not in sys.path:  # runnable from a fresh clone without installing
    sys.path.insert(0, str(REPO / "src"))

from resstream import LM, ModelConfig, ResidualConfig  # noqa: E402
from resstream.config import ConfigError, parse_value  # noqa: E402,F401  (parse_value: step_time's flags)
from resstream.residual import available_kinds, format_spec, get_kind, parse_spec  # noqa: E402
from resstream.residual.config import split_specs  # noqa: E402


# ----------------------------------------------------------------------------- shapes and variants


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
    """One residual kind with its options, run on one code path."""

    kind: str
    options: dict[str, Any] = field(default_factory=dict)  # the kind's options (ResidualConfig fields)
    label_options: dict[str, Any] = field(default_factory=dict)  # the ones named in the label
    compiled: bool = False

    @property
    def label(self) -> str:
        return format_spec({"kind": self.kind, **self.label_options})

    @property
    def path(self) -> str:
        return "compiled" if self.compiled else "eager"


def residual_fields() -> list[dataclasses.Field]:
    """Every option of every kind, once (the first kind's default where kinds share a name)."""
    out: dict[str, dataclasses.Field] = {}
    for kind in available_kinds():
        for f in dataclasses.fields(get_kind(kind).options):
            out.setdefault(f.name, f)
    return list(out.values())


def parse_variants(spec: str, common: dict[str, Any]) -> list[Variant]:
    """'prenorm,block_attnres:block_size=8,recompute=true' -> Variants (the residual-spec grammar of
    resstream.residual.config; unknown kinds and options rejected). ``common`` options apply to
    every variant whose kind has them."""
    out = []
    for item in split_specs(spec):
        try:
            own = parse_spec(item)
        except ConfigError as e:
            raise SystemExit(str(e)) from None
        kind = own.pop("kind")
        options = get_kind(kind).option_defaults()
        out.append(Variant(kind, {**{k: v for k, v in common.items() if k in options}, **own}, own))
    return out


def model_config(shape: Shape, v: Variant) -> ModelConfig:
    return ModelConfig(
        vocab_size=shape.vocab, d_model=shape.d_model, n_layers=shape.layers, n_heads=shape.heads,
        max_seq_len=shape.seq, residual=ResidualConfig(kind=v.kind, **v.options),
    )


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


def build_runner(shape: Shape, v: Variant, device: torch.device, batch) -> Runner:
    torch.manual_seed(0)
    model = LM(model_config(shape, v)).to(device)
    opt, flavour = make_optimizer(model)
    fwd = torch.compile(model) if v.compiled else model
    idx, tgt = batch

    def step() -> None:
        _, loss = fwd(idx, tgt)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return Runner(v, model, step, opt, flavour, batch)


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
    "wall", or "cpu" (this process's CPU time, all threads): on cores shared with other jobs,
    CPU time with one thread counts the work done rather than the time spent waiting for a core.
    """
    now = CLOCKS[clock]
    n = len(entries)
    times: list[list[float]] = [[] for _ in entries]
    for r in range(warmup + steps):
        round_t = [0.0] * n
        for j in range(n):
            i = (r + j) % n
            fn = entries[i][2]
            sync(device)
            t0 = now()
            fn()
            sync(device)
            round_t[i] = now() - t0
        if r >= warmup:
            for i in range(n):
                times[i].append(round_t[i])
        tag = "warm-up" if r < warmup else "timed"
        log(f"  round {r + 1}/{warmup + steps} ({tag}): " + "  ".join(f"{entries[i][0]}[{entries[i][1]}] {1e3 * round_t[i]:.0f}" for i in range(n)))
    out = [Timing(label, path, ts) for (label, path, _), ts in zip(entries, times)]
    if baseline:
        for t in out:
            b = baseline.get(t.path)
            if b is not None:
                t.ratios = [a / c for a, c in zip(t.times, out[b].times)]
    return out


# ----------------------------------------------------------------------------- peak memory (child process)


def _proc_status_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def _reset_hwm() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _live_bytes(model: torch.nn.Module, opt: torch.optim.Optimizer, batch) -> int:
    seen: set[int] = set()
    total = 0

    def add(t: torch.Tensor) -> None:
        nonlocal total
        s = t.untyped_storage()
        if s.data_ptr() not in seen:
            seen.add(s.data_ptr())
            total += s.nbytes()

    for p in model.parameters():
        add(p)
        if p.grad is not None:
            add(p.grad)
    for st in opt.state.values():
        for v in st.values():
            if torch.is_tensor(v):
                add(v)
    for b in model.buffers():
        add(b)
    for t in batch:
        add(t)
    return total


def memory_child(payload: dict) -> dict:
    """Build one variant in this fresh process and measure its peak (see module docstring)."""
    shape = Shape(**payload["shape"])
    v = Variant(payload["kind"], payload["options"], {}, payload["compiled"])
    device = torch.device(payload["device"])
    if payload.get("threads"):
        torch.set_num_threads(payload["threads"])
    batch = make_batch(shape, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        r = build_runner(shape, v, device, batch)
        for _ in range(3):
            r.step_fn()
        sync(device)
        return {"alloc_mib": torch.cuda.max_memory_allocated(device) / 2**20, "rss_mib": None,
                "method": "torch.cuda.max_memory_allocated over build + 3 steps"}
    from torch.profiler import ProfilerActivity, profile

    # One tiny step of the same kind first, so that lazily loaded kernels and thread pools
    # are not counted as this variant's memory.
    tiny = Shape(layers=1, d_model=2 * shape.heads * 2, heads=shape.heads, seq=8, batch=1, vocab=64)
    build_runner(tiny, v, device, make_batch(tiny, device)).step_fn()
    have_reset = _reset_hwm()
    rss0 = _proc_status_kib("VmRSS")
    r = build_runner(shape, v, device, batch)
    for _ in range(2):
        r.step_fn()
    rss_peak = _proc_status_kib("VmHWM") - rss0
    live = _live_bytes(r.model, r.optimizer, batch)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        r.step_fn()
    events = sorted(
        ((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
    )
    running = peak = 0
    for _, nb in events:
        running += nb
        peak = max(peak, running)
    return {"alloc_mib": (live + peak) / 2**20, "rss_mib": rss_peak / 1024 if have_reset else None,
            "step_alloc_mib": peak / 2**20, "live_before_step_mib": live / 2**20,
            "method": "profiler allocator events (alloc); VmHWM - VmRSS after HWM reset (rss)"}


def measure_memory(shape: Shape, v: Variant, device: torch.device, threads: int | None = None, timeout: float = 1800) -> dict:
    payload = {"shape": dataclasses.asdict(shape), "kind": v.kind, "options": v.options,
               "compiled": v.compiled, "device": str(device), "threads": threads}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--memory-child", json.dumps(payload)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=os.environ.copy())
    if res.returncode != 0:
        return {"error": res.stderr.strip().splitlines()[-1] if res.stderr.strip() else f"exit {res.returncode}"}
    return json.loads(res.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- machine description


def machine_info(device: torch.device) -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO, capture_output=True, text=True).stdout.strip())
    except OSError:
        sha, dirty = "", False
    info = {
        "cpu": cpu, "logical_cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__, "python": platform.python_version(), "device": str(device),
        "git": sha + ("-dirty" if dirty else ""), "allocator": allocator_settings(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "--memory-child":
    print(json.dumps(memory_child(json.loads(sys.argv[2]))))
