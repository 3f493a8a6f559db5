"""A prepared data folder, reopened: token shards as memmaps, the tokenizer, the stats.

Layout of ``<cache_dir>/<key>/``::

    tokenizer.json   the tokenizer that produced the ids (trained here or the user's copy)
    train.bin        train-split token ids, documents joined by the end-of-text id
    val.bin          the same for validation
    meta.json        dtype, vocab size, eot id, per-split stats, the settings behind the key
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from resstream.config import ConfigError
from resstream.data.tokenizer import token_byte_lengths

FORMAT_VERSION = 1
SPLITS = ("train", "val")


def shard_dtype(vocab_size: int) -> np.dtype:
    """uint16 halves shard size and read bandwidth whenever every id fits in it."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


@dataclass
class PreparedData:
    """Everything training and evaluation need from the data room."""

    dir: Path
    tokenizer_path: Path
    tokenizer: Tokenizer
    vocab_size: int
    eot_id: int
    train: np.memmap  # [n_train_tokens] token ids
    val: np.memmap  # [n_val_tokens] token ids
    stats: dict  # split -> {documents, bytes, tokens, bytes_per_token}
    token_bytes: np.ndarray  # [vocab_size] UTF-8 bytes of each id; specials 0
    token_bytes_exact: bool  # True for byte-level tokenizers: bits/byte from it is exact
    meta: dict

    @classmethod
    def from_dir(cls, path: str | Path) -> "PreparedData":
        d = Path(path)
        meta_path = d / "meta.json"
        if not meta_path.is_file():
            raise ConfigError(f"data dir '{d}' has no meta.json; it is not a prepared data folder (run `resstream data prepare`)")
        meta = json.loads(meta_path.read_text())
        if meta.get("format") != FORMAT_VERSION:
            raise ConfigError(f"data dir '{d}' has format {meta.get('format')}, expected {FORMAT_VERSION}; delete it and prepare again")
        tokenizer_path = d / "tokenizer.json"
        tokenizer = Tokenizer.from_file(str(tokenizer_path))
        dtype = np.dtype(meta["dtype"])
        shards = {}
        for split in SPLITS:
            shard = np.memmap(d / f"{split}.bin", dtype=dtype, mode="r")
            if shard.shape[0] != meta["stats"][split]["tokens"]:
                raise ConfigError(f"data dir '{d}': {split}.bin holds {shard.shape[0]} tokens, meta.json says {meta['stats'][split]['tokens']}; delete the folder and prepare again")
            shards[split] = shard
        token_bytes, exact = token_byte_lengths(tokenizer)
        return cls(
            dir=d,
            tokenizer_path=tokenizer_path,
            tokenizer=tokenizer,
            vocab_size=int(meta["vocab_size"]),
            eot_id=int(meta["eot_id"]),
            train=shards["train"],
            val=shards["val"],
            stats=meta["stats"],
            token_bytes=token_bytes,
            token_bytes_exact=exact,
            meta=meta,
        )


def format_stats(prepared: PreparedData) -> str:
    """A small table of the prepared splits, for `resstream data prepare`."""
    header = ("split", "documents", "bytes", "tokens", "bytes/token")
    rows = [header]
    for split in SPLITS:
        s = prepared.stats[split]
        rows.append((split, f"{s['documents']:,}", f"{s['bytes']:,}", f"{s['tokens']:,}", f"{s['bytes_per_token']:.3f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(r, widths))) for r in rows]
    return "\n".join(lines)
