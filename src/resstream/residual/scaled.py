"""Scaled residual branches: ReZero (a learned scale per sublayer, zero at init) and a fixed
depth-dependent scale. Both keep PreNorm's single stream and change only the branch weight::

    emb ──►(+)──►(+)── ... ──►(+)──► final norm ──► head
           ▲ │   ▲ │          ▲
      s_0·f_0│ s_1·f_1│  s_{L-1}·f_{L-1}
           └─┘   └─┘

    h_{l+1} = h_l + s_l f_l(h_l),   h_0 = emb

- ``rezero`` (Bachlechner et al., 2020, "ReZero is All You Need: Fast Convergence at Large
  Depth", arXiv:2003.04887): s_l = alpha_l, one learned scalar per sublayer, initialised to 0,
  stored as ``residual.alpha`` [L]. At init the stream is the identity map: the LM computes
  the logits of the embedding alone, and no sublayer weight gets a gradient at step 0 (only
  alpha does; the sublayers start learning once alpha moves). That is the method, not a bug.
  Two departures from the paper, both forced or chosen here: ReZero removes LayerNorm, but our
  sublayers own their PreNorm (and the head its final norm), so this is ReZero on a PreNorm
  transformer; and the authors' Transformer code shares one alpha between a layer's
  attention and its feed-forward branch, while we give each sublayer its own (2 x n_layers
  scalars), the finer of the two and the one our sublayer indexing makes natural.
- ``scaled`` (the residual-scaling prescription of Dherin & Munn, 2025, "On residual network
  depth", arXiv:2510.03470): s_l = 1/sqrt(L) for all l, L = 2 x n_layers sublayers, a fixed
  constant with no parameters. The paper argues for scales of order 1/L or 1/sqrt(L) to tame
  the combinatorial growth of paths; we take 1/sqrt(L). It is a forward multiplier applied for
  the whole run, not an init: the GPT-2 1/sqrt(L) init of the output projections (model/lm.py)
  is kept, so at init a branch is down-weighted twice.

Neither starts as PreNorm: the embedding keeps weight 1 while the branches are scaled, which
no scale-invariant norm can undo.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from resstream.residual.base import ResidualStream, State, register


def rezero_reference(emb: Tensor, sublayers, params: dict, cfg) -> tuple[Tensor, list]:
    """Float64 specification (Bachlechner et al. 2020): h_{l+1} = h_l + alpha_l f_l(h_l)."""
    h = emb.to(torch.float64)
    for l, f in enumerate(sublayers):
        h = h + params["alpha"].to(torch.float64)[l] * f(h)
    return h, []


def scaled_reference(emb: Tensor, sublayers, params: dict, cfg) -> tuple[Tensor, list]:
    """Float64 specification (Dherin & Munn 2025): h_{l+1} = h_l + f_l(h_l) / sqrt(L)."""
    lam = 1.0 / len(sublayers) ** 0.5
    h = emb.to(torch.float64)
    for f in sublayers:
        h = h + lam * f(h)
    return h, []


@register("rezero", reference=rezero_reference)
class ReZero(ResidualStream):
    """ReZero: h_{l+1} = h_l + alpha_l f_l(h_l), alpha = 0 at init.

    State: ``h``, the running hidden state [B, T, D].
    """

    identity_at_init = False  # at init the LM is the embedding-only model, not PreNorm

    def __init__(self, options, n_sublayers: int, d_model: int) -> None:
        super().__init__(options, n_sublayers, d_model)
        self.alpha = nn.Parameter(torch.zeros(self.n_sublayers))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.alpha.zero_()

    def init(self, emb: Tensor) -> State:
        return {"h": emb}

    def read_weighted(self, state: State, l: int) -> tuple[Tensor, None]:
        return state["h"], None

    def write(self, state: State, l: int, y: Tensor) -> State:
        return {**state, "h": state["h"] + self.alpha[l].to(y.dtype) * y}

    def finish_weighted(self, state: State) -> tuple[Tensor, None]:
        return state["h"], None


@register("scaled", reference=scaled_reference)
class Scaled(ResidualStream):
    """Scaled residual branches: h_{l+1} = h_l + f_l(h_l) / sqrt(L); no parameters.

    State: ``h``, the running hidden state [B, T, D].
    """

    identity_at_init = False

    def __init__(self, options, n_sublayers: int, d_model: int) -> None:
        super().__init__(options, n_sublayers, d_model)
        self.scale = 1.0 / math.sqrt(self.n_sublayers)  # a Python float: nothing to train or save

    def init(self, emb: Tensor) -> State:
        return {"h": emb}

    def read_weighted(self, state: State, l: int) -> tuple[Tensor, None]:
        return state["h"], None

    def write(self, state: State, l: int, y: Tensor) -> State:
        return {**state, "h": state["h"] + self.scale * y}

    def finish_weighted(self, state: State) -> tuple[Tensor, None]:
        return state["h"], None
