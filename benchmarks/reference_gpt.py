"""A plain PreNorm GPT in the nanoGPT style: the floor the benchmarks time resstream against.

The same architecture and parameter count as resstream's LM with residual kind ``prenorm``
(RMSNorm, rotary embeddings, SwiGLU MLP of the same width, tied embeddings, PyTorch SDPA),
written the plain way, every residual an inline ``x = x + ...``, no residual-stream object,
and with nanoGPT's fused projections (one matmul for q, k, v; one for the MLP's gate and up).
What resstream's PreNorm costs beyond this is what its abstractions and layer layout cost.
Used by benchmarks/step_time.py and benchmarks/decode.py; not part of the package.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps, self.weight = eps, nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


def rope(x, cos, sin):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg) -> None:
        super().__init__()
        self.n_head, self.hd = cfg.n_heads, cfg.d_model // cfg.n_heads
        self.c_attn = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.c_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)

    def forward(self, x, cos, sin, cache=None):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, self.hd).transpose(1, 2) for t in (q, k, v))
        q, k = rope(q, cos, sin), rope(k, cos, sin)
        if cache is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:  # decoding: append to the preallocated cache (k_all, v_all, pos)
            k_all, v_all, pos = cache
            k_all[:, :, pos : pos + T], v_all[:, :, pos : pos + T] = k, v
            k, v = k_all[:, :, : pos + T], v_all[:, :, : pos + T]
            y = F.scaled_dot_product_attention(q, k, v, is_causal=pos == 0 and T > 1)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, cfg) -> None:
        super().__init__()
        self.hidden = cfg.hidden
        self.c_fc = nn.Linear(cfg.d_model, 2 * cfg.hidden, bias=False)  # gate and up, fused
        self.c_proj = nn.Linear(cfg.hidden, cfg.d_model, bias=False)

    def forward(self, x):
        gate, up = self.c_fc(x).split(self.hidden, dim=-1)
        return self.c_proj(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, cfg) -> None:
        super().__init__()
        self.ln_1, self.attn = RMSNorm(cfg.d_model, cfg.norm_eps), CausalSelfAttention(cfg)
        self.ln_2, self.mlp = RMSNorm(cfg.d_model, cfg.norm_eps), MLP(cfg)

    def forward(self, x, cos, sin, cache=None):
        x = x + self.attn(self.ln_1(x), cos, sin, cache)
        x = x + self.mlp(self.ln_2(x))
        return x


class GPT(nn.Module):
    """``cfg``: a resstream ModelConfig (only its shape is read; no GQA, untied head not supported)."""

    def __init__(self, cfg) -> None:
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.h = nn.ModuleList([Block(cfg) for _ in range(cfg.n_layers)])
        self.ln_f = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight
        hd = cfg.d_model // cfg.n_heads
        inv = 1.0 / cfg.rope_base ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd)
        ang = torch.outer(torch.arange(cfg.max_seq_len, dtype=torch.float64), inv)
        self.register_buffer("cos", ang.cos().float(), persistent=False)
        self.register_buffer("sin", ang.sin().float(), persistent=False)
        for name, p in self.named_parameters():
            if p.dim() == 2:
                std = cfg.init_std / math.sqrt(2 * cfg.n_layers) if name.endswith("c_proj.weight") else cfg.init_std
                nn.init.normal_(p, 0.0, std)

    def forward(self, idx, targets=None):
        T = idx.shape[1]
        x = self.wte(idx)
        for block in self.h:
            x = block(x, self.cos[:T], self.sin[:T])
        logits = self.lm_head(self.ln_f(x))
        if targets is None:
            return logits
        return logits, F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-1)

    def new_cache(self, batch: int, max_len: int) -> dict:
        shape = (batch, self.cfg.n_heads, max_len, self.cfg.d_model // self.cfg.n_heads)
        p = self.wte.weight
        return {"k": [p.new_empty(shape) for _ in self.h], "v": [p.new_empty(shape) for _ in self.h], "pos": 0}

    @torch.inference_mode()
    def decode(self, idx, cache: dict, last_only: bool = False):
        """Logits of the new tokens idx [B, T] at positions cache["pos"].., appending to the cache."""
        pos, T = cache["pos"], idx.shape[1]
        cos, sin = self.cos[pos : pos + T], self.sin[pos : pos + T]
        x = self.wte(idx)
        for i, block in enumerate(self.h):
            x = block(x, cos, sin, (cache["k"][i], cache["v"][i], pos))
        cache["pos"] = pos + T
        return self.lm_head(self.ln_f(x[:, -1:] if last_only else x))
