"""The data room: corpora, train/val split by document, tokenizer, cached token shards.

    prepared = prepare(DataConfig(corpus="kjv"))   # built once, then reused from the cache
    prepared.train, prepared.val                   # 1-D memmaps of token ids
    prepared.token_bytes                           # bytes per id, for bits-per-byte
"""
from resstream.data.build import cache_key, default_cache_dir, prepare
from resstream.data.hf import load_hf_documents
from resstream.data.prepared import PreparedData, format_stats, shard_dtype
from resstream.data.corpus import Corpus
from resstream.data.sources import load_corpus
from resstream.data.split import assign_val, split_key
from resstream.data.tokenizer import EOT, encode_documents, find_eot_id, load_tokenizer, token_byte_lengths, train_bpe

__all__ = [
    "EOT",
    "Corpus",
    "PreparedData",
    "assign_val",
    "cache_key",
    "default_cache_dir",
    "encode_documents",
    "find_eot_id",
    "format_stats",
    "load_corpus",
    "load_hf_documents",
    "load_tokenizer",
    "prepare",
    "shard_dtype",
    "split_key",
    "token_byte_lengths",
    "train_bpe",
]
