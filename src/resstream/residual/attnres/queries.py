"""The pseudo-queries and key norms shared by every AttnRes-style kind (Full, Block, depth_swa).

One pseudo-query w_l in R^D per sublayer plus one for the final mixture (row L), stored
stacked as ``residual.queries`` [L+1, D], zero init; the keys (the sources) are RMS-normalised
with a learnable weight per query, ``residual.key_norm_weight`` [L+1, D], init 1 (absent when
``key_norm_learnable=False``). Row l reads its sources with
    alpha_i = softmax_i( w_l · RMSNorm_{g_l}(v_i) ),   x_l = sum_i alpha_i v_i
(keys normalised, values raw, no temperature). The key-norm weight folds into the query
exactly: w · (g ⊙ k̂) = (w ⊙ g) · k̂, so the fast paths normalise each source once.
Zero queries give uniform weights at init (paper, section 5).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from resstream.config import ConfigBase, require
from resstream.residual.attnres.kernels import GradSums, as_source, new_grad_sums, normed_logit_columns
from resstream.residual.attnres.source_grad import KeyedSums, keyed_source
from resstream.residual.base import ResidualStream


@dataclass
class PseudoQueryOptions(ConfigBase):
    """key_norm_eps / key_norm_learnable: the RMSNorm applied to the keys (the sources) before
    the pseudo-queries read them; learnable: a weight per query (``residual.key_norm_weight``)."""

    key_norm_eps: float = 1e-6
    key_norm_learnable: bool = True

    def validate(self) -> None:
        require(0 < self.key_norm_eps < 1, f"model.residual.key_norm_eps: must be in (0, 1), got {self.key_norm_eps}")


class PseudoQueries(ResidualStream):
    """The parameters of every AttnRes-style kind, and their first source, the embedding."""

    mixes_depth = True
    fused_kernels = True
    source_legend = {"emb": "token embedding", "f{i}": "output of sublayer i"}

    def __init__(self, options: PseudoQueryOptions, n_sublayers: int, d_model: int) -> None:
        super().__init__(options, n_sublayers, d_model)
        rows = n_sublayers + 1  # one per sublayer, one for the final mixture
        self.eps = options.key_norm_eps
        self.queries = nn.Parameter(torch.zeros(rows, d_model))
        if options.key_norm_learnable:
            self.key_norm_weight = nn.Parameter(torch.ones(rows, d_model))
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

    def new_sums(self, emb: Tensor) -> GradSums | None:
        """The gradient sums of one forward (None: no backward follows); kinds whose sources may
        take their gradients at source time (source_grad.py) return KeyedSums where they can."""
        return new_grad_sums()

    def source(self, v: Tensor, q: Tensor, sums: GradSums | None, i: int, first: int, last: int) -> tuple[Tensor, tuple]:
        """v as source i with its logit columns against rows first..last of q: (source, columns)."""
        if isinstance(sums, KeyedSums):  # float32 kernels: a bf16 output (autocast) is kept as float32
            return keyed_source(v.float(), q[: last + 1], sums, i, first, self.eps)
        return as_source(v, sums, i), normed_logit_columns(v, q[first : last + 1], self.eps)

    def open_sources(self, emb: Tensor) -> tuple[Tensor, GradSums | None, Tensor, tuple[Tensor, ...]]:
        """Start a forward: (effective queries, gradient sums or None, the embedding as source 0,
        its logit columns against every row)."""
        q = self.effective_queries()
        sums = self.new_sums(emb)
        emb, cols = self.source(emb, q, sums, 0, 0, self.n_sublayers)
        return q, sums, emb, cols

    def reopen_sources(self, sources: list[tuple[int, int, int, Tensor]], l: int):
        """Resume a forward at sublayer l (a pipeline cut): (effective queries, gradient sums or
        None, the sources, their logit columns). ``sources``: (id, first row, last row, tensor)
        per source; its columns are indexed by row - first row, as when it was written, but
        computed for rows l..last only (None below l: rows read on an earlier stage)."""
        q = self.effective_queries()
        sums = self.new_sums(sources[0][3])
        values, logits = [], []
        for i, first, last, v in sources:
            v, cols = self.source(v, q, sums, i, l, last)
            values.append(v)
            logits.append((None,) * (l - first) + cols)
        return q, sums, tuple(values), tuple(logits)
