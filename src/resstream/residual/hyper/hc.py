"""Hyper-Connections (Zhu et al., "Hyper-Connections", ICLR 2025, arXiv:2409.19606), Eqs. 1-5
and 10-14, on the n-stream wiring of streams.py.

Paper notation: pre = A_m, post = B, res = A_r^T (the paper's A_r[j, i] carries stream j
into stream i). Static coefficients are parameters per sublayer; the dynamic variant adds
    B[j] += s_b tanh(norm(h_j) . W_b),  A_m[j] += s_a tanh(norm(h_j) . W_m),
    A_r[j, :] += s_a tanh(norm(h_j) W_r)                        (per stream j, per token)
Init (Eq. 14): A_m = e_{l mod n}, B = 1, A_r = I, W = 0, s_a = s_b = 0.01. All streams then
stay equal to PreNorm's h_l, sublayer l reads exactly h_l, and the head sees n h_L: after
the scale-invariant final norm, the same logits as PreNorm (up to the norm epsilon).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from resstream.residual.base import register
from resstream.residual.hyper.reference import hc_reference
from resstream.residual.hyper.streams import INIT_SCALE, ScaledProjection, StreamOptions, Streams


@register("hc", options=StreamOptions, reference=hc_reference)
class HyperConnections(Streams):
    """Hyper-Connections, static or dynamic (``residual.dynamic``), n = ``residual.n_streams``.

    Parameters (under ``residual.``), per sublayer l: ``static_pre`` [L, n] (A_m),
    ``static_post`` [L, n] (B), ``static_res`` [L, n, n] (A_r, paper orientation: [j, i]
    carries stream j into stream i); dynamic only: ``dynamic_proj`` [L, D, n+2] (columns
    W_b, W_m, W_r[:, 0..n-1]), ``dynamic_scale`` [L, 2] (s_a, s_b), ``norm_weight`` [L, D]
    (the RMSNorm of each stream before the projection, epsilon ``stream_norm_eps``; the paper
    uses a LayerNorm).

    State (see Streams): the token's n parallel streams [B, T, n, D] and the read prepared
    from them.
    """

    def __init__(self, options: StreamOptions, n_sublayers: int, d_model: int) -> None:
        super().__init__(options, n_sublayers, d_model)
        L, n, D = self.n_sublayers, self.n, self.d_model
        self.static_pre = nn.Parameter(torch.empty(L, n))
        self.static_post = nn.Parameter(torch.empty(L, n))
        self.static_res = nn.Parameter(torch.empty(L, n, n))
        if self.dynamic:
            self.dynamic_proj = nn.Parameter(torch.empty(L, D, n + 2))
            self.dynamic_scale = nn.Parameter(torch.empty(L, 2))
            self.norm_weight = nn.Parameter(torch.empty(L, D))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Eq. 14: the PreNorm-equivalent init. Sublayer l reads stream l mod n only.
        with torch.no_grad():
            self.static_pre.zero_()
            self.static_pre[torch.arange(self.n_sublayers), torch.arange(self.n_sublayers) % self.n] = 1.0
            self.static_post.fill_(1.0)
            self.static_res.copy_(torch.eye(self.n).expand_as(self.static_res))
            if self.dynamic:
                self.dynamic_proj.zero_()
                self.dynamic_scale.fill_(INIT_SCALE)
                self.norm_weight.fill_(1.0)

    def static_coefficients(self, dt: torch.dtype) -> dict:
        # The paper's alpha = [A_m | A_r] [n, 1 + n] per sublayer; C = alpha^T.
        alpha = torch.cat([self.static_pre.unsqueeze(-1), self.static_res], dim=-1)  # [L, n, 1+n]
        static = {"C": alpha.transpose(-1, -2).unbind(0), "post": self.static_post.unbind(0)}
        if self.dynamic:
            # The norm weight folds into the projection: (g * h/rms) . w = (h . (g * w)) / rms.
            W = self.norm_weight.to(dt).unsqueeze(-1) * self.dynamic_proj.to(dt)  # [L, D, 1 + 1 + n]
            static.update(W=W.unbind(0), scale=self.dynamic_scale.to(dt).unbind(0))
        return static

    def coefficients(self, static: dict, H: Tensor, l: int, pending=None) -> tuple[Tensor, Tensor]:
        C, post = static["C"][l], static["post"][l]
        if not self.dynamic:
            return C, post
        W = static["W"][l]                                                   # [D, 2 + n]
        p = ScaledProjection.apply(H.to(W.dtype), W, self.eps, pending)     # per stream: [B, T, n, 2 + n]
        p_post, p_alpha = p.split([1, 1 + self.n], dim=-1)
        s_a, s_b = static["scale"][l]
        return (
            C + s_a * torch.tanh(p_alpha).transpose(-1, -2),  # alpha^T: [.., 1+n, n]
            post + s_b * torch.tanh(p_post).squeeze(-1),
        )
