"""Block Attention Residuals (Kimi Team, "Attention Residuals", arXiv:2603.15031, section 3.2).

With S sublayers per block (``block_size``), the sources of sublayer l are b_0 = emb, the
completed block sums b_1..b_n (b_n = sum of the S outputs of block n), and, unless l opens
its block, the running partial sum of its own block::

    block 1 (S sublayers)     block 2               sublayer l in block n+1
    f_0 + ... + f_{S-1} = b_1  f_S + ... = b_2  ...  sources: [b_0, b_1, .., b_n, partial]

Each source is read with the shared pseudo-queries (queries.py). The embedding appears once
(b_0), never inside block 1's sum; S = 1 is exactly Full AttnRes. A final mixture with its own
query (row L) sees b_0 and every block, the last possibly partial.

Fast path: the paper's two-phase schedule (Algorithm 1, kernels in phases.py). Phase 1, when
a block opens, mixes the completed blocks for all S queries of the block at once; phase 2
merges the running partial sum per sublayer, elementwise, with the online-softmax identity.
"""
from __future__ import annotations

from dataclasses import dataclass
import torch
from torch import Tensor

from resstream.config import require
from resstream.residual.attnres.full import FullOptions
from resstream.residual.attnres.kernels import as_source, normed_logit_columns, softmax_mixture, source_logit, source_rstd
from resstream.residual.attnres.lean import BlockDecoder
from resstream.residual.attnres.phases import BlockInputs, Phase1, Phase2, merge
from resstream.residual.attnres.queries import PseudoQueries
from resstream.residual.attnres.recompute import Recipe, RecomputesInput
from resstream.residual.attnres.reference import block_attnres_reference
from resstream.residual.attnres.variants import AblationBlock, SwitchesToAblation
from resstream.residual.base import Boundary, State, register


# "auto" recomputes the inputs of the first third of the blocks (rounded up): block j's inputs
# cost one mixture of j + 1 sources in backward, so the first blocks are the cheapest per byte
# saved. At 12 layers, S = 4 (two blocks of six) that brings Block's peak memory from 1.065x to
# 1.047x PreNorm's at no measurable step time (README, Performance).
AUTO_RECOMPUTED_SHARE = 3  # one block in three


