"""Tokenizers: train a byte-level BPE on the train split, or load the user's tokenizer.json.

Byte-level BPE maps every byte to one of 256 printable symbols before merging, so any
text round-trips exactly and each token stands for a known number of UTF-8 bytes. That
makes bits-per-byte exact: ``token_bytes[id]`` is the byte length of token ``id``.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Iterable, Iterator, Optional

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from resstream.config import ConfigError

EOT = "<|endoftext|>"
# Names other tokenizers give their end-of-text token, tried in order for a user tokenizer.
EOT_ALIASES = (EOT, "<|end_of_text|>", "</s>", "<eos>", "<|eos|>", "<|im_end|>")

# Documents longer than this are encoded in pieces cut at "x\n|Y" (x, Y non-space). The
# byte-level pre-tokenizer's regex makes such a lone newline its own pre-token in context
# and at the end of a piece alike, so the ids equal those of the whole document, while
# pieces let encode_batch use every core on a corpus of a few huge files.
PIECE_CHARS = 1 << 16
_SAFE_CUT = re.compile(r"\S\n(?=\S)")


def train_bpe(documents: Iterable[str], vocab_size: int, length: Optional[int] = None) -> Tokenizer:
    """A byte-level BPE with ``vocab_size`` ids (fewer if the text runs out of merges), EOT = id 0."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT],
        # All 256 byte symbols up front, so bytes unseen in training still encode.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(documents, trainer=trainer, length=length)
    return tok


def tokenizer_file(path: str | Path) -> Path:
    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(f"data.tokenizer: '{path}' not found; pass an existing tokenizer.json or unset it to train one")
    return p


def load_tokenizer(path: str | Path) -> Tokenizer:
    p = tokenizer_file(path)
    try:
        return Tokenizer.from_file(str(p))
    except Exception as e:
        raise ConfigError(f"data.tokenizer: '{path}' is not a tokenizers JSON file ({str(e).splitlines()[0]}); pass a tokenizer.json") from None


def find_eot_id(tok: Tokenizer, where: str = "the tokenizer") -> int:
    for name in EOT_ALIASES:
        i = tok.token_to_id(name)
        if i is not None:
            return i
    raise ConfigError(f"data.tokenizer: {where} has no end-of-text token ({', '.join(EOT_ALIASES)}); add '{EOT}' as a special token")


def _decoder_is_byte_level(tok: Tokenizer) -> bool:
    dec = json.loads(tok.to_str()).get("decoder") or {}
    parts = dec.get("decoders", []) if dec.get("type") == "Sequence" else [dec]
    return any(d.get("type") == "ByteLevel" for d in parts)


def token_byte_lengths(tok: Tokenizer) -> tuple[np.ndarray, bool]:
    """UTF-8 bytes per token id (specials 0) and whether the lengths are exact.

    Exact for byte-level tokenizers: each symbol of the byte alphabet is one byte. Other
    tokenizers fall back to decoding each id alone, which can miss a word-initial space
    (e.g. SentencePiece's metaspace), so they are flagged inexact.
    """
    n = tok.get_vocab_size(with_added_tokens=True)
    lengths = np.zeros(n, dtype=np.int64)
    added = tok.get_added_tokens_decoder()
    alphabet = set(pre_tokenizers.ByteLevel.alphabet())
    byte_level = _decoder_is_byte_level(tok)
    exact = True
    for token, i in tok.get_vocab(with_added_tokens=True).items():
        if i in added:
            lengths[i] = 0 if added[i].special else len(added[i].content.encode("utf-8"))
        elif byte_level and all(ch in alphabet for ch in token):
            lengths[i] = len(token)
        else:
            lengths[i] = len(tok.decode([i], skip_special_tokens=False).encode("utf-8"))
            exact = False
    return lengths, exact


def _pieces(doc: str, piece_chars: Optional[int]) -> list[str]:
    if piece_chars is None or len(doc) <= piece_chars:
        return [doc]
    out, start = [], 0
    while len(doc) - start > piece_chars:
        m = _SAFE_CUT.search(doc, start + piece_chars)
        if m is None:
            break
        out.append(doc[start:m.end()])
        start = m.end()
    out.append(doc[start:])
    return out


def _encode_batch(encode, docs: list[str], piece_chars: Optional[int]) -> list[np.ndarray]:
    pieces: list[str] = []
    owners: list[int] = []  # piece -> index of its document in ``docs``
    for d, doc in enumerate(docs):
        for piece in _pieces(doc, piece_chars):
            pieces.append(piece)
            owners.append(d)
    per_doc: list[list[int]] = [[] for _ in docs]
    for owner, enc in zip(owners, encode(pieces, add_special_tokens=False)):
        per_doc[owner].extend(enc.ids)
    return [np.asarray(ids, dtype=np.int64) for ids in per_doc]


def encode_documents(
    tok: Tokenizer,
    documents: Iterable[str],
    batch_chars: int = 1 << 20,
    piece_chars: Optional[int] = PIECE_CHARS,
) -> Iterator[np.ndarray]:
    """Token ids of each document, in order, encoded with ``encode_batch`` in batches of
    about ``batch_chars`` characters (bounded memory, parallel across documents).

    Special-token strings inside the text (a literal "<|endoftext|>") are encoded as plain
    text: only the separators prepare inserts are real end-of-text ids. ``piece_chars=None``
    encodes each document whole (for tokenizers whose pre-tokenizer we do not know).
    """
    encode = getattr(tok, "encode_batch_fast", tok.encode_batch)  # no offsets: faster
    saved = tok.encode_special_tokens
    tok.encode_special_tokens = True
    try:
        batch: list[str] = []
        size = 0
        for doc in documents:
            batch.append(doc)
            size += len(doc)
            if size >= batch_chars:
                yield from _encode_batch(encode, batch, piece_chars)
                batch, size = [], 0
        if batch:
            yield from _encode_batch(encode, batch, piece_chars)
    finally:
        tok.encode_special_tokens = saved
