"""Standard PreNorm residual: every sublayer output is added with weight one.

    emb ──►(+)──►(+)── ... ──►(+)──► final norm ──► head
           ▲ │   ▲ │          ▲
          f_0│  f_1│        f_{L-1}
           └─┘   └─┘

h_{l+1} = h_l + f_l(h_l), h_0 = emb (Xiong et al., 2020, "On Layer Normalization in the
Transformer Architecture"). Adds no parameters and has no options.
"""
from __future__ import annotations

import torch
from torch import Tensor

from resstream.residual.base import ResidualStream, State, register


def prenorm_reference(emb: Tensor, sublayers, params: dict, cfg) -> tuple[Tensor, list]:
    """Float64 specification: h_{l+1} = h_l + f_l(h_l)."""
    h = emb.to(torch.float64)
    for f in sublayers:
        h = h + f(h)
    return h, []


@register("prenorm", reference=prenorm_reference)
class PreNorm(ResidualStream):
    """Standard PreNorm residual (Xiong et al., 2020).

    State: ``h``, the running sum [B, T, D].
    """

    standard_residual = True

    def init(self, emb: Tensor) -> State:
        return {"h": emb}

    def read_weighted(self, state: State, l: int) -> tuple[Tensor, None]:
        return state["h"], None

    def write(self, state: State, l: int, y: Tensor) -> State:
        return {**state, "h": state["h"] + y}

    def finish_weighted(self, state: State) -> tuple[Tensor, None]:
        return state["h"], None
