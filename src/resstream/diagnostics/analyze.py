"""How a model uses its depth, after Csordás, Manning & Potts, "Do Language Models Use Their
Depth Efficiently?" (NeurIPS 2025, arXiv:2505.13898), on any residual kind.

The paper's probes are written for the PreNorm sum h_{l+1} = h_l + y_l. Here they are
defined through the residual-stream contract, so they mean the same for PreNorm and apply
unchanged to every other kind (x_l = stream.read(state, l), y_l = sublayer_l(x_l)):

- Relative contribution of sublayer l: per token ||y_l|| / ||x_l||, averaged over tokens;
  ``cos``: per-token cos(y_l, x_l) (< 0 erases what it read, ~0 writes something new, > 0
  reinforces). Under PreNorm these are the paper's attention ||a||/||h|| and MLP
  ||m||/||h + a||. Per layer (attention + MLP): ||y_2k + y_2k+1|| / ||x_2k|| and its cosine,
  the paper's ||h_{k+1} - h_k|| / ||h_k|| under PreNorm.
- Skipping sublayer s: y_s is replaced by zeros (under PreNorm exactly the paper's skip:
  the layer's output equals its input), everything after s is recomputed. Effect on a later
  sublayer l: per token ||y_l^skip - y_l|| / ||y_l||, averaged (``effect_mean``) and the
  maximum over tokens (``effect_max``, the paper's statistic). Effect on the output: per
  position KL(p || p_skip) in nats, top-1 agreement, and the skipped model's bits per byte.
  (The paper also skips only before a random position to isolate effects on future tokens;
  this skips everywhere.)
- Logit lens: the final norm and head read the stream after k layers (2k sublayers): what
  the next sublayer reads there, x_2k = stream.read(state, 2k) (PreNorm: the paper's h_k;
  AttnRes: that sublayer's mixture; hyper-connections: its weighted sum of the streams),
  and at k = n_layers stream.finish, the model itself; k = 0 is the embedding alone. Per
  point: bits per byte on the targets, KL(p_final || p_k) and top-1 agreement with the
  final prediction.

The prefix before a skipped sublayer is never recomputed: the contract's explicit state
after every sublayer of the plain pass is kept and the skipped pass resumes from it.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

Batch = tuple[Tensor, Tensor]
_TINY = 1e-30


def _norms(t: Tensor) -> Tensor:
    """Per-token L2 norm over the model dimension in float64: [B, T]."""
    return t.double().norm(dim=-1)


def _cos(a: Tensor, b: Tensor) -> Tensor:
    return F.cosine_similarity(a.double(), b.double(), dim=-1, eps=_TINY)


def _log_probs(model, h: Tensor) -> Tensor:
    logits = model.head(model.final_norm(h))
    return F.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)


class _Sums:
    """Running sums over batches; every metric is a token average or a maximum."""

    def __init__(self, L: int) -> None:
        z = np.zeros
        self.tokens, self.bytes, self.n_batches = 0, 0.0, 0
        self.rel, self.cos = z(L), z(L)
        self.layer_rel, self.layer_cos = z(L // 2), z(L // 2)
        self.eff_sum, self.eff_max = z((L, L)), z((L, L))
        self.skip_kl, self.skip_top1, self.skip_nats = z(L), z(L), z(L)
        self.lens_nats, self.lens_kl, self.lens_top1 = z(L // 2 + 1), z(L // 2 + 1), z(L // 2 + 1)


def _output_stats(logp: Tensor, ref: tuple[Tensor, Tensor, Tensor], targets: Tensor) -> tuple[float, float, float]:
    """Sum over tokens of: nats on targets, KL(ref || this), top-1 agreement with ref.
    ``ref``: (log-probabilities, probabilities, top-1) of the model itself."""
    ref_logp, ref_p, ref_top = ref
    nats = F.nll_loss(logp.flatten(0, 1), targets.flatten(), reduction="sum").item()
    kl = (ref_p * (ref_logp - logp)).sum(-1).double().sum().item()
    top1 = (logp.argmax(-1) == ref_top).sum().item()
    return nats, kl, top1


@torch.no_grad()
def _batch(model, idx: Tensor, targets: Tensor, acc: _Sums) -> None:
    stream, subs = model.residual, list(model.sublayers)
    L = len(subs)
    states = [stream.init(model.embed(idx))]  # states[l]: before sublayer l; states[L]: after all
    xs, ys = [], []
    for l, sub in enumerate(subs):
        xs.append(stream.read(states[-1], l))
        ys.append(sub(xs[-1]))
        states.append(stream.write(states[-1], l, ys[-1]))
    ref_logp = _log_probs(model, stream.finish(states[L]))
    ref = (ref_logp, ref_logp.exp(), ref_logp.argmax(-1))

    y_norms = [_norms(y) for y in ys]
    for l in range(L):
        acc.rel[l] += (y_norms[l] / _norms(xs[l]).clamp_min(_TINY)).sum().item()
        acc.cos[l] += _cos(ys[l], xs[l]).sum().item()
    for k in range(L // 2):
        both = ys[2 * k] + ys[2 * k + 1]
        acc.layer_rel[k] += (_norms(both) / _norms(xs[2 * k]).clamp_min(_TINY)).sum().item()
        acc.layer_cos[k] += _cos(both, xs[2 * k]).sum().item()
    for k in range(L // 2 + 1):  # logit lens after k layers
        h = xs[2 * k] if 2 * k < L else stream.finish(states[L])
        nats, kl, top1 = _output_stats(_log_probs(model, h), ref, targets)
        acc.lens_nats[k] += nats
        acc.lens_kl[k] += kl
        acc.lens_top1[k] += top1
    for s in range(L):  # skip s, resume from the state before it
        state = stream.write(states[s], s, torch.zeros_like(ys[s]))
        for l in range(s + 1, L):
            y = subs[l](stream.read(state, l))
            change = _norms(y - ys[l]) / y_norms[l].clamp_min(_TINY)
            acc.eff_sum[s, l] += change.sum().item()
            acc.eff_max[s, l] = max(acc.eff_max[s, l], change.max().item())
            state = stream.write(state, l, y)
        nats, kl, top1 = _output_stats(_log_probs(model, stream.finish(state)), ref, targets)
        acc.skip_nats[s] += nats
        acc.skip_kl[s] += kl
        acc.skip_top1[s] += top1


def _rows(a: np.ndarray, valid) -> list[list[float | None]]:
    return [[float(v) if valid(i, j) else None for j, v in enumerate(row)] for i, row in enumerate(a)]


def analyze_depth(model, batches: Sequence[Batch], token_bytes: np.ndarray | Tensor) -> dict:
    """Run every probe of the module docstring on ``batches`` ((idx, targets) pairs [B, T]);
    ``token_bytes[id]``: UTF-8 bytes of each token id, for bits per byte. Returns plain lists
    (JSON-ready; None where a value is undefined, e.g. the effect of a skip on earlier
    sublayers). The model is measured in eval mode and put back in its previous mode."""
    batches = list(batches)
    if not batches:
        raise ValueError("analyze_depth needs at least one (idx, targets) batch")
    L = len(model.sublayers)
    device = next(model.parameters()).device
    tb = torch.as_tensor(np.asarray(token_bytes), dtype=torch.float64)
    acc = _Sums(L)
    was_training = model.training
    model.eval()
    try:
        for idx, targets in batches:
            _batch(model, idx.to(device), targets.to(device), acc)
            acc.tokens += targets.numel()
            acc.bytes += tb[targets.cpu()].sum().item()
            acc.n_batches += 1
    finally:
        model.train(was_training)
    n, bits = acc.tokens, math.log(2) * max(acc.bytes, 1.0)
    lst = lambda a, d=n: [float(v) / d for v in a]  # noqa: E731
    later = lambda s, l: l > s  # noqa: E731
    return {
        "kind": model.cfg.residual.kind, "n_layers": L // 2, "n_sublayers": L,
        "n_batches": acc.n_batches, "n_tokens": n, "n_bytes": acc.bytes,
        "bpb": float(acc.lens_nats[L // 2] / bits),
        "sublayer": {"rel_contribution": lst(acc.rel), "cos": lst(acc.cos)},
        "layer": {"rel_contribution": lst(acc.layer_rel), "cos": lst(acc.layer_cos)},
        "skip": {
            "effect_mean": _rows(acc.eff_sum / n, later), "effect_max": _rows(acc.eff_max, later),
            "kl": lst(acc.skip_kl), "top1": lst(acc.skip_top1), "bpb": [float(v / bits) for v in acc.skip_nats],
        },
        "lens": {"kl": lst(acc.lens_kl), "top1": lst(acc.lens_top1), "bpb": [float(v / bits) for v in acc.lens_nats]},
    }
