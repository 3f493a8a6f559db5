"""The decoder LM: embed -> L sublayers joined by a ResidualStream -> final norm -> head.

    idx ─► embed ─► stream.init
                     │
             for l in 0..L-1:   x_l = stream.read(state, l)
                                y_l = sublayer_l(x_l)        (attention if l even, else MLP)
                                state = stream.write(state, l, y_l)
                     │
          stream.finish ─► final_norm ─► head ─► logits

Parameter names outside ``residual.`` are the same for every residual kind, so a PreNorm
state dict loads into any kind with only ``residual.*`` missing.
"""
from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from resstream.config import ConfigError
from resstream.model.config import ModelConfig
from resstream.model.generate import DecodeCache, generate
from resstream.model.layers import MLP, Attention, RMSNorm
from resstream.residual import build_residual
from resstream.residual.base import outside_autocast


class LM(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.sublayers = nn.ModuleList(
            [Attention(cfg) if l % 2 == 0 else MLP(cfg) for l in range(cfg.n_sublayers)]
        )
        self.residual = build_residual(cfg.residual, cfg.n_sublayers, cfg.d_model)
        self.final_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.head.weight = self.embed.weight
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """GPT-2 style init; output projections scaled by 1/sqrt(L). Residual parameters
        are initialised by the stream itself, after (so nothing here overwrites them)."""
        std = self.cfg.init_std
        for module in [self.embed, self.sublayers, self.final_norm, self.head]:
            for m in module.modules():
                if isinstance(m, nn.Linear):
                    s = std / math.sqrt(self.cfg.n_sublayers) if getattr(m, "is_output_proj", False) else std
                    nn.init.normal_(m.weight, mean=0.0, std=s)
                    if m.bias is not None:
                        nn.init.zeros_(m.bias)
                elif isinstance(m, nn.Embedding):
                    nn.init.normal_(m.weight, mean=0.0, std=std)
                elif isinstance(m, RMSNorm):
                    nn.init.ones_(m.weight)
        self.residual.reset_parameters()

    def forward(self, idx: Tensor, targets: Tensor | None = None, return_mixing: bool = False):
        """idx [B, T] -> logits [B, T, V].

        With ``targets`` returns (logits, loss); loss is the mean cross-entropy, ignoring
        targets of -1. With ``return_mixing`` also returns the depth-mixing weights: a list
        of L + 1 entries (each sublayer input, then the final mixture), each [B, T, n_sources]
        or None for kinds that do not mix; names in ``model.residual.source_names(l)``.
        """
        if idx.shape[-1] > self.cfg.max_seq_len:
            raise ConfigError(f"model.max_seq_len: the input has {idx.shape[-1]} positions but the model's context is "
                              f"max_seq_len={self.cfg.max_seq_len}; shorten the input or raise model.max_seq_len")
        stream, mixing = self.residual, []
        full = functools.partial(outside_autocast, idx.device.type)  # depth mixing in full precision
        with full():
            state = stream.init(self.embed(idx))
        for l, sublayer in enumerate(self.sublayers):
            with full():
                x, w = stream.read_weighted(state, l) if return_mixing else (stream.read(state, l), None)
            mixing.append(w)
            # Kinds that can recompute a sublayer's input in backward (residual.recompute) give
            # a context under which autograd keeps that input as a recipe, not a tensor.
            with stream.input_hooks(state, l, x):
                y = sublayer(x)
            with full():
                state = stream.write(state, l, y)
        with full():
            h, w = stream.finish_weighted(state) if return_mixing else (stream.finish(state), None)
        mixing.append(w)
        logits = self.head(self.final_norm(h))
        if targets is None:
            return (logits, None, mixing) if return_mixing else logits
        loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-1)
        return (logits, loss, mixing) if return_mixing else (logits, loss)

    @torch.inference_mode()
    def decode(self, idx: Tensor, cache: DecodeCache, last_only: bool = False) -> Tensor:
        """Incremental forward: logits [B, T, V] of the T new tokens idx [B, T] at positions
        cache.pos.., appending their keys and values to ``cache`` (a model.generate.DecodeCache).
        The residual state is built and consumed within the call: depth mixing is per token, so
        only attention K/V persist between calls. ``last_only``: logits of the last position
        only. Runs in inference mode (less per-op overhead): the logits cannot enter autograd.
        """
        if cache.pos + idx.shape[1] > cache.max_len:
            raise ValueError(f"decoding past the cache: {cache.pos} + {idx.shape[1]} positions > max_len={cache.max_len}")
        stream = self.residual.inference(cache.residual_scratch)  # lean: no autograd, state in buffers
        state = stream.init(self.embed(idx))
        for l, sublayer in enumerate(self.sublayers):
            kv = cache.layers[l]
            x = stream.read(state, l)
            state = stream.write(state, l, sublayer(x) if kv is None else sublayer(x, kv_cache=kv))
        h = stream.finish(state)
        return self.head(self.final_norm(h[:, -1:] if last_only else h))

    def generate(self, idx: Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 top_p: float | None = None, seed: int | None = None) -> Tensor:
        """Extend idx [B, T] (or [T]) by max_new_tokens sampled tokens; see model.generate.generate."""
        return generate(self, idx, max_new_tokens, temperature, top_k, top_p, seed)

    def num_params(self, residual_only: bool = False) -> int:
        params = self.residual.parameters() if residual_only else self.parameters()
        return sum(p.numel() for p in params)
