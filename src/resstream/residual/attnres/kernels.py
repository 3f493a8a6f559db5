"""Autograd kernels of the AttnRes fast paths: logit caches, weighted sums, gradient sums.

Checked against the float64 reference (tests/residual/test_attnres.py: each kernel by
gradcheck, whole models forward and every gradient). The sources are never stacked into a
history tensor: each is touched by a few custom autograd Functions that save only the
sources (which the stream keeps anyway) and per-token statistics. On a CPU these mixing ops
are memory-bound, so what counts is the number of passes over [B, T, D] tensors, not FLOPs.

- Logit cache (``NormedLogits``): when a source is written, its logits against every later
  query come from one [B,T,D] x [D,k] matmul, c = (v @ Q_later^T) / RMS(v). A read only
  gathers its column of each cache and takes a softmax over sources (``softmax_mixture``).
- Weighted sum (``WeightedSum``): the sources mixed by ``fused.mix`` (one fused pass per chunk
  of sources where compiled, one multiply-add per source in eager), their weights' gradients
  by ``fused.dots``, one scale per source backward.
- Gradient sums (``GradSums``, ``Source``, ``ReadAll``): a source read by many mixtures would
  get a scaled copy of each reader's gradient, which autograd then adds up (two passes per
  reader). Instead the readers leave (weight, gradient) pairs and the source sums them once,
  one multiply-add per reader. Off under torch.compile, which fuses the plain path itself.
Block AttnRes's two-phase kernels are in phases.py.
"""
from __future__ import annotations

import torch
from torch import Tensor

from resstream.residual.attnres.fused import dots, mix, mix_columns, mix_dtype
from resstream.residual.base import stats_dtype


def source_rstd(v: Tensor, eps: float) -> Tensor:
    """1 / RMS(v) over the model dimension, in float32 or wider: [B, T]."""
    return torch.rsqrt(v.to(stats_dtype(v)).pow(2).mean(-1) + eps)


def source_logit(v: Tensor, rstd: Tensor, q: Tensor) -> Tensor:
    """q · RMSNorm(v) for one source, per token: [B, T]."""
    dt = stats_dtype(v)
    return (v.to(dt) @ q.to(dt)) * rstd


class NormedLogits(torch.autograd.Function):
    """c[..., k] = Q[k] · v / RMS(v): one source v [B, T, D] against rows Q [k, D] -> [B, T, k].

    Computed in the statistics dtype (float32 or wider). Saves v, Q and the [B, T, k] / [B, T, 1]
    results; the backward is two matmuls and one fused pass over v:
    dv = (g r) @ Q - v (r^2 / D) sum_k g_k c_k,  dQ = (g r)^T @ v,  r = 1 / RMS(v).
    """

    @staticmethod
    def forward(ctx, v: Tensor, Q: Tensor, eps: float) -> Tensor:
        dt = stats_dtype(v)
        v_, Q_ = v.to(dt), Q.to(dt)
        # one reduction pass: ||v||^2 / D is the mean square
        r = torch.rsqrt(torch.linalg.vector_norm(v_, dim=-1, keepdim=True).square() / v.shape[-1] + eps)
        c = (v_ @ Q_.t()) * r
        ctx.save_for_backward(v, Q, r, c)
        return c

    @staticmethod
    def backward(ctx, gc: Tensor):
        v, Q, r, c = ctx.saved_tensors
        dt = r.dtype
        v_ = v.to(dt)
        gm = gc * r  # gradient of the un-normalised logits v @ Q^T
        gv = gQ = None
        if ctx.needs_input_grad[1]:
            gQ = (gm.reshape(-1, gm.shape[-1]).t() @ v_.reshape(-1, v.shape[-1])).to(Q.dtype)
        if ctx.needs_input_grad[0]:
            coef = (gc * c).sum(-1, keepdim=True) * r.square() / v.shape[-1]
            gv = (gm @ Q.to(dt)).addcmul_(v_, coef, value=-1).to(v.dtype)
        return gv, gQ, None


def normed_logit_columns(v: Tensor, Q: Tensor, eps: float) -> tuple[Tensor, ...]:
    """Logits of source v against each row of Q, one [B, T] column per row (unbind: cheap backward)."""
    return NormedLogits.apply(v, Q, eps).unbind(-1)


class WeightedSum(torch.autograd.Function):
    """h = sum_i alpha[..., i] v_i over a tuple of sources, never stacking them.

    Saves alpha and the sources (alive anyway), not h. Backward: d alpha_i = <g, v_i> per
    token, d v_i = alpha_i g.
    """

    @staticmethod
    def forward(ctx, alpha: Tensor, *values: Tensor) -> Tensor:
        ctx.save_for_backward(alpha, *values)
        return mix(alpha, values)

    @staticmethod
    def backward(ctx, gh: Tensor):
        alpha, *values = ctx.saved_tensors
        galpha = dots(gh, values).to(alpha.dtype) if ctx.needs_input_grad[0] else None
        a = alpha.to(gh.dtype)
        gvs = [(gh * a[..., i : i + 1]).to(v.dtype) if ctx.needs_input_grad[i + 1] else None
               for i, v in enumerate(values)]
        return galpha, *gvs


