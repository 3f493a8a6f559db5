"""The stream read and write of hc/mhc (streams.py) on the native CPU kernels (residual/native.py).

The batched-matmul path costs, per sublayer, a [1+n, n] @ [n, D] product per token (slow on a
CPU for such small matrices), a copy of x out of it, a concatenation of its gradient pieces and
autograd's sum of the streams' gradients from the read and the write. Here the read
x = sum_j pre_j h_j and the write H' = res H + post (outer) y are one pass each, forward and
backward, and the write's backward leaves its gradient of H for the read's backward, which adds
its own in place (the read's backward always runs later: it needs the sublayer's input gradient,
which needs the write's gradient of y). With dynamic coefficients the projection of H
(streams.ScaledProjection), whose backward runs after both (it needs their coefficients'
gradients), adds its part in place too and returns the sum. Float32 on a CPU, where the native
kernels run; checked against the float64 reference with every fast path.
"""
from __future__ import annotations

import torch
from torch import Tensor

from resstream.residual import native


def _coef(c: Tensor, per_token: int) -> tuple[int, int, Tensor]:
    """Per-token coefficients (the last ``per_token`` elements of each token row-major, e.g. n or
    n x n) as (address, token stride, holder): stride 0 for one static block shared by all."""
    inner = native.contiguous(c).reshape(-1, per_token)
    return inner.data_ptr(), (per_token if inner.shape[0] > 1 else 0), inner


def _dims(H: Tensor) -> tuple[int, int, int]:
    """(tokens, streams, width) of streams H [..., n, D]."""
    n, D = H.shape[-2:]
    return H.numel() // (n * D), n, D


def streams_read(lib, c0: Tensor, H: Tensor) -> Tensor:
    """x = sum_j c0[.., j] h_j over streams H [..., n, D] (c0 [.., n] per token or [n])."""
    N, n, D = _dims(H)
    H = native.contiguous(H)
    cp, cs, ck = _coef(c0, n)
    x = torch.empty(*H.shape[:-2], D, dtype=torch.float32)
    lib.rs_streams_read(N, D, n, cp, cs, H.data_ptr(), x.data_ptr(), native.threads(N * D * (n + 1)))
    return x


def streams_write(lib, res: Tensor, post: Tensor, H: Tensor, y: Tensor) -> Tensor:
    """H' = res @ H + post (outer) y per token."""
    N, n, D = _dims(H)
    H, y = native.contiguous(H), native.contiguous(y)
    (rp, rs, rk), (pp, ps, pk) = _coef(res, n * n), _coef(post, n)
    out = torch.empty(H.shape, dtype=torch.float32)
    lib.rs_streams_write(N, D, n, rp, rs, pp, ps, H.data_ptr(), y.data_ptr(), out.data_ptr(),
                         native.threads(N * D * (2 * n + 1)))
    return out


def streams_write_backward(lib, res: Tensor, post: Tensor, H: Tensor, y: Tensor, G: Tensor):
    """(gres [.., n, n], gpost [.., n], gH, gy) of streams_write."""
    N, n, D = _dims(H)
    H, y, G = native.contiguous(H), native.contiguous(y), native.contiguous(G)
    (rp, rs, rk), (pp, ps, pk) = _coef(res, n * n), _coef(post, n)
    lead = H.shape[:-2]
    gres = torch.empty(*lead, n, n, dtype=torch.float32)
    gpost = torch.empty(*lead, n, dtype=torch.float32)
    gH, gy = torch.empty(H.shape, dtype=torch.float32), torch.empty(y.shape, dtype=torch.float32)
    lib.rs_streams_write_backward(N, D, n, rp, rs, pp, ps, H.data_ptr(), y.data_ptr(), G.data_ptr(), gres.data_ptr(),
                                  gpost.data_ptr(), gH.data_ptr(), gy.data_ptr(), native.threads(N * D * (3 * n + 2)))
    return gres, gpost, gH, gy