@dataclass
class BlockOptions(FullOptions):
    """Block AttnRes: block_size S sublayers per block (S = 1 is Full AttnRes), and Full's options
    (the key norm, Table 4's ablations: query, score, key_norm, heads). ``recompute``: the
    sublayer inputs recomputed in backward instead of kept (bitwise the same): false (none),
    true (all), k (those of the first k blocks, the cheapest to recompute), or "auto" (the
    default: the first third of the blocks; none on the ablations' plain path)."""

    block_size: int = 4
    recompute: bool | int | str = "auto"

    def validate(self) -> None:
        rc = self.recompute
        require(isinstance(rc, bool) or rc == "auto" or (isinstance(rc, int) and rc >= 0),
                f"model.residual.recompute: true, false, \"auto\" or a number of blocks >= 0, got {rc!r}")
        super().validate()
        require(self.block_size >= 1, f"model.residual.block_size: must be >= 1 (sublayers per block), got {self.block_size}")

    def recompute_requested(self) -> bool:
        return self.recompute not in (False, 0, "auto")

    def recomputed_blocks(self, n_blocks: int) -> int:
        """How many blocks, counted from the first, have their inputs recomputed."""
        rc = self.recompute
        if rc == "auto":
            return -(-n_blocks // AUTO_RECOMPUTED_SHARE)
        return n_blocks if rc is True else int(rc)


@register("block_attnres", options=BlockOptions, reference=block_attnres_reference)
class BlockAttnRes(SwitchesToAblation, RecomputesInput, PseudoQueries):
    """Block Attention Residuals with S = ``residual.block_size`` sublayers per block.

    State: ``blocks`` (b_0 = emb and the completed block sums) with their logit columns
    ``logits`` (block j, written when sublayer j*S opens, against rows j*S..L), ``partial``
    (running sum of the open block), and ``phase1``: (outputs o_s, lse [B,T,S'], weights
    [B,T,S',n]) for every query of the open block, computed once when the block opened.
    """

    source_legend = {"emb": "token embedding", "B{j}": "sum of block j", "partial": "running sum of the open block"}

    ablation_class = AblationBlock  # Table 4's ablations run on the plain path

    def __init__(self, options: BlockOptions, n_sublayers: int, d_model: int) -> None:
        super().__init__(options, n_sublayers, d_model)
        self.S = options.block_size

    def init(self, emb: Tensor) -> State:
        q, sums, emb, cols = self.open_sources(emb)
        state = {"blocks": (emb,), "logits": (cols,), "partial": None, "q": q, "sums": sums}
        return self._open_block(state, 0)

    def _open_block(self, state: State, l0: int) -> State:
        """The state with phase 1 done for the block opening at sublayer l0 (and, where some of its
        inputs are recomputed in backward, their BlockInputs)."""
        phase1 = self._phase1(state, l0)
        rows = sum(self.recomputes(l) for l in range(l0, min(l0 + self.S, self.n_sublayers)))
        inputs = BlockInputs(phase1[2], state["blocks"], rows) if rows and torch.is_grad_enabled() else None
        return {**state, "phase1": phase1, "inputs": inputs}

    def _phase1(self, state: State, l0: int) -> tuple[tuple[Tensor, ...], Tensor, Tensor]:
        """Phase 1 for the block opening at sublayer l0: all its queries over the completed blocks."""
        n_q = min(self.S, self.n_sublayers - l0)
        blocks = state["blocks"]
        # z[b, t, s, j] = logit of block j for query l0 + s; block j's columns start at row j*S
        logits = state["logits"]
        z = torch.stack([cols[l0 + s - j * self.S] for s in range(n_q) for j, cols in enumerate(logits)], dim=-1)
        z = z.unflatten(-1, (n_q, len(logits)))
        lse = torch.logsumexp(z, dim=-1)  # [B, T, S']
        alpha = torch.exp(z - lse.unsqueeze(-1))  # [B, T, S', n]
        if len(blocks) == 1:  # first block: the embedding is the only completed source
            return (blocks[0],) * n_q, lse, alpha
        return Phase1.apply(alpha, state["sums"], *blocks), lse, alpha

    def read(self, state: State, l: int) -> Tensor:
        # not read_weighted()[0]: the joint weights of phase 2 cost passes that training never uses
        i = l % self.S
        o, lse, alpha = state["phase1"]
        if i == 0:  # first sublayer of a block: completed blocks only
            return o[0]
        # Phase 2: merge the partial sum into the phase-1 softmax (online-softmax identity).
        p, q = state["partial"], state["q"][l]
        # a recomputed input: phase 2 and the next norm share one Recipe instead of keeping x
        recipe = self._input_recipe(state, l, keep=True) if self.recomputes(l) and state.get("inputs") else None
        return Phase2.apply(o[i], p, q, lse[..., i], self.eps, recipe)

    def read_weighted(self, state: State, l: int) -> tuple[Tensor, Tensor]:
        i = l % self.S
        _, lse, alpha = state["phase1"]
        if i == 0:
            return self.read(state, l), alpha[..., 0, :]
        p, q = state["partial"], state["q"][l]
        return self.read(state, l), self._phase2_weights(p, q, lse[..., i], alpha[..., i, :])

    def _phase2_weights(self, p: Tensor, q: Tensor, lse: Tensor, alpha: Tensor) -> Tensor:
        """The joint softmax weights [completed blocks..., partial] (diagnostics; the mixture
        itself never forms them)."""
        gate = torch.sigmoid(source_logit(p, source_rstd(p, self.eps), q) - lse).unsqueeze(-1)
        return torch.cat([alpha * (1 - gate), gate], dim=-1)

    def write(self, state: State, l: int, y: Tensor) -> State:
        i = l % self.S
        partial = y if i == 0 else state["partial"] + y
        if i < self.S - 1 and l < self.n_sublayers - 1:
            return {**state, "partial": partial}
        # The block is complete: it becomes a source for rows l+1..L, and phase 1 runs for the next block.
        partial = as_source(partial, state["sums"], len(state["blocks"]))
        cols = normed_logit_columns(partial, state["q"][l + 1 :], self.eps)
        state = {**state, "blocks": state["blocks"] + (partial,), "logits": state["logits"] + (cols,),
                 "partial": None, "phase1": None, "inputs": None}
        return self._open_block(state, l + 1) if l + 1 < self.n_sublayers else state

    def inference(self, scratch: dict | None = None) -> BlockDecoder:
        return BlockDecoder(self, {} if scratch is None else scratch)

    def finish_weighted(self, state: State) -> tuple[Tensor, Tensor]:
        L = self.n_sublayers  # block j's columns start at row min(j*S, L): the last may be short
        z = [cols[L - min(j * self.S, L)] for j, cols in enumerate(state["logits"])]
        return softmax_mixture(z, state["blocks"], state["sums"])

    def recomputes(self, l: int) -> bool:
        return l // self.S < self.options.recomputed_blocks(-(-self.n_sublayers // self.S))

    def _is_source(self, state: State, x: Tensor) -> bool:
        return any(x is b for b in state["blocks"])

    def _input_recipe(self, state: State, l: int, keep: bool = False) -> Recipe:
        i, inputs = l % self.S, state["inputs"]  # the phase-1 outputs themselves are not kept
        if i == 0:
            return inputs.recipe(i, lambda: inputs.mixture(0), keep)
        p, q, lse_i, eps = state["partial"], state["q"][l].detach(), state["phase1"][1][..., i].detach(), self.eps
        return inputs.recipe(i, lambda: merge(inputs.mixture(i), p, q, lse_i, eps)[0], keep)

    def stage_boundary(self, state: State, l: int) -> Boundary:
        # completed blocks never change (history); the open block's partial sum does (fresh)
        fresh = {} if state["partial"] is None else {"partial": state["partial"]}
        return Boundary(fresh=fresh, history={f"b{j}": b for j, b in enumerate(state["blocks"])})

    def from_boundary(self, boundary: Boundary, l: int) -> State:
        L, l0 = self.n_sublayers, l - l % self.S  # l0: the open block's first sublayer; phase 1 is redone for it
        blocks = [(j, min(j * self.S, L), L, boundary.history[f"b{j}"]) for j in range(len(boundary.history))]
        q, sums, blocks, logits = self.reopen_sources(blocks, l0)
        state = {"blocks": blocks, "logits": logits, "partial": boundary.fresh.get("partial"), "q": q, "sums": sums}
        return self._open_block(state, l0)

    def source_names(self, l: int) -> list[str]:
        if l >= self.n_sublayers:
            return ["emb"] + [f"B{j + 1}" for j in range(-(-self.n_sublayers // self.S))]
        names = ["emb"] + [f"B{j + 1}" for j in range(l // self.S)]
        return names + ["partial"] if l % self.S else names
