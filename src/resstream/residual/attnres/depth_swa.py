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
weights and the mixing path are those of Full AttnRes (``residual.queries`` [L+1, D], zero
init; ``residual.key_norm_weight`` [L+1, D], init 1; full.py's ``SourceHistory`` with a
window: each output's logits against the W queries that read it come from one matmul when it
is written), so with W >= L this kind is exactly Full AttnRes, and a Full AttnRes checkpoint
loads into it.

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

from dataclasses import dataclass

from resstream.config import require
from resstream.residual.attnres.full import SourceHistory
from resstream.residual.attnres.queries import PseudoQueryOptions
from resstream.residual.attnres.reference import depth_swa_reference
from resstream.residual.base import register


@dataclass
class DepthSWAOptions(PseudoQueryOptions):
    """depth_swa: window W, the sublayer outputs visible besides the embedding; and the key norm."""

    window: int = 4

    def validate(self) -> None:
        super().validate()
        require(self.window >= 1, f"model.residual.window: must be >= 1, got {self.window}")


@register("depth_swa", options=DepthSWAOptions, reference=depth_swa_reference)
class DepthSWA(SourceHistory):
    """AttnRes over a causal sliding window of depth (W = ``residual.window``).

    State (see SourceHistory): the embedding and the token's last W sublayer outputs with
    their logits against the queries that still read them.
    """

    identity_at_init = False  # True only when W >= L; see the module docstring

    def __init__(self, options: DepthSWAOptions, n_sublayers: int, d_model: int) -> None:
        super().__init__(options, n_sublayers, d_model)  # zero queries: uniform weights over the window at init
        self.window = options.window
