"""Hugging Face ``datasets`` as a corpus source (``data.corpus = "hf:NAME[:CONFIG]"``).

One function serves both uses: a hub dataset (``name="wikitext", config=...``) and local
files through the generic builders (``name="json"`` or ``"parquet"`` with ``data_files``),
which is how the code path is tested offline. The ``train`` split is loaded in full
(``datasets`` caches the download); resstream makes its own train/val split by document.
"""
from __future__ import annotations

import contextlib
import logging
import warnings
from typing import Iterator, Optional, Sequence

from resstream.config import ConfigError
from resstream.data.corpus import Corpus, content_hash, text_value


@contextlib.contextmanager
def _quiet_hub():
    """Without the network the hub client logs a line per retry before giving up; the one-line
    error below says it all, so its warnings are silenced for the call."""
    loggers = [logging.getLogger(n) for n in ("huggingface_hub", "datasets", "fsspec")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def load_hf_documents(
    name: str,
    config: Optional[str] = None,
    text_field: str = "text",
    data_files: Optional[str | Sequence[str]] = None,
    cache_dir: Optional[str] = None,
) -> Corpus:
    """A corpus of the ``text_field`` of every row of dataset ``name``'s train split."""
    try:
        import datasets
    except ImportError:
        raise ConfigError("data.corpus: hf: corpora need the datasets package; pip install 'resstream[hf]'") from None

    label = f"hf:{name}" + (f":{config}" if config else "")
    try:
        with _quiet_hub():
            ds = datasets.load_dataset(name, config, data_files=data_files, split="train", cache_dir=cache_dir)
    except Exception as e:  # network, unknown name, bad config: one line for the CLI
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"data.corpus: could not load {label} ({first}); check the name, config and network") from None
    if text_field not in ds.column_names:
        raise ConfigError(
            f"data.text_field: {label} has no column '{text_field}' (columns: {', '.join(ds.column_names)}); set data.text_field"
        )

    def documents() -> Iterator[str]:
        for batch in ds.select_columns([text_field]).iter(batch_size=1024):
            for value in batch[text_field]:
                yield text_value(value, label, text_field)

    # datasets fingerprints a loaded split from its builder config and data files (the hub
    # revision, or local paths and modification times), so it changes when the data does.
    return Corpus(label, content_hash("hf", name, config or "", text_field, ds._fingerprint), documents)
