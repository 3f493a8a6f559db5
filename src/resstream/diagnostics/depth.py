"""How a model uses its depth: per-sublayer magnitudes, gradients and depth-mixing weights.

Works for every residual kind without touching model code. Forward hooks on
``model.sublayers`` see each sublayer's input x_l and raw output y_l; one
``torch.autograd.grad`` call per batch gives dLoss/dy_l and dLoss/d(parameters of sublayer l)
without writing any ``.grad``; the depth-mixing weights come from
``model(idx, targets, return_mixing=True)``, the same code path as training.

Definitions (every number is an average over the measured batches):

- ``output_rms[l]``: RMS of y_l over the model dimension, averaged over tokens. Under PreNorm
  the AttnRes paper (section 5.2, figure 5) finds this grows with depth ("PreNorm dilution");
  under Block AttnRes it stays bounded and periodic per block.
- ``input_rms[l]``: the same for x_l, the input the residual stream hands to sublayer l
  (PreNorm: the running sum; AttnRes: the softmax mixture). ``final_input_rms``: the input of
  the final norm.
- ``rel_contribution[l]``: per token ||y_l|| / ||x_l||, averaged over tokens: how much a
  sublayer changes what it reads (Csordas et al. 2025 measure this for PreNorm models).
- ``cos_in_out[l]``: per-token cosine similarity of y_l with x_l, averaged (negative: the
  sublayer erases what it read; near zero: writes something new).
- ``grad_norm[l]``: L2 norm of dLoss/d(parameters of sublayer l), its norm included, per batch.
- ``grad_norm_output[l]``: L2 norm of dLoss/dy_l over the whole [B, T, D] tensor, per batch.
- ``mixing[l][i]``: weight of source i in the input of sublayer l (row L: the final mixture),
  averaged over tokens; rows are padded with None to the widest row so the result is valid
  JSON (``mixing_array`` turns it into a NaN-padded array). ``source_names[l]`` names the
  sources of row l. Both are None for kinds that do not mix over depth. ``mixing_sums_to_one``:
  False for kinds whose weights are free coefficients (DenseFormer), not a softmax.
- ``loss``: mean cross-entropy (nats per token) over the batches.
"""
from __future__ import annotations

import math
from typing import Iterable, Sequence

import numpy as np
import torch
from torch import Tensor, nn

Batch = tuple[Tensor, Tensor]

_PER_SUBLAYER = ("output_rms", "input_rms", "rel_contribution", "cos_in_out", "grad_norm", "grad_norm_output")


def _token_rms(x: Tensor) -> Tensor:
    """RMS over the model dimension, per token, in float32 or wider: [B, T]."""
    x = x.detach()
    return x.to(torch.promote_types(x.dtype, torch.float32)).pow(2).mean(-1).sqrt()


