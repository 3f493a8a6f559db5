"""Ladder residual: each sublayer reads the stream without its predecessor's output.

    h:  emb ───────┬──────┬─ +y_0 ─┬─ +y_1 ─┬─ ··· ─ +y_{L-3} ─┬─ +y_{L-2} +y_{L-1} ─► final norm ─► head
                   ▼      ▼        ▼        ▼                   ▼
                  f_0    f_1      f_2      f_3       ···     f_{L-1}
                   └ y_0 ─│──────►(joins h once f_1 has run)
                          └ y_1 ──────────►(joins h once f_2 has run)

    x_0 = x_1 = emb,   x_l = emb + y_0 + ... + y_{l-2}  (l >= 2),   y_l = f_l(x_l)
    h_final = emb + y_0 + ... + y_{L-1}   (the last two outputs are added after f_{L-1})

Ladder-Residual (Zhang et al., ICML 2025, "Ladder-residual: parallelism-aware architecture
for accelerating large model inference with communication overlapping", arXiv:2501.06589).
Attention and MLP sublayers form one sequence; sublayer l's input s_l = s_{l-1} + y_{l-2}
leaves out y_{l-1}, so under tensor parallelism the all-reduce of y_{l-1} can run while f_l
computes. The state holds h and the one output not yet added (``pending``);
``write(l, y_l)`` adds y_{l-1} to h and keeps y_l. Under tensor parallelism
(resstream.parallel.tensor) y_l arrives as an AsyncCollectiveTensor whose all-reduce is
waited by the first op that reads it: here the next write, after f_{l+1} has run.

Adds no parameters, no FLOPs and has no options. Identity at init: no. There is nothing to
initialise, and with the same sublayer weights Ladder is a different function from PreNorm,
at init as after training: every sublayer after f_0 misses its predecessor's output. What
it keeps from PreNorm is the unweighted sum that reaches the head (emb plus every output)
and each sublayer's own norm.
"""
from __future__ import annotations

import torch
from torch import Tensor

from resstream.residual.base import ResidualStream, State, register


def ladder_reference(emb: Tensor, sublayers, params: dict, cfg) -> tuple[Tensor, list]:
    """Float64 specification, as sums: x_l = emb + sum_{m <= l-2} f_m(x_m),
    h = emb + sum_m f_m(x_m)."""
    emb = emb.to(torch.float64)
    ys: list[Tensor] = []
    for l, f in enumerate(sublayers):
        x = emb + sum(ys[: max(l - 1, 0)], torch.zeros_like(emb))
        ys.append(f(x))
    return emb + sum(ys, torch.zeros_like(emb)), []


@register("ladder", reference=ladder_reference)
class Ladder(ResidualStream):
    """Ladder-Residual (Zhang et al., 2025): sublayer l reads the stream without y_{l-1}.

    State: ``h``, emb plus every output but the newest [B, T, D]; ``pending``, the newest
    output y_{l} (None before the first write).
    """

    identity_at_init = False  # a different wiring from PreNorm's, whatever the weights

    def init(self, emb: Tensor) -> State:
        return {"h": emb, "pending": None}

    def read_weighted(self, state: State, l: int) -> tuple[Tensor, None]:
        return state["h"], None

    def write(self, state: State, l: int, y: Tensor) -> State:
        # y itself stays untouched until the next write: that is where, under tensor
        # parallelism, its all-reduce is waited on.
        return {**state, "h": self._settled(state), "pending": y}

    def finish_weighted(self, state: State) -> tuple[Tensor, None]:
        return self._settled(state), None

    @staticmethod
    def _settled(state: State) -> Tensor:
        """h with the pending output added."""
        return state["h"] if state["pending"] is None else state["h"] + state["pending"]
