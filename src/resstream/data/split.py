"""Deterministic train/val split by document.

Splitting by token range would let a long document straddle train and val; splitting by
document keeps val text unseen. Each document gets a 64-bit key from (split_seed, its
content), and the ``round(n * val_fraction)`` documents with the smallest keys are val.
Keying by content rather than position gives identical documents identical keys, so
copies sit together in the ranking and (unless the cut falls between them) on the same
side, and a document's side does not depend on its index; ranking rather than thresholding gives the exact requested share, at least one
document on each side.
"""
from __future__ import annotations

import hashlib

import numpy as np

from resstream.config import ConfigError


def split_key(document: str, seed: int) -> int:
    """A stable 64-bit key of (seed, document): same on every machine and Python run."""
    h = hashlib.blake2b(document.encode("utf-8"), digest_size=8, key=seed.to_bytes(8, "little", signed=True))
    return int.from_bytes(h.digest(), "little")


def assign_val(keys: list[int], val_fraction: float, corpus_name: str = "the corpus") -> np.ndarray:
    """Bool mask over documents, True for validation."""
    n = len(keys)
    if n == 0:
        raise ConfigError(f"data.corpus: {corpus_name} has no documents (no non-empty text); point it at some text")
    if n < 2:
        raise ConfigError(
            f"data.corpus: {corpus_name} has only 1 document; a train/val split by document needs at least 2 (add text or raise data.max_bytes)"
        )
    n_val = min(max(round(n * val_fraction), 1), n - 1)
    # Sort by (key, index): the index only breaks exact ties, which are duplicate documents.
    order = np.lexsort((np.arange(n), np.array(keys, dtype=np.uint64)))
    is_val = np.zeros(n, dtype=bool)
    is_val[order[:n_val]] = True
    return is_val
