"""Deterministic batches: a pure function of (seed, step), so a resumed run and every
residual kind in a comparison see exactly the same data in the same order."""
from __future__ import annotations

import numpy as np
import torch


def train_batch(tokens: np.ndarray, seed: int, step: int, micro: int, n_micro: int, rank: int,
                world: int, batch_size: int, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Micro-batch ``micro`` of rank ``rank`` for optimizer step ``step``.

    The global batch of ``batch_size`` windows is drawn from a generator seeded by
    (seed, step); it is cut into n_micro * world equal slices, so a DDP run and a
    single-process run with the same global batch see the same windows.
    """
    n = len(tokens) - seq_len - 1
    if n <= 0:
        raise ValueError(f"the training split has {len(tokens)} tokens, fewer than seq_len + 2 = {seq_len + 2}; use a larger corpus or a smaller train.seq_len")
    rng = np.random.default_rng([seed, step])
    starts = rng.integers(0, n + 1, size=batch_size)
    per = batch_size // (n_micro * world)
    k = micro * world + rank
    mine = starts[k * per : (k + 1) * per]
    return _windows(tokens, mine, seq_len)


def val_batches(tokens: np.ndarray, n_batches: int, batch_size: int, seq_len: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Fixed, non-overlapping windows from the start of the validation split."""
    n_windows = min(n_batches * batch_size, (len(tokens) - 1) // seq_len)
    if n_windows < 1:
        raise ValueError(f"the validation split has {len(tokens)} tokens, fewer than seq_len + 1 = {seq_len + 1}; raise data.val_fraction or lower train.seq_len")
    starts = np.arange(n_windows) * seq_len
    return [_windows(tokens, starts[i : i + batch_size], seq_len) for i in range(0, n_windows, batch_size)]


def _windows(tokens: np.ndarray, starts: np.ndarray, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    rows = np.stack([np.asarray(tokens[s : s + seq_len + 1], dtype=np.int64) for s in starts])
    t = torch.from_numpy(rows)
    return t[:, :-1], t[:, 1:]
