"""How many seeds a comparison needs: the power of the paired t-test, and the threshold that
keeps ``--seeds auto`` honest.

Power statement: if the true per-seed difference between a kind and the baseline had the mean
and spread observed so far, how many seeds would the two-sided paired t-test need to reach
p < alpha in a share ``power`` of repeated experiments? Under that assumption the test
statistic follows a non-central t with n - 1 degrees of freedom and non-centrality
sqrt(n) * mean / sd. The observed effect is itself noisy (from few seeds), so the answer is a
guide to the order of magnitude, not a promise.

Sequential threshold: ``--seeds auto`` looks at the p-value after every added seed and stops
when it is small. Stopping at the first p < 0.05 over several looks rejects a true null more
often than 5% of the time, so each look uses a smaller threshold, chosen by simulating the
looks under the null (normal per-seed differences; the t statistic does not depend on their
scale) so that the chance of any false stop over all looks is alpha.
"""
from __future__ import annotations

import math
from functools import lru_cache
from typing import Sequence

import numpy as np
from scipy import stats as _st

MAX_SEEDS_SEARCHED = 1000


def paired_power(effect: float, n: int, alpha: float = 0.05) -> float:
    """Power of the two-sided paired t-test with ``n`` pairs when mean/sd of the differences is
    ``effect``: P(|T| > t_crit) for T = (Z + sqrt(n) effect) / sqrt(V / (n - 1)), V ~ chi2(n - 1),
    integrated over V (scipy's non-central t returns NaN for large non-centrality)."""
    from scipy.integrate import quad

    if n < 2:
        return 0.0
    df = n - 1
    crit = _st.t.ppf(1 - alpha / 2, df)
    ncp = abs(effect) * math.sqrt(n)

    def given_v(v: float) -> float:
        s = math.sqrt(v / df)
        return (_st.norm.cdf(ncp - crit * s) + _st.norm.cdf(-ncp - crit * s)) * _st.chi2.pdf(v, df)

    lo, hi = _st.chi2.ppf([1e-12, 1 - 1e-12], df)
    value, _ = quad(given_v, lo, hi, limit=200)
    return float(min(max(value, 0.0), 1.0))


def seeds_needed(diffs: Sequence[float], alpha: float = 0.05, power: float = 0.8) -> dict:
    """Seeds the paired test would need for p < ``alpha`` at ``power``, from observed per-seed
    differences ``diffs`` (kind minus baseline).

    Returns {"n": int | None, "effect": mean/sd | None, "note": str | None}; ``n`` is None
    (with the reason in ``note``) when the spread cannot be estimated, or when more than
    MAX_SEEDS_SEARCHED seeds would be needed."""
    d = np.asarray(list(diffs), dtype=float)
    out = {"n": None, "effect": None, "alpha": alpha, "power": power, "note": None}
    if d.size < 2:
        out["note"] = f"needs >= 2 seeds shared with the baseline (have {d.size})"
        return out
    sd = float(d.std(ddof=1))
    if sd == 0:
        out["note"] = "every per-seed difference is the same; the spread cannot be estimated"
        return out
    effect = float(d.mean()) / sd
    out["effect"] = effect
    if paired_power(effect, MAX_SEEDS_SEARCHED, alpha) < power:
        out["note"] = f"more than {MAX_SEEDS_SEARCHED} seeds"
        return out
    lo, hi = 2, MAX_SEEDS_SEARCHED  # power grows with n: bisect for the smallest n that reaches it
    while lo < hi:
        mid = (lo + hi) // 2
        if paired_power(effect, mid, alpha) >= power:
            hi = mid
        else:
            lo = mid + 1
    out["n"] = lo
    return out


@lru_cache(maxsize=32)
def sequential_threshold(first: int, last: int, alpha: float = 0.05, sims: int = 40_000, seed: int = 0) -> float:
    """Per-look p-value threshold for paired t-tests after ``first``, ``first`` + 1, ..., ``last``
    seeds such that, when the kinds are equal, the chance that any look falls below it is
    ``alpha`` (by simulation, deterministic for a given ``seed``). With one look it is ``alpha``."""
    first = max(first, 2)
    if last <= first:
        return alpha
    rng = np.random.default_rng(seed)
    d = rng.standard_normal((sims, last))
    looks = np.arange(first, last + 1)
    min_p = np.ones(sims)
    csum, csq = np.cumsum(d, axis=1), np.cumsum(d * d, axis=1)
    for n in looks:
        mean = csum[:, n - 1] / n
        var = (csq[:, n - 1] - n * mean * mean) / (n - 1)
        t = mean / np.sqrt(var / n)
        p = 2 * _st.t.sf(np.abs(t), n - 1)
        min_p = np.minimum(min_p, p)
    return float(np.quantile(min_p, alpha))
