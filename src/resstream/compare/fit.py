"""Scaling-law fits and the compute multiplier, with intervals from a bootstrap over seeds.

A fit describes one kind's final validation loss L as a function of training compute C:

    power law        L(C) = A * C^(-alpha)              (Kimi Team, Attention Residuals, Sec. 5.1)
    with a floor     L(C) = E + A * C^(-alpha)          (E: the loss no compute removes)

The power law is a straight line in log-log space and is fitted there by least squares; the
floor fit is a non-linear least-squares fit in L, started from the power law, and needs at
least four distinct compute values (three parameters, one left to check them).

The compute multiplier of a kind at compute C is how much more compute the baseline's fit
needs to reach the kind's loss there: m = C_b / C with L_base(C_b) = L_kind(C). m > 1 means
the kind is worth m times the baseline's compute (the paper's "1.25x compute advantage").

Seeds are the unit of replication: a bootstrap draws seeds with replacement and refits on the
runs of the drawn seeds, the same draw for every kind (seed s gave every kind the same data
order), so a multiplier's interval carries the noise the kinds do not share.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np

Points = Sequence[tuple[float, float]]  # (compute, loss)

MIN_POINTS_FLOOR = 4  # distinct compute values needed before the floor fit is attempted


def fit_power_law(points: Points) -> dict | None:
    """Least-squares fit of log L = log A - alpha log C. None below two distinct computes.

    Returns {"A", "alpha", "rmse_log"} (rmse of the log-loss residuals)."""
    c, l = _arrays(points)
    if c is None or np.unique(c).size < 2:
        return None
    x, y = np.log(c), np.log(l)
    slope, intercept = np.polyfit(x, y, 1)
    resid = y - (intercept + slope * x)
    return {"A": float(math.exp(intercept)), "alpha": float(-slope), "rmse_log": float(np.sqrt(np.mean(resid ** 2)))}


def fit_power_law_floor(points: Points) -> dict | None:
    """Fit L = E + A C^(-alpha) with 0 <= E <= min(L), A >= 0. None (no fit) below
    MIN_POINTS_FLOOR distinct computes.

    For a fixed alpha the model is linear in (E, A), solved in closed form (E clipped to its
    bounds); alpha is then found by a bounded one-dimensional search, fast enough to refit on
    every bootstrap draw. Returns {"E", "A", "alpha", "rmse", "E_at_bound"}: rmse of the loss
    residuals; ``E_at_bound`` when E ended within 0.1% of 0 or of min(L), i.e. the points do
    not locate a floor."""
    from scipy.optimize import minimize_scalar

    c, l = _arrays(points)
    if c is None or np.unique(c).size < MIN_POINTS_FLOOR:
        return None
    x = np.log(c)
    x0 = x.mean()  # centre log C so that A's scale and alpha are not entangled
    e_max = float(l.min())

    def solve(alpha: float) -> tuple[float, float, float]:
        z = np.exp(-alpha * (x - x0))
        zc, lc = z - z.mean(), l - l.mean()
        a = max(float(zc @ lc / (zc @ zc)), 0.0) if zc @ zc > 0 else 0.0
        e = min(max(float(l.mean() - a * z.mean()), 0.0), e_max)
        if e in (0.0, e_max):  # E at a bound: the best A for that E
            a = max(float(z @ (l - e) / (z @ z)), 0.0)
        return e, a, float(np.sum((e + a * z - l) ** 2))

    start = fit_power_law(points)["alpha"]
    r = minimize_scalar(lambda al: solve(al)[2], bounds=(1e-4, max(4.0 * start, 1.0)), method="bounded",
                        options={"xatol": 1e-10})
    alpha = float(r.x)
    e, a, sse = solve(alpha)
    if not (math.isfinite(sse) and a > 0):
        return None
    at_bound = e <= 1e-3 * e_max or e >= (1 - 1e-3) * e_max  # within 0.1% of the loss: not located
    return {"E": e, "A": float(a * math.exp(alpha * x0)), "alpha": alpha,
            "rmse": float(math.sqrt(sse / len(l))), "E_at_bound": bool(at_bound)}


def predict(fit: dict, compute: float) -> float:
    """The fitted loss at ``compute`` (either fit form)."""
    return fit.get("E", 0.0) + fit["A"] * compute ** (-fit["alpha"])


def compute_for_loss(fit: dict, loss: float) -> float | None:
    """The compute at which ``fit`` reaches ``loss``; None when it never does (a loss at or
    below the floor E, or a fit that does not fall with compute)."""
    reducible = loss - fit.get("E", 0.0)
    if reducible <= 0 or fit["alpha"] <= 0:
        return None
    return float((fit["A"] / reducible) ** (1.0 / fit["alpha"]))


def multiplier(base_fit: dict, compute: float, loss: float) -> float | None:
    """How many times ``compute`` the baseline's fit needs to reach ``loss``."""
    needed = compute_for_loss(base_fit, loss)
    return None if needed is None else needed / compute


def _arrays(points: Points) -> tuple[np.ndarray | None, np.ndarray | None]:
    pts = [(float(c), float(l)) for c, l in points if c > 0 and l > 0 and math.isfinite(c) and math.isfinite(l)]
    if not pts:
        return None, None
    a = np.asarray(pts)
    return a[:, 0], a[:, 1]


# ----------------------------------------------------------------------------- bootstrap over seeds


def bootstrap(seeds: Sequence[int], statistic: Callable[[list[int]], dict], n_boot: int,
              rng_seed: int = 0) -> list[dict]:
    """``statistic`` on ``n_boot`` resamples of ``seeds`` drawn with replacement (a seed may
    appear twice; its runs then count twice). Deterministic for a given ``rng_seed``; the
    statistic must not depend on the order of the seeds it gets (it is computed once per
    distinct multiset)."""
    rng = np.random.default_rng(rng_seed)
    seeds = list(seeds)
    draws = rng.integers(0, len(seeds), size=(n_boot, len(seeds)))
    cache: dict[tuple, dict] = {}  # a draw is a multiset: few seeds give few distinct ones
    out = []
    for row in draws:
        key = tuple(sorted(seeds[i] for i in row))
        if key not in cache:
            cache[key] = statistic(list(key))
        out.append(cache[key])
    return out


def interval(values: Sequence[float | None], level: float = 0.95) -> dict:
    """Percentile interval of the finite bootstrap values: {"lo", "hi", "n", "n_undefined"}.

    ``n_undefined`` counts resamples where the statistic did not exist (e.g. a loss below the
    baseline's floor); the interval uses the rest and says so through the count."""
    finite = np.array([v for v in values if v is not None and math.isfinite(v)], dtype=float)
    out = {"lo": None, "hi": None, "n": int(finite.size), "n_undefined": int(len(values) - finite.size), "level": level}
    if finite.size:
        q = (1 - level) / 2
        out["lo"], out["hi"] = float(np.quantile(finite, q)), float(np.quantile(finite, 1 - q))
    return out


def distinct_resamples(n_seeds: int) -> int:
    """How many different multisets a bootstrap over ``n_seeds`` seeds can draw: C(2n-1, n)."""
    return math.comb(2 * n_seeds - 1, n_seeds)
