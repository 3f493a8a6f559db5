"""Decoding: a KV cache per attention sublayer, incremental forward, sampling, streaming text.

    prompt ─► LM.decode(prompt, cache)           prefill: every prompt position at once (or in chunks)
                 │  appends K/V of each attention sublayer to its KVCache
                 ▼
         logits[-1] ─► sample ─► token ─► LM.decode(token, cache) ─► ...   one position per step

What persists across steps. Every residual kind's depth mixing is per token: the sources
mixed for token t are token t's own embedding and its own earlier sublayer outputs, never
another position's. So a decoding step builds the whole residual state of its new token(s)
in ``stream.init`` and consumes it by ``stream.finish``, and only attention's keys and values
(the one place where positions meet) persist between steps. What each kind's state holds
within a step is described in its stream class's docstring (``resstream kinds`` lists them).

None of these needs a cache across steps because none reads another position. That claim is
checked, not assumed: tests/test_generate.py compares incremental decoding with the full
forward for every registered kind. A kind whose residual does mix positions (e.g. a causal
convolution over tokens) declares ``mixes_positions = True`` on its class; generation then
recomputes the whole sequence every step (exact, slow) instead of using the KV cache.
"""
from __future__ import annotations

from typing import Iterable, Iterator, Optional

import torch
from torch import Tensor, nn

from resstream.model.layers import Attention

# ``model`` below is a resstream LM (model/lm.py, which imports this module: hence nn.Module).


# ----------------------------------------------------------------------------- caches


class KVCache:
    """Keys and values of one attention sublayer, preallocated for ``max_len`` positions.

    ``pos`` is the number of positions written; ``update(k, v)`` writes the new positions
    (k, v: [B, Hkv, T, hd], RoPE applied) after them and returns views of the whole history
    [B, Hkv, pos + T, hd]. Decoding only: written in place, never part of autograd.
    """

    def __init__(self, batch: int, n_kv_heads: int, head_dim: int, max_len: int,
                 dtype: torch.dtype, device: torch.device | str) -> None:
        self.k = torch.empty(batch, n_kv_heads, max_len, head_dim, dtype=dtype, device=device)
        self.v = torch.empty_like(self.k)
        self.max_len = max_len
        self.pos = 0

    def update(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        end = self.pos + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache full: {end} positions asked, the cache holds max_len={self.max_len}")
        self.k[:, :, self.pos : end] = k
        self.v[:, :, self.pos : end] = v
        self.pos = end
        return self.k[:, :, :end], self.v[:, :, :end]


class DecodeCache:
    """Everything that persists across decoding steps: one KVCache per attention sublayer.

    ``layers[l]`` is sublayer l's KVCache, or None for sublayers without one (MLPs). No
    residual state persists: see the module docstring.
    """

    def __init__(self, model: nn.Module, batch: int, max_len: Optional[int] = None) -> None:
        cfg = model.cfg
        if model.residual.mixes_positions:
            raise ValueError(f"residual kind '{cfg.residual.kind}' mixes positions: a KV cache alone cannot decode it")
        max_len = cfg.max_seq_len if max_len is None else max_len
        if not 1 <= max_len <= cfg.max_seq_len:
            raise ValueError(f"cache length must be in 1..max_seq_len={cfg.max_seq_len}, got {max_len}")
        p = model.embed.weight
        self.layers: list[Optional[KVCache]] = [
            KVCache(batch, cfg.kv_heads, cfg.dim_per_head, max_len, p.dtype, p.device) if isinstance(s, Attention) else None
            for s in model.sublayers
        ]
        self.max_len = max_len

    @property
    def pos(self) -> int:
        """Positions decoded so far (the position of the next token)."""
        return next(c.pos for c in self.layers if c is not None)


def prefill(model: nn.Module, idx: Tensor, cache: DecodeCache, chunk_size: Optional[int] = None,
            last_only: bool = False) -> Tensor:
    """Run the tokens idx [B, T] at positions cache.pos.. through the model, ``chunk_size``
    positions at a time (None: all at once). Returns their logits [B, T, V], or only the last
    position's [B, 1, V] with ``last_only``."""
    T = idx.shape[1]
    step = T if chunk_size is None else chunk_size
    if T < 1 or step < 1:
        raise ValueError(f"prefill needs at least one token and chunk_size >= 1, got {T} tokens, chunk_size={chunk_size}")
    out = [model.decode(idx[:, s : s + step], cache, last_only=last_only) for s in range(0, T, step)]
    return out[-1] if last_only else torch.cat(out, dim=1)


# ----------------------------------------------------------------------------- sampling


def check_sampling(temperature: float, top_k: Optional[int], top_p: Optional[float]) -> None:
    if not temperature >= 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be an integer >= 1 or None, got {top_k!r}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1] or None, got {top_p}")


def sample_next(logits: Tensor, temperature: float = 1.0, top_k: Optional[int] = None,
                top_p: Optional[float] = None, generator: Optional[torch.Generator] = None) -> Tensor:
    """Next token [B] from last-position logits [B, V].

    temperature 0 is greedy (argmax). Otherwise softmax(logits / temperature) restricted to the
    top_k most likely tokens and then to the smallest set whose probability reaches top_p (the
    most likely token always stays), renormalised, sampled with ``generator``.
    """
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        before = probs.cumsum(dim=-1) - probs  # mass of the strictly more likely tokens
        drop_sorted = before >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _generator(seed: Optional[int], device: torch.device) -> torch.Generator:
    """A local generator: reproducible with a seed, and the global RNG is never touched."""
    g = torch.Generator(device=device)
    if seed is None:
        g.seed()
    else:
        g.manual_seed(seed)
    return g


# ----------------------------------------------------------------------------- generation


