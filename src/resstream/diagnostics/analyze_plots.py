"""Figures of ``analyze_depth``: contributions by depth, the skip-effect heatmap, what a skip
does to the output, and the logit lens. Each takes the analysis dict and an output path."""
from __future__ import annotations

from pathlib import Path

import matplotlib
import numpy as np

from resstream.diagnostics.plots import _maybe_log, _save, plt, sublayer_label


def _layer_axis(ax, n: int, label: str = "layer") -> None:
    ax.set_xticks(range(0, n, max(1, int(np.ceil(n / 16)))))
    ax.set_xlim(-0.5, n - 0.5)
    ax.set_xlabel(label)
    ax.grid(alpha=0.3)


def plot_contributions(a: dict, out_path: Path | str, title: str) -> Path:
    """Relative contribution ||y||/||x|| (top) and cos(y, x) (bottom) per layer, for the
    attention sublayer, the MLP sublayer and the whole layer."""
    n = a["n_layers"]
    series = {"attention": slice(0, None, 2), "MLP": slice(1, None, 2)}
    fig, axes = plt.subplots(2, 1, figsize=(8.5, 7.5), sharex=True)
    for key, ax, ylabel in (("rel_contribution", axes[0], "||y|| / ||x|| (mean over tokens)"),
                            ("cos", axes[1], "cos(y, x) (mean over tokens)")):
        lines = [np.asarray(a["sublayer"][key], dtype=float)[sl] for sl in series.values()]
        lines.append(np.asarray(a["layer"][key], dtype=float))
        for vals, name, m in zip(lines, [*series, "layer (attention + MLP)"], "osD"):
            ax.plot(range(len(vals)), vals, marker=m, ms=4, lw=1.6, label=name)
        if key == "rel_contribution":
            _maybe_log(ax, lines)
        else:
            ax.axhline(0, color="gray", lw=0.8)
        ax.set_ylabel(ylabel)
        _layer_axis(ax, n)
    axes[0].axvline((n - 1) / 2, color="gray", ls=":", lw=1)
    axes[0].legend(fontsize=9)
    fig.suptitle(title, fontsize=12)
    fig.tight_layout()
    return _save(fig, out_path)


def plot_skip_heatmap(a: dict, out_path: Path | str, title: str) -> Path:
    """Mean relative change of each later sublayer's output (columns) when sublayer s (rows)
    is skipped; log colour scale, since effects span orders of magnitude."""
    L = a["n_sublayers"]
    grid = np.array([[np.nan if v is None else v for v in row] for row in a["skip"]["effect_mean"]], dtype=float)
    finite = grid[np.isfinite(grid) & (grid > 0)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (1e-6, 1.0)
    lo = max(lo, hi * 1e-4)
    fig, ax = plt.subplots(figsize=(min(14, 3 + 0.22 * L), min(13, 2.5 + 0.2 * L)))
    cmap = plt.get_cmap("magma").with_extremes(bad="#eeeeee", under="black")
    im = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, aspect="auto",
                   norm=matplotlib.colors.LogNorm(vmin=lo, vmax=max(hi, lo * 10)))
    ticks = list(range(0, L, max(1, int(np.ceil(L / 20)))))
    ax.set_xticks(ticks)
    ax.set_xticklabels([sublayer_label(l, L) for l in ticks], rotation=70, fontsize=8)
    ax.set_yticks(ticks)
    ax.set_yticklabels([sublayer_label(l, L) for l in ticks], fontsize=8)
    ax.set_xlabel("affected later sublayer")
    ax.set_ylabel("skipped sublayer (output set to zero)")
    fig.colorbar(im, ax=ax, label="mean over tokens of ||y_skip - y|| / ||y||", fraction=0.05, pad=0.02)
    ax.set_title(title + "\n(grey: not later than the skipped sublayer)", fontsize=11)
    fig.tight_layout()
    return _save(fig, out_path)


def plot_skip_output(a: dict, out_path: Path | str, title: str) -> Path:
    """What skipping each sublayer does to the next-token distribution: KL to the model's own
    (left, log) and top-1 agreement with it (right), attention and MLP separately."""
    n = a["n_layers"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.4))
    kl, top1 = np.asarray(a["skip"]["kl"], dtype=float), np.asarray(a["skip"]["top1"], dtype=float)
    for parity, name, m in ((0, "skip attention", "o"), (1, "skip MLP", "s")):
        axes[0].plot(range(n), kl[parity::2], marker=m, ms=4, lw=1.6, label=name)
        axes[1].plot(range(n), top1[parity::2], marker=m, ms=4, lw=1.6, label=name)
    _maybe_log(axes[0], [kl[kl > 0]] if (kl > 0).any() else [])
    axes[0].set_ylabel("KL(p || p_skip), nats per token")
    axes[1].set_ylabel("top-1 agreement with the full model")
    axes[1].set_ylim(-0.02, 1.02)
    for ax in axes:
        _layer_axis(ax, n, "layer of the skipped sublayer")
        ax.legend(fontsize=9)
    fig.suptitle(title, fontsize=12)
    fig.tight_layout()
    return _save(fig, out_path)


def plot_logit_lens(a: dict, out_path: Path | str, title: str) -> Path:
    """Bits per byte when the final norm and head read the stream after k layers (left),
    and KL to / top-1 agreement with the model's own prediction (right)."""
    n = a["n_layers"]
    x = np.arange(n + 1)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.4))
    bpb = np.asarray(a["lens"]["bpb"], dtype=float)
    axes[0].plot(x, bpb, marker="o", ms=3, lw=1.6)
    axes[0].axhline(a["bpb"], color="gray", ls=":", lw=1, label=f"model: {a['bpb']:.3f}")
    axes[0].set_ylabel("bits per byte (logit lens)")
    axes[0].legend(fontsize=9)
    _maybe_log(axes[0], [bpb])
    kl = np.asarray(a["lens"]["kl"], dtype=float)
    axes[1].plot(x, kl, marker="o", ms=3, lw=1.6, color="C1", label="KL(p_final || p_l), nats")
    axes[1].set_ylabel("KL to the final distribution (nats)")
    twin = axes[1].twinx()
    twin.plot(x, a["lens"]["top1"], marker="s", ms=3, lw=1.2, color="C2", label="top-1 agreement")
    twin.set_ylim(-0.02, 1.02)
    twin.set_ylabel("top-1 agreement with the final prediction")
    axes[1].legend(loc="upper center", fontsize=9)
    twin.legend(loc="center right", fontsize=9)
    for ax in axes:
        _layer_axis(ax, n + 1, "layers applied (0: the embedding alone)")
    fig.suptitle(title, fontsize=12)
    fig.tight_layout()
    return _save(fig, out_path)
