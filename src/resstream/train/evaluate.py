"""Validation: loss and bits per byte over fixed batches, split across ranks."""
from __future__ import annotations

import math

import torch
from torch import nn

from resstream.train.distributed import Dist, all_reduce_sum


@torch.no_grad()
def evaluate(model: nn.Module, batches, token_bytes: torch.Tensor, device, dtype, d: Dist) -> tuple[float, float]:
    """Validation loss (nats per token) and bits per byte over fixed batches, split across the
    data-parallel ranks. Tensor-parallel peers evaluate the same batches: the sums over all
    processes then count each batch tp times, numerator and denominators alike."""
    was_training = model.training
    model.eval()
    sums = torch.zeros(3, dtype=torch.float64)
    for i, (x, y) in enumerate(batches):
        if i % d.data_world != d.data_rank:
            continue
        x, y = x.to(device), y.to(device)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            logits = model(x)
        nats = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="sum")
        sums += torch.tensor([nats.item(), y.numel(), token_bytes[y.cpu()].sum().item()], dtype=torch.float64)
    if d.enabled:
        sums = all_reduce_sum(sums, d)
    model.train(was_training)
    nats, count, nbytes = sums.tolist()
    return nats / count, nats / math.log(2) / max(nbytes, 1.0)