def streams_read_backward(lib, c0: Tensor, H: Tensor, gx: Tensor, acc: Tensor | None):
    """(gc0 [.., n], gH = acc + c0 (outer) gx, written into acc where given)."""
    N, n, D = _dims(H)
    H, gx = native.contiguous(H), native.contiguous(gx)
    cp, cs, ck = _coef(c0, n)
    gc0 = torch.empty(*H.shape[:-2], n, dtype=torch.float32)
    gH = acc if acc is not None else torch.empty(H.shape, dtype=torch.float32)
    lib.rs_streams_read_backward(N, D, n, cp, cs, H.data_ptr(), gx.data_ptr(), None if acc is None else acc.data_ptr(),
                                 gc0.data_ptr(), gH.data_ptr(), native.threads(N * D * (2 * n + 1)))
    return gc0, gH


def sinkhorn(lib, z: Tensor, iters: int) -> Tensor:
    """Sinkhorn-Knopp of exp(z) per token, z [..., n, n] float32 (see rs_sinkhorn)."""
    n = z.shape[-1]
    z = native.contiguous(z)
    out = torch.empty(z.shape, dtype=torch.float32)
    lib.rs_sinkhorn(z.numel() // (n * n), n, iters, z.data_ptr(), out.data_ptr(), native.threads(z.numel() * iters))
    return out


def sinkhorn_backward(lib, z: Tensor, g: Tensor, iters: int) -> Tensor:
    n = z.shape[-1]
    z, g = native.contiguous(z), native.contiguous(g)
    gz = torch.empty(z.shape, dtype=torch.float32)
    lib.rs_sinkhorn_backward(z.numel() // (n * n), n, iters, z.data_ptr(), g.data_ptr(), gz.data_ptr(),
                             native.threads(z.numel() * iters))
    return gz


class NativeSinkhorn(torch.autograd.Function):
    """sinkhorn.SinkhornKnopp per token in one native call each way (the backward recomputes the
    forward's steps instead of keeping 2 iters n^2 floats per token)."""

    @staticmethod
    def forward(ctx, z: Tensor, iters: int, lib) -> Tensor:
        ctx.save_for_backward(z)
        ctx.iters, ctx.lib = iters, lib
        return sinkhorn(lib, z, iters)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g: Tensor):
        (z,) = ctx.saved_tensors
        return sinkhorn_backward(ctx.lib, z, g, ctx.iters), None, None


class Pending:
    """The write's gradient of H, waiting for the read's backward of the same sublayer."""

    def __init__(self, lib) -> None:
        self.lib, self.gH = lib, None
        self.projected = False  # a ScaledProjection of H (dynamic coefficients) runs backward last


class StreamRead(torch.autograd.Function):
    @staticmethod
    def forward(ctx, c0: Tensor, H: Tensor, pending: Pending) -> Tensor:
        ctx.save_for_backward(c0, H)
        ctx.pending = pending
        return streams_read(pending.lib, c0, H)

    @staticmethod
    def backward(ctx, gx: Tensor):
        c0, H = ctx.saved_tensors
        pending = ctx.pending
        gc0, gH = streams_read_backward(pending.lib, c0, H, gx, pending.gH)
        if pending.projected:  # the projection of H adds its part and returns the sum
            pending.gH = gH
            return _like(gc0, c0), None, None
        pending.gH = None
        return _like(gc0, c0), gH, None


class StreamWrite(torch.autograd.Function):
    @staticmethod
    def forward(ctx, res: Tensor, post: Tensor, H: Tensor, y: Tensor, pending: Pending) -> Tensor:
        ctx.save_for_backward(res, post, H, y)
        ctx.pending = pending
        return streams_write(pending.lib, res, post, H, y)

    @staticmethod
    def backward(ctx, G: Tensor):
        res, post, H, y = ctx.saved_tensors
        gres, gpost, gH, gy = streams_write_backward(ctx.pending.lib, res, post, H, y, G)
        ctx.pending.gH = gH  # the read's backward adds its part and returns the sum
        return _like(gres, res), _like(gpost, post), None, gy.to(y.dtype), None


def _like(g: Tensor, c: Tensor) -> Tensor:
    """A per-token gradient for coefficients c that may be shared by every token (static)."""
    return g if c.dim() == g.dim() else g.sum(tuple(range(g.dim() - c.dim())))
