"""Autograd kernels of Block AttnRes's two-phase schedule (paper Algorithm 1; see block.py).

Phase 1 (``Phase1``), when a block opens, computes the inter-block mixtures of all S queries
of the block at once. Phase 2 (``Phase2``) merges the running partial sum per sublayer,
elementwise, with the online-softmax identity x_l = o_l + sigmoid(s_partial - lse_l) (partial - o_l).
Both are checked by gradcheck and, inside whole models, against the float64 reference.
"""
from __future__ import annotations

import torch
from torch import Tensor

from resstream.residual import native
from resstream.residual.attnres.fused import dots_many, merge_backward, merge_forward, mix, mix_many
from resstream.residual.attnres.kernels import GradSums
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
    Saves p, x and per-token scalars. With ``recompute`` it does not keep x (which the next
    norm then does not keep either, see BlockAttnRes.input_hooks) but phase 1's weights row
    ``a_row`` and the blocks, and recomputes o and x in backward.
    """

    @staticmethod
    def forward(ctx, o, p, q, lse, eps, recompute, a_row, *blocks):
        x, r, s, gate = merge(o, p, q, lse, eps)
        ctx.recompute, ctx.o_dtype = recompute, o.dtype
        ctx.save_for_backward(p, q, r, s, gate, *((lse, a_row, *blocks) if recompute else (x,)))
        ctx.eps = eps
        return x

    @staticmethod
    def backward(ctx, gx: Tensor):
        p, q, r, s, gate, *rest = ctx.saved_tensors
        if ctx.recompute:
            lse, a_row, *blocks = rest  # the forward's own ops on the same inputs: x is bitwise the same
            x = merge(mix(a_row, blocks), p, q, lse, ctx.eps)[0]
        else:
            (x,) = rest
        go, gp, gq, dz = merge_backward(gx, p, x, q, r, s, gate)
        return go.to(ctx.o_dtype), gp.to(p.dtype), gq, -dz, None, None, None, *([None] * (len(rest) - 2 if ctx.recompute else 0))
