"""How much memory a model will need, estimated before anything is allocated, and how much
this machine has; a config that cannot fit is refused with one line naming the field.

    closed-form lower bound ─► (fits?) ─► meta-device model + meta forward ─► (fits?) ─► build

Training holds the fp32 weights, their gradients and AdamW's two moments (16 bytes per
parameter), the non-persistent buffers (rotary tables, one pair per attention sublayer) and
the activations autograd saves for backward. Those are measured, not guessed: the model is
built on the meta device (shapes, no storage) and run forward on a meta batch, summing the
storage of every tensor autograd saves, which sees every residual kind's own state without
naming a kind. A real step peaks at about twice what is saved (backward's gradients of the
activations and temporaries: 1.7x-2.1x measured on CPU for three kinds, plain to
multi-stream, at d_model 128, 4 layers, batch 4-32 x 128), hence ``ACTIVATION_PEAK``. Generation holds the
weights, the KV cache and one forward's activations (the saved ones bound them from above).

The closed form runs first, so absurd shapes (n_layers=100000, d_model=1000000) are refused
before even a meta model is built.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from resstream.config import ConfigError
from resstream.model.config import ModelConfig

ACTIVATION_PEAK = 2.0
TRAIN_BYTES_PER_PARAM = 16  # fp32 weight + gradient + AdamW exp_avg + exp_avg_sq
INFER_BYTES_PER_PARAM = 4


@dataclass
class MemoryEstimate:
    params: int
    weight_bytes: int  # weights (+ gradients and optimizer state when training)
    buffer_bytes: int
    activation_bytes: int

    @property
    def total(self) -> int:
        return self.weight_bytes + self.buffer_bytes + self.activation_bytes

    def describe(self, training: bool) -> str:
        held = "with gradients and AdamW state" if training else "weights"
        return (f"{self.params:.3g} parameters: {fmt_bytes(self.weight_bytes)} {held}; "
                f"activations {fmt_bytes(self.activation_bytes)}; buffers {fmt_bytes(self.buffer_bytes)}")


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024 or unit == "PiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.3g} PiB"  # pragma: no cover


# ----------------------------------------------------------------------------- the machine


def _meminfo_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _cgroup_available() -> int | None:
    """Room left under a cgroup v2 memory limit (containers), if there is one."""
    try:
        root = Path("/sys/fs/cgroup")
        limit = (root / "memory.max").read_text().strip()
        if limit == "max":
            return None
        return int(limit) - int((root / "memory.current").read_text().strip())
    except (OSError, ValueError):
        return None


def available_memory(device: torch.device) -> tuple[int | None, str]:
    """(bytes free for a new allocation, where), or (None, where) when the OS does not say."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return free, f"GPU {device}"
    known = [b for b in (_meminfo_available(), _cgroup_available()) if b is not None]
    return (min(known) if known else None), "this machine"


# ----------------------------------------------------------------------------- estimates


def lower_bound(cfg: ModelConfig, batch: int, tokens: int, training: bool) -> MemoryEstimate:
    """Closed form for everything but the residual stream: a lower bound of ``measure``."""
    D, L, hd = cfg.d_model, cfg.n_layers, cfg.dim_per_head
    attn = D * cfg.n_heads * hd * 2 + 2 * D * cfg.kv_heads * hd + D
    mlp = 3 * D * cfg.hidden + D
    params = cfg.vocab_size * D * (1 if cfg.tie_embeddings else 2) + L * (attn + mlp) + D
    per_param = TRAIN_BYTES_PER_PARAM if training else INFER_BYTES_PER_PARAM
    buffers = L * cfg.max_seq_len * hd * 4 + cfg.max_seq_len * hd * 8  # fp32 tables + float64 angles
    acts = batch * tokens * 4 * (cfg.vocab_size + 2 * cfg.n_sublayers * D)  # logits, sublayer inputs
    return MemoryEstimate(params, params * per_param, buffers, acts)


def measure(cfg: ModelConfig, batch: int, tokens: int, training: bool, budget: float = math.inf) -> MemoryEstimate:
    """Build the model on the meta device and run it forward on a meta batch (no storage).
    The forward is skipped when weights and buffers alone exceed ``budget`` bytes."""
    from resstream.model.lm import LM  # late: lm imports this package's siblings

    with _shapes_only():
        model = LM(cfg)
    params = model.num_params()
    per_param = TRAIN_BYTES_PER_PARAM if training else INFER_BYTES_PER_PARAM
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        saved[storage._cdata] = storage.nbytes()  # a storage saved twice is held once
        return t

    if params * per_param + buffers <= budget:
        idx = torch.zeros(batch, tokens, dtype=torch.long, device="meta")
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(idx, idx)
    acts = int(ACTIVATION_PEAK * sum(saved.values()))
    if not training:
        acts += cfg.n_layers * 2 * batch * cfg.kv_heads * tokens * cfg.dim_per_head * 4  # KV cache
    return MemoryEstimate(params, params * per_param, buffers, acts)


