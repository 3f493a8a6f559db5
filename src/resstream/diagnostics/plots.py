"""PNG plots of a comparison and of one run's depth profile (matplotlib, Agg backend); used by the
comparison report and by diagnose, so they live here, below both.

Every function takes plain data (dicts of lists, keyed by kind label, in the order the kinds
should appear) and an output path, draws one figure, writes it, and returns the path. A kind
keeps the same colour in every figure as long as the dicts list kinds in the same order.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

Curve = Sequence[Sequence[float]]  # [[tokens, val_bpb], ...]

_DPI = 130


def kind_colors(labels: Sequence[str]) -> dict[str, tuple]:
    cmap = plt.get_cmap("tab10")
    return {label: cmap(i % 10) for i, label in enumerate(labels)}


def _save(fig, out_path: Path | str) -> Path:
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, dpi=_DPI, bbox_inches="tight")
    plt.close(fig)
    return out_path


def _align(curves: Sequence[Curve]) -> tuple[np.ndarray, np.ndarray]:
    """Put several (tokens, value) curves on one token grid: [n_points], [n_curves, n_points].

    Curves of one kind normally share their evaluation points; otherwise they are linearly
    interpolated onto the points of the first curve inside the range every curve covers.
    """
    arrs = [np.asarray(c, dtype=float).reshape(-1, 2) for c in curves]
    if all(a.shape == arrs[0].shape and np.array_equal(a[:, 0], arrs[0][:, 0]) for a in arrs):
        return arrs[0][:, 0], np.stack([a[:, 1] for a in arrs])
    lo = max(a[0, 0] for a in arrs)
    hi = min(a[-1, 0] for a in arrs)
    grid = arrs[0][(arrs[0][:, 0] >= lo) & (arrs[0][:, 0] <= hi), 0]
    return grid, np.stack([np.interp(grid, a[:, 0], a[:, 1]) for a in arrs])


def plot_val_curves(
    curves: Mapping[str, Sequence[Curve]],
    out_path: Path | str,
    failed: Mapping[str, Sequence[Curve]] | None = None,
    title: str = "Validation bits per byte during training",
) -> Path:
    """(a) Val bpb vs tokens seen: per kind the mean over seeds and a min-max band.

    ``curves[label]``: the curves of the kind's finished runs; ``failed[label]``: curves of
    failed runs, drawn as thin dotted lines and left out of the mean and band.
    """
    fig, ax = plt.subplots(figsize=(7.5, 4.6))
    colors = kind_colors(list(curves))
    for label, runs in curves.items():
        runs = [c for c in runs if len(c)]
        if not runs:
            continue
        x, ys = _align(runs)
        c = colors[label]
        n = len(runs)
        ax.plot(x, ys.mean(0), color=c, lw=2, label=f"{label} (mean of {n} seed{'s' if n != 1 else ''})")
        if n > 1:
            ax.fill_between(x, ys.min(0), ys.max(0), color=c, alpha=0.18, lw=0)
    for label, runs in (failed or {}).items():
        c = colors.get(label, "gray")
        for i, run in enumerate(r for r in runs if len(r)):
            a = np.asarray(run, dtype=float).reshape(-1, 2)
            ax.plot(a[:, 0], a[:, 1], color=c, lw=1, ls=":", label=f"{label}: failed run" if i == 0 else None)
    ax.set_xlabel("training tokens")
    ax.set_ylabel("validation bits per byte (lower is better)")
    ax.grid(alpha=0.3)
    zoomed = _zoom_to_tail(ax, curves)
    ax.set_title(title + "\nline: mean over seeds; band: min to max over seeds"
                 + ("; y zoomed on later evaluations" if zoomed else ""), fontsize=11)
    ax.legend(fontsize=9)
    return _save(fig, out_path)


def _zoom_to_tail(ax, curves: Mapping[str, Sequence[Curve]]) -> bool:
    """Early evaluations can sit far above the rest and squash the end, where the kinds are
    compared; then clip the y range to the last three quarters of each curve. Returns True
    when it clipped."""
    vals = [np.asarray(c, dtype=float).reshape(-1, 2)[:, 1] for runs in curves.values() for c in runs if len(c)]
    vals = [v[np.isfinite(v)] for v in vals]
    vals = [v for v in vals if v.size]
    if not vals:
        return False
    allv = np.concatenate(vals)
    tail = np.concatenate([v[len(v) // 4 :] for v in vals])
    lo, hi = float(allv.min()), float(tail.max())
    if hi > lo and float(allv.max()) - hi > 2 * (hi - lo):
        pad = 0.08 * (hi - lo)
        ax.set_ylim(lo - pad, hi + 3 * pad)
        return True
    return False


def _maybe_log(ax, series: Sequence[Sequence[float]]) -> None:
    """Log y when the values span more than a factor of 20, with plain-number tick labels."""
    v = np.concatenate([np.asarray(s, dtype=float) for s in series]) if series else np.array([])
    v = v[np.isfinite(v) & (v > 0)]
    if v.size and v.max() / v.min() > 20:
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda y, _: f"{y:g}"))
        decades = np.log10(v.max() / v.min())
        keep = (2, 5) if decades < 2.5 else ()  # label 2x and 5x ticks too when few decades show

        def minor(y, _):
            m = y / 10 ** np.floor(np.log10(y))
            return f"{y:g}" if any(abs(m - k) < 1e-6 for k in keep) else ""

        ax.yaxis.set_minor_formatter(matplotlib.ticker.FuncFormatter(minor))
        ax.tick_params(axis="y", which="minor", labelsize=8)


_MARKERS = "osD^v<>ph*"


def _depth_grid(
    rows: Sequence[tuple[str, Mapping[str, Sequence[float]]]], out_path: Path | str, title: str
) -> Path:
    """One row of panels per metric, attention sublayers (even l) left and MLP sublayers (odd l)
    right, x = layer index; splitting them keeps the depth trend readable (attention and MLP
    outputs differ by an order of magnitude, which would make one line zigzag)."""
    labels = list(rows[0][1])
    colors = kind_colors(labels)
    fig, axes = plt.subplots(len(rows), 2, figsize=(11, 3.6 * len(rows)), squeeze=False)
    for r, (ylabel, data) in enumerate(rows):
        for c, (name, parity) in enumerate((("attention", 0), ("MLP", 1))):
            ax = axes[r, c]
            series = []
            for i, label in enumerate(labels):
                if label not in data:
                    continue
                vals = np.asarray(data[label], dtype=float)[parity::2]
                series.append(vals)
                ax.plot(range(len(vals)), vals, marker=_MARKERS[i % len(_MARKERS)], ms=4, lw=1.6,
                        color=colors[label], label=label)
            _maybe_log(ax, series)
            n = max((len(v) for v in series), default=1)
            ax.set_xticks(range(0, n, max(1, int(np.ceil(n / 16)))))
            ax.set_xlim(-0.4, n - 0.6)
            ax.grid(alpha=0.3)
            ax.set_title(f"{name} sublayers", fontsize=10)
            ax.set_ylabel(ylabel)
            ax.set_xlabel(f"layer (sublayer l = {'2k' if parity == 0 else '2k+1'})")
    axes[0, 0].legend(fontsize=9)
    fig.suptitle(title, fontsize=12)
    fig.tight_layout()
    return _save(fig, out_path)


def plot_depth_rms(
    output_rms: Mapping[str, Sequence[float]],
    out_path: Path | str,
    input_rms: Mapping[str, Sequence[float]] | None = None,
    title: str = "Magnitude by depth (PreNorm dilution: output RMS grows with depth)",
) -> Path:
    """(b) Per-sublayer output RMS vs depth, one line per kind; with ``input_rms`` a second
    row shows the RMS of what each sublayer reads from the residual stream."""
    rows = [("RMS of sublayer output y_l", output_rms)]
    if input_rms:
        rows.append(("RMS of sublayer input x_l", input_rms))
    return _depth_grid(rows, out_path, title)


def plot_grad_norms(
    grad_norm: Mapping[str, Sequence[float]],
    out_path: Path | str,
    grad_norm_output: Mapping[str, Sequence[float]] | None = None,
    title: str = "Gradient magnitude by depth",
) -> Path:
    """(c) Per-sublayer gradient norm vs depth, one line per kind: ||dLoss/d params of
    sublayer l||, and with ``grad_norm_output`` a second row of ||dLoss/dy_l||."""
    rows = [("||dLoss/d params of sublayer||", grad_norm)]
    if grad_norm_output:
        rows.append(("||dLoss/dy_l|| (whole batch)", grad_norm_output))
    return _depth_grid(rows, out_path, title)


def _column_order(source_names: Sequence[Sequence[str]]) -> list[str]:
    """Columns for the heatmap: an order consistent with every row's own order of sources
    (a topological sort of "comes before" within rows). Among sources free to go next, those
    found at one fixed position in every row come first, then by first appearance; so a
    source whose position moves from row to row (e.g. a running partial sum that always comes
    last) ends up after the sources it follows: emb, B1, B2, ..., partial."""
    pos: dict[str, set[int]] = {}
    first: dict[str, tuple[int, int]] = {}
    after: dict[str, set[str]] = {}
    n_before: dict[str, int] = {}
    for r, names in enumerate(source_names):
        for i, n in enumerate(names):
            pos.setdefault(n, set()).add(i)
            first.setdefault(n, (r, i))
            after.setdefault(n, set())
            n_before.setdefault(n, 0)
        for a, b in zip(names, names[1:]):
            if b not in after[a]:
                after[a].add(b)
                n_before[b] += 1

    def key(n: str):
        return (len(pos[n]) > 1, first[n])

    order: list[str] = []
    ready = [n for n in n_before if n_before[n] == 0]
    while ready:
        ready.sort(key=key)
        n = ready.pop(0)
        order.append(n)
        for m in after[n]:
            n_before[m] -= 1
            if n_before[m] == 0:
                ready.append(m)
    # rows that contradict each other leave a cycle: append what is left in a stable order
    return order + sorted((n for n in n_before if n not in order), key=key)


def _source_legend(legend: Mapping[str, str] | None) -> str:
    """The x label: 'source', with the stream's naming scheme (``ResidualStream.source_legend``)."""
    return "source" + (" (" + "; ".join(f"{k}: {v}" for k, v in legend.items()) + ")" if legend else "")


