"""The arithmetic of the AttnRes mixing kernels, fused where a compiler is available.

Each function here computes one piece of the mixing on plain tensors (no autograd: the
custom autograd Functions of kernels.py and phases.py call them in their forward and
backward). Three paths compute the same formula:

- native (residual/native.py, the default on a CPU where a C compiler works; float32): one
  loop over tokens per call, each source and output read or written once;
- compiled (residual/compiled.py, the default on CUDA where Triton works): one fused loop per
  reduction group. Mixtures go in chunks of CHUNK sources, so a chunk of k sources costs
  k + 2 passes instead of eager's 3k - 1, and the kernels have a fixed arity (short chunks
  repeat their last source with weight 0): a handful of graphs serves every sublayer, every
  depth and every kind of the family;
- eager (the fallback): in-place multiply-adds, one operator per source.

On a CPU these are memory-bound, so the number of passes over [B, T, D] tensors is the cost
(README, Performance). Statistics are in float32 at least; a mixture's output has the dtype
asked for (the first source's by default), so sources of mixed dtypes work.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from resstream.residual import native
from resstream.residual.base import stats_dtype
from resstream.residual.compiled import kernel, native_kernels

CHUNK = 8  # sources per compiled mixing call


# ----------------------------------------------------------------------------- compiled bodies


@kernel
def mix_chunk(a: Tensor, acc: Tensor | None, out_dtype: torch.dtype, *vs: Tensor) -> Tensor:
    """acc + sum_k a[..., k] vs[k] in a's dtype, written in out_dtype: one pass."""
    h = None if acc is None else acc.to(a.dtype)
    for k, v in enumerate(vs):
        t = v.to(a.dtype) * a[..., k : k + 1]
        h = t if h is None else h + t
    return h.to(out_dtype)


@kernel
def dots_chunk(g: Tensor, *vs: Tensor) -> Tensor:
    """<g, vs[k]> per token for every k: [B, T, len(vs)] in the statistics dtype, one pass."""
    dt = stats_dtype(g)
    g_ = g.to(dt)
    return torch.stack([(g_ * v.to(dt)).sum(-1) for v in vs], dim=-1)


@kernel
def merge_forward_fused(o: Tensor, p: Tensor, q: Tensor, lse: Tensor, eps: float):
    dt = lse.dtype
    p_ = p.to(dt)
    r = torch.rsqrt(p_.square().mean(-1) + eps)
    s = (p_ * q.to(dt)).sum(-1) * r
    gate = torch.sigmoid(s - lse)
    o_ = o.to(dt)
    return (o_ + gate.unsqueeze(-1) * (p_ - o_)).to(o.dtype), r, s, gate


@kernel
def merge_backward_fused(gx: Tensor, p: Tensor, x: Tensor, q: Tensor, r: Tensor, s: Tensor, gate: Tensor):
    dt = gate.dtype
    gx_, p_ = gx.to(dt), p.to(dt)
    dz = gate * (gx_ * (p_ - x.to(dt))).sum(-1)
    dr = dz * r
    g = gate.unsqueeze(-1)
    gp = gx_ * g + dr.unsqueeze(-1) * q.to(dt) - p_ * (dz * r * r * s / p.shape[-1]).unsqueeze(-1)
    return (gx_ - gx_ * g).to(gx.dtype), gp.to(p.dtype), dz


# ----------------------------------------------------------------------------- the pieces


def _vecdot(a: Tensor, b: Tensor, dt: torch.dtype) -> Tensor:
    """<a, b> per token in dt (the statistics dtype); casts only sources of another dtype."""
    return torch.linalg.vecdot(a if a.dtype == dt else a.to(dt), b if b.dtype == dt else b.to(dt))


def _chunks(n: int):
    for c in range(0, n, CHUNK):
        yield c, min(CHUNK, n - c)


def _padded(vs: Sequence[Tensor], k: int) -> list[Tensor]:
    return list(vs) + [vs[k - 1]] * (CHUNK - k)


def mix_dtype(values: Sequence[Tensor]) -> torch.dtype:
    """The dtype of a mixture of ``values``: their promotion, as PreNorm's running sum h + y
    would have it. Under autocast the embedding is float32 and sublayer outputs bfloat16, so
    mixtures (the next sublayer's input) stay float32, like PreNorm's residual stream."""
    dt = values[0].dtype
    for v in values[1:]:
        dt = torch.promote_types(dt, v.dtype)
    return dt


def mix_values(a: Tensor, values: Sequence[Tensor]) -> Tensor:
    """Eager: sum_i a[..., i] v_i with one in-place multiply-add per source (a in the values' dtype)."""
    h = values[0] * a[..., 0:1]
    for i in range(1, len(values)):
        h.addcmul_(values[i], a[..., i : i + 1])
    return h


