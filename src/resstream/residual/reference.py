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


def denseformer(emb: Tensor, sublayers: Sublayers, params: dict, rcfg) -> tuple[Tensor, list]:
    """DenseFormer (Pagliardini et al. 2024, section 3): X_0 = emb, X_i = B_i(Y_{i-1}) with B_i
    a PreNorm block (attention then MLP), Y_i = sum_{j=0..i} a_ij X_j (a_i = ``dwa.{i-1}``),
    output Y_n. Weights: attention of block i reads Y_{i-1} = [a_{i-1}] over [X_0..X_{i-1}]
    (Y_0 = X_0: weight [1]); its MLP reads Y_{i-1} + attn, i.e. [a_{i-1}, 1]; final: a_n."""
    B, T, _ = emb.shape
    n = len(sublayers) // 2

    def per_token(a: Tensor) -> Tensor:
        return a.reshape(1, 1, -1).repeat(B, T, 1)

    X = [_f64(emb)]
    Y = X[0]
    a_prev = torch.ones(1, dtype=torch.float64)
    weights = []
    for i in range(1, n + 1):
        attn, mlp = sublayers[2 * i - 2], sublayers[2 * i - 1]
        weights.append(per_token(a_prev))
        U = Y + attn(Y)
        weights.append(per_token(torch.cat([a_prev, torch.ones(1, dtype=torch.float64)])))
        X.append(U + mlp(U))
        a = _f64(params[f"dwa.{i - 1}"])
        Y = sum(a[j] * X[j] for j in range(i + 1))
        a_prev = a
    return Y, weights + [per_token(a_prev)]


def ddl(emb: Tensor, sublayers: Sublayers, params: dict, rcfg) -> tuple[Tensor, list]:
    """Deep Delta Learning, d_v = 1 (Zhang et al. 2026, Eq. 2.1 with the authors' v):
    X_{l+1} = A_l X_l + beta_l k_l v_l, A_l = I - beta_l k_l k_l^T, k_l = y_l / sqrt(|y_l|^2 + 1e-10),
    beta_l = 2 sigmoid(w_b . RMSNorm(X_l) + b_b) (norm eps 1e-6), v_l = 4 sigmoid(w_v . X_l + b_v).
    The Delta operator is built as an explicit D x D matrix per token."""
    x = _f64(emb)
    D = x.shape[-1]
    eye = torch.eye(D, dtype=torch.float64)
    for l, f in enumerate(sublayers):
        y = f(x)
        k = y / torch.sqrt((y * y).sum(-1, keepdim=True) + 1e-5 ** 2)
        c = x / torch.sqrt((x * x).mean(-1, keepdim=True) + 1e-6)
        beta = 2 * torch.sigmoid(c @ _f64(params["beta_weight"][l]) + _f64(params["beta_bias"][l]))
        v = 4 * torch.sigmoid(x @ _f64(params["v_weight"][l]) + _f64(params["v_bias"][l]))
        b = beta[..., None, None]
        A = eye - b * k.unsqueeze(-1) * k.unsqueeze(-2)                # [B, T, D, D]
        x = (A @ x.unsqueeze(-1)).squeeze(-1) + beta.unsqueeze(-1) * k * v.unsqueeze(-1)
    return x, []


def depth_swa(emb: Tensor, sublayers: Sublayers, params: dict, rcfg) -> tuple[Tensor, list]:
    """AttnRes over a causal depth window: sublayer l attends over [emb, f_{l-W}, ..., f_{l-1}]
    (outputs with index >= 0); the final mixture over [emb, f_{L-W}, ..., f_{L-1}]."""
    L, W = len(sublayers), rcfg.window
    outputs: list[Tensor] = []
    weights = []
    for l, f in enumerate(sublayers):
        sources = [_f64(emb)] + outputs[max(0, l - W) : l]
        h, a = _attend(sources, params["queries"][l], _g(params, l), rcfg.key_norm_eps)
        weights.append(a)
        outputs.append(f(h))
    sources = [_f64(emb)] + outputs[max(0, L - W) :]
    h, a = _attend(sources, params["queries"][L], _g(params, L), rcfg.key_norm_eps)
    return h, weights + [a]


def rezero(emb: Tensor, sublayers: Sublayers, params: dict, rcfg) -> tuple[Tensor, list]:
    """ReZero (Bachlechner et al. 2020): h_{l+1} = h_l + alpha_l f_l(h_l)."""
    h = _f64(emb)
    for l, f in enumerate(sublayers):
        h = h + _f64(params["alpha"])[l] * f(h)
    return h, []


def scaled(emb: Tensor, sublayers: Sublayers, params: dict, rcfg) -> tuple[Tensor, list]:
    """Residual scaling (Dherin & Munn 2025): h_{l+1} = h_l + f_l(h_l) / sqrt(L)."""
    lam = 1.0 / len(sublayers) ** 0.5
    h = _f64(emb)
    for f in sublayers:
        h = h + lam * f(h)
    return h, []


REFERENCES: dict[str, Callable] = {
    "prenorm": prenorm,
    "attnres": attnres,
    "block_attnres": block_attnres,
    "denseformer": denseformer,
    "ddl": ddl,
    "depth_swa": depth_swa,
    "rezero": rezero,
    "scaled": scaled,
}
