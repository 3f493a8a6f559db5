"""Building blocks: RMSNorm, rotary embeddings, causal attention (SDPA, GQA), SwiGLU MLP.

Each sublayer owns its PreNorm and returns its raw output f(x) = g(norm(x)); how outputs
are joined is the residual stream's business, not theirs.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from resstream.model.config import ModelConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # A bfloat16 input with the float32 weight would leave the fused kernel (and warn);
        # the kernel keeps its statistics in float32 either way.
        w = self.weight if self.weight.dtype == x.dtype else self.weight.to(x.dtype)
        return F.rms_norm(x, (x.shape[-1],), w, self.eps)


def rope_tables(seq_len: int, head_dim: int, base: float) -> tuple[Tensor, Tensor]:
    """cos and sin of the rotary angles: [seq_len, head_dim // 2] each."""
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float64), inv_freq)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate pairs (first half, second half) of each head: x [B, H, T, hd]; cos/sin [T, hd/2]."""
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class Attention(nn.Module):
    """PreNorm causal self-attention with RoPE and grouped-query heads; returns the raw output.

    ``kv_cache`` (optional, for decoding): a KVCache whose ``update(k, v)`` appends this call's
    keys and values and returns the full history; positions start at ``kv_cache.pos``.
    ``n_heads`` / ``n_kv`` count the heads this module computes: all of them, or under tensor
    parallelism (resstream.parallel.tensor) this rank's share.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv, self.hd = cfg.n_heads, cfg.kv_heads, cfg.dim_per_head
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.wq = nn.Linear(cfg.d_model, self.n_heads * self.hd, bias=cfg.qkv_bias)
        self.wk = nn.Linear(cfg.d_model, self.n_kv * self.hd, bias=cfg.qkv_bias)
        self.wv = nn.Linear(cfg.d_model, self.n_kv * self.hd, bias=cfg.qkv_bias)
        self.wo = nn.Linear(self.n_heads * self.hd, cfg.d_model, bias=False)
        self.wo.is_output_proj = True
        cos, sin = rope_tables(cfg.max_seq_len, self.hd, cfg.rope_base)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def forward(self, x: Tensor, kv_cache=None) -> Tensor:
        B, T, _ = x.shape
        h = self.norm(x)
        q = self.wq(h).view(B, T, self.n_heads, self.hd).transpose(1, 2)  # [B, H, T, hd]
        k = self.wk(h).view(B, T, self.n_kv, self.hd).transpose(1, 2)     # [B, Hkv, T, hd]
        v = self.wv(h).view(B, T, self.n_kv, self.hd).transpose(1, 2)
        start = 0 if kv_cache is None else kv_cache.pos
        cos, sin = self.rope_cos[start : start + T], self.rope_sin[start : start + T]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if kv_cache is not None:
            return self.wo(self._attend_cached(q, k, v, start, kv_cache).transpose(1, 2).reshape(B, T, -1))
        if self.n_kv != self.n_heads:  # grouped-query: share each KV head among its group
            k = k.repeat_interleave(self.n_heads // self.n_kv, dim=1)
            v = v.repeat_interleave(self.n_heads // self.n_kv, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))

    def _attend_cached(self, q: Tensor, k: Tensor, v: Tensor, start: int, kv_cache) -> Tensor:
        """Decoding: queries at positions start..start+T-1 over the cached history and the new
        keys. GQA heads are shared in the kernel (enable_gqa) rather than by copying the whole
        cache every step; a single new token sees every key, so it needs no mask."""
        k, v = kv_cache.update(k, v)
        T, S = q.shape[2], k.shape[2]
        gqa = self.n_kv != self.n_heads
        if T == 1:
            return F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)
        if start == 0:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(diagonal=S - T)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)


class MLP(nn.Module):
    """PreNorm SwiGLU MLP (Shazeer, 2020); returns the raw output."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.w_gate = nn.Linear(cfg.d_model, cfg.hidden, bias=False)
        self.w_up = nn.Linear(cfg.d_model, cfg.hidden, bias=False)
        self.w_down = nn.Linear(cfg.hidden, cfg.d_model, bias=False)
        self.w_down.is_output_proj = True

    def forward(self, x: Tensor) -> Tensor:
        h = self.norm(x)
        return self.w_down(F.silu(self.w_gate(h)) * self.w_up(h))
