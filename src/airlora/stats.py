"""Paired comparisons of methods: the statistics every airlora report uses.

Methods are compared on matched units (the same seed: same data order, same channel draws;
the same SNR and r_max), so the differences are paired: a paired t-test and a Wilcoxon
signed-rank test on them, a 95 % confidence interval of the mean difference, the Holm
correction over every comparison of a table, and the **minimum detectable difference** of
the design: the true mean difference that the paired t-test at level alpha would detect with
the given power, from the observed spread of the differences,

    MDD = (t_{1 - alpha/2, n-1} + t_{power, n-1}) * sd(d) / sqrt(n).

A difference smaller than the MDD that is not significant is "not detectable with this
design", not "no difference".
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd
from scipy import stats


def mean_ci(values: pd.Series | np.ndarray) -> tuple[float, float]:
    """Mean and half-width of the 95 % Student-t interval (NaN half-width for n < 2)."""
    x = np.asarray(values, dtype=np.float64)
    x = x[np.isfinite(x)]
    if len(x) == 0:
        return math.nan, math.nan
    if len(x) < 2:
        return float(x.mean()), math.nan
    half = stats.t.ppf(0.975, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x))
    return float(x.mean()), float(half)


def minimum_detectable_difference(
    sd_diff: float, n: int, alpha: float = 0.05, power: float = 0.8
) -> float:
    """The mean paired difference a two-sided paired t-test detects with ``power``."""
    if n < 2 or not math.isfinite(sd_diff):
        return math.nan
    df = n - 1
    return float((stats.t.ppf(1 - alpha / 2, df) + stats.t.ppf(power, df)) * sd_diff / math.sqrt(n))


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjustment (family-wise error); NaN p-values stay NaN and do not
    count towards the family size."""
    p = np.asarray(p_values, dtype=np.float64)
    out = np.full(p.shape, np.nan)
    valid = np.flatnonzero(np.isfinite(p))
    m = len(valid)
    running = 0.0
    for rank, i in enumerate(valid[np.argsort(p[valid], kind="stable")]):
        running = max(running, min(1.0, (m - rank) * p[i]))
        out[i] = running
    return out.tolist()


def paired_comparison(
    a: Sequence[float], b: Sequence[float], alpha: float = 0.05, power: float = 0.8
) -> dict:
    """Mean of ``a - b`` over matched units with its CI, both tests and the design's MDD."""
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    n = len(d)
    out = {"n": n, "mean_diff": float(d.mean()) if n else math.nan}
    sd = float(d.std(ddof=1)) if n > 1 else math.nan
    half = float(stats.t.ppf(1 - alpha / 2, n - 1) * sd / math.sqrt(n)) if n > 1 else math.nan
    out.update(ci_low=out["mean_diff"] - half, ci_high=out["mean_diff"] + half, sd_diff=sd)
    if n > 1 and sd > 0:
        out["p_t"] = float(stats.ttest_rel(a, b).pvalue)
    else:  # no spread: the t statistic is undefined
        out["p_t"] = math.nan
    nonzero = d[d != 0]
    out["p_wilcoxon"] = float(stats.wilcoxon(nonzero).pvalue) if len(nonzero) > 0 else math.nan
    out["mdd"] = minimum_detectable_difference(sd, n, alpha, power)
    return out


def compare_to_reference(
    table: pd.DataFrame,
    reference: str,
    metric: str = "final_accuracy",
    group: Sequence[str] = ("r_max",),
    pair_on: Sequence[str] = ("snr_db", "seed"),
    name: str = "name",
) -> pd.DataFrame:
    """Every method against ``reference`` within each ``group``, paired on ``pair_on``
    (rows without a partner are left out), Holm-adjusted over the whole table. Differences
    are method minus reference."""
    rows = []
    for keys, g in table.groupby(list(group), sort=True):
        keys = keys if isinstance(keys, tuple) else (keys,)
        ref = g[g[name] == reference].set_index(list(pair_on))[metric]
        for method, m in g[g[name] != reference].groupby(name, sort=True):
            joined = (
                m.set_index(list(pair_on))[metric]
                .to_frame("x")
                .join(ref.to_frame("ref"), how="inner")
                .dropna()
            )
            result = paired_comparison(joined["x"], joined["ref"])
            rows.append({**dict(zip(group, keys, strict=True)), "method": method, **result})
    out = pd.DataFrame(rows)
    if not out.empty:
        out["p_holm"] = holm(out["p_t"].tolist())
    return out
