"""Plain float64 references of every residual kind: the specification.

Each function follows its paper's equations as literally as possible, shares no code with
the fast paths, and is slow on purpose. Signature::

    h_final, weights = REFERENCES[kind](emb, sublayers, params, rcfg)

emb [B, T, D]; ``sublayers`` the L callables f_l (raw outputs, PreNorm inside);
``params`` the stream's parameters by name (as in ``stream.named_parameters()``); rcfg the
ResidualConfig. ``weights`` lists the depth-mixing weights [B, T, n] of each sublayer input
and of the final mixture (empty for kinds that do not mix). Everything runs in float64.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

Sublayers = list[Callable[[Tensor], Tensor]]


def _f64(x: Tensor) -> Tensor:
    return x.to(torch.float64)


def prenorm(emb: Tensor, sublayers: Sublayers, params: dict, rcfg) -> tuple[Tensor, list]:
    """h_{l+1} = h_l + f_l(h_l)."""
    h = _f64(emb)
    for f in sublayers:
        h = h + f(h)
    return h, []


def _attend(sources: list[Tensor], w: Tensor, g: Tensor | None, eps: float) -> tuple[Tensor, Tensor]:
    """Paper Eqs. 2-4: alpha_i = softmax_i(w . RMSNorm(v_i)), h = sum_i alpha_i v_i."""
    V = torch.stack([_f64(v) for v in sources])                     # [n, B, T, D]
    K = V / torch.sqrt(V.pow(2).mean(-1, keepdim=True) + eps)       # RMSNorm of the keys
    if g is not None:
        K = K * _f64(g)
    logits = K @ _f64(w)                                            # [n, B, T]
    alpha = torch.softmax(logits, dim=0)
    h = (alpha.unsqueeze(-1) * V).sum(0)
    return h, alpha.permute(1, 2, 0)                                # weights [B, T, n]


def _g(params: dict, row: int) -> Tensor | None:
    g = params.get("key_norm_weight")
    return None if g is None else g[row]


def attnres(emb: Tensor, sublayers: Sublayers, params: dict, rcfg) -> tuple[Tensor, list]:
    """Full AttnRes: sublayer l attends over v_0 = emb, v_1 = f_0, ..., v_l = f_{l-1}."""
    L = len(sublayers)
    values = [_f64(emb)]
    weights = []
    for l, f in enumerate(sublayers):
        h, a = _attend(values, params["queries"][l], _g(params, l), rcfg.key_norm_eps)
        weights.append(a)
        values.append(f(h))
    h, a = _attend(values, params["queries"][L], _g(params, L), rcfg.key_norm_eps)
    return h, weights + [a]


def block_attnres(emb: Tensor, sublayers: Sublayers, params: dict, rcfg) -> tuple[Tensor, list]:
    """Block AttnRes (paper Eq. 6), 0-based: sources(l) = [emb] + [B_1..B_k] + ([P] if l mod S),
    k = floor(l / S), B_j the sum of block j's outputs, P the partial sum of the open block.
    The final mixture sees emb and every block, the last possibly partial."""
    L, S = len(sublayers), rcfg.block_size
    outputs: list[Tensor] = []
    weights = []

    def block_sum(j: int) -> Tensor:  # sum of outputs of block j (1-based), as far as computed
        return torch.stack(outputs[(j - 1) * S : j * S]).sum(0)

    for l, f in enumerate(sublayers):
        k = l // S
        sources = [_f64(emb)] + [block_sum(j) for j in range(1, k + 1)]
        if l % S:
            sources.append(torch.stack(outputs[k * S : l]).sum(0))
        h, a = _attend(sources, params["queries"][l], _g(params, l), rcfg.key_norm_eps)
        weights.append(a)
        outputs.append(f(h))
    n_blocks = -(-L // S)
    sources = [_f64(emb)] + [block_sum(j) for j in range(1, n_blocks + 1)]
    h, a = _attend(sources, params["queries"][L], _g(params, L), rcfg.key_norm_eps)
    return h, weights + [a]


REFERENCES: dict[str, Callable] = {
    "prenorm": prenorm,
    "attnres": attnres,
    "block_attnres": block_attnres,
}
