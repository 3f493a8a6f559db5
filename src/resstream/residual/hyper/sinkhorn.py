"""Sinkhorn-Knopp projection onto (nearly) doubly stochastic matrices, for mHC (mhc.py).

exp(logits), then ``iters`` times normalise columns, then rows (mHC Eq. 9), in float32 at
least, batched over all tokens with the token axes last and with a hand-written backward.
"""
from __future__ import annotations

import torch
from torch import Tensor

from resstream.residual.base import stats_dtype
from resstream.residual.compiled import native_kernels
from resstream.residual.hyper.native_streams import NativeSinkhorn


def sinkhorn(logits: Tensor, iters: int) -> Tensor:
    """Sinkhorn-Knopp projection of exp(logits) [..., n, n] towards a doubly stochastic
    matrix: ``iters`` times normalise columns, then rows. Runs in float32 at least; per token in
    one native call where the native kernels run (native_streams.NativeSinkhorn)."""
    lib = native_kernels(logits)
    if lib is not None:
        return NativeSinkhorn.apply(logits, iters, lib)
    z = logits.to(stats_dtype(logits)).movedim((-2, -1), (0, 1)).contiguous()  # [n, n, ...]
    return SinkhornKnopp.apply(z, iters).movedim((0, 1), (-2, -1))


def _sum_over(m: Tensor, axis: int) -> Tensor:
    """Sum over a tiny axis as n - 1 adds of token-sized slices (keepdim). A torch reduction
    of a 32k-element tensor goes multi-threaded; on a 2-core CPU shared with other jobs each
    such call was measured at ~12 ms (waiting for the second core) against ~10 us here."""
    parts = m.unbind(axis)
    s = parts[0]
    for part in parts[1:]:
        s = s + part
    return s.unsqueeze(axis)


def _normalise(m: Tensor, iters: int) -> tuple[Tensor, list]:
    """The iterations on m [n, n, ...], with each step's (output, sums, axis) for backward."""
    steps = []
    for _ in range(iters):
        for axis in (0, 1):  # columns sum to 1, then rows
            s = _sum_over(m, axis)
            m = m / s
            steps.append((m, s, axis))
    return m, steps


class SinkhornKnopp(torch.autograd.Function):
    """Sinkhorn-Knopp on [n, n, ...] with a hand-written backward.

    Token axes last, so every operation is an elementwise one over token-sized slices.
    Autograd's graph of 2 * iters broadcast divisions costs several times the few kernels
    per step below. The steps are kept for backward (2 * iters * n^2 floats per token; mHC's
    fused kernel recomputes them instead, which costs more kernels here).
    """

    @staticmethod
    def forward(ctx, z: Tensor, iters: int) -> Tensor:
        # Subtracting each column's max cannot change the result (the first column
        # normalisation divides it out again) but keeps exp finite.
        col_max = z[0]
        for row in z.unbind(0)[1:]:
            col_max = torch.maximum(col_max, row)
        m0 = torch.exp(z - col_max)
        out, steps = _normalise(m0, iters)
        # Intermediates live on ctx; the output goes through save_for_backward (no cycle).
        ctx.intermediates = (m0, steps[:-1], steps[-1][1])
        ctx.save_for_backward(out)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g: Tensor) -> tuple[Tensor, None]:
        (out,) = ctx.saved_tensors
        m0, steps, last_sum = ctx.intermediates
        g = g.contiguous()  # arrives transposed (movedim)
        for o, s, axis in reversed(steps + [(out, last_sum, 1)]):
            # o = m / s with s = m.sum(axis): dm = (g - sum_axis(g * o)) / s
            g = (g - _sum_over(g * o, axis)) / s
        return g * m0, None  # d exp(z) = exp(z) dz; the max shift has no effect on the output
