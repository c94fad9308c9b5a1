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
