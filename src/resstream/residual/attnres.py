"""Attention Residuals, Full and Block (Kimi Team, "Attention Residuals", arXiv:2603.15031).

Full AttnRes: each sublayer l attends over the embedding and every earlier raw output
with its own pseudo-query w_l (one d-vector, no projections, no temperature)::

    v_0 = emb   v_1 = f_0   v_2 = f_1   ...   v_l = f_{l-1}
      │           │           │                 │
      └───────────┴─────┬─────┴─────────────────┘
                        ▼
        alpha_i = softmax_i( w_l · RMSNorm_{g_l}(v_i) )     (keys normalised, values raw)
        x_l     = sum_i alpha_i v_i   ──►  f_l(x_l) = Sublayer_l(PreNorm_l(x_l))

Block AttnRes with S sublayers per block: the sources of sublayer l are b_0 = emb, the
completed block sums b_1..b_n (b_n = sum of the S outputs of block n), and, unless l opens
its block, the running partial sum of its own block::

    block 1 (S sublayers)     block 2               sublayer l in block n+1
    f_0 + ... + f_{S-1} = b_1  f_S + ... = b_2  ...  sources: [b_0, b_1, .., b_n, partial]

A final mixture with its own query (row L) over every source feeds the final norm. All
queries start at zero, so every mixture starts as the mean of its sources; because each
sublayer and the head begin with a scale-invariant RMSNorm, the model then computes the
same logits as PreNorm (up to the norm epsilon).

Parameters (under ``residual.``): ``queries`` [L+1, D], zero init; ``key_norm_weight``
[L+1, D], init 1 (absent when ``key_norm_learnable=False``). The key-norm weight folds into
the query exactly: w · (g ⊙ k̂) = (w ⊙ g) · k̂, so the fast paths normalise each source once.

Fast paths (checked against ``reference.py``):
- Full: per-source RMS statistics are computed once when a source is written and reused by
  every later reader; the history is never re-stacked.
- Block: the paper's two-phase schedule (Algorithm 1). Phase 1, at the start of a block,
  serves all S pseudo-queries of the block with one pass over the completed blocks and keeps
  each query's normalised output and log-sum-exp; phase 2 merges the running partial sum
  per sublayer with the online-softmax identity
  x_l = o_l + sigmoid(s_partial - lse_l) (partial - o_l).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from resstream.residual.base import ResidualStream, State, register, stats_dtype


def source_rstd(v: Tensor, eps: float) -> Tensor:
    """1 / RMS(v) over the model dimension, in float32 or wider: [B, T]."""
    return torch.rsqrt(v.to(stats_dtype(v)).pow(2).mean(-1) + eps)


def source_logit(v: Tensor, rstd: Tensor, q: Tensor) -> Tensor:
    """q · RMSNorm(v) for one source, per token: [B, T]."""
    dt = stats_dtype(v)
    return (v.to(dt) @ q.to(dt)) * rstd


def mix_sources(values: list[Tensor], rstds: list[Tensor], q: Tensor) -> tuple[Tensor, Tensor]:
    """softmax over sources of q · RMSNorm(v_i), applied to the raw values.

    Returns the mixture [B, T, D] and the weights [B, T, n]. Loops over sources instead of
    stacking them, so no copy of the history is made.
    """
    logits = torch.stack([source_logit(v, r, q) for v, r in zip(values, rstds)], dim=-1)
    alpha = torch.softmax(logits, dim=-1)
    a = alpha.to(values[0].dtype)
    h = a[..., 0:1] * values[0]
    for i in range(1, len(values)):
        h = h + a[..., i : i + 1] * values[i]
    return h, alpha


class _AttnResParams(ResidualStream):
    """Pseudo-queries and key-norm weights shared by Full and Block AttnRes."""

    mixes_depth = True

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        rows = self.n_sublayers + 1  # one per sublayer, one for the final mixture
        self.eps = self.rcfg.key_norm_eps
        self.queries = nn.Parameter(torch.zeros(rows, self.d_model))
        if self.rcfg.key_norm_learnable:
            self.key_norm_weight = nn.Parameter(torch.ones(rows, self.d_model))
        else:
            self.register_parameter("key_norm_weight", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Zero queries are essential: uniform weights at init (paper, section 5).
        with torch.no_grad():
            self.queries.zero_()
            if self.key_norm_weight is not None:
                self.key_norm_weight.fill_(1.0)

    def effective_queries(self) -> Tensor:
        """w_l ⊙ g_l for every row: [L+1, D]."""
        if self.key_norm_weight is None:
            return self.queries
        return self.queries * self.key_norm_weight


@register("attnres")
class FullAttnRes(_AttnResParams):
    """Full Attention Residuals: sublayer l mixes the embedding and all l earlier outputs."""

    def init(self, emb: Tensor) -> State:
        return {"values": (emb,), "rstd": (source_rstd(emb, self.eps),), "q": self.effective_queries()}

    def read_weighted(self, state: State, l: int) -> tuple[Tensor, Tensor]:
        return mix_sources(list(state["values"]), list(state["rstd"]), state["q"][l])

    def write(self, state: State, l: int, y: Tensor) -> State:
        return {**state, "values": state["values"] + (y,), "rstd": state["rstd"] + (source_rstd(y, self.eps),)}

    def finish_weighted(self, state: State) -> tuple[Tensor, Tensor]:
        return mix_sources(list(state["values"]), list(state["rstd"]), state["q"][self.n_sublayers])

    def source_names(self, l: int) -> list[str]:
        return ["emb"] + [f"f{i}" for i in range(l)]


@register("block_attnres")
class BlockAttnRes(_AttnResParams):
    """Block Attention Residuals with S = ``residual.block_size`` sublayers per block.

    State: ``blocks`` (b_0 = emb and the completed block sums) with their ``rstd``,
    ``partial`` (running sum of the open block), and ``phase1``: the inter-block result for
    every query of the open block, computed once when the previous block completed.
    """

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        self.S = self.rcfg.block_size

    def init(self, emb: Tensor) -> State:
        state = {"blocks": (emb,), "rstd": (source_rstd(emb, self.eps),), "partial": None, "q": self.effective_queries()}
        return {**state, "phase1": self._phase1(state, 0)}

    def _phase1(self, state: State, l: int) -> tuple[Tensor, Tensor, Tensor]:
        """Phase 1: inter-block attention for all queries of the block opening at l, in one pass.

        Returns o [S', B, T, D] (normalised outputs), lse [S', B, T], alpha [S', B, T, n].
        """
        q = state["q"][l : min(l + self.S, self.n_sublayers)]  # [S', D]
        blocks = state["blocks"]
        dt = stats_dtype(blocks[0])
        # logits[s, b, t, j] = rstd_j[b, t] * (b_j[b, t] . q_s)
        logits = torch.stack(
            [(b.to(dt) @ q.to(dt).t()).permute(2, 0, 1) * r for b, r in zip(blocks, state["rstd"])], dim=-1
        )
        lse = torch.logsumexp(logits, dim=-1)
        alpha = torch.exp(logits - lse.unsqueeze(-1))
        a = alpha.to(blocks[0].dtype)
        o = a[..., 0:1] * blocks[0]
        for j in range(1, len(blocks)):
            o = o + a[..., j : j + 1] * blocks[j]
        return o, lse, alpha

    def read_weighted(self, state: State, l: int) -> tuple[Tensor, Tensor]:
        i = l % self.S
        o, lse, alpha = state["phase1"]
        if i == 0:  # first sublayer of a block: completed blocks only
            return o[0], alpha[0]
        # Phase 2: merge the partial sum into the phase-1 softmax (online-softmax identity).
        p = state["partial"]
        s = source_logit(p, source_rstd(p, self.eps), state["q"][l])
        gate = torch.sigmoid(s - lse[i])  # the partial sum's weight in the joint softmax
        h = o[i] + gate.to(p.dtype).unsqueeze(-1) * (p - o[i])
        weights = torch.cat([alpha[i] * (1 - gate).unsqueeze(-1), gate.unsqueeze(-1)], dim=-1)
        return h, weights

    def write(self, state: State, l: int, y: Tensor) -> State:
        i = l % self.S
        partial = y if i == 0 else state["partial"] + y
        if i < self.S - 1 and l < self.n_sublayers - 1:
            return {**state, "partial": partial}
        # The block is complete: it becomes a source, and phase 1 runs for the next block.
        state = {**state, "blocks": state["blocks"] + (partial,), "partial": None, "phase1": None,
                 "rstd": state["rstd"] + (source_rstd(partial, self.eps),)}
        if l + 1 < self.n_sublayers:
            state["phase1"] = self._phase1(state, l + 1)
        return state

    def finish_weighted(self, state: State) -> tuple[Tensor, Tensor]:
        return mix_sources(list(state["blocks"]), list(state["rstd"]), state["q"][self.n_sublayers])

    def source_names(self, l: int) -> list[str]:
        if l >= self.n_sublayers:
            return ["emb"] + [f"B{j + 1}" for j in range(-(-self.n_sublayers // self.S))]
        names = ["emb"] + [f"B{j + 1}" for j in range(l // self.S)]
        return names + ["partial"] if l % self.S else names
