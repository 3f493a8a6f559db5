"""The numbers of a scaling study, from its run folders: per size the compare statistics, per
kind the scaling-law fits, per kind and size the compute multiplier against the baseline,
each with a bootstrap interval over seeds (compare/fit.py says how)."""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Callable

import numpy as np
import torch

import resstream
from resstream.compare import fit as F
from resstream.compare.collect import machine_line, run_record
from resstream.compare.stats import ok_runs, summarize
from resstream.runs import folder

LOSS = "final validation bits per byte"


def collect_points(out: Path, plan, run_dir: Callable) -> dict:
    """{label: {"kind", "residual", "params_added": {size: n}, "runs": {size: [run records]}}}."""
    kinds = {}
    for label, residual in plan.kinds:
        runs, added = {}, {}
        for size in plan.sizes:
            runs[size.label] = []
            for seed in plan.seeds:
                rd = run_dir(out, size, label, seed)
                meta = folder.read_json(rd / folder.CONFIG) or {}
                if meta.get("params_residual") is not None:
                    added[size.label] = meta["params_residual"]
                rec = run_record(rd, seed)
                rec["compute"] = size.compute
                runs[size.label].append(rec)
        kinds[label] = {"kind": residual["kind"], "residual": residual, "params_added": added, "runs": runs}
    return kinds


def _losses(kind: dict, seeds: list[int]) -> dict[str, list[float]]:
    """Per size the final losses of the drawn seeds' finished runs (a seed drawn twice counts twice)."""
    out = {}
    for size, runs in kind["runs"].items():
        by_seed = {r["seed"]: r["final_val_bpb"] for r in ok_runs({"runs": runs})}
        out[size] = [by_seed[s] for s in seeds if s in by_seed]
    return out


def _statistic(points: dict, computes: dict, baseline: str, seeds: list[int]) -> dict:
    """Every fitted number of the study on the runs of ``seeds`` (one bootstrap draw)."""
    res, fits = {}, {}
    for label, kind in points.items():
        losses = _losses(kind, seeds)
        pts = [(computes[s], v) for s, vals in losses.items() for v in vals]
        means = {s: float(np.mean(v)) if v else None for s, v in losses.items()}
        fits[label] = F.fit_power_law(pts)
        res[label] = {"fit": fits[label], "fit_floor": F.fit_power_law_floor(pts), "means": means}
    base_fit = fits.get(baseline)
    for label, r in res.items():
        mult, mult_fit = {}, {}
        for s, mean in r["means"].items():
            ok = base_fit is not None and mean is not None
            mult[s] = F.multiplier(base_fit, computes[s], mean) if ok else None
            own = r["fit"]
            mult_fit[s] = (F.multiplier(base_fit, computes[s], F.predict(own, computes[s]))
                           if base_fit is not None and own is not None else None)
        r["multiplier"], r["multiplier_fit"] = mult, mult_fit
    return res


def _intervals(draws: list[dict], label: str) -> dict:
    def values(get):
        out = []
        for d in draws:
            try:
                out.append(get(d[label]))
            except (TypeError, KeyError):
                out.append(None)
        return out

    ci = {"fit": {k: F.interval(values(lambda r, k=k: r["fit"][k])) for k in ("A", "alpha")},
          "fit_floor": {k: F.interval(values(lambda r, k=k: r["fit_floor"][k])) for k in ("E", "A", "alpha")},
          "multiplier": {}, "multiplier_fit": {}}
    for s in draws[0][label]["means"]:
        ci["multiplier"][s] = F.interval(values(lambda r, s=s: r["multiplier"][s]))
        ci["multiplier_fit"][s] = F.interval(values(lambda r, s=s: r["multiplier_fit"][s]))
    return ci


def _per_size_stats(points: dict, sizes, baseline: str) -> dict:
    """Compare statistics (mean, std, Welch and paired p vs the baseline) at each size."""
    out = {}
    for size in sizes:
        mini = {"setup": {"baseline": baseline},
                "kinds": {label: {"runs": copy.deepcopy(k["runs"][size.label])} for label, k in points.items()}}
        summarize(mini)
        out[size.label] = {label: k["stats"] for label, k in mini["kinds"].items()}
    return out


def analyse(points: dict, plan, data_stats: dict, n_boot: int) -> dict:
    """The summary of a scaling study (what summary.json holds and the report shows)."""
    computes = {s.label: s.compute for s in plan.sizes}
    point = _statistic(points, computes, plan.baseline, plan.seeds)
    draws = F.bootstrap(plan.seeds, lambda sd: _statistic(points, computes, plan.baseline, sd), n_boot)
    per_size = _per_size_stats(points, plan.sizes, plan.baseline)
    kinds = {}
    for label, k in points.items():
        kinds[label] = {**k, **point[label], "ci": _intervals(draws, label),
                        "stats": {s: per_size[s][label] for s in per_size}}
    return {"setup": _setup(plan, data_stats, n_boot), "kinds": kinds}


def _setup(plan, data_stats: dict, n_boot: int) -> dict:
    base, sc = plan.base, plan.base.scale
    return {
        "experiment": "scale", "baseline": plan.baseline, "seeds": plan.seeds,
        "sizes": [s.to_dict() for s in plan.sizes], "model": base.model, "corpus": base.data.corpus,
        "train": base.train.to_dict(), "evals": sc.evals, "loss": LOSS,
        "compute": "C = 6 N D FLOP; N: parameters except the token embedding/output head and the residual "
                   "stream's own parameters (the same N for every kind at a size); D: training tokens of the run",
        "tokens_rule": (f"{plan.tokens:,} tokens per run at every size" if plan.tokens is not None else
                        f"{plan.tokens_per_param:g} tokens per parameter (D = {plan.tokens_per_param:g} N, rounded up to whole steps)"),
        "bootstrap": {"resamples": n_boot, "distinct": F.distinct_resamples(len(plan.seeds)), "level": 0.95},
        "machine": machine_line(), "torch": torch.__version__, "resstream": resstream.__version__, "data": data_stats,
    }
