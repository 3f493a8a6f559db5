"""The figures of the scaling report: loss vs compute (log-log, fits) and the validation curves
of the largest size."""
from __future__ import annotations

from pathlib import Path

from resstream.compare.stats import ok_runs
from resstream.diagnostics.document import Block
from resstream.diagnostics.experiment_plots import plot_scaling
from resstream.diagnostics.plots import plot_val_curves


def figures(summary: dict, out_dir: Path) -> list[Block]:
    kinds, sizes = summary["kinds"], summary["setup"]["sizes"]
    series = {}
    for label, k in kinds.items():
        pts = [(r["compute"], r["final_val_bpb"]) for s in sizes for r in ok_runs({"runs": k["runs"][s["label"]]})]
        series[label] = {"points": pts, "fit": k.get("fit"), "fit_floor": k.get("fit_floor")}
    blocks = [Block("fig", "Final validation bits per byte vs training compute, log-log (the layout of the paper's "
                           "Fig. 4): small dots one run each, large dots mean over seeds, solid lines power-law fits, "
                           "dashed lines fits with a floor.",
                    path=plot_scaling(series, out_dir / "scaling.png", "validation bits per byte (log)"))]
    last = sizes[-1]["label"]
    curves = {label: [r["curve"] for r in ok_runs({"runs": k["runs"][last]})] for label, k in kinds.items()}
    if any(curves.values()):
        blocks.append(Block("fig", f"Validation curves at the largest size ({last}): mean over seeds, band min to max.",
                            path=plot_val_curves(curves, out_dir / "val_curves_largest.png",
                                                 title=f"Validation bits per byte during training, {last}")))
    return blocks
