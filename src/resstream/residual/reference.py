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


def _rms_normed(x: Tensor, eps: float) -> Tensor:
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def _per_token(a: Tensor) -> Tensor:
    """A coefficient, a scalar or per token [B, T], ready to scale a [B, T, D] stream."""
    return a.unsqueeze(-1) if a.dim() else a


def hc(emb: Tensor, sublayers: Sublayers, params: dict, rcfg) -> tuple[Tensor, list]:
    """Hyper-Connections (Zhu et al., ICLR 2025), one token-wise stream h_j at a time:
    h_j = emb (j = 1..n); sublayer l reads x = sum_j A_m[j] h_j (width connection) and writes
    h_i <- B[i] f(x) + sum_j A_r[j, i] h_j (depth connection, Eqs. 2-5); output sum_i h_i.
    Dynamic (Eqs. 10-13), per stream j: A_m[j] += s_a tanh(hbar_j . W_m),
    B[j] += s_b tanh(hbar_j . W_b), A_r[j, i] += s_a tanh(hbar_j . W_r[:, i]),
    hbar_j = RMSNorm(h_j) with weight g_l."""
    n = rcfg.n_streams
    H = [_f64(emb)] * n
    for l, f in enumerate(sublayers):
        A_m = [_f64(params["static_pre"][l, j]) for j in range(n)]
        B = [_f64(params["static_post"][l, j]) for j in range(n)]
        A_r = [[_f64(params["static_res"][l, j, i]) for i in range(n)] for j in range(n)]
        if rcfg.dynamic:
            W = _f64(params["dynamic_proj"][l])  # columns: W_b, W_m, W_r[:, 0..n-1]
            s_a, s_b = _f64(params["dynamic_scale"][l])
            for j in range(n):
                hbar = _rms_normed(H[j], rcfg.key_norm_eps) * _f64(params["norm_weight"][l])
                B[j] = B[j] + s_b * torch.tanh(hbar @ W[:, 0])
                A_m[j] = A_m[j] + s_a * torch.tanh(hbar @ W[:, 1])
                for i in range(n):
                    A_r[j][i] = A_r[j][i] + s_a * torch.tanh(hbar @ W[:, 2 + i])
        y = f(sum(_per_token(A_m[j]) * H[j] for j in range(n)))
        H = [_per_token(B[i]) * y + sum(_per_token(A_r[j][i]) * H[j] for j in range(n)) for i in range(n)]
    return sum(H), []


def _sinkhorn_knopp(M: list[list[Tensor]], iters: int) -> list[list[Tensor]]:
    """mHC Eq. 9 on a positive n x n matrix of (per-token) entries: normalise the columns,
    then the rows, ``iters`` times."""
    n = len(M)
    for _ in range(iters):
        col = [sum(M[i][j] for i in range(n)) for j in range(n)]
        M = [[M[i][j] / col[j] for j in range(n)] for i in range(n)]
        row = [sum(M[i][j] for j in range(n)) for i in range(n)]
        M = [[M[i][j] / row[i] for j in range(n)] for i in range(n)]
    return M


def mhc(emb: Tensor, sublayers: Sublayers, params: dict, rcfg) -> tuple[Tensor, list]:
    """mHC (Xie et al., arXiv:2512.24880), Eqs. 3, 7-9: x_{l+1} = H_res x_l + H_post^T f(H_pre x_l)
    on the n x D state x_l (rows: streams, each emb at the start); output sum of the rows.
    v = RMSNorm(vec(x_l)) (stream-major, no weight); H~ = a (v phi) + b for pre, post, res;
    H_pre = sigmoid(H~_pre), H_post = 2 sigmoid(H~_post), H_res = Sinkhorn-Knopp(exp(H~_res))."""
    n = rcfg.n_streams
    H = [_f64(emb)] * n
    for l, f in enumerate(sublayers):
        pre = [_f64(params["static_pre"][l, j]) for j in range(n)]
        post = [_f64(params["static_post"][l, j]) for j in range(n)]
        res = [[_f64(params["static_res"][l, i, j]) for j in range(n)] for i in range(n)]
        if rcfg.dynamic:
            v = _rms_normed(torch.cat(H, dim=-1), rcfg.key_norm_eps)  # [B, T, nD]
            phi = _f64(params["dynamic_proj"][l])
            a_pre, a_post, a_res = _f64(params["dynamic_scale"][l])
            for j in range(n):
                pre[j] = a_pre * (v @ phi[:, j]) + pre[j]
                post[j] = a_post * (v @ phi[:, n + j]) + post[j]
            for i in range(n):
                for j in range(n):
                    res[i][j] = a_res * (v @ phi[:, 2 * n + n * i + j]) + res[i][j]
        H_pre = [torch.sigmoid(p) for p in pre]
        H_post = [2 * torch.sigmoid(p) for p in post]
        H_res = _sinkhorn_knopp([[torch.exp(r) for r in row] for row in res], rcfg.sinkhorn_iters)
        y = f(sum(_per_token(H_pre[j]) * H[j] for j in range(n)))
        H = [sum(_per_token(H_res[i][j]) * H[j] for j in range(n)) + _per_token(H_post[i]) * y for i in range(n)]
    return sum(H), []


REFERENCES: dict[str, Callable] = {
    "prenorm": prenorm,
    "attnres": attnres,
    "block_attnres": block_attnres,
    "denseformer": denseformer,
    "ddl": ddl,
    "depth_swa": depth_swa,
    "rezero": rezero,
    "scaled": scaled,
    "hc": hc,
    "mhc": mhc,
}
