"""The numbers and the report of a sweep: per cell (kind at a point of the grid) the compare
statistics against the baseline at the same point, each kind at its own best point, a plot
of final bits per byte vs the first swept key, and the validation curves of each kind's best."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import torch

import resstream
from resstream.compare.collect import machine_line, run_record
from resstream.compare.decide import seeds_cell
from resstream.compare.report import _bpb, _fmt, fmt_p
from resstream.compare.stats import ok_runs, summarize
from resstream.diagnostics.document import Block, write_document


def _versus(runs: list[dict], base_runs: list[dict]) -> dict:
    """Compare statistics of ``runs`` against ``base_runs`` (paired by seed)."""
    mini = {"setup": {"baseline": "b"}, "kinds": {"b": {"runs": copy.deepcopy(base_runs)}, "k": {"runs": copy.deepcopy(runs)}}}
    return summarize(mini)["kinds"]["k"]["stats"]


def _matching(cells: list[dict], label: str, point: dict) -> dict | None:
    """The cell of kind ``label`` whose point agrees with ``point`` on every key both have; when
    several do (the baseline is swept on a key this cell lacks), the one with the lowest mean."""
    found = [c for c in cells if c["label"] == label and all(point.get(k, v) == v for k, v in c["point"].items())]
    scored = [c for c in found if ok_runs(c)]
    if len(scored) > 1:
        return min(scored, key=lambda c: sum(r["final_val_bpb"] for r in ok_runs(c)) / len(ok_runs(c)))
    return (scored or found or [None])[0]


def analyse_sweep(out: Path, base, labels, cells, seeds, baseline: str, axes, cell_dir) -> dict:
    rows = [{"label": c.label, "residual": c.residual, "point": c.point, "slug": c.slug,
             "runs": [run_record(cell_dir(out, c, s), s) for s in seeds]} for c in cells]
    for r in rows:
        ref = _matching(rows, baseline, r["point"])
        r["stats"] = _versus(r["runs"], ref["runs"] if ref else [])
    best = {}
    for label in labels:
        mine = [r for r in rows if r["label"] == label and r["stats"]["bpb_mean"] is not None]
        if mine:
            best[label] = min(mine, key=lambda r: r["stats"]["bpb_mean"])
    base_runs = best[baseline]["runs"] if baseline in best else None
    best = {label: {"slug": r["slug"], "point": r["point"],
                    "stats": _versus(r["runs"], base_runs) if base_runs is not None else r["stats"]}
            for label, r in best.items()}
    setup = {"experiment": "sweep", "axes": axes, "seeds": seeds, "baseline": baseline, "kinds": labels,
             "model": base.model, "corpus": base.data.corpus, "train": base.train.to_dict(),
             "tokens_per_run": base.train.steps * base.train.batch_size * base.train.seq_len,
             "machine": machine_line(), "torch": torch.__version__, "resstream": resstream.__version__}
    return {"setup": setup, "cells": rows, "best": best}


# ----------------------------------------------------------------------------- tables


def _point_text(point: dict) -> str:
    return ", ".join(f"{k}={json.dumps(v) if isinstance(v, str) else v}" for k, v in point.items()) or "(not swept)"


CELL_HEADER = ["kind", "point", "runs ok", "val bpb (mean ± std)", "Δ vs baseline (same point)", "p paired",
               "seeds for 80% power"]


def cell_rows(summary: dict) -> list[list[str]]:
    base = summary["setup"]["baseline"]
    rows = []
    for c in summary["cells"]:
        st, is_base = c["stats"], c["label"] == base
        rows.append([c["label"], _point_text(c["point"]), f"{st['n_ok']}/{st['n_runs']}", _bpb(st),
                     "baseline" if is_base else _fmt(st["delta_vs_baseline"], "+.4f"),
                     "–" if is_base else fmt_p(st["p_paired"]), "–" if is_base else seeds_cell(st)])
    return rows


BEST_HEADER = ["kind", "best point", "val bpb (mean ± std)", "Δ vs baseline at its best", "p paired"]


def best_rows(summary: dict) -> list[list[str]]:
    base = summary["setup"]["baseline"]
    return [[label, _point_text(b["point"]), _bpb(b["stats"]),
             "baseline" if label == base else _fmt(b["stats"]["delta_vs_baseline"], "+.4f"),
             "–" if label == base else fmt_p(b["stats"]["p_paired"])] for label, b in summary["best"].items()]


def format_sweep(summary: dict) -> str:
    out = []
    for header, rows in ((CELL_HEADER, cell_rows(summary)), (BEST_HEADER, best_rows(summary))):
        widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
        out += ["  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip()]
        out += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows] + [""]
    return "\n".join(out).rstrip()


# ----------------------------------------------------------------------------- figures and document


def _figures(summary: dict, out_dir: Path) -> list[Block]:
    from resstream.diagnostics.experiment_plots import plot_sweep
    from resstream.diagnostics.plots import plot_val_curves

    key, values = summary["setup"]["axes"][0][0], summary["setup"]["axes"][0][1]
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
    series, refs = {}, {}
    for c in summary["cells"]:
        finals = [r["final_val_bpb"] for r in ok_runs(c)]
        if key not in c["point"]:
            refs[" ".join([c["label"]] + [f"{k}={v}" for k, v in c["point"].items()])] = finals
            continue
        name = " ".join([c["label"]] + [f"{k.rpartition('.')[2]}={v}" for k, v in c["point"].items() if k != key])
        x = c["point"][key] if numeric else values.index(c["point"][key])
        series.setdefault(name, []).append((x, finals))
    pos = [v for v in values if numeric and v > 0]
    log_x = numeric and len(pos) == len(values) and max(pos) / min(pos) >= 8
    blocks = [Block("fig", f"Final validation bits per byte vs {key}: mean over seeds, bar min to max; dashed lines: "
                           "kinds the key does not apply to.",
                    path=plot_sweep(series, out_dir / "sweep.png", key, "final validation bits per byte", refs,
                                    log_x=log_x, tick_labels=None if numeric else [str(v) for v in values]))]
    curves = {}
    for label, b in summary["best"].items():
        cell = next(c for c in summary["cells"] if c["label"] == label and c["slug"] == b["slug"])
        curves[f"{label} ({_point_text(b['point'])})"] = [r["curve"] for r in ok_runs(cell)]
    if any(curves.values()):
        blocks.append(Block("fig", "Validation curves of each kind at its best point: mean over seeds, band min to max.",
                            path=plot_val_curves(curves, out_dir / "val_curves_best.png")))
    return blocks


def build_blocks(summary: dict, out_dir: Path) -> list[Block]:
    st = summary["setup"]
    axes = "; ".join(f"{k} = {', '.join(map(str, vs))}" for k, vs in st["axes"])
    m = st["model"]
    items = [f"Swept: {axes}", f"Kinds: {', '.join(st['kinds'])}; baseline {st['baseline']}",
             f"Model: {m.get('n_layers')} layers, d_model {m.get('d_model')}, {m.get('n_heads')} heads",
             f"Corpus: {st['corpus']}; {st['tokens_per_run']:,} training tokens per run",
             f"Seeds: {', '.join(map(str, st['seeds']))} (a seed fixes data order and sublayer init for every cell)",
             f"Machine: {st['machine']}; torch {st['torch']}, resstream {st['resstream']}"]
    blocks = [Block("h1", "resstream sweep report"), Block("h2", "Setup"), Block("ul", items=items),
              Block("h2", "Every cell"), Block("table", header=CELL_HEADER, items=cell_rows(summary)),
              Block("h2", "Each kind at its own best point"), Block("table", header=BEST_HEADER, items=best_rows(summary)),
              Block("h2", "Plots")] + _figures(summary, out_dir)
    blocks += [Block("h2", "How to read this"), Block("p",
        "Each cell is compared with the baseline kind at the same values of the keys both use (paired by seed). "
        "A model.residual key applies only to kinds with that option; the others run once and appear as "
        "reference lines. 'Each kind at its own best point' gives every kind the setting that suited it "
        "(tuning fairness); picking the best of several cells favours the kind with more cells and with more "
        "seed noise, so its p-value is optimistic. 'seeds for 80% power': how many seeds the paired test would "
        "need if the observed per-seed differences were the truth.")]
    return blocks


def write_sweep_report(summary: dict, out_dir: Path) -> tuple[Path, Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    return write_document(build_blocks(summary, out_dir), out_dir)
