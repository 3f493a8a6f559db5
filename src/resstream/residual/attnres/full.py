"""Full Attention Residuals (Kimi Team, "Attention Residuals", arXiv:2603.15031).

Each sublayer l attends over the embedding and every earlier raw output with its own
pseudo-query w_l (one d-vector, no projections, no temperature; see queries.py)::

    v_0 = emb   v_1 = f_0   v_2 = f_1   ...   v_l = f_{l-1}
      │           │           │                 │
      └───────────┴─────┬─────┴─────────────────┘
                        ▼
        alpha_i = softmax_i( w_l · RMSNorm_{g_l}(v_i) )     (keys normalised, values raw)
        x_l     = sum_i alpha_i v_i   ──►  f_l(x_l) = Sublayer_l(PreNorm_l(x_l))

A final mixture with its own query (row L) over every source feeds the final norm. All
queries start at zero, so every mixture starts as the mean of its sources; because each
sublayer and the head begin with a scale-invariant RMSNorm, the model then computes the
same logits as PreNorm (up to the norm epsilon).

Fast path (kernels.py): each source's logits against every later query are computed once,
when it is written; a read gathers its column of each cache, takes a softmax and one
weighted sum; each source's gradient is summed once (gradient sums). ``SourceHistory`` is
that mechanism, shared with depth_swa (a window over the same history).

The ablations of the paper's Table 4 (options query, score, key_norm, heads) build the plain
path of variants.py instead.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from resstream.config import require
from resstream.residual import native
from resstream.residual.attnres.fused import mix
from resstream.residual.attnres.kernels import GradSums, new_grad_sums, softmax_mixture
from resstream.residual.attnres.lean import HistoryDecoder
from resstream.residual.attnres.queries import PseudoQueries, PseudoQueryOptions
from resstream.residual.attnres.recompute import Recipe, RecomputeOption, RecomputesInput
from resstream.residual.attnres.reference import attnres_reference
from resstream.residual.attnres.source_grad import KeyedSums, keyed_read
from resstream.residual.attnres.variants import AblationFull, AblationOptions, SwitchesToAblation
from resstream.residual.base import Boundary, State, register
from resstream.residual.compiled import native_kernels


class SourceHistory(PseudoQueries):
    """Sources v_0 = emb, v_1 = f_0, ... with their logit caches; ``window`` W keeps only the
    last W outputs besides the embedding (None: all of them).

    State: ``values`` the kept sources, ``ids`` their indices i (v_i; source i is read by rows
    i.. onwards, so its cache column for row r is r - i), ``logits`` each source's columns
    against the rows that read it, ``q`` the effective queries, ``sums`` the gradient sums.
    """

    window: int | None = None

    def init(self, emb: Tensor) -> State:
        q, sums, emb, cols = self.open_sources(emb)
        return {"values": (emb,), "ids": (0,), "logits": (cols,), "q": q, "sums": sums}

    def new_sums(self, emb: Tensor) -> GradSums | None:
        # gradients at source time (source_grad.py) where the native kernels run
        sums = new_grad_sums()
        lib = native_kernels(emb, self.queries) if sums is not None else None
        return sums if lib is None else KeyedSums(lib)

    def _read_row(self, state: State, row: int) -> tuple[Tensor, Tensor]:
        """The mixture read by query ``row`` (L: the final mixture) and its weights."""
        z = [cols[row - i] for i, cols in zip(state["ids"], state["logits"])]
        sums = state["sums"]
        if isinstance(sums, KeyedSums):
            values = state["values"]
            if len(values) == 1:  # a softmax over one source is exactly 1
                return values[0], torch.ones(*values[0].shape[:-1], 1)
            return keyed_read(z, sums, state["ids"], row, values, getattr(self.options, "recompute", False))
        ids = None if self.window is None else state["ids"]  # None: ids are positions
        return softmax_mixture(z, state["values"], sums, ids)

    def read_weighted(self, state: State, l: int) -> tuple[Tensor, Tensor]:
        return self._read_row(state, l)

    def finish_weighted(self, state: State) -> tuple[Tensor, Tensor]:
        return self._read_row(state, self.n_sublayers)

    def inference(self, scratch: dict | None = None) -> HistoryDecoder:
        return HistoryDecoder(self, {} if scratch is None else scratch)

    def write(self, state: State, l: int, y: Tensor) -> State:
        last = self.n_sublayers if self.window is None else min(l + self.window, self.n_sublayers)
        y, cols = self.source(y, state["q"], state["sums"], l + 1, l + 1, last)  # readers l+1..last
        values, ids, logits = state["values"] + (y,), state["ids"] + (l + 1,), state["logits"] + (cols,)
        if self.window is not None and len(values) > self.window + 1:  # the oldest output leaves
            values, ids, logits = values[:1] + values[2:], ids[:1] + ids[2:], logits[:1] + logits[2:]
        return {**state, "values": values, "ids": ids, "logits": logits}

    def source_names(self, l: int) -> list[str]:
        first = 0 if self.window is None else max(0, l - self.window)
        return ["emb"] + [f"f{i}" for i in range(first, l)]

    def stage_boundary(self, state: State, l: int) -> Boundary:
        # a source never changes once written: all history, named by id (v_i = f_{i-1})
        return Boundary(history={f"v{i}": v for i, v in zip(state["ids"], state["values"])})

    def from_boundary(self, boundary: Boundary, l: int) -> State:
        L = self.n_sublayers
        first = 1 if self.window is None else max(1, l - self.window + 1)
        ids = (0, *range(first, l + 1))
        # source i is read by rows i..L (the embedding always; an output until it leaves the window)
        last = [L if i == 0 or self.window is None else min(i - 1 + self.window, L) for i in ids]
        q, sums, values, logits = self.reopen_sources(
            [(i, i, end, boundary.history[f"v{i}"]) for i, end in zip(ids, last)], l)
        return {"values": values, "ids": ids, "logits": logits, "q": q, "sums": sums}


@dataclass
class FullOptions(AblationOptions, RecomputeOption, PseudoQueryOptions):
    """Full AttnRes: the key norm (key_norm_eps, key_norm_learnable), ``recompute``, and Table 4's
    ablations (query, score, key_norm, heads; see variants.py)."""

    def validate(self) -> None:
        super().validate()
        require(not (self.recompute_requested() and self.is_ablation()), "model.residual.recompute: not available "
                "with the ablation options (query, score, key_norm, heads); set recompute=false")

    def recompute_requested(self) -> bool:
        """Whether the user asked for recomputation (the ablations' plain path has none)."""
        return bool(self.recompute)


@register("attnres", options=FullOptions, reference=attnres_reference)
class FullAttnRes(SwitchesToAblation, RecomputesInput, SourceHistory):
    """Full Attention Residuals: sublayer l mixes the embedding and all l earlier outputs.

    State (see SourceHistory): the token's history v_0 = emb, v_1 = f_0, ... with each
    source's logits against the later queries, computed once when it is written.
    """

    ablation_class = AblationFull  # Table 4's ablations run on the plain path

    def _is_source(self, state: State, x: Tensor) -> bool:
        return any(x is v for v in state["values"])

    def _input_recipe(self, state: State, l: int) -> Recipe:
        values = state["values"]
        cols = [c[l - i].detach() for i, c in enumerate(state["logits"])]  # views of kept caches
        if isinstance(state["sums"], KeyedSums):  # the forward's kernel on the same inputs
            lib = state["sums"].lib
            return Recipe(lambda: native.softmax_mix(lib, cols, values)[0])

        def recompute() -> Tensor:  # the forward's ops on the same inputs: bitwise the same
            return mix(torch.softmax(torch.stack(cols, dim=-1), dim=-1), values)

        return Recipe(recompute)