def weighted_sum(alpha: Tensor, values: list[Tensor] | tuple[Tensor, ...]) -> Tensor:
    """sum_i alpha[..., i] * values[i]: alpha [B, T, n] (any float dtype), values n x [B, T, D]."""
    return WeightedSum.apply(alpha, *values)


# ----------------------------------------------------------------------------- gradient sums


class GradSums:
    """Readers leave here, per source id, the (weight, gradient) pairs that source gets from
    them (weight [B, T, 1]); ``Source`` then sums each source's gradient once (``fused.mix``
    over its readers), instead of autograd receiving a scaled copy per reader and adding it
    (two passes per reader)."""

    def __init__(self) -> None:
        self.parts: dict[int, list[tuple[Tensor, Tensor]]] = {}
        self.running: dict[int, Tensor] = {}  # sums readers already formed (Block's phase 1, native)

    def add(self, i: int, weight: Tensor, grad: Tensor) -> None:
        self.parts.setdefault(i, []).append((weight, grad))

    def total(self, i: int, direct: Tensor | None) -> Tensor | None:
        """The gradient of source i: its readers' parts, plus ``direct`` (what reached it otherwise)."""
        parts, running = self.parts.pop(i, []), self.running.pop(i, None)
        if running is not None:  # our own buffer: add in place
            direct = running if direct is None else running.add_(direct.to(running.dtype))
        if not parts:
            return direct
        grads = [g for _, g in parts]
        return mix_columns([w for w, _ in parts], grads, None if direct is None else direct.to(mix_dtype(grads)))


def new_grad_sums() -> GradSums | None:
    """A GradSums for one forward, or None when no backward follows or the graph is being
    compiled (the compiler fuses the plain path instead)."""
    return GradSums() if torch.is_grad_enabled() and not torch.compiler.is_compiling() else None


class Source(torch.autograd.Function):
    """Identity on source i; in backward, adds the readers' parts left in ``sums`` to the
    gradient that reached it directly (through its logits). Autograd runs this after every
    reader of the source (they all take its output), so all parts are in by then."""

    @staticmethod
    def forward(ctx, v: Tensor, sums: GradSums, i: int) -> Tensor:
        ctx.sums, ctx.i, ctx.dtype = sums, i, v.dtype
        ctx.set_materialize_grads(False)
        return v.view_as(v)

    @staticmethod
    def backward(ctx, g: Tensor | None):
        total = ctx.sums.total(ctx.i, g)  # in the readers' (mixture) dtype; the source's once here
        return (None if total is None else total.to(ctx.dtype)), None, None


def as_source(v: Tensor, sums: GradSums | None, i: int) -> Tensor:
    """v as source i of a mixture whose readers leave their gradients in ``sums`` (if any)."""
    return v if sums is None else Source.apply(v, sums, i)


class ReadAll(torch.autograd.Function):
    """A read over all sources (as ``WeightedSum``) that leaves the sources' gradients
    alpha_i g in ``sums`` for their ``Source`` to add up; ``ids``: the sources' ids (None:
    their positions)."""

    @staticmethod
    def forward(ctx, alpha: Tensor, sums: GradSums, ids: tuple[int, ...] | None, *values: Tensor) -> Tensor:
        ctx.save_for_backward(alpha, *values)
        ctx.sums, ctx.ids = sums, ids
        return mix(alpha, values)

    @staticmethod
    def backward(ctx, gh: Tensor):
        alpha, *values = ctx.saved_tensors
        galpha = dots(gh, values).to(alpha.dtype)
        for k, i in enumerate(ctx.ids if ctx.ids is not None else range(len(values))):
            ctx.sums.add(i, alpha[..., k : k + 1], gh)
        return galpha, None, None, *([None] * len(values))


def softmax_mixture(z: list[Tensor], values: tuple[Tensor, ...], sums: GradSums | None,
                    ids: tuple[int, ...] | None = None) -> tuple[Tensor, Tensor]:
    """softmax over sources of their logits z (n x [B, T]) applied to ``values``: the mixture
    [B, T, D] and its weights [B, T, n]."""
    alpha = torch.softmax(torch.stack(z, dim=-1), dim=-1)
    if len(values) == 1:  # a softmax over one source is exactly 1, with zero gradient
        return values[0], alpha
    if sums is None:
        return weighted_sum(alpha, values), alpha
    return ReadAll.apply(alpha, sums, ids, *values), alpha
