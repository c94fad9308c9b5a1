"""Number and Markdown formatting shared by the reports (round and online sweeps)."""

from __future__ import annotations

import math

import pandas as pd


def fmt_ci(mean: float, half: float, digits: int = 4) -> str:
    if math.isnan(mean):
        return "-"
    if math.isnan(half):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {half:.{digits}f}"


def fmt_p(v: float) -> str:
    return "-" if math.isnan(v) else f"{v:.3g}"


def markdown_table(df: pd.DataFrame) -> str:
    head = "| " + " | ".join(df.columns) + " |\n| " + " | ".join("---" for _ in df.columns) + " |\n"
    body = "".join("| " + " | ".join(str(v) for v in row) + " |\n" for row in df.to_numpy())
    return head + body


def comparison_frame(comparisons: pd.DataFrame) -> pd.DataFrame:
    """The display columns of a :func:`~airlora.stats.compare_to_reference` table."""
    diff = [
        f"{d:+.4f} [{lo:+.4f}, {hi:+.4f}]"
        for d, lo, hi in zip(
            comparisons.mean_diff, comparisons.ci_low, comparisons.ci_high, strict=True
        )
    ]
    return pd.DataFrame(
        {
            "r_max": comparisons.r_max,
            "method": comparisons.method,
            "pairs": comparisons.n,
            "diff vs airllm": diff,
            "p (t)": comparisons.p_t.map(fmt_p),
            "p (Wilcoxon)": comparisons.p_wilcoxon.map(fmt_p),
            "p Holm": comparisons.p_holm.map(fmt_p),
            "MDD": comparisons.mdd.map(lambda v: "-" if math.isnan(v) else f"{v:.4f}"),
        }
    )
