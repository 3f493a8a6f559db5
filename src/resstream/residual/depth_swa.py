"""Depth-wise sliding-window attention residuals: Attention Residuals restricted to a causal
window over depth, the reading suggested by Yifan Zhang, "Residual Stream Duality in Modern
Transformer Architectures" (arXiv:2603.16039, section 2.2: residual attention over a depth
window of size K is causal ShortSWA on the layer axis), applied to Attention Residuals (Kimi
Team, arXiv:2603.15031).

Sublayer l attends, with its own pseudo-query, over the embedding and the last W raw
sublayer outputs (W = ``residual.window``); older outputs are dropped from the stream::

    v_0 = emb    f_0  ...  f_{l-W-1}   f_{l-W}  ...  f_{l-1}
      │          (out of the window)      │              │
      └──────────────────────┬────────────┴──────────────┘
                             ▼
        alpha_i = softmax_i( w_l · RMSNorm_{g_l}(v_i) )    (keys normalised, values raw)
        x_l     = sum_i alpha_i v_i  ──►  f_l(x_l)

The final mixture (query row L) sees the embedding and f_{L-W}..f_{L-1}. Queries, key-norm
weights and the mixing helpers are those of Full AttnRes (``residual.queries`` [L+1, D], zero
init; ``residual.key_norm_weight`` [L+1, D], init 1), so with W >= L this kind is exactly
Full AttnRes, and a Full AttnRes checkpoint loads into it.

Choices where the note is silent or differs: the note's depth attention reads hidden states
with learned Q/K/V projections and a window that eventually drops h^(0); we keep AttnRes's
parameter-light form (one pseudo-query per sublayer, raw values) and keep the embedding in
every window, as AttnRes keeps it in every source set: it is the only source carrying the
token itself once W outputs have passed. Memory: the stream holds W + 1 tensors instead of l + 1.

Not identity at init: zero queries give the uniform mean of emb and the last W outputs,
which is not a rescaling of PreNorm's sum of all outputs once l > W (for W >= L it is, being
Full AttnRes).
"""
from __future__ import annotations

from torch import Tensor

from resstream.residual.attnres import PseudoQueries, mix_sources, source_rstd
from resstream.residual.base import State, register


@register("depth_swa")
class DepthSWA(PseudoQueries):
    identity_at_init = False  # True only when W >= L; see the module docstring

    def __init__(self, cfg) -> None:
        super().__init__(cfg)  # zero queries: uniform weights over the window at init
        self.W = self.rcfg.window

    def init(self, emb: Tensor) -> State:
        # The key-norm weight folds into the query: w · (g ⊙ k̂) = (w ⊙ g) · k̂.
        q = self.effective_queries()
        return {"emb": emb, "emb_rstd": source_rstd(emb, self.eps), "window": (), "rstd": (), "q": q}

    def _mix(self, state: State, row: int) -> tuple[Tensor, Tensor]:
        values = [state["emb"], *state["window"]]
        rstds = [state["emb_rstd"], *state["rstd"]]
        return mix_sources(values, rstds, state["q"][row])

    def read_weighted(self, state: State, l: int) -> tuple[Tensor, Tensor]:
        return self._mix(state, l)

    def write(self, state: State, l: int, y: Tensor) -> State:
        # Each output's RMS statistic is computed once and slides out of the window with it.
        window = (state["window"] + (y,))[-self.W :]
        rstd = (state["rstd"] + (source_rstd(y, self.eps),))[-self.W :]
        return {**state, "window": window, "rstd": rstd}

    def finish_weighted(self, state: State) -> tuple[Tensor, Tensor]:
        return self._mix(state, self.n_sublayers)

    def source_names(self, l: int) -> list[str]:
        return ["emb"] + [f"f{i}" for i in range(max(0, l - self.W), l)]
