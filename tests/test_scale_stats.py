"""Scaling-law fits, the compute multiplier, bootstrap intervals, the power statement and the
sequential threshold of --seeds auto: checked against numbers known in closed form or by
simulation."""
from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as sst

from resstream.compare import fit as F
from resstream.compare.power import paired_power, seeds_needed, sequential_threshold

COMPUTE = [1e9, 4e9, 2e10, 1e11, 5e11]


def test_power_law_fit_recovers_exact_parameters():
    pts = [(c, 12.5 * c ** -0.061) for c in COMPUTE]
    f = F.fit_power_law(pts)
    assert f["A"] == pytest.approx(12.5, rel=1e-9) and f["alpha"] == pytest.approx(0.061, rel=1e-9)
    assert f["rmse_log"] < 1e-12
    assert F.fit_power_law(pts[:1]) is None  # one compute: no line
    assert F.fit_power_law([(1e9, 3.0), (1e9, 3.1)]) is None


def test_floor_fit_recovers_the_floor_and_needs_four_computes():
    pts = [(c, 1.3 + 40.0 * c ** -0.17) for c in COMPUTE for _ in range(2)]
    f = F.fit_power_law_floor(pts)
    assert f["E"] == pytest.approx(1.3, rel=1e-4) and f["A"] == pytest.approx(40.0, rel=1e-3)
    assert f["alpha"] == pytest.approx(0.17, rel=1e-4) and not f["E_at_bound"]
    assert F.fit_power_law_floor(pts[:6]) is None  # three distinct computes
    pure = [(c, 12.5 * c ** -0.061) for c in COMPUTE]  # a pure power law has no floor to find
    assert F.fit_power_law_floor(pure)["E_at_bound"]


def test_multiplier_inverts_the_baseline_fit():
    base = {"A": 1.891, "alpha": 0.057}
    for c in COMPUTE:
        for k in (0.5, 1.0, 1.25, 3.0):
            loss = F.predict(base, k * c)  # the loss the baseline reaches with k times the compute
            assert F.multiplier(base, c, loss) == pytest.approx(k, rel=1e-9)
    # the paper's arithmetic: Block's 1.692 at 5.6 PFLOP/s-days against 1.891 C^-0.057 is about 1.25x
    assert F.multiplier(base, 5.6, 1.692) == pytest.approx(1.25, abs=0.01)
    floor = {"E": 1.5, "A": 2.0, "alpha": 0.1}
    assert F.compute_for_loss(floor, 1.5) is None and F.compute_for_loss(floor, 1.4) is None
    assert F.compute_for_loss(floor, F.predict(floor, 7e9)) == pytest.approx(7e9, rel=1e-9)


def test_bootstrap_draws_seeds_with_replacement_deterministically():
    seen = F.bootstrap([3, 5], lambda s: tuple(sorted(s)), 400, rng_seed=1)
    assert set(seen) == {(3, 3), (3, 5), (5, 5)} and F.distinct_resamples(2) == 3
    assert seen == F.bootstrap([3, 5], lambda s: tuple(sorted(s)), 400, rng_seed=1)
    assert F.distinct_resamples(5) == 126
    ci = F.interval([1.0, 2.0, None, 3.0, float("nan")] + [2.0] * 95)
    assert ci["n_undefined"] == 2 and ci["lo"] <= 2.0 <= ci["hi"]
    assert F.interval([None, None])["lo"] is None


def test_paired_power_matches_the_noncentral_t_and_simulation():
    for effect, n in ((0.8, 6), (1.5, 4), (0.3, 30)):
        crit = sst.t.ppf(0.975, n - 1)
        ncp = effect * math.sqrt(n)
        exact = sst.nct.sf(crit, n - 1, ncp) + sst.nct.cdf(-crit, n - 1, ncp)
        assert paired_power(effect, n) == pytest.approx(exact, abs=1e-6)
        assert paired_power(-effect, n) == pytest.approx(exact, abs=1e-6)
    rng = np.random.default_rng(0)
    d = rng.standard_normal((20000, 5)) + 1.2
    p = sst.ttest_1samp(d, 0.0, axis=1).pvalue
    assert paired_power(1.2, 5) == pytest.approx(float(np.mean(p < 0.05)), abs=0.01)
    assert paired_power(50.0, 400) == pytest.approx(1.0)  # no NaN where scipy's nct gives up


def test_seeds_needed_is_the_smallest_count_reaching_the_power():
    diffs = [-0.093, -0.062, -0.071]
    r = seeds_needed(diffs)
    effect = np.mean(diffs) / np.std(diffs, ddof=1)
    assert r["effect"] == pytest.approx(effect)
    assert paired_power(effect, r["n"]) >= 0.8 > paired_power(effect, r["n"] - 1)
    assert seeds_needed([0.05])["n"] is None and "2 seeds" in seeds_needed([0.05])["note"]
    assert "same" in seeds_needed([0.01, 0.01])["note"]
    tiny = seeds_needed([0.001, -0.001, 0.0001])
    assert tiny["n"] is None and tiny["note"].startswith("more than")


def test_sequential_threshold_keeps_the_overall_false_positive_rate():
    assert sequential_threshold(3, 3) == 0.05  # one look: the plain threshold
    a = sequential_threshold(2, 8)
    assert 0.005 < a < 0.05
    # an independent simulation of the looks 2..8 under the null, stopping at p < a
    rng = np.random.default_rng(123)
    d = rng.standard_normal((20000, 8))
    stopped = np.zeros(len(d), dtype=bool)
    for n in range(2, 9):
        stopped |= sst.ttest_1samp(d[:, :n], 0.0, axis=1).pvalue < a
    assert float(stopped.mean()) == pytest.approx(0.05, abs=0.006)
    stopped_plain = np.zeros(len(d), dtype=bool)
    for n in range(2, 9):
        stopped_plain |= sst.ttest_1samp(d[:, :n], 0.0, axis=1).pvalue < 0.05
    assert stopped_plain.mean() > 0.1  # what the plain 0.05 would have done
