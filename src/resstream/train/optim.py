"""AdamW parameter groups and the learning-rate schedule."""
from __future__ import annotations

import math

import torch
from torch import nn

from resstream.config import TrainConfig
from resstream.model.config import ModelConfig


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay only matrices inside sublayers (and an untied head).

    No decay on norms, embeddings (and a head tied to them) and every residual parameter
    (``residual.*``): pseudo-queries, gates and depth weights are tiny, and decaying them
    pulls a kind back towards its init (DenseFormer and AttnRes leave them undecayed).
    """
    decay, no_decay, seen = [], [], set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        is_matrix = p.dim() >= 2
        exempt = name.startswith("residual.") or name.startswith("embed.") or "norm" in name
        if name.startswith("head.") and getattr(model, "cfg", None) is not None and model.cfg.tie_embeddings:
            exempt = True
        (decay if is_matrix and not exempt else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def optimizer_index_names(cfg: ModelConfig, weight_decay: float) -> list[str]:
    """Parameter names in the order make_optimizer numbers a whole LM's parameters (the indices
    of its state_dict), from a model built on the meta device (no memory, no RNG)."""
    from resstream.model import LM

    with torch.device("meta"):
        model = LM(cfg)
    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(p)] for g in param_groups(model, weight_decay) for p in g["params"]]


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    return torch.optim.AdamW(
        param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8
    )


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup over warmup_frac of the steps, then cosine or linear decay to
    min_lr_ratio * lr at the last step (step counts from 0)."""
    warmup = int(round(cfg.warmup_frac * cfg.steps))
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    if cfg.schedule == "constant":
        return cfg.lr
    span = max(1, cfg.steps - warmup - 1)
    progress = min(1.0, (step - warmup) / span)
    floor = cfg.min_lr_ratio
    if cfg.schedule == "cosine":
        scale = floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    else:
        scale = 1 - (1 - floor) * progress
    return cfg.lr * scale