class SublayerTaps:
    """Forward hooks that record each sublayer's (input x_l, raw output y_l) and the final
    norm's input during one forward, in call order; removed on exit. Works for every kind."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.pairs: list[tuple[Tensor, Tensor]] = []
        self.final_in: list[Tensor] = []
        self._handles: list = []

    def __enter__(self) -> "SublayerTaps":
        for s in self.model.sublayers:
            self._handles.append(s.register_forward_hook(lambda m, args, out: self.pairs.append((args[0], out))))
        self._handles.append(self.model.final_norm.register_forward_hook(lambda m, args, out: self.final_in.append(args[0])))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def clear(self) -> None:
        self.pairs.clear()
        self.final_in.clear()


def _add_grads(sums: dict, loss: Tensor, params: list[list[Tensor]], ys: list[Tensor]) -> None:
    """||dLoss/d params of sublayer l|| and ||dLoss/dy_l|| of one batch, added to ``sums``."""
    flat = [p for ps in params for p in ps]
    grads = torch.autograd.grad(loss, flat + ys, allow_unused=True)
    pgrads, ygrads = grads[: len(flat)], grads[len(flat):]
    k = 0
    for l, ps in enumerate(params):
        gs = [g for g in pgrads[k : k + len(ps)] if g is not None]
        k += len(ps)
        sq = sum(g.double().pow(2).sum() for g in gs) if gs else torch.zeros((), dtype=torch.float64)
        sums["grad_norm"][l] += math.sqrt(float(sq))
        sums["grad_norm_output"][l] += 0.0 if ygrads[l] is None else ygrads[l].double().norm().item()


@torch.no_grad()
def _add_magnitudes(sums: dict, pairs: list[tuple[Tensor, Tensor]]) -> None:
    """RMS of x_l and y_l, ||y_l|| / ||x_l|| and cos(y_l, x_l) of one batch, added to ``sums``."""
    for l, (x, y) in enumerate(pairs):
        rx, ry = _token_rms(x), _token_rms(y)
        sums["output_rms"][l] += ry.mean().item()
        sums["input_rms"][l] += rx.mean().item()
        sums["rel_contribution"][l] += (ry / rx.clamp_min(1e-30)).mean().item()
        sums["cos_in_out"][l] += torch.cosine_similarity(y.detach().float(), x.detach().float(), dim=-1, eps=1e-30).mean().item()


def _mixing_means(mixing: list) -> list[np.ndarray] | None:
    """Per row the mean weight of each source over tokens ([B, T, n] -> [n]); None when no row mixes."""
    if not any(w is not None for w in mixing):
        return None
    return [np.zeros(0) if w is None else w.detach().double().mean(dim=(0, 1)).cpu().numpy() for w in mixing]


def measure_depth(model: nn.Module, batches: Sequence[Batch]) -> dict:
    """Measure per-sublayer magnitudes, gradients and mixing weights of ``model`` on ``batches``.

    ``batches``: (idx, targets) pairs of [B, T] token ids, moved to the model's device.
    Returns a dict of plain lists and floats (see the module docstring). The model is put in
    eval mode while measuring and then back in its previous mode; no hook stays registered
    and no parameter's ``.grad`` is touched.
    """
    batches = list(batches)
    if not batches:
        raise ValueError("measure_depth needs at least one (idx, targets) batch")
    L = len(model.sublayers)
    device = next(model.parameters()).device
    params = [[p for p in s.parameters() if p.requires_grad] for s in model.sublayers]
    sums = {k: np.zeros(L) for k in _PER_SUBLAYER}
    totals = {"final_input_rms": 0.0, "loss": 0.0}
    mixing_sum: list[np.ndarray] | None = None
    was_training = model.training
    try:
        model.eval()
        with SublayerTaps(model) as taps, torch.enable_grad():
            for idx, targets in batches:
                taps.clear()
                _, loss, mixing = model(idx.to(device), targets.to(device), return_mixing=True)
                if len(taps.pairs) != L:
                    raise RuntimeError(f"expected {L} sublayer calls in one forward, saw {len(taps.pairs)}")
                _add_grads(sums, loss, params, [y for _, y in taps.pairs])
                _add_magnitudes(sums, taps.pairs)
                totals["final_input_rms"] += _token_rms(taps.final_in[-1]).mean().item()
                totals["loss"] += loss.item()
                means = _mixing_means(mixing) if model.residual.mixes_depth else None
                if means is not None:
                    mixing_sum = means if mixing_sum is None else [a + b for a, b in zip(mixing_sum, means)]
            taps.clear()
    finally:
        model.train(was_training)
    return _result(model.residual, batches, sums, totals, mixing_sum)


def _result(stream, batches: list[Batch], sums: dict, totals: dict, mixing_sum: list[np.ndarray] | None) -> dict:
    n, L = len(batches), len(sums["output_rms"])
    out: dict = {k: [float(v / n) for v in sums[k]] for k in _PER_SUBLAYER}
    out.update({k: v / n for k, v in totals.items()})
    out["n_batches"] = n
    out["n_tokens"] = int(sum(idx.numel() for idx, _ in batches))
    out["kind"] = getattr(stream, "kind", type(stream).__name__)
    out["mixing"] = out["source_names"] = out["mixing_sums_to_one"] = None
    if mixing_sum is not None:
        width = max(len(m) for m in mixing_sum)
        out["mixing"] = [[float(v / n) for v in m] + [None] * (width - len(m)) for m in mixing_sum]
        out["source_names"] = [list(stream.source_names(l)) for l in range(L + 1)]
        out["mixing_sums_to_one"] = bool(stream.weights_sum_to_one)
        for l, (m, names) in enumerate(zip(mixing_sum, out["source_names"])):
            if len(m) and len(m) != len(names):
                raise RuntimeError(f"mixing row {l} has {len(m)} weights but {len(names)} source names")
    return out


def mixing_array(depth: dict) -> np.ndarray | None:
    """The mixing weights of a ``measure_depth`` result as a NaN-padded [L+1, max_sources] array."""
    if depth.get("mixing") is None:
        return None
    return np.array([[np.nan if v is None else v for v in row] for row in depth["mixing"]], dtype=float)


def mean_depth(depths: Iterable[dict]) -> dict:
    """Average several ``measure_depth`` results (e.g. one per seed) entry by entry.

    Per-sublayer lists and scalars are averaged; mixing rows are averaged where every result
    has a value. All results must come from models of the same shape and kind.
    """
    depths = list(depths)
    if not depths:
        raise ValueError("mean_depth needs at least one measure_depth result")
    first = depths[0]
    out = dict(first)
    for k in _PER_SUBLAYER:
        out[k] = [float(v) for v in np.mean([d[k] for d in depths], axis=0)]
    for k in ("final_input_rms", "loss"):
        out[k] = float(np.mean([d[k] for d in depths]))
    out["n_batches"] = int(sum(d["n_batches"] for d in depths))
    out["n_tokens"] = int(sum(d["n_tokens"] for d in depths))
    if first.get("mixing") is not None:
        arr = np.mean([mixing_array(d) for d in depths], axis=0)
        out["mixing"] = [[None if np.isnan(v) else float(v) for v in row] for row in arr]
    return out
