"""Full AttnRes's backward at source time: the native CPU path of SourceHistory (Full, depth_swa).

The plain fast path (kernels.py) differentiates each read through its weights: the read's
backward takes <g, v_i> for every source it mixed, the softmax and the logit caches pass that
on to each source's key norm (NormedLogits), and the gradient sums add alpha g per reader. Every
source is then read twice in backward (its dot products, its key gradient) and every reader's
gradient once more per source. Here each read's backward only records (g, <g, x>) and the
source, once all its readers are done (autograd runs a node after every consumer of its
output), forms its whole gradient in one native pass over itself and its readers' gradients
(native_kernels.c, rs_source_backward), using that a softmax's gradient needs only
<g, v_i> - <g, x> per source:

    dz_l   = alpha_l (<g_l, v> - <g_l, x_l>)                     (logit of v for reader l)
    dL/dv  = direct + sum_l alpha_l g_l + r sum_l dz_l q_l - (r^2 / D)(sum_l dz_l c_l) v
    dL/dq_l += sum_tokens dz_l r v                               (c_l = q_l · v r, r = 1/RMS(v))

Used where the native kernels run (float32 on a CPU, residual.compiled "auto"/"on"), with
gradient sums (with ``recompute`` a read recomputes its output in backward for <g, x>).
Checked against the float64 reference like every fast path (tests/residual/test_native.py).
"""
from __future__ import annotations

import torch
from torch import Tensor

from resstream.residual import native
from resstream.residual.attnres.kernels import GradSums


class KeyedSums(GradSums):
    """Gradient sums whose sources keep their keys (v, 1/RMS(v), logits) and whose readers leave
    ((weights, column), g, <g, x>, row) per source."""

    def __init__(self, lib) -> None:
        super().__init__()
        self.lib = lib
        self.keys: dict[int, tuple[Tensor, Tensor, Tensor, int]] = {}
        self.readers: dict[int, list[tuple[Tensor, Tensor, Tensor, int]]] = {}


class KeyedSource(torch.autograd.Function):
    """Identity on source i (whose keys sit in ``sums.keys``); its backward is the source's whole
    gradient and its queries' (see the module docstring)."""

    @staticmethod
    def forward(ctx, v: Tensor, Q: Tensor, sums: KeyedSums, i: int) -> Tensor:
        ctx.sums, ctx.i = sums, i
        ctx.save_for_backward(Q)
        ctx.set_materialize_grads(False)
        return v.view_as(v)

    @staticmethod
    def backward(ctx, g: Tensor | None):
        (Q,) = ctx.saved_tensors
        sums = ctx.sums
        v, r, c, row0 = sums.keys.pop(ctx.i)
        readers = sums.readers.pop(ctx.i, [])
        if not readers:
            return g, None, None, None
        gv, dz = native.source_backward(sums.lib, v, r, (c, [row - row0 for *_, row in readers]), readers,
                                        Q.detach(), g)
        D = v.shape[-1]
        rows = torch.tensor([row for *_, row in readers])
        gq_rows = (dz * r).reshape(len(readers), -1) @ v.reshape(-1, D)
        gQ = torch.zeros_like(Q).index_add_(0, rows, gq_rows.to(Q.dtype))
        return gv, gQ, None, None


def keyed_source(v: Tensor, Q: Tensor, sums: KeyedSums, i: int, row0: int, eps: float) -> tuple[Tensor, tuple]:
    """v as source i, with its logits against rows row0.. of the effective queries Q computed now
    (no autograd: their gradients come from KeyedSource): (source, logit columns)."""
    with torch.no_grad():
        vd, q = v.detach(), Q.detach()[row0:]
        r = torch.rsqrt(torch.linalg.vector_norm(vd, dim=-1).square() / v.shape[-1] + eps)
        # one contiguous column per query row: [rows, ...] (what the kernels read per token)
        c = ((q @ vd.reshape(-1, v.shape[-1]).t()) * r.reshape(-1)).view(len(q), *v.shape[:-1])
    sums.keys[i] = (vd, r, c, row0)
    return KeyedSource.apply(v, Q, sums, i), c.unbind(0)


class KeyedRead(torch.autograd.Function):
    """x = sum_k alpha[..., k] v_k with alpha = softmax of the logit columns z (no gradient of
    their own), in one native pass; returns (x, alpha). Backward leaves, per source, (its weight
    column, g, <g, x>, row) for its KeyedSource. With ``recompute`` x is not kept but recomputed
    in backward from alpha and the sources (bitwise the same: one mixing loop, native_kernels.c)."""

    @staticmethod
    def forward(ctx, sums: KeyedSums, ids: tuple[int, ...], row: int, recompute: bool, z: list,
                *values: Tensor) -> tuple[Tensor, Tensor]:
        x, alpha = native.softmax_mix(sums.lib, z, values)
        ctx.save_for_backward(alpha, *(values if recompute else (x,)))
        ctx.sums, ctx.ids, ctx.row, ctx.recompute = sums, ids, row, recompute
        ctx.mark_non_differentiable(alpha)
        return x, alpha

    @staticmethod
    def backward(ctx, g: Tensor, _: Tensor | None):
        alpha, *saved = ctx.saved_tensors
        x = _mix(ctx.sums.lib, alpha, saved) if ctx.recompute else saved[0]
        gx = native.dots(ctx.sums.lib, [g], [x])[..., 0, 0]
        for k, i in enumerate(ctx.ids):  # (weights, which column) rather than a view per source
            ctx.sums.readers.setdefault(i, []).append(((alpha, k), g, gx, ctx.row))
        return None, None, None, None, None, *([None] * len(ctx.ids))


def _mix(lib, alpha: Tensor, values) -> Tensor:
    return native.mix_rows(lib, alpha[..., None, :], values)[0]


def keyed_read(z: list[Tensor], sums: KeyedSums, ids: tuple[int, ...], row: int, values: tuple[Tensor, ...],
               recompute: bool = False) -> tuple[Tensor, Tensor]:
    """The mixture read by query ``row`` over ``values`` (ids ``ids``) from their logit columns z,
    and its weights."""
    return KeyedRead.apply(sums, ids, row, recompute, list(z), *values)