def check_request(model: nn.Module, idx: Tensor, max_new_tokens: int) -> None:
    """One-line ValueErrors for prompts and lengths the model cannot serve."""
    if idx.dim() not in (1, 2) or idx.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"prompt must be integer token ids [T] or [B, T], got {idx.dtype} of shape {tuple(idx.shape)}")
    T = idx.shape[-1]
    if T == 0 or idx.numel() == 0:
        raise ValueError("empty prompt: give at least one token")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    limit = model.cfg.max_seq_len
    if T > limit:
        raise ValueError(f"prompt of {T} tokens is longer than the model's context max_seq_len={limit}")
    if T + max_new_tokens > limit:
        raise ValueError(
            f"prompt of {T} tokens + max_new_tokens={max_new_tokens} exceeds the model's context "
            f"max_seq_len={limit}; ask for at most {limit - T} new tokens"
        )


@torch.inference_mode()
def _tokens(model: nn.Module, idx: Tensor, max_new_tokens: int, temperature: float, top_k: Optional[int],
            top_p: Optional[float], seed: Optional[int]) -> Iterator[Tensor]:
    """Yield each new token [B]; arguments already checked."""
    gen = _generator(seed, idx.device)
    sample = lambda logits: sample_next(logits, temperature, top_k, top_p, gen)  # noqa: E731
    if model.residual.mixes_positions:  # no KV cache can serve it: recompute
        seq = idx
        for i in range(max_new_tokens):
            nxt = sample(model(seq)[:, -1])
            yield nxt
            seq = torch.cat([seq, nxt[:, None]], dim=1)
        return
    cache = DecodeCache(model, idx.shape[0], idx.shape[1] + max_new_tokens)
    logits = prefill(model, idx, cache, last_only=True)[:, -1]
    for i in range(max_new_tokens):
        nxt = sample(logits)
        yield nxt
        if i + 1 < max_new_tokens:
            logits = model.decode(nxt[:, None], cache)[:, -1]


def generate_tokens(model: nn.Module, idx: Tensor, max_new_tokens: int, temperature: float = 1.0,
                    top_k: Optional[int] = None, top_p: Optional[float] = None,
                    seed: Optional[int] = None) -> Iterator[Tensor]:
    """Iterator over the new tokens [B] of ``generate``, one per step (idx: [B, T]).

    Checks its arguments when called, not when first iterated."""
    check_request(model, idx, max_new_tokens)
    check_sampling(temperature, top_k, top_p)
    return _tokens(model, idx if idx.dim() == 2 else idx[None], max_new_tokens, temperature, top_k, top_p, seed)


def generate(model: nn.Module, idx: Tensor, max_new_tokens: int, temperature: float = 1.0,
             top_k: Optional[int] = None, top_p: Optional[float] = None, seed: Optional[int] = None) -> Tensor:
    """Extend the prompt idx ([B, T] or [T] token ids) by ``max_new_tokens`` tokens.

    Returns the prompt followed by the new tokens, with idx's shape otherwise. temperature 0 is
    greedy; a seed makes sampling reproducible (a local torch.Generator: the global RNG is left
    alone). Raises ValueError when prompt + max_new_tokens do not fit in max_seq_len.
    """
    new = list(generate_tokens(model, idx, max_new_tokens, temperature, top_k, top_p, seed))
    out = torch.cat([idx if idx.dim() == 2 else idx[None], torch.stack(new, dim=1).to(idx.dtype)], dim=1)
    return out if idx.dim() == 2 else out[0]


# ----------------------------------------------------------------------------- text


def _encode(tokenizer, text: str) -> list[int]:
    enc = tokenizer.encode(text)
    return list(getattr(enc, "ids", enc))  # a tokenizers.Encoding, or a plain list of ids


def stream_generate(model: nn.Module, tokenizer, prompt: str, max_new_tokens: int, temperature: float = 1.0,
                    top_k: Optional[int] = None, top_p: Optional[float] = None, seed: Optional[int] = None,
                    stop_at_eot: Optional[int] = None) -> Iterator[str]:
    """Yield the continuation of ``prompt`` as text pieces, as the tokens are generated.

    ``tokenizer``: anything with ``encode(str)`` (ids, or an object with ``.ids``) and
    ``decode(list[int]) -> str``. A byte-level BPE token may end in the middle of a UTF-8
    character; the growing continuation is decoded each step and only its new, complete
    suffix is yielded (text ending in U+FFFD waits for the next token; whatever is left is
    flushed at the end). Generation stops after ``max_new_tokens`` or when the token
    ``stop_at_eot`` is sampled (its text is not yielded).
    """
    ids = _encode(tokenizer, prompt)
    device = model.embed.weight.device
    idx = torch.tensor([ids], dtype=torch.long, device=device).reshape(1, len(ids))
    tokens = generate_tokens(model, idx, max_new_tokens, temperature, top_k, top_p, seed)
    return decode_stream(tokenizer, (int(t[0]) for t in tokens), stop_at_eot)


def decode_stream(tokenizer, tokens: Iterable[int], stop_at_eot: Optional[int] = None) -> Iterator[str]:
    """Text pieces of a stream of token ids: after each token, the new complete suffix of the
    decoded sequence so far (held back while it ends in U+FFFD, an incomplete UTF-8 character;
    flushed at the end). Stops before ``stop_at_eot``."""
    new: list[int] = []
    sent = ""
    for t in tokens:
        if stop_at_eot is not None and t == stop_at_eot:
            break
        new.append(t)
        text = tokenizer.decode(new)
        if not text.endswith("\ufffd") and len(text) > len(sent):
            yield text[len(sent):]
            sent = text
    text = tokenizer.decode(new) if new else ""
    if len(text) > len(sent):
        yield text[len(sent):]
