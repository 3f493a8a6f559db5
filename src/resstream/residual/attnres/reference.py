"""Float64 references of the AttnRes family: the specification its fast paths are tested against.

Plain, slow on purpose, following the paper's equations (Kimi Team, "Attention Residuals",
arXiv:2603.15031, Eqs. 2-6) and sharing no code with the fast paths. Signature as every
kind's reference (residual/base.py, ``Reference``).
"""
from __future__ import annotations

import torch
from torch import Tensor


def _f64(x: Tensor) -> Tensor:
    return x.to(torch.float64)


def attend(sources: list[Tensor], w: Tensor, g: Tensor | None, eps: float) -> tuple[Tensor, Tensor]:
    """Paper Eqs. 2-4: alpha_i = softmax_i(w . RMSNorm(v_i)), h = sum_i alpha_i v_i."""
    V = torch.stack([_f64(v) for v in sources])                     # [n, B, T, D]
    K = V / torch.sqrt(V.pow(2).mean(-1, keepdim=True) + eps)       # RMSNorm of the keys
    if g is not None:
        K = K * _f64(g)
    logits = K @ _f64(w)                                            # [n, B, T]
    alpha = torch.softmax(logits, dim=0)
    h = (alpha.unsqueeze(-1) * V).sum(0)
    return h, alpha.permute(1, 2, 0)                                # weights [B, T, n]


def _query(params: dict, row: int) -> tuple[Tensor, Tensor | None]:
    g = params.get("key_norm_weight")
    return params["queries"][row], None if g is None else g[row]


def attend_ablation(sources: list[Tensor], params: dict, row: int, cfg) -> tuple[Tensor, Tensor]:
    """Table 4's ablations (variants.py), token by token and head by head: the query
    w_l [+ W_l RMSNorm(newest source) / sqrt(D)] or a learned scalar per source; keys RMS-normalised per
    channel group (or raw); softmax over sources or a sigmoid per source; weights averaged over heads."""
    V = [_f64(v) for v in sources]
    n, D, H = len(V), V[0].shape[-1], cfg.heads
    d = D // H
    if cfg.query == "none":
        logits = torch.stack([params["source_logits"][row, i].double().expand(V[0].shape[:-1]) for i in range(n)])
        logits = logits.unsqueeze(-1)                                       # [n, B, T, 1]
    else:
        w = _f64(params["queries"][row]).expand(V[0].shape)                 # [B, T, D]
        if cfg.query == "input":
            newest = V[-1] / torch.sqrt(V[-1].pow(2).mean(-1, keepdim=True) + cfg.key_norm_eps)
            w = w + torch.einsum("btj,ij->bti", newest, _f64(params["query_proj"][row])) / D ** 0.5
        g = params.get("key_norm_weight")
        per_head = []
        for h in range(H):
            cut = slice(h * d, (h + 1) * d)
            keys = [v[..., cut] for v in V]
            if cfg.key_norm:
                keys = [k / torch.sqrt(k.pow(2).mean(-1, keepdim=True) + cfg.key_norm_eps) for k in keys]
                if g is not None:
                    keys = [k * _f64(g[row, cut]) for k in keys]
            per_head.append(torch.stack([(k * w[..., cut]).sum(-1) for k in keys]))  # [n, B, T]
        logits = torch.stack(per_head, -1)                                  # [n, B, T, H]
    alpha = torch.softmax(logits, dim=0) if cfg.score == "softmax" else torch.sigmoid(logits)
    heads = alpha.shape[-1]
    d = D // heads
    h_out = torch.cat([sum(alpha[i, ..., h : h + 1] * V[i][..., h * d : (h + 1) * d] for i in range(n))
                       for h in range(heads)], dim=-1)
    return h_out, alpha.mean(-1).permute(1, 2, 0)                          # weights [B, T, n]


def _mix(sources: list[Tensor], params: dict, row: int, cfg) -> tuple[Tensor, Tensor]:
    if cfg.is_ablation():
        return attend_ablation(sources, params, row, cfg)
    return attend(sources, *_query(params, row), cfg.key_norm_eps)


def attnres_reference(emb: Tensor, sublayers, params: dict, cfg) -> tuple[Tensor, list]:
    """Full AttnRes: sublayer l attends over v_0 = emb, v_1 = f_0, ..., v_l = f_{l-1}."""
    L = len(sublayers)
    values = [_f64(emb)]
    weights = []
    for l, f in enumerate(sublayers):
        h, a = _mix(values, params, l, cfg)
        weights.append(a)
        values.append(f(h))
    h, a = _mix(values, params, L, cfg)
    return h, weights + [a]


def block_attnres_reference(emb: Tensor, sublayers, params: dict, cfg) -> tuple[Tensor, list]:
    """Block AttnRes (paper Eq. 6), 0-based: sources(l) = [emb] + [B_1..B_k] + ([P] if l mod S),
    k = floor(l / S), B_j the sum of block j's outputs, P the partial sum of the open block.
    The final mixture sees emb and every block, the last possibly partial."""
    L, S = len(sublayers), cfg.block_size
    outputs: list[Tensor] = []
    weights = []

    def block_sum(j: int) -> Tensor:  # sum of outputs of block j (1-based), as far as computed
        return torch.stack(outputs[(j - 1) * S : j * S]).sum(0)

    for l, f in enumerate(sublayers):
        k = l // S
        sources = [_f64(emb)] + [block_sum(j) for j in range(1, k + 1)]
        if l % S:
            sources.append(torch.stack(outputs[k * S : l]).sum(0))
        h, a = _mix(sources, params, l, cfg)
        weights.append(a)
        outputs.append(f(h))
    n_blocks = -(-L // S)
    sources = [_f64(emb)] + [block_sum(j) for j in range(1, n_blocks + 1)]
    h, a = _mix(sources, params, L, cfg)
    return h, weights + [a]


def depth_swa_reference(emb: Tensor, sublayers, params: dict, cfg) -> tuple[Tensor, list]:
    """AttnRes over a causal depth window: sublayer l attends over [emb, f_{l-W}, ..., f_{l-1}]
    (outputs with index >= 0); the final mixture over [emb, f_{L-W}, ..., f_{L-1}]."""
    L, W = len(sublayers), cfg.window
    outputs: list[Tensor] = []
    weights = []
    for l, f in enumerate(sublayers):
        sources = [_f64(emb)] + outputs[max(0, l - W) : l]
        h, a = attend(sources, *_query(params, l), cfg.key_norm_eps)
        weights.append(a)
        outputs.append(f(h))
    sources = [_f64(emb)] + outputs[max(0, L - W) :]
    h, a = attend(sources, *_query(params, L), cfg.key_norm_eps)
    return h, weights + [a]
