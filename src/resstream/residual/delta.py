"""Deep Delta Learning, scalar-value form d_v = 1 (Zhang, Liu, Wang, Gu, "Deep Delta
Learning", arXiv:2601.00417; code github.com/yifanzhang-pro/deep-delta-learning).

The shortcut itself changes: the identity becomes the Delta operator A_l = I - beta_l k_l k_l^T,
a rank-1 perturbation whose eigenvalue along k_l is 1 - beta_l (identity at beta = 0,
projection at 1, Householder reflection at 2), and the same gate writes a value along k_l::

    x_l ──┬──────────────────────────────► (I - beta k k^T) x_l + beta k v ──► x_{l+1}
          │                                   ▲      ▲              ▲
          ├─► f_l ─► y_l ─► k = y / sqrt(|y|^2 + eps_k^2) (direction only)
          ├─► RMSNorm ─► c ─► beta = 2 sigmoid(w_b . c + b_b)    in (0, 2)
          └────────────────► v    = 4 sigmoid(w_v . x + b_v)    in (0, 4)

    x_{l+1} = x_l + beta_l k_l (v_l - k_l^T x_l)          (the delta rule over depth)

so the readout along k_l moves a fraction beta_l of the way to its target:
k^T x_{l+1} - v = (1 - beta)(k^T x_l - v) (up to eps_k). Only the direction of the sublayer
output survives; its magnitude is discarded.

Paper (arXiv:2601.00417: the operator in section 2.1, Eqs. 2.1-2.2; k, v and beta in
section 3 and appendix A.1) versus the authors' code (github.com/yifanzhang-pro/deep-delta-learning,
``model/DDL-vdim1-gpt-mha-rope.py``, class ``DeepDeltaResidualVdim1``, and its GPTConfig
defaults), and what we follow:
- beta and k: as in both (they agree): beta = 2 sigmoid(W_beta c + b_beta) with c the
  normalised sublayer input, k the sublayer output normalised with eps_k = 1e-5. The code
  reads beta from the sublayer's own PreNorm output; our sublayers own their norm, so the
  stream normalises x_l itself without a gain, which W_beta absorbs (same function class).
- v: the paper writes v_l = W_v c_l (a linear readout of the normalised input); the code
  uses v = 4 sigmoid(W_v x + b_v) on the un-normalised state, bounded to (0, 4). We follow
  the code: every reported number comes from it, and it is what makes the authors' init
  behave like a PreNorm start (below). A linear v of a small init would instead start each
  sublayer as a bare projection that erases the k-component and writes almost nothing.
- init: the code initialises beta to 1 (its ``ddl_beta_init``, "for baseline comparability").
  With v = 2, a sublayer then adds 2 y/|y| after erasing the (small) component of x along k:
  a PreNorm-like step with a normalised branch. Exact identity needs beta = 0, which
  beta = 2 sigmoid(.) reaches only as the logit goes to -inf, and near it the gate's gradient
  vanishes with beta itself (d beta / d b = beta (1 - beta/2)), so a near-identity start
  opens only after thousands of Adam steps. We therefore default to the authors' beta0 = 1
  (``residual.ddl_beta_init``; any value in (0, 2), e.g. 1e-3 for a near-identity start),
  and ``identity_at_init`` is False: no beta0 reproduces PreNorm.
  Deviation: w_beta, w_v and b_v start at zero (the code draws w from N(0, (0.5/sqrt d)^2)
  and b_v from PyTorch's default), so at init beta = beta0 and v = 2 exactly at every token.
- Left out: the expanded state d_v > 1 (DDL-CC/TC with the embedding convolution and the
  compressors), a per-token matrix state that is a different stream shape.

Parameters (under ``residual.``): ``beta_weight`` [L, D], ``beta_bias`` [L], ``v_weight``
[L, D], ``v_bias`` [L]: 2L(D+1), i.e. 4D+4 per transformer block. The gate logits and k^T x
run in float32 at least (as the authors do).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from resstream.config import ConfigBase, require
from resstream.residual.base import ResidualStream, State, register, stats_dtype

K_EPS = 1e-5    # eps_k of k = y / sqrt(|y|^2 + eps_k^2): the authors' ddl_k_eps
CTX_EPS = 1e-6  # epsilon of the parameter-free RMSNorm that feeds the gate (our norm_eps default)
V_SCALE = 4.0   # v = V_SCALE * sigmoid(.), the authors' ddl_v_sigmoid_scale


@dataclass
class DDLOptions(ConfigBase):
    """ddl_beta_init: the gate beta = 2 sigmoid(.) at init, in (0, 2): 1 is the authors' default
    (projection regime); values near 0 start near the identity shortcut."""

    ddl_beta_init: float = 1.0

    def validate(self) -> None:
        require(0.0 < self.ddl_beta_init < 2.0,
                f"model.residual.ddl_beta_init: must be in (0, 2) (beta = 2 sigmoid(logit)), got {self.ddl_beta_init}")


def ddl_reference(emb: Tensor, sublayers, params: dict, cfg) -> tuple[Tensor, list]:
    """Float64 specification, d_v = 1 (Eq. 2.1 with the authors' v):
    X_{l+1} = A_l X_l + beta_l k_l v_l, A_l = I - beta_l k_l k_l^T, k_l = y_l / sqrt(|y_l|^2 + 1e-10),
    beta_l = 2 sigmoid(w_b . RMSNorm(X_l) + b_b) (norm eps 1e-6), v_l = 4 sigmoid(w_v . X_l + b_v).
    The Delta operator is built as an explicit D x D matrix per token."""
    f64 = torch.float64
    x = emb.to(f64)
    eye = torch.eye(x.shape[-1], dtype=f64)
    for l, f in enumerate(sublayers):
        y = f(x)
        k = y / torch.sqrt((y * y).sum(-1, keepdim=True) + 1e-5 ** 2)
        c = x / torch.sqrt((x * x).mean(-1, keepdim=True) + 1e-6)
        beta = 2 * torch.sigmoid(c @ params["beta_weight"][l].to(f64) + params["beta_bias"][l].to(f64))
        v = 4 * torch.sigmoid(x @ params["v_weight"][l].to(f64) + params["v_bias"][l].to(f64))
        A = eye - beta[..., None, None] * k.unsqueeze(-1) * k.unsqueeze(-2)     # [B, T, D, D]
        x = (A @ x.unsqueeze(-1)).squeeze(-1) + beta.unsqueeze(-1) * k * v.unsqueeze(-1)
    return x, []


@register("ddl", options=DDLOptions, reference=ddl_reference)
class DeepDelta(ResidualStream):
    """Deep Delta Learning (Zhang et al., 2026): a gated rank-1 erase-and-write shortcut.

    State: ``h``, the running hidden state [B, T, D]; the delta rule reads only the token's
    own h and sublayer output.
    """

    identity_at_init = False  # see the module docstring: no gate init reproduces PreNorm

    def __init__(self, options: DDLOptions, n_sublayers: int, d_model: int) -> None:
        super().__init__(options, n_sublayers, d_model)
        L, D = self.n_sublayers, self.d_model
        self.beta_weight = nn.Parameter(torch.zeros(L, D))
        self.beta_bias = nn.Parameter(torch.zeros(L))
        self.v_weight = nn.Parameter(torch.zeros(L, D))
        self.v_bias = nn.Parameter(torch.zeros(L))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        p = self.options.ddl_beta_init / 2.0  # beta = 2 sigmoid(b)  =>  b = logit(beta0 / 2)
        with torch.no_grad():
            self.beta_weight.zero_()
            self.beta_bias.fill_(math.log(p) - math.log1p(-p))
            self.v_weight.zero_()
            self.v_bias.zero_()

    def init(self, emb: Tensor) -> State:
        return {"h": emb}

    def read_weighted(self, state: State, l: int) -> tuple[Tensor, None]:
        return state["h"], None

    def gate_and_value(self, x: Tensor, l: int) -> tuple[Tensor, Tensor]:
        """beta_l(x) and v_l(x), each [B, T], in float32 or wider."""
        dt = stats_dtype(x)
        xs = x.to(dt)
        # One [B,T,D] x [D,2] product serves both readouts; the gate's RMSNorm is folded in as
        # a per-token factor, since w . (x * r) = (w . x) * r.
        w = torch.stack([self.beta_weight[l], self.v_weight[l]], dim=-1).to(dt)
        p = xs @ w                                                   # [B, T, 2]
        rstd = torch.rsqrt(xs.pow(2).mean(-1) + CTX_EPS)
        beta = 2.0 * torch.sigmoid(p[..., 0] * rstd + self.beta_bias[l].to(dt))
        v = V_SCALE * torch.sigmoid(p[..., 1] + self.v_bias[l].to(dt))
        return beta, v

    def write(self, state: State, l: int, y: Tensor) -> State:
        x = state["h"]
        beta, v = self.gate_and_value(x, l)
        dt = beta.dtype
        ys = y.to(dt)
        # k = y * inv: keep k implicit, so the update is one scaled add of y
        inv = torch.rsqrt(ys.pow(2).sum(-1) + K_EPS * K_EPS)       # [B, T]
        kx = (ys * x.to(dt)).sum(-1) * inv                          # k^T x, [B, T]
        coef = beta * (v - kx) * inv                                # x' = x + coef * y
        return {**state, "h": x + coef.unsqueeze(-1).to(x.dtype) * y}

    def finish_weighted(self, state: State) -> tuple[Tensor, None]:
        return state["h"], None
