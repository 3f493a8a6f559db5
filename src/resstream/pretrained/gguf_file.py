"""GGUF files (llama.cpp's format): metadata -> ModelConfig, tensors dequantized, tokenizer
rebuilt from the metadata. Needs the ``gguf`` package (``pip install 'resstream[hf]'``).

Supported: ``general.architecture`` llama and qwen2 with a byte-level BPE tokenizer
(``tokenizer.ggml.model`` gpt2). Quantized tensors (Q4_1, Q8_0, K-quants, ...) are
dequantized to float32 with ``gguf.quants.dequantize``: the result is the quantized
model's function, not the original float checkpoint's.

The Q/K pitfall: llama.cpp's converter reorders the rows of every llama query and key
projection so that its RoPE can rotate adjacent pairs (x[2i], x[2i+1]); Hugging Face and
resstream rotate (x[i], x[i + hd/2]). Within each head, llama.cpp's row 2i is the original
row i and row 2i+1 the original row i + hd/2. ``unpermute_rows`` undoes that, so the
un-permuted weights with half-rotation RoPE compute exactly what llama.cpp computes. qwen2
files are stored unpermuted (llama.cpp uses half-rotation RoPE for them) and are read as is.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
from torch import Tensor

from resstream.config import ConfigError
from resstream.model.config import ModelConfig
from resstream.model import LM
from resstream.pretrained.loaded import fill_model
from resstream.pretrained.names import gguf_name

ARCHITECTURES = ("llama", "qwen2")
PERMUTED_QK = ("llama",)
# tokenizer.ggml.pre -> pre-tokenizer of the BPE (the ones we can rebuild exactly)
_PRE = {
    "smollm": lambda: pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                               pre_tokenizers.ByteLevel(add_prefix_space=False)]),
    "gpt-2": lambda: pre_tokenizers.ByteLevel(add_prefix_space=False),
    "default": lambda: pre_tokenizers.ByteLevel(add_prefix_space=False),
}
_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp token types


def _gguf():
    try:
        import gguf
    except ImportError:
        raise ConfigError("reading GGUF files needs the gguf package: pip install 'resstream[hf]'") from None
    return gguf


def open_gguf(path: Path):
    try:
        return _gguf().GGUFReader(str(path))
    except ConfigError:
        raise
    except Exception as e:
        raise ConfigError(f"'{path}' is not a readable GGUF file ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None


def _meta(reader, key: str, default=KeyError):
    field = reader.fields.get(key)
    if field is None:
        if default is KeyError:
            raise ConfigError(f"GGUF metadata has no '{key}'; the file is incomplete or not a language model")
        return default
    return field.contents()


def config_from_gguf(reader, where: str) -> ModelConfig:
    arch = _meta(reader, "general.architecture")
    if arch not in ARCHITECTURES:
        raise ConfigError(f"{where}: GGUF architecture '{arch}' is not supported; resstream loads {', '.join(ARCHITECTURES)}")
    k = lambda name, default=KeyError: _meta(reader, f"{arch}.{name}", default)  # noqa: E731
    if k("rope.scaling.type", "none") not in ("none", None):
        raise ConfigError(f"{where}: rope scaling '{k('rope.scaling.type')}' is not supported")
    d, heads = int(k("embedding_length")), int(k("attention.head_count"))
    head_dim = int(k("attention.key_length", d // heads))
    if int(k("rope.dimension_count", head_dim)) != head_dim:
        raise ConfigError(f"{where}: partial rotary embeddings are not supported")
    tensors = {t.name: t for t in reader.tensors}
    if "token_embd.weight" not in tensors:
        raise ConfigError(f"{where}: no token_embd.weight tensor; not a language model")
    vocab = int(tensors["token_embd.weight"].shape[1])  # GGUF lists dims innermost first
    return ModelConfig(
        vocab_size=vocab, d_model=d, n_layers=int(k("block_count")), n_heads=heads,
        n_kv_heads=int(k("attention.head_count_kv", heads)), head_dim=None if head_dim == d // heads else head_dim,
        mlp_hidden=int(k("feed_forward_length")), rope_base=float(k("rope.freq_base", 10000.0)),
        max_seq_len=int(k("context_length")), tie_embeddings="output.weight" not in tensors,
        norm_eps=float(k("attention.layer_norm_rms_epsilon")), qkv_bias="blk.0.attn_q.bias" in tensors,
    )


def unpermute_rows(w: Tensor, n_heads: int) -> Tensor:
    """llama.cpp's interleaved row order of a Q or K projection (weight [H*hd, in] or bias
    [H*hd]) back to Hugging Face's half-split order. Per head: [hd/2, 2] -> [2, hd/2]."""
    hd = w.shape[0] // n_heads
    return w.reshape(n_heads, hd // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def load_gguf_weights(reader, cfg: ModelConfig, where: str, dtype: torch.dtype) -> LM:
    dequantize = _gguf().quants.dequantize
    tensors = {t.name: t for t in reader.tensors}
    permuted = _meta(reader, "general.architecture") in PERMUTED_QK
    expected = {gguf_name(n) for n in LM(cfg).state_dict() if not n.startswith("residual.")}
    if "rope_freqs.weight" in tensors:
        raise ConfigError(f"{where}: rope frequency factors (Llama 3.1-style rope scaling) are not supported")
    extra = [n for n in tensors if n not in expected]
    if extra:
        raise ConfigError(f"{where}: tensor '{extra[0]}' (and {len(extra) - 1} more) has no place in a "
                          "Llama-family model; this architecture is not supported")

    def fetch(name: str):
        t = tensors.get(gguf_name(name))
        if t is None:
            return None
        w = torch.from_numpy(np.array(dequantize(t.data, t.tensor_type), dtype=np.float32))  # a writable copy
        w = w.reshape([int(x) for x in reversed(t.shape.tolist())])  # GGUF dims are innermost first
        if permuted and (".wq." in name or ".wk." in name):
            w = unpermute_rows(w, cfg.n_heads if ".wq." in name else cfg.kv_heads)
        return w

    return fill_model(cfg, fetch, where, dtype, external=gguf_name)


def tokenizer_from_gguf(reader, where: str) -> Tokenizer:
    """The byte-level BPE stored in the metadata (tokens, merges, token types, BOS rule)."""
    model = _meta(reader, "tokenizer.ggml.model")
    pre = _meta(reader, "tokenizer.ggml.pre", "default")
    if model != "gpt2" or pre not in _PRE:
        raise ConfigError(f"{where}: tokenizer '{model}' with pre-tokenizer '{pre}' cannot be rebuilt exactly; "
                          f"supported: gpt2 BPE with pre-tokenizer {', '.join(_PRE)} (or load a Hugging Face folder "
                          "with its tokenizer.json)")
    tokens = list(_meta(reader, "tokenizer.ggml.tokens"))
    types = list(_meta(reader, "tokenizer.ggml.token_type", [1] * len(tokens)))
    merges = [tuple(m.split(" ", 1)) for m in _meta(reader, "tokenizer.ggml.merges")]
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    tok.pre_tokenizer = _PRE[pre]()
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, ty in zip(tokens, types) if ty == _CONTROL])
    tok.add_tokens([AddedToken(t, normalized=False) for t, ty in zip(tokens, types) if ty == _USER_DEFINED])
    if _meta(reader, "tokenizer.ggml.add_bos_token", False):
        bos = tokens[int(_meta(reader, "tokenizer.ggml.bos_token_id"))]
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                           special_tokens=[(bos, tokens.index(bos))])
    return tok


def gguf_eos_id(reader) -> int | None:
    eos = _meta(reader, "tokenizer.ggml.eos_token_id", None)
    return None if eos is None else int(eos)