@contextlib.contextmanager
def _shapes_only():
    """Build modules on the meta device, without initial values: meta tensors hold none, and
    the meta kernel of normal_ imports torch._dynamo (seconds per process)."""
    normal = torch.nn.init.normal_
    torch.nn.init.normal_ = lambda tensor, *args, **kwargs: tensor
    try:
        with torch.device("meta"):
            yield
    finally:
        torch.nn.init.normal_ = normal


# ----------------------------------------------------------------------------- refusing


def _score(value: float, default: float, power: float) -> float:
    return power * math.log(max(value, 1) / max(default, 1))


def _model_knobs(cfg: ModelConfig) -> dict[str, tuple[float, float, dict]]:
    """Fields that drive memory -> (value, default, {component: power})."""
    defaults = {f.name: f.default for f in dataclasses.fields(ModelConfig) if f.default is not dataclasses.MISSING}
    knobs = {
        "model.d_model": (cfg.d_model, defaults["d_model"], {"weights": 2, "activations": 1}),
        "model.n_layers": (cfg.n_layers, defaults["n_layers"], {"weights": 1, "activations": 1, "buffers": 1}),
        "model.max_seq_len": (cfg.max_seq_len, defaults["max_seq_len"], {"buffers": 1}),
    }
    if cfg.mlp_hidden is not None:
        knobs["model.mlp_hidden"] = (cfg.mlp_hidden, 64 * -(-(8 * cfg.d_model // 3) // 64), {"weights": 1})
    # residual options: whatever integers the kind has (no kind is named here)
    res = cfg.residual
    for f in dataclasses.fields(res):
        value = getattr(res, f.name)
        if isinstance(value, int) and not isinstance(value, bool) and isinstance(f.default, int):
            knobs[f"model.residual.{f.name}"] = (value, f.default, {"weights": 1, "activations": 1})
    return knobs


def blame(est: MemoryEstimate, knobs: dict[str, tuple[float, float, dict]]) -> str:
    """The field most responsible: among those driving the largest component, the one
    furthest above its default (weighted by how the component grows with it)."""
    sizes = {"weights": est.weight_bytes, "buffers": est.buffer_bytes, "activations": est.activation_bytes}
    component = max(sizes, key=sizes.get)
    drivers = {k: v for k, v in knobs.items() if component in v[2]} or knobs
    return max(drivers, key=lambda k: _score(drivers[k][0], drivers[k][1], drivers[k][2].get(component, 1)))


def check_memory(cfg: ModelConfig, batch: int, tokens: int, device: torch.device, training: bool,
                 knobs: dict[str, tuple[float, float, dict]]) -> MemoryEstimate | None:
    """Refuse (ConfigError) a model that cannot fit in ``device``'s free memory. ``knobs``: the
    caller's own fields that drive memory (vocabulary, batch, tokens), as in ``_model_knobs``."""
    available, where = available_memory(device)
    if available is None:
        return None
    all_knobs = {**_model_knobs(cfg), **knobs}
    what, smaller = ("training", "the model or the batch") if training else ("generation", "the model or the context")
    for estimate in (lambda: lower_bound(cfg, batch, tokens, training),
                     lambda: measure(cfg, batch, tokens, training, budget=available)):
        try:
            est = estimate()
        except RuntimeError as e:  # a tensor too large to even describe (sizes overflow 64 bits)
            if "overflow" not in str(e):
                raise
            name = max(all_knobs, key=lambda k: _score(all_knobs[k][0], all_knobs[k][1], 1))
            raise ConfigError(f"{name}={all_knobs[name][0]}: {what} needs tensors larger than 2**63 bytes; make {smaller} smaller") from None
        if est.total > available:
            name = blame(est, all_knobs)
            raise ConfigError(
                f"{name}={all_knobs[name][0]}: {what} needs about {fmt_bytes(est.total)} ({est.describe(training)}) "
                f"but {where} has {fmt_bytes(available)} free; make {smaller} smaller"
            )
    return est
