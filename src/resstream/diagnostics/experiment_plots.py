"""PNG plots of the experiments built on comparisons: a scaling study (loss vs compute on
log-log axes, the layout of Attention Residuals' Fig. 4) and a sweep (final loss vs the swept
value, the layout of its Fig. 6). Plain data in, one figure out, the path returned; kinds keep
the colours of the comparison plots (``kind_colors``)."""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import matplotlib.ticker as mticker
import numpy as np

from resstream.diagnostics.plots import _MARKERS, _save, kind_colors, plt


def plot_scaling(series: Mapping[str, dict], out_path: Path | str, ylabel: str) -> Path:
    """``series[label]``: {"points": [(compute, loss), ...] one per finished run,
    "fit": {"A", "alpha"} | None, "fit_floor": {"E", "A", "alpha"} | None}.

    Per kind: every run as a small dot, the mean at each compute as a larger marker, the
    power-law fit as a solid line (its formula in the legend), the floor fit dashed."""
    fig, ax = plt.subplots(figsize=(7.5, 5.0))
    colors = kind_colors(list(series))
    all_c = [c for s in series.values() for c, _ in s["points"]]
    if not all_c:
        ax.text(0.5, 0.5, "no finished runs", ha="center", va="center", transform=ax.transAxes)
        return _save(fig, out_path)
    grid = np.geomspace(min(all_c) / 1.3, max(all_c) * 1.3, 200)
    for i, (label, s) in enumerate(series.items()):
        col, marker = colors[label], _MARKERS[i % len(_MARKERS)]
        pts = np.asarray(s["points"], dtype=float).reshape(-1, 2)
        if pts.size:
            ax.scatter(pts[:, 0], pts[:, 1], s=12, color=col, alpha=0.45, lw=0, marker=marker)
            cs = np.unique(pts[:, 0])
            ax.scatter(cs, [pts[pts[:, 0] == c, 1].mean() for c in cs], s=46, color=col, edgecolor="black", lw=0.6,
                       zorder=3, marker=marker, alpha=0.85)
        f = s.get("fit")
        if f:
            ax.plot(grid, f["A"] * grid ** -f["alpha"], color=col, lw=1.8,
                    label=f"{label}: {f['A']:.3g} x C^-{f['alpha']:.3f}")
        else:
            ax.plot([], [], color=col, lw=1.8, label=f"{label}: no fit")
        ff = s.get("fit_floor")
        if ff:
            ax.plot(grid, ff["E"] + ff["A"] * grid ** -ff["alpha"], color=col, lw=1.0, ls="--",
                    label=f"  with floor: {ff['E']:.3g} + {ff['A']:.3g} x C^-{ff['alpha']:.3f}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(mticker.FuncFormatter(lambda y, _: f"{y:.3g}"))
    ax.yaxis.set_minor_formatter(mticker.FuncFormatter(lambda y, _: f"{y:.3g}"))
    ax.tick_params(axis="y", which="minor", labelsize=8)
    ax.set_xlabel("training compute C = 6 N D (FLOP)")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3, which="both")
    ax.set_title("Scaling: small dots one run each, large dots mean over seeds, lines fits", fontsize=11)
    ax.legend(fontsize=8)
    return _save(fig, out_path)


def plot_sweep(series: Mapping[str, Sequence[tuple]], out_path: Path | str, xlabel: str, ylabel: str,
               references: Mapping[str, Sequence[float]] | None = None, log_x: bool = False,
               tick_labels: Sequence[str] | None = None) -> Path:
    """``series[label]``: [(x, [loss of each finished seed]), ...] in the order of the swept
    values; drawn as the mean with a min-max bar. ``references[label]``: the losses of a kind
    the swept key does not apply to, drawn as a horizontal line (mean) and band (min-max).
    ``tick_labels``: names of the x positions when the swept values are not numbers."""
    fig, ax = plt.subplots(figsize=(7.5, 4.6))
    labels = list(series) + [r for r in (references or {}) if r not in series]
    colors = kind_colors(labels)
    for label, pts in series.items():
        pts = [(x, np.asarray(v, dtype=float)) for x, v in pts if len(v)]
        if not pts:
            continue
        xs = np.array([x for x, _ in pts], dtype=float)
        mean = np.array([v.mean() for _, v in pts])
        lo, hi = mean - np.array([v.min() for _, v in pts]), np.array([v.max() for _, v in pts]) - mean
        ax.errorbar(xs, mean, yerr=[lo, hi], color=colors[label], marker="o", ms=5, lw=1.6, capsize=3, label=label)
    for label, vals in (references or {}).items():
        v = np.asarray(vals, dtype=float)
        if v.size:
            ax.axhline(v.mean(), color=colors[label], lw=1.2, ls="--", label=f"{label} (not swept)")
            if v.size > 1:
                ax.axhspan(v.min(), v.max(), color=colors[label], alpha=0.12, lw=0)
    if log_x:
        ax.set_xscale("log")
    if tick_labels is not None:
        ax.set_xticks(range(len(tick_labels)), tick_labels)
    else:  # the swept values themselves as ticks, written plainly (not 2×10⁰ on a log axis)
        xs_all = sorted({x for pts in series.values() for x, _ in pts})
        if xs_all and (log_x or all(float(x).is_integer() for x in xs_all)):
            ax.set_xticks(xs_all, [f"{x:g}" for x in xs_all])
            ax.xaxis.set_minor_locator(mticker.NullLocator())
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.set_title("Final loss vs the swept value: mean over seeds, bar min to max", fontsize=11)
    ax.legend(fontsize=9)
    return _save(fig, out_path)
