"""A corpus: a named, content-identified, re-iterable stream of documents, and the helpers
every source (built-in, local files, Hugging Face datasets) shares."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Callable, Iterator

from resstream.config import ConfigError


@dataclass(frozen=True)
class Corpus:
    """A named, content-identified, re-iterable stream of non-empty documents."""

    name: str
    identity: str  # sha256 hex of everything that determines the documents
    _documents: Callable[[], Iterator[str]]

    def __iter__(self) -> Iterator[str]:
        for doc in self._documents():
            if doc:  # an empty file or record carries no text and no tokens
                yield doc


def content_hash(*parts: bytes | str) -> str:
    h = hashlib.sha256()
    for p in parts:
        b = p.encode("utf-8") if isinstance(p, str) else p
        # Length-prefix each part so ("ab", "c") and ("a", "bc") hash differently.
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h.hexdigest()


def text_value(value: object, where: object, text_field: str) -> str:
    if value is None:  # a missing value is an empty document, skipped like an empty file
        return ""
    if not isinstance(value, str):
        raise ConfigError(f"data.text_field: '{text_field}' in '{where}' holds {type(value).__name__}, not text; name a text field")
    return value