def mix(a: Tensor, values: Sequence[Tensor], acc: Tensor | None = None) -> Tensor:
    """acc + sum_i a[..., i] values[i] (a [B, T, n], any float dtype; values n x [B, T, D]), in
    acc's dtype, else the values' promotion (``mix_dtype``). The one forward formula of every
    mixture (Full's reads, Block's phase 1, the gradient sums), so that recomputing one is
    bitwise exact."""
    out = mix_dtype(values) if acc is None else acc.dtype
    lib = native_kernels(*values, *(() if acc is None else (acc,)))
    if lib is not None:
        a = a.to(torch.float32)[..., None, :]  # one mixture
        return native.mix_rows(lib, a, values, None if acc is None else [acc])[0]
    if mix_chunk.usable(a, *values):
        a = a.to(torch.promote_types(stats_dtype(values[0]), a.dtype))
        for c, k in _chunks(len(values)):
            ac = a[..., c : c + k].contiguous() if k == CHUNK else F.pad(a[..., c : c + k], (0, CHUNK - k))
            acc = mix_chunk(ac, acc, out, *_padded(values[c : c + k], k))
        return acc
    if any(v.dtype != out for v in values):  # mixed dtypes: in-place multiply-adds need one
        values = [v.to(out) for v in values]
    h = mix_values(a.to(out), values)
    return h if acc is None else h.add_(acc)


def mix_columns(weights: Sequence[Tensor], values: Sequence[Tensor], acc: Tensor | None = None) -> Tensor:
    """mix() with the weights given as per-token columns ([B, T, 1] views), as the gradient sums
    collect them: the native kernel reads them where they are, the other paths concatenate them."""
    lib = native_kernels(*values, *weights, *(() if acc is None else (acc,)))
    if lib is not None:
        return native.mix(lib, [list(weights)], values, None if acc is None else [acc])[0]
    return mix(torch.cat(list(weights), dim=-1), values, acc)


def dots(g: Tensor, values: Sequence[Tensor]) -> Tensor:
    """<g, v_i> per token for every source: [B, T, n] in the statistics dtype."""
    lib = native_kernels(g, *values)
    if lib is not None:
        return native.dots(lib, [g], values).squeeze(-2)
    if dots_chunk.usable(g, *values):
        parts = [dots_chunk(g, *_padded(values[c : c + k], k))[..., :k] for c, k in _chunks(len(values))]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)
    dt = torch.promote_types(stats_dtype(g), values[0].dtype)
    return torch.stack([_vecdot(g, v, dt) for v in values], dim=-1)


def merge_forward(o: Tensor, p: Tensor, q: Tensor, lse: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Block's phase-2 merge: x = lerp(o, p, gate), r = 1/RMS(p), s = q · p r, gate = sigmoid(s - lse)
    (statistics in lse's dtype, x in the mixture dtype of o and p: under autocast o, which holds
    the embedding, is float32 and p, a sum of sublayer outputs, may be bfloat16)."""
    o = o.to(mix_dtype((o, p)))
    lse = lse.contiguous()
    lib = native_kernels(o, p, q, lse)
    if lib is not None:
        return native.merge_forward(lib, o, p, q, lse, eps)
    if merge_forward_fused.usable(o, p, q, lse):
        return merge_forward_fused(o, p, q, lse, eps)
    dt = lse.dtype
    p_ = p.to(dt)
    r = torch.rsqrt(torch.linalg.vector_norm(p_, dim=-1).square() / p.shape[-1] + eps)  # [B, T]
    s = (p_ @ q.to(dt)) * r
    gate = torch.sigmoid(s - lse)
    return torch.lerp(o, p.to(o.dtype), gate.unsqueeze(-1).to(o.dtype)), r, s, gate


def merge_backward(gx: Tensor, p: Tensor, x: Tensor, q: Tensor, r: Tensor, s: Tensor, gate: Tensor):
    """Gradients of merge_forward's x (see phases.Phase2): (go, gp, gq, dz) with dz = gate <g, p - x>."""
    dt = gate.dtype
    lib = native_kernels(gx, p, x, q, r, s, gate)
    if lib is not None:
        go, gp, dz, gq = native.merge_backward(lib, gx, p, x, q, r, s, gate)
        return go, gp, gq.to(q.dtype), dz
    if merge_backward_fused.usable(gx, p, x, q, r, s, gate):
        go, gp, dz = merge_backward_fused(gx, p, x, q, r, s, gate)
    else:
        gp = (gx * gate.unsqueeze(-1).to(gx.dtype)).to(p.dtype)
        go = gx - gp
        dz = gate * (_vecdot(gx, p, dt) - _vecdot(gx, x, dt))  # [B, T]
        gp.addcmul_((dz * r).unsqueeze(-1).to(gp.dtype), q.to(gp.dtype))
        gp.addcmul_(p, (-dz * r.square() * s / p.shape[-1]).unsqueeze(-1).to(gp.dtype))
    gq = (p.to(dt).reshape(-1, p.shape[-1]).t() @ (dz * r).reshape(-1)).to(q.dtype)
    return go, gp, gq, dz


def mix_many(A: Tensor, values: Sequence[Tensor]) -> list[Tensor]:
    """[mix(A[..., s, :], values) for every s] (A [B, T, S, n]): Block's phase 1, every query of a
    block at once; the native kernel reads each source once for all of them."""
    lib = native_kernels(*values)
    if lib is not None:
        return native.mix_rows(lib, A.to(torch.float32), values)
    return [mix(A[..., s, :], values) for s in range(A.shape[-2])]


def dots_many(grads: Sequence[Tensor], values: Sequence[Tensor]) -> Tensor:
    """<grads[s], values[j]> per token: [B, T, S, n] in the statistics dtype."""
    lib = native_kernels(*grads, *values)
    if lib is not None:
        return native.dots(lib, grads, values)
    return torch.stack([dots(g, values) for g in grads], dim=-2)
