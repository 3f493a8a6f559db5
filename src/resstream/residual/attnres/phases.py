"""Autograd kernels of Block AttnRes's two-phase schedule (paper Algorithm 1; see block.py).

Phase 1 (``Phase1``), when a block opens, computes the inter-block mixtures of all S queries
of the block at once. Phase 2 (``Phase2``) merges the running partial sum per sublayer,
elementwise, with the online-softmax identity x_l = o_l + sigmoid(s_partial - lse_l) (partial - o_l).
Both are checked by gradcheck and, inside whole models, against the float64 reference.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from resstream.residual import native
from resstream.residual.attnres.fused import dots_many, merge_backward, merge_forward, mix, mix_many
from resstream.residual.attnres.kernels import GradSums
from resstream.residual.attnres.recompute import Recipe
from resstream.residual.compiled import native_kernels


def merge(o: Tensor, p: Tensor, q: Tensor, lse: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Phase 2's forward (see Phase2): returns x, r = 1/RMS(p), s = q · p r, gate = sigmoid(s - lse)."""
    return merge_forward(o, p, q, lse, eps)


class Phase1(torch.autograd.Function):
    """Phase 1 of Block AttnRes: o_s = sum_j A[..., s, j] b_j for the S queries of a block at once.

    A [B, T, S, n]: softmax weights of the S queries over the n completed blocks. Each output
    is its own tensor, so the one the next norm keeps does not pin the others. Saves A and the
    blocks (alive anyway). Per-token mixtures (fused.mix), not a batched matmul: on CPU a
    [S, n] @ [n, D] product per token is several times slower. With ``sums`` (see
    kernels.GradSums) the blocks' gradients are left there, by block position.
    """

    @staticmethod
    def forward(ctx, A: Tensor, sums: GradSums | None, *blocks: Tensor) -> tuple[Tensor, ...]:
        ctx.save_for_backward(A, *blocks)
        ctx.sums = sums
        ctx.set_materialize_grads(False)
        return tuple(mix_many(A, blocks))

    @staticmethod
    def backward(ctx, *gos: Tensor | None):
        A, *blocks = ctx.saved_tensors
        read = [s for s, g in enumerate(gos) if g is not None]  # outputs nobody read get nothing
        gA = torch.zeros_like(A)
        lib = native_kernels(A, *blocks, *(gos[s] for s in read)) if ctx.sums is not None and read else None
        if lib is not None:  # one pass: the dot products, and each block's running gradient sum
            sums = ctx.sums.running
            gA[..., read, :], gbs = native.phase1_backward(lib, A[..., read, :], [gos[s] for s in read], blocks,
                                                           [sums.get(j) for j in range(len(blocks))])
            sums.update(enumerate(gbs))
            return gA, None, *([None] * len(blocks))
        if read:
            gA[..., read, :] = dots_many([gos[s] for s in read], blocks).to(A.dtype)
        gbs: list[Tensor | None] = [None] * len(blocks)
        for j in range(len(blocks)):
            if ctx.sums is not None:  # the block's Source adds them up with its other readers'
                for s in read:
                    ctx.sums.add(j, A[..., s, j : j + 1], gos[s])
            elif read:
                gbs[j] = mix(A[..., read, j], [gos[s] for s in read]).to(blocks[j].dtype)
        return gA, None, *gbs


class Phase2(torch.autograd.Function):
    """Phase 2 of Block AttnRes for one sublayer: merge the partial sum p into phase 1's result o.

    s = q · p / RMS(p) is the partial sum's logit, lse phase 1's log-sum-exp, and
    gate = sigmoid(s - lse) the partial sum's weight in the joint softmax:
        x = o + gate (p - o)                     (online-softmax merge, exact).
    o is not needed for backward, because dz = gate <g, p - x> for z = s - lse; then ds = dz,
    dlse = -dz, and through the RMS norm, with r = 1 / RMS(p):
        dp += ds r q - ds (r^2 s / D) p,   dq = sum over tokens of ds r p.
    Saves p, x and per-token scalars. Given ``recipe`` (residual.recompute: the Recipe that the
    next norm keeps in place of x, see BlockInputs) it does not keep x but takes it from the
    recipe in backward: x is recomputed once for both.
    """

    @staticmethod
    def forward(ctx, o, p, q, lse, eps, recipe):
        x, r, s, gate = merge(o, p, q, lse, eps)
        ctx.recipe, ctx.o_dtype = recipe, o.dtype
        if recipe is not None:
            recipe.packs += 1  # one more unpack of it in backward: ours
        ctx.save_for_backward(p, q, r, s, gate, *(() if recipe is not None else (x,)))
        return x

    @staticmethod
    def backward(ctx, gx: Tensor):
        p, q, r, s, gate, *rest = ctx.saved_tensors
        x = ctx.recipe.unpack() if ctx.recipe is not None else rest[0]
        go, gp, gq, dz = merge_backward(gx, p, x, q, r, s, gate)
        return go.to(ctx.o_dtype), gp.to(p.dtype), gq, -dz, None, None


class BlockInputs:
    """The sublayer inputs of one block that are recomputed in backward (residual.recompute): one
    Recipe per sublayer, shared by its norm (recompute_hooks) and its Phase2. The first of them
    recomputed in backward redoes phase 1's mixtures for all of them in one pass (each row
    exactly as the forward's mix_many made it), and the others take theirs from it."""

    def __init__(self, A: Tensor, blocks: tuple[Tensor, ...], rows: int) -> None:
        self.A, self.blocks = A.detach()[..., :rows, :], blocks
        self.o: dict[int, Tensor] = {}
        self.recipes: dict[int, Recipe] = {}

    def mixture(self, i: int) -> Tensor:
        """Phase 1's output for the block's sublayer i, recomputed."""
        if len(self.blocks) == 1:  # the first block: phase 1's outputs are the embedding itself
            return self.blocks[0]
        if i not in self.o:
            self.o = dict(enumerate(mix_many(self.A, self.blocks)))
        return self.o.pop(i)

    def recipe(self, i: int, fn: Callable[[], Tensor], keep: bool) -> Recipe:
        """The Recipe of the block's sublayer i (``fn`` recomputes it): the one made by the call
        that kept it (``keep``: phase 2, before the norm asks), else a new one. The norm's call
        takes it out again: fn refers to this object, which must not hold it past the forward
        (a reference cycle outlives the step until Python's cycle collector runs)."""
        recipe = self.recipes.pop(i, None) or Recipe(fn)
        if keep:
            self.recipes[i] = recipe
        return recipe
