"""Model sizes of a scaling study: shapes, their parameter counts, token budgets and compute.

A size is a model shape (n_layers x d_model) derived from the base config: the head width
d_model / n_heads of the base is kept (so n_heads = d_model / head_dim), the MLP width
follows d_model (the SwiGLU default), and everything else is the base's.

N, the parameter count of the compute estimate C = 6 N D, counts every parameter except the
token embedding (tied with or separate from the output head) and the residual stream's own
parameters, so that every kind has the same N, and so the same C, at a size (the kinds' extra
parameters are listed beside it). D is the tokens one run trains on.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

from resstream.config import ConfigError


@dataclass(frozen=True)
class Size:
    n_layers: int
    d_model: int
    n_heads: int
    params: int  # N: non-embedding, non-residual parameters
    params_total: int  # every parameter of the baseline's model (embedding and residual included)
    tokens: int  # D, after rounding up to whole steps
    steps: int

    @property
    def label(self) -> str:
        return f"{self.n_layers}x{self.d_model}"

    @property
    def compute(self) -> float:
        return 6.0 * self.params * self.tokens

    def to_dict(self) -> dict:
        return {"label": self.label, "n_layers": self.n_layers, "d_model": self.d_model, "n_heads": self.n_heads,
                "params": self.params, "params_total": self.params_total, "tokens": self.tokens,
                "steps": self.steps, "compute": self.compute}


_SIZE = re.compile(r"^\s*(\d+)\s*x\s*(\d+)\s*$")
_COUNT = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([kKmMgGbB]?)\s*$")
_UNITS = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "b": 1e9}


def parse_shapes(text: str) -> list[tuple[int, int]]:
    """'4x64,6x96' -> [(4, 64), (6, 96)] (n_layers x d_model)."""
    shapes = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        m = _SIZE.match(item)
        if not m or int(m.group(1)) < 1 or int(m.group(2)) < 1:
            raise ConfigError(f"--sizes: '{item}' is not N_LAYERSxD_MODEL; write e.g. --sizes 4x64,6x96,8x128")
        shapes.append((int(m.group(1)), int(m.group(2))))
    if not shapes:
        raise ConfigError("--sizes: name at least one size, e.g. --sizes 4x64,6x96,8x128")
    return shapes


def parse_counts(text: str) -> list[int]:
    """'200k,1.5M' -> [200000, 1500000] (target parameter counts)."""
    out = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        m = _COUNT.match(item)
        if not m or float(m.group(1)) <= 0:
            raise ConfigError(f"--params: '{item}' is not a parameter count; write e.g. --params 200k,500k,1.5M")
        out.append(int(round(float(m.group(1)) * _UNITS[m.group(2).lower()])))
    if not out:
        raise ConfigError("--params: name at least one parameter count, e.g. --params 200k,500k,1.5M")
    return out


def head_dim(model: dict) -> int:
    from resstream.model.config import ModelConfig

    return ModelConfig.from_dict({**model, "vocab_size": 2}, prefix="model.").dim_per_head


def shaped(model: dict, n_layers: int, d_model: int) -> dict:
    """The base model section at a new depth and width (same head width; MLP width from d_model)."""
    hd = head_dim(model)
    if d_model % hd:
        raise ConfigError(f"size {n_layers}x{d_model}: d_model must be a multiple of the head width {hd} "
                          f"(d_model / n_heads of the base config)")
    out = {k: v for k, v in model.items() if k not in ("n_kv_heads", "mlp_hidden")}
    out.update(n_layers=n_layers, d_model=d_model, n_heads=d_model // hd)
    return out


def build_on_meta(model: dict, vocab_size: int):
    """The LM of a model section on the meta device (nothing allocated): a shape error of any
    kind (e.g. channel groups that do not divide d_model) fails here, before training."""
    import torch

    from resstream.model.config import ModelConfig
    from resstream.model.lm import LM

    cfg = ModelConfig.from_dict({**model, "vocab_size": vocab_size}, prefix="model.")
    with torch.device("meta"):
        return LM(cfg)


def count_params(model: dict, vocab_size: int) -> tuple[int, int]:
    """(N, total) of a model section: N excludes the embedding, the head and residual.*."""
    lm = build_on_meta(model, vocab_size)
    seen, n, total = set(), 0, 0
    for name, p in lm.named_parameters():  # named_parameters lists a tied weight once
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        if not name.startswith(("embed.", "head.", "residual.")):
            n += p.numel()
    return n, total


def shape_for_params(model: dict, vocab_size: int, target: int) -> tuple[int, int]:
    """The (n_layers, d_model) whose N is closest to ``target`` (log scale) among shapes with the
    base config's depth-to-width ratio (d_model a multiple of the head width)."""
    from resstream.model.config import ModelConfig

    base = ModelConfig.from_dict({**model, "vocab_size": vocab_size}, prefix="model.")
    hd, ratio = base.dim_per_head, base.d_model / base.n_layers
    best = None
    for n_layers in range(1, 129):
        d = max(hd, hd * round(ratio * n_layers / hd))
        n, _ = count_params(shaped(model, n_layers, d), vocab_size)
        err = abs(math.log(n / target))
        if best is None or err < best[0]:
            best = (err, n_layers, d)
        if n > 4 * target:
            break
    return best[1], best[2]


def build_sizes(model: dict, vocab_size: int, shapes: list[tuple[int, int]], tokens_per_step: int,
                tokens_per_param: float | None, tokens: int | None) -> list[Size]:
    """Sizes sorted by N, each with its token budget: ``tokens`` for every size, else
    ``tokens_per_param`` x N, rounded up to whole steps of ``tokens_per_step``."""
    sizes, seen = [], set()
    for n_layers, d_model in shapes:
        if (n_layers, d_model) in seen:
            raise ConfigError(f"size {n_layers}x{d_model} is listed twice")
        seen.add((n_layers, d_model))
        section = shaped(model, n_layers, d_model)
        n, total = count_params(section, vocab_size)
        want = tokens if tokens is not None else tokens_per_param * n
        steps = max(1, math.ceil(want / tokens_per_step))
        sizes.append(Size(n_layers, d_model, section["n_heads"], n, total, steps * tokens_per_step, steps))
    return sorted(sizes, key=lambda s: (s.params, s.n_layers))
