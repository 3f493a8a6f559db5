"""Float64 references of hc and mhc: the specification their fast paths are tested against.

Plain, slow on purpose, one token-wise stream at a time, following the papers' equations and
sharing no code with the fast paths. Signature as every kind's reference (residual/base.py).
"""
from __future__ import annotations

import torch
from torch import Tensor


def _f64(x: Tensor) -> Tensor:
    return x.to(torch.float64)


def _rms_normed(x: Tensor, eps: float) -> Tensor:
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def _per_token(a: Tensor) -> Tensor:
    """A coefficient, a scalar or per token [B, T], ready to scale a [B, T, D] stream."""
    return a.unsqueeze(-1) if a.dim() else a


def _static(params: dict, l: int, n: int) -> tuple[list, list, list]:
    """Sublayer l's static coefficients as float64 scalars: pre[j], post[j], res[a][b] = static_res[l, a, b]."""
    pre = [_f64(params["static_pre"][l, j]) for j in range(n)]
    post = [_f64(params["static_post"][l, j]) for j in range(n)]
    return pre, post, [[_f64(params["static_res"][l, a, b]) for b in range(n)] for a in range(n)]


def hc_reference(emb: Tensor, sublayers, params: dict, cfg) -> tuple[Tensor, list]:
    """Hyper-Connections (Zhu et al., ICLR 2025), one token-wise stream h_j at a time:
    h_j = emb (j = 1..n); sublayer l reads x = sum_j A_m[j] h_j (width connection) and writes
    h_i <- B[i] f(x) + sum_j A_r[j, i] h_j (depth connection, Eqs. 2-5); output sum_i h_i.
    Dynamic (Eqs. 10-13), per stream j: A_m[j] += s_a tanh(hbar_j . W_m),
    B[j] += s_b tanh(hbar_j . W_b), A_r[j, i] += s_a tanh(hbar_j . W_r[:, i]),
    hbar_j = RMSNorm(h_j) with weight g_l."""
    n = cfg.n_streams
    H = [_f64(emb)] * n
    for l, f in enumerate(sublayers):
        A_m, B, A_r = _static(params, l, n)  # A_r[j][i]: stream j into stream i
        if cfg.dynamic:
            W = _f64(params["dynamic_proj"][l])  # columns: W_b, W_m, W_r[:, 0..n-1]
            s_a, s_b = _f64(params["dynamic_scale"][l])
            for j in range(n):
                hbar = _rms_normed(H[j], cfg.stream_norm_eps) * _f64(params["norm_weight"][l])
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


def mhc_reference(emb: Tensor, sublayers, params: dict, cfg) -> tuple[Tensor, list]:
    """mHC (Xie et al., arXiv:2512.24880), Eqs. 3, 7-9: x_{l+1} = H_res x_l + H_post^T f(H_pre x_l)
    on the n x D state x_l (rows: streams, each emb at the start); output sum of the rows.
    v = RMSNorm(vec(x_l)) (stream-major, no weight); H~ = a (v phi) + b for pre, post, res;
    H_pre = sigmoid(H~_pre), H_post = 2 sigmoid(H~_post), H_res = Sinkhorn-Knopp(exp(H~_res))."""
    n = cfg.n_streams
    H = [_f64(emb)] * n
    for l, f in enumerate(sublayers):
        pre, post, res = _static(params, l, n)  # res[i][j]: stream j into stream i
        if cfg.dynamic:
            v = _rms_normed(torch.cat(H, dim=-1), cfg.stream_norm_eps)  # [B, T, nD]
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
        H_res = _sinkhorn_knopp([[torch.exp(r) for r in row] for row in res], cfg.sinkhorn_iters)
        y = f(sum(_per_token(H_pre[j]) * H[j] for j in range(n)))
        H = [sum(_per_token(H_res[i][j]) * H[j] for j in range(n)) + _per_token(H_post[i]) * y for i in range(n)]
    return sum(H), []
