"""Statistics of a comparison: mean and spread over seeds, and t-tests against a baseline.

Seeds are the unit of replication. The same seed gives every kind the same data order and
the same sublayer initialisation, so results pair up by seed; the paired t-test on the
per-seed differences removes the noise the kinds share and is the better test here.
Welch's t-test (no pairing, unequal variances) is reported beside it for runs whose seeds do
not match. Every p-value comes with ``None`` and a reason where it cannot be computed.
"""
from __future__ import annotations

import math
import warnings
from typing import Sequence

import numpy as np
from scipy import stats as _st

from resstream.compare.power import seeds_needed


def mean_std(values: Sequence[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (ddof = 1); std is None below two values."""
    v = np.asarray(list(values), dtype=float)
    if v.size == 0:
        return None, None
    return float(v.mean()), (float(v.std(ddof=1)) if v.size >= 2 else None)


def welch_test(a: Sequence[float], b: Sequence[float]) -> dict:
    """Welch's two-sided t-test of mean(a) != mean(b).

    Returns {"p": float | None, "t": float | None, "note": str | None}. ``p`` is None, with the
    reason in ``note``, when either group has fewer than two values or both have zero spread.
    """
    a, b = np.asarray(list(a), dtype=float), np.asarray(list(b), dtype=float)
    if a.size < 2 or b.size < 2:
        return {"p": None, "t": None, "note": f"needs >= 2 runs in each group (have {a.size} and {b.size})"}
    if a.var(ddof=1) == 0 and b.var(ddof=1) == 0:
        return {"p": None, "t": None, "note": "both groups have zero spread; a t-test is undefined"}
    with warnings.catch_warnings():
        # One group with zero spread (e.g. deterministic runs) is a valid Welch test; scipy
        # still warns about precision loss in its variance, which says nothing here.
        warnings.filterwarnings("ignore", "Precision loss", RuntimeWarning)
        r = _st.ttest_ind(a, b, equal_var=False)
    return {"p": float(r.pvalue), "t": float(r.statistic), "note": None}


def paired_test(a: dict[int, float], b: dict[int, float]) -> dict:
    """Paired two-sided t-test on a[seed] - b[seed] over the seeds both have.

    Returns {"p", "t", "n_pairs", "mean_diff", "note"}; ``p`` is None with a reason when fewer
    than two seeds pair up or every difference is the same (zero spread).
    """
    seeds = sorted(set(a) & set(b))
    d = np.array([a[s] - b[s] for s in seeds], dtype=float)
    out = {"p": None, "t": None, "n_pairs": len(seeds), "mean_diff": float(d.mean()) if d.size else None, "note": None}
    if d.size < 2:
        out["note"] = f"needs >= 2 seeds shared with the baseline (have {d.size})"
    elif d.var(ddof=1) == 0:
        out["note"] = "every per-seed difference is the same; a t-test is undefined"
    else:
        r = _st.ttest_rel([a[s] for s in seeds], [b[s] for s in seeds])
        out["p"], out["t"] = float(r.pvalue), float(r.statistic)
    return out


def baseline_label(summary: dict) -> str:
    """The kind every other is compared with: the one the user chose (``setup.baseline``,
    ``resstream compare --baseline``), else the first kind."""
    kinds = summary["kinds"]
    if not kinds:
        raise ValueError("summary has no kinds")
    chosen = summary.get("setup", {}).get("baseline")
    return chosen if chosen in kinds else next(iter(kinds))


def ok_runs(kind: dict) -> list[dict]:
    """Runs that finished with a validation result; failed runs are left out of every statistic."""
    return [r for r in kind.get("runs", []) if r.get("status") == "ok" and _finite(r.get("final_val_bpb"))]


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def _mean_of(runs: list[dict], key: str) -> float | None:
    vals = [r[key] for r in runs if _finite(r.get(key))]
    return float(np.mean(vals)) if vals else None


def summarize(summary: dict) -> dict:
    """Add ``stats`` to every kind of ``summary`` (in place) and return ``summary``.

    stats: bpb_mean, bpb_std, n_ok, n_runs, failed ([{seed, last_good_step, ...}]), baseline,
    delta_vs_baseline (mean of this kind minus mean of the baseline, bits per byte),
    p_welch / p_welch_note, p_paired / p_paired_note / n_pairs / paired_mean_diff,
    seeds_needed / seeds_needed_note (seeds the paired test would need for p < 0.05 at 80%
    power if the observed mean and spread of the per-seed differences were the truth), and the
    means over ok runs of tokens_per_s, peak_mem_mb, wall_s and compile_s (one-time
    compilation, not in tokens_per_s). The baseline's own p-values are None with the note "baseline".
    """
    base = baseline_label(summary)
    base_runs = ok_runs(summary["kinds"][base])
    base_vals = [r["final_val_bpb"] for r in base_runs]
    base_by_seed = {r["seed"]: r["final_val_bpb"] for r in base_runs}
    base_mean, _ = mean_std(base_vals)
    for label, kind in summary["kinds"].items():
        runs = ok_runs(kind)
        ok_ids = {id(r) for r in runs}
        vals = [r["final_val_bpb"] for r in runs]
        mean, std = mean_std(vals)
        s = {
            "baseline": base,
            "n_runs": len(kind.get("runs", [])),
            "n_ok": len(runs),
            "bpb_mean": mean,
            "bpb_std": std,
            "failed": [
                {k: r.get(k) for k in ("seed", "status", "reason", "last_good_step", "failed_step", "error") if r.get(k) is not None}
                for r in kind.get("runs", []) if id(r) not in ok_ids
            ],
            "delta_vs_baseline": None if mean is None or base_mean is None else mean - base_mean,
            "tokens_per_s": _mean_of(runs, "tokens_per_s"),
            "peak_mem_mb": _mean_of(runs, "peak_mem_mb"),
            "wall_s": _mean_of(runs, "wall_s"),
            "compile_s": _mean_of(runs, "compile_s"),
        }
        if label == base:
            s.update(p_welch=None, p_welch_note="baseline", p_paired=None, p_paired_note="baseline",
                     n_pairs=None, paired_mean_diff=None, seeds_needed=None, seeds_needed_note="baseline")
        else:
            w = welch_test(vals, base_vals)
            by_seed = {r["seed"]: r["final_val_bpb"] for r in runs}
            p = paired_test(by_seed, base_by_seed)
            need = seeds_needed([by_seed[sd] - base_by_seed[sd] for sd in sorted(set(by_seed) & set(base_by_seed))])
            s.update(p_welch=w["p"], p_welch_note=w["note"], p_paired=p["p"], p_paired_note=p["note"],
                     n_pairs=p["n_pairs"], paired_mean_diff=p["mean_diff"],
                     seeds_needed=need["n"], seeds_needed_note=need["note"])
        kind["stats"] = s
    return summary
