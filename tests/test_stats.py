"""Paired statistics: against scipy, a hand computation, and a power simulation."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from airlora.stats import (
    compare_to_reference,
    holm,
    minimum_detectable_difference,
    paired_comparison,
)


def test_paired_comparison_matches_scipy():
    rng = np.random.default_rng(0)
    b = rng.normal(0.8, 0.02, 9)
    a = b + rng.normal(0.01, 0.01, 9)
    out = paired_comparison(a, b)
    assert out["p_t"] == pytest.approx(stats.ttest_rel(a, b).pvalue)
    assert out["p_wilcoxon"] == pytest.approx(stats.wilcoxon(a - b).pvalue)
    lo, hi = stats.t.interval(0.95, 8, loc=(a - b).mean(), scale=stats.sem(a - b))
    assert (out["ci_low"], out["ci_high"]) == (pytest.approx(lo), pytest.approx(hi))
    assert out["n"] == 9 and out["mean_diff"] == pytest.approx((a - b).mean())


def test_holm_by_hand():
    # sorted 0.01, 0.02, 0.04, 0.30 -> 4*0.01, 3*0.02, max(.., 2*0.04), max(.., 1*0.30)
    assert holm([0.04, 0.01, 0.30, 0.02, math.nan]) == pytest.approx(
        [0.08, 0.04, 0.30, 0.06, math.nan], nan_ok=True
    )
    assert holm([0.5, 0.6]) == [1.0, 1.0]


def test_the_mdd_is_detected_with_the_stated_power():
    """Simulate paired designs whose true difference is the MDD: the paired t-test at 5 %
    must reject in about 80 % of them."""
    rng = np.random.default_rng(1)
    n, sd = 10, 0.03
    mdd = minimum_detectable_difference(sd, n)
    diffs = rng.normal(mdd, sd, size=(4000, n))
    t = diffs.mean(1) / (diffs.std(1, ddof=1) / math.sqrt(n))
    rejected = np.mean(np.abs(t) > stats.t.ppf(0.975, n - 1))
    assert rejected == pytest.approx(0.8, abs=0.03)
    assert minimum_detectable_difference(sd, 40) < mdd / 1.9  # more units, finer design


def test_compare_to_reference_pairs_on_seed_and_snr():
    rows = []
    rng = np.random.default_rng(2)
    for seed in range(5):
        for snr in (0.0, 10.0):
            base = 0.7 + 0.01 * seed + snr / 100
            rows.append({"name": "airllm", "r_max": 8, "snr_db": snr, "seed": seed, "acc": base})
            rows.append(
                {
                    "name": "lora",
                    "r_max": 8,
                    "snr_db": snr,
                    "seed": seed,
                    "acc": base - 0.02 + rng.normal(0, 0.002),
                }
            )
    rows.append({"name": "lora", "r_max": 8, "snr_db": 20.0, "seed": 0, "acc": 0.1})  # no pair
    out = compare_to_reference(pd.DataFrame(rows), "airllm", metric="acc")
    (row,) = out.to_dict("records")
    assert row["method"] == "lora" and row["n"] == 10  # the unpaired row is left out
    assert row["mean_diff"] == pytest.approx(-0.02, abs=0.002)
    assert row["p_t"] < 1e-6 and row["p_holm"] == pytest.approx(row["p_t"])
    assert 0 < row["mdd"] < 0.005
