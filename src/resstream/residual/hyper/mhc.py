"""mHC, Manifold-Constrained Hyper-Connections (Xie et al. (DeepSeek), arXiv:2512.24880),
Eqs. 3 and 7-9, on the n-stream wiring of streams.py.

Coefficients come from the whole flattened state v = RMSNorm(vec(H)) [nD]:
    pre  = sigmoid(a_pre v phi_pre + b_pre)                     [n]     non-negative read
    post = 2 sigmoid(a_post v phi_post + b_post)                [n]     non-negative write
    res  = SinkhornKnopp(a_res mat(v phi_res) + b_res)          [n, n]  doubly stochastic
Sinkhorn-Knopp (sinkhorn.py): M = exp(logits), then sinkhorn_iters times normalise columns,
then rows, in float32 at least. The paper gives a = 0.01 and leaves b's init open; ours puts
mhc near hc's Eq. 14 init: b_pre = +8 on stream l mod n and -8 elsewhere (pre = e_{l mod n}
within sigmoid(-8) = 3.4e-4 per entry), b_post = 0 (post = 1 exactly), b_res = 0 on the
diagonal and -8 off it (res: 3.4e-4 off the diagonal, 1 - (n-1) 3.4e-4 on it), phi = 0.
Since the streams start equal and res's rows sum to 1 (the last normalisation is the rows'),
the model starts exactly as PreNorm up to the norm epsilon, like hc. Near such a permutation
matrix Sinkhorn converges slowly: once the logits move, 20 iterations leave column sums off
by up to ~1e-4 (logit noise 0.05) to ~5e-2 (noise 0.5); rows are exact. Static mhc projects
every sublayer's matrix in one call per forward.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from resstream.config import require
from resstream.residual.base import register
from resstream.residual.hyper.reference import mhc_reference
from resstream.residual.hyper.sinkhorn import sinkhorn
from resstream.residual.hyper.streams import INIT_SCALE, ScaledProjection, StreamOptions, Streams

# mhc's static logits: +-INIT_LOGIT puts sigmoid and Sinkhorn within (n-1) 3.4e-4 of hc's init.
INIT_LOGIT = 8.0


@dataclass
class MHCOptions(StreamOptions):
    """mhc: the n-stream options and sinkhorn_iters, the Sinkhorn-Knopp iterations."""

    sinkhorn_iters: int = 20

    def validate(self) -> None:
        super().validate()
        # the paper runs 20; each iteration is a step of every forward and backward
        require(1 <= self.sinkhorn_iters <= 1000, f"model.residual.sinkhorn_iters: must be in [1, 1000], got {self.sinkhorn_iters}")


@register("mhc", options=MHCOptions, reference=mhc_reference)
class ManifoldHyperConnections(Streams):
    """mHC, n = ``residual.n_streams``, ``residual.sinkhorn_iters`` Sinkhorn-Knopp iterations;
    ``residual.dynamic=False`` keeps only the static logits b.

    Parameters (under ``residual.``), per sublayer l: ``static_pre`` [L, n] (b_pre),
    ``static_post`` [L, n] (b_post), ``static_res`` [L, n, n] (b_res, [i, j]: stream j into
    stream i); dynamic only: ``dynamic_proj`` [L, nD, 2n + n^2] (phi: columns pre, post, then
    res row-major; rows index vec(H) stream-major) and ``dynamic_scale`` [L, 3] (a_pre,
    a_post, a_res). The RMSNorm of vec(H) (epsilon ``stream_norm_eps``) has no weight of its
    own (it would fold into phi).

    State (see Streams): the token's n parallel streams [B, T, n, D] and the read prepared
    from them.
    """

    def __init__(self, options: MHCOptions, n_sublayers: int, d_model: int) -> None:
        super().__init__(options, n_sublayers, d_model)
        L, n, D = self.n_sublayers, self.n, self.d_model
        self.iters = options.sinkhorn_iters
        self.static_pre = nn.Parameter(torch.empty(L, n))
        self.static_post = nn.Parameter(torch.empty(L, n))
        self.static_res = nn.Parameter(torch.empty(L, n, n))
        if self.dynamic:
            self.dynamic_proj = nn.Parameter(torch.empty(L, n * D, 2 * n + n * n))
            self.dynamic_scale = nn.Parameter(torch.empty(L, 3))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Near hc's Eq. 14 (see the module docstring): read ~ e_{l mod n}, write = 1, mix ~ I.
        L, n = self.n_sublayers, self.n
        with torch.no_grad():
            self.static_pre.fill_(-INIT_LOGIT)
            self.static_pre[torch.arange(L), torch.arange(L) % n] = INIT_LOGIT
            self.static_post.zero_()
            self.static_res.copy_((torch.eye(n) - 1.0).mul(INIT_LOGIT).expand_as(self.static_res))
            if self.dynamic:
                self.dynamic_proj.zero_()
                self.dynamic_scale.fill_(INIT_SCALE)

    def static_coefficients(self, dt: torch.dtype) -> dict:
        if self.dynamic:  # the nonlinearities act after the per-token terms are added
            names = ("static_pre", "static_post", "static_res", "dynamic_proj", "dynamic_scale")
            return {name: getattr(self, name).to(dt).unbind(0) for name in names}
        # Static: every sublayer's coefficients at once, Sinkhorn included, once per forward.
        pre = torch.sigmoid(self.static_pre.to(dt)).unsqueeze(-2)                # [L, 1, n]
        C = torch.cat([pre, sinkhorn(self.static_res.to(dt), self.iters)], dim=-2)  # [L, 1+n, n]
        return {"C": C.unbind(0), "post": (2 * torch.sigmoid(self.static_post.to(dt))).unbind(0)}

    def coefficients(self, static: dict, H: Tensor, l: int, pending=None) -> tuple[Tensor, Tensor]:
        if not self.dynamic:
            return static["C"][l], static["post"][l]
        n = self.n
        phi = static["dynamic_proj"][l]                                            # [nD, 2n + n^2]
        v = H.flatten(-2).to(phi.dtype)                                            # vec(H): [B, T, nD]
        p_pre, p_post, p_res = ScaledProjection.apply(v, phi, self.eps, pending).split([n, n, n * n], dim=-1)
        a_pre, a_post, a_res = static["dynamic_scale"][l]
        pre = torch.sigmoid(a_pre * p_pre + static["static_pre"][l])
        post = 2 * torch.sigmoid(a_post * p_post + static["static_post"][l])
        res_logits = (a_res * p_res).unflatten(-1, (n, n)) + static["static_res"][l]
        return torch.cat([pre.unsqueeze(-2), sinkhorn(res_logits, self.iters)], dim=-2), post
