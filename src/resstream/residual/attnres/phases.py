"""Autograd kernels of Block AttnRes's two-phase schedule (paper Algorithm 1; see block.py).

Phase 1 (``Phase1``), when a block opens, computes the inter-block mixtures of all S queries
of the block at once. Phase 2 (``Phase2``) merges the running partial sum per sublayer,
elementwise, with the online-softmax identity x_l = o_l + sigmoid(s_partial - lse_l) (partial - o_l).
Both are checked by gradcheck and, inside whole models, against the float64 reference.
"""
from __future__ import annotations

import torch
from torch import Tensor

from resstream.residual.attnres.kernels import GradSums, dot, mix_dtype, mix_values


def merge(o: Tensor, p: Tensor, q: Tensor, lse: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Phase 2's forward (see Phase2): returns x, r = 1/RMS(p), s = q · p r, gate = sigmoid(s - lse)."""
    dt = lse.dtype  # statistics dtype
    p_ = p.to(dt)
    r = torch.rsqrt(torch.linalg.vector_norm(p_, dim=-1).square() / p.shape[-1] + eps)  # [B, T]
    s = (p_ @ q.to(dt)) * r
    gate = torch.sigmoid(s - lse)
    return lerp(o, p, gate), r, s, gate


def lerp(o: Tensor, p: Tensor, gate: Tensor) -> Tensor:
    """o + gate (p - o) in the mixture dtype of o and p (under autocast o, a mixture holding the
    embedding, is float32 and p, a sum of sublayer outputs, bfloat16)."""
    dt = mix_dtype((o, p))
    return torch.lerp(o.to(dt), p.to(dt), gate.unsqueeze(-1).to(dt))


class Phase1(torch.autograd.Function):
    """Phase 1 of Block AttnRes: o_s = sum_j A[..., s, j] b_j for the S queries of a block at once.

    A [B, T, S, n]: softmax weights of the S queries over the n completed blocks. Each output
    is its own tensor, so the one the next norm keeps does not pin the others. Saves A and the
    blocks (alive anyway). Elementwise multiply-adds, not a batched matmul: on CPU a [S, n] @
    [n, D] product per token is several times slower than S * n fused multiply-adds. With
    ``sums`` (see kernels.GradSums) the blocks' gradients are left there, by block position.
    """

    @staticmethod
    def forward(ctx, A: Tensor, sums: GradSums | None, *blocks: Tensor) -> tuple[Tensor, ...]:
        a = A.to(mix_dtype(blocks))
        ctx.save_for_backward(a, *blocks)
        ctx.A_dtype, ctx.sums = A.dtype, sums
        ctx.set_materialize_grads(False)
        return tuple(mix_values(a[..., s, :], blocks) for s in range(a.shape[-2]))

    @staticmethod
    def backward(ctx, *gos: Tensor | None):
        a, *blocks = ctx.saved_tensors
        sums = ctx.sums
        gA = torch.zeros_like(a)
        gbs: list[Tensor | None] = [None] * len(blocks)
        for s, g in enumerate(gos):
            if g is None:  # an output nobody read
                continue
            for j, b in enumerate(blocks):
                gA[..., s, j] = dot(g, b)
                w = a[..., s, j : j + 1]
                if sums is not None:  # the block's Source adds it up with its other readers'
                    sums.parts.setdefault(j, []).append((w, g))
                else:
                    gbs[j] = g * w if gbs[j] is None else gbs[j].addcmul_(g, w)
        gbs = [None if g is None else g.to(b.dtype) for g, b in zip(gbs, blocks)]
        return gA.to(ctx.A_dtype), None, *gbs


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
        ctx.save_for_backward(p, q, r, s, gate, *((a_row, *blocks) if recompute else (x,)))
        return x

    @staticmethod
    def backward(ctx, gx: Tensor):
        p, q, r, s, gate, *rest = ctx.saved_tensors
        if ctx.recompute:
            a_row, *blocks = rest
            x = lerp(mix_values(a_row.to(mix_dtype(blocks)), blocks), p, gate)
        else:
            (x,) = rest
        dt = gate.dtype
        gp = gx * gate.unsqueeze(-1).to(gx.dtype)
        go = gx - gp
        dz = gate * (dot(gx, p) - dot(gx, x)).to(dt)  # [B, T]
        dr = dz * r  # gradient of p · q per token
        gq = (p.to(dt).reshape(-1, p.shape[-1]).t() @ dr.reshape(-1)).to(q.dtype)
        gp.addcmul_(dr.unsqueeze(-1).to(gp.dtype), q.to(gp.dtype))
        gp.addcmul_(p, (-dz * r.square() * s / p.shape[-1]).unsqueeze(-1).to(gp.dtype))
        return (go.to(ctx.o_dtype), gp.to(p.dtype), gq, -dz, None, None, None,
                *([None] * (len(rest) - 1 if ctx.recompute else 0)))
