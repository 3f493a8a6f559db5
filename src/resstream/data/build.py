"""``prepare``: corpus -> split -> tokenizer -> token shards, cached by content.

The cache folder's name is a hash of everything that determines its bytes: the corpus
content identity, max_bytes, the split settings, the tokenizer (the user's file bytes, or
the vocab size and tokenizers version of a trained one) and this pipeline's format. Same
inputs, same folder: the second prepare only hashes the sources and reopens the shards.

The folder is built under a temporary name in the same parent and renamed into place
only when complete and fsynced, so a crash or Ctrl-C never leaves a half cache that a
later run would trust.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import tokenizers

from resstream.config import ConfigError, DataConfig
from resstream.data.prepared import FORMAT_VERSION, SPLITS, PreparedData, shard_dtype
from resstream.data.corpus import Corpus, content_hash
from resstream.data.sources import load_corpus
from resstream.data.split import assign_val, split_key
from resstream.runtime import cache_root
from resstream.data.tokenizer import PIECE_CHARS, encode_documents, find_eot_id, load_tokenizer, tokenizer_file, train_bpe

Log = Callable[[str], None]
TMP_PREFIX = ".tmp-"


def default_cache_dir() -> Path:
    return cache_root()


def cache_key(cfg: DataConfig, corpus: Corpus) -> str:
    if cfg.tokenizer is not None:
        tok_id = content_hash("user", tokenizer_file(cfg.tokenizer).read_bytes())
    else:
        # The trainer's output can change between tokenizers releases.
        tok_id = content_hash("bpe", str(cfg.vocab_size), tokenizers.__version__)
    return content_hash(
        "resstream-data", str(FORMAT_VERSION), corpus.identity, str(cfg.split_seed), repr(cfg.val_fraction), tok_id
    )[:20]


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some platforms cannot fsync a directory; the rename is still atomic
        pass
    finally:
        os.close(fd)


def _write_shards(tmp: Path, corpus: Corpus, is_val: np.ndarray, tok, eot_id: int, dtype: np.dtype, piece_chars) -> dict:
    stats = {s: {"documents": 0, "bytes": 0, "tokens": 0} for s in SPLITS}
    files = {s: open(tmp / f"{s}.bin", "wb") for s in SPLITS}
    eot = np.array([eot_id], dtype=dtype)
    written = {s: 0 for s in SPLITS}
    try:
        counted = _tee_counted(corpus, stats, is_val)  # counts as the encoder reads
        for i, ids in enumerate(encode_documents(tok, counted, piece_chars=piece_chars)):
            split = "val" if is_val[i] else "train"
            if written[split]:  # documents are joined with the end-of-text id between them
                files[split].write(eot.tobytes())
                stats[split]["tokens"] += 1
            written[split] += 1
            files[split].write(ids.astype(dtype).tobytes())
            stats[split]["tokens"] += len(ids)
        for f in files.values():
            f.flush()
            os.fsync(f.fileno())
    finally:
        for f in files.values():
            f.close()
    for s in stats.values():
        s["bytes_per_token"] = s["bytes"] / s["tokens"] if s["tokens"] else 0.0
    return stats


def _tee_counted(docs, stats: dict, is_val: np.ndarray):
    """Yield documents while counting documents and UTF-8 bytes per split."""
    for i, doc in enumerate(docs):
        if i >= len(is_val):
            raise RuntimeError("the corpus yielded more documents on a second read; is it changing?")
        s = stats["val" if is_val[i] else "train"]
        s["documents"] += 1
        s["bytes"] += len(doc.encode("utf-8"))
        yield doc


def _build(cfg: DataConfig, corpus: Corpus, tmp: Path, key: str, log: Log) -> None:
    t0 = time.perf_counter()
    keys = [split_key(doc, cfg.split_seed) for doc in corpus]
    is_val = assign_val(keys, cfg.val_fraction, corpus.name)
    n_train = int((~is_val).sum())
    log(f"data: {corpus.name}: {len(keys):,} documents, {n_train:,} train / {len(keys) - n_train:,} val")

    if cfg.tokenizer is not None:
        tok = load_tokenizer(cfg.tokenizer)
        shutil.copyfile(tokenizer_file(cfg.tokenizer), tmp / "tokenizer.json")  # as is, byte for byte
        piece_chars = None  # its pre-tokenizer may not allow exact cuts; encode documents whole
        log(f"data: tokenizer {cfg.tokenizer} ({tok.get_vocab_size():,} ids)")
    else:
        t = time.perf_counter()
        train_docs = (doc for doc, v in zip(corpus, is_val) if not v)  # the tokenizer never sees val text
        tok = train_bpe(train_docs, cfg.vocab_size, length=n_train)
        piece_chars = PIECE_CHARS
        log(f"data: trained byte-level BPE, {tok.get_vocab_size():,} ids, in {time.perf_counter() - t:.1f} s")
        tok.save(str(tmp / "tokenizer.json"))
    vocab_size = tok.get_vocab_size(with_added_tokens=True)
    eot_id = find_eot_id(tok, where=f"tokenizer '{cfg.tokenizer}'")
    dtype = shard_dtype(vocab_size)

    t = time.perf_counter()
    stats = _write_shards(tmp, corpus, is_val, tok, eot_id, dtype, piece_chars)
    if stats["train"]["documents"] != n_train or stats["val"]["documents"] != len(keys) - n_train:
        raise RuntimeError(f"corpus {corpus.name} yielded different documents on a second read; is it changing?")
    log(f"data: encoded {stats['train']['tokens'] + stats['val']['tokens']:,} tokens in {time.perf_counter() - t:.1f} s")

    meta = {
        "format": FORMAT_VERSION,
        "key": key,
        "corpus": corpus.name,
        "corpus_identity": corpus.identity,
        "config": {k: v for k, v in cfg.to_dict().items() if k != "cache_dir"},
        "tokenizer_source": cfg.tokenizer or "trained",
        "tokenizers_version": tokenizers.__version__,
        "vocab_size": vocab_size,
        "eot_id": eot_id,
        "dtype": dtype.name,
        "stats": stats,
        "build_seconds": round(time.perf_counter() - t0, 3),
    }
    with open(tmp / "meta.json", "w") as f:
        json.dump(meta, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    _fsync_path(tmp / "tokenizer.json")
    _fsync_path(tmp)


def prepare(cfg: DataConfig, log: Optional[Log] = None) -> PreparedData:
    """Tokenized train/val shards for ``cfg``, built once and then reused from the cache."""
    log = log or (lambda _msg: None)
    corpus = load_corpus(cfg)
    key = cache_key(cfg, corpus)
    root = Path(cfg.cache_dir).expanduser() if cfg.cache_dir else default_cache_dir()
    final = root / key
    if (final / "meta.json").is_file():
        log(f"data: reusing {final}")
        return PreparedData.from_dir(final)

    try:
        root.mkdir(parents=True, exist_ok=True)
        _remove_stale_temps(root)
        tmp = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{key}-", dir=root))
    except OSError as e:
        raise ConfigError(f"data.cache_dir: cannot write '{root}' ({e.strerror or e}); set data.cache_dir to a writable folder") from None
    try:
        _build(cfg, corpus, tmp, key, log)
        try:
            os.replace(tmp, final)
        except OSError:
            # Another process finished the same key first; its folder is just as good.
            if not (final / "meta.json").is_file():
                raise ConfigError(f"data cache: '{final}' exists but is not a complete prepared folder; delete it and retry") from None
        _fsync_path(root)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    log(f"data: wrote {final}")
    return PreparedData.from_dir(final)


def _remove_stale_temps(root: Path, max_age_s: float = 24 * 3600) -> None:
    """Drop temp folders left by a killed prepare (kill -9 skips our cleanup); a day-old
    one cannot belong to a build still running on a corpus this tool is meant for."""
    now = time.time()
    for p in root.glob(f"{TMP_PREFIX}*"):
        try:
            if p.is_dir() and now - p.stat().st_mtime > max_age_s:
                shutil.rmtree(p, ignore_errors=True)
        except OSError:
            pass