def sublayer_label(l: int, L: int) -> str:
    if l == L:
        return "final"
    return f"{l}: {'attn' if l % 2 == 0 else 'mlp'} {l // 2}"


def plot_mixing_heatmap(
    mixing: Sequence[Sequence[float | None]],
    source_names: Sequence[Sequence[str]],
    out_path: Path | str,
    title: str = "Depth-mixing weights",
    sums_to_one: bool | None = None,
    legend: Mapping[str, str] | None = None,
) -> Path:
    """(d) Mean depth-mixing weight of each source (columns) in each sublayer's input and the
    final mixture (rows). ``mixing``: [L+1][n_sources] padded with None or NaN;
    ``source_names[l]``: names of row l's sources (``ResidualStream.source_names``);
    ``sums_to_one``: the stream's ``weights_sum_to_one`` (False: free coefficients, drawn on a
    scale centred at 0; None: not declared, the scale is centred at 0 only if a weight is
    negative); ``legend``: its ``source_legend``, shown under the columns."""
    L = len(mixing) - 1
    cols = _column_order(source_names)
    col = {n: j for j, n in enumerate(cols)}
    grid = np.full((L + 1, len(cols)), np.nan)
    for r, (row, names) in enumerate(zip(mixing, source_names)):
        for v, n in zip(row, names):
            grid[r, col[n]] = np.nan if v is None else float(v)
    w = min(14.0, max(6.5, 2.8 + 0.55 * len(cols)))
    h = min(16.0, 2.0 + 0.34 * (L + 1))
    fig, ax = plt.subplots(figsize=(w, h))
    finite = grid[np.isfinite(grid)]
    # free coefficients (not a softmax) can be negative: a diverging scale centred at 0
    signed = sums_to_one is False or (finite.size > 0 and float(finite.min()) < 0)
    if signed:
        lim = max(1e-9, float(np.abs(finite).max()))
        cmap, vmin, vmax = plt.get_cmap("RdBu_r"), -lim, lim
    else:
        cmap, vmin, vmax = plt.get_cmap("viridis"), 0.0, max(1e-9, float(finite.max()) if finite.size else 1.0)
    cmap = cmap.with_extremes(bad="#eeeeee")
    im = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto")
    ax.set_xticks(range(len(cols)))
    ax.set_xticklabels(cols, rotation=60 if len(cols) > 10 else 0, fontsize=8 if len(cols) > 16 else 9)
    ax.set_yticks(range(L + 1))
    ax.set_yticklabels([sublayer_label(l, L) for l in range(L + 1)], fontsize=8 if L > 24 else 9)
    ax.set_xlabel(_source_legend(legend))
    ax.set_ylabel("input of sublayer (row L: final mixture)")
    if len(cols) <= 12 and L + 1 <= 26:
        for r in range(L + 1):
            for j in range(len(cols)):
                if np.isfinite(grid[r, j]):
                    v = grid[r, j]
                    light = abs(v) < 0.5 * vmax if signed else v > 0.6 * vmax
                    ax.text(j, r, f"{v:.2f}", ha="center", va="center", fontsize=8,
                            color="black" if light else "white")
    fig.colorbar(im, ax=ax, label="mean weight over tokens", fraction=0.05, pad=0.02)
    note = {True: "each row sums to 1; ", False: "free coefficients, rows need not sum to 1; ", None: ""}[sums_to_one]
    ax.set_title(title + f"\n({note}grey: source not read by that row)", fontsize=11)
    fig.tight_layout()
    return _save(fig, out_path)
