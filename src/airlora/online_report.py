"""The report of an online sweep: test accuracy per method and r_max, and every method
against airllm paired on seeds (same data order and SNR draws), Holm-adjusted, with the
minimum detectable difference of the design."""

from __future__ import annotations

import math
from datetime import datetime, timezone
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pandas as pd

from airlora.config import SweepConfig
from airlora.runs import REPORT_DIR, REPORT_FILE
from airlora.stats import compare_to_reference, mean_ci
from airlora.tables import comparison_frame, fmt_ci, markdown_table

REFERENCE = "airllm"


def online_summary(table: pd.DataFrame) -> pd.DataFrame:
    """One row per (r_max, method): means over seeds, the test accuracy with its 95 % CI."""
    rows = []
    for (r_max, name), g in table.groupby(["r_max", "name"], sort=True):
        acc, half = mean_ci(g["test_accuracy"])
        rows.append(
            {
                "r_max": r_max,
                "method": name,
                "seeds": len(g),
                "test_accuracy": acc,
                "test_accuracy_ci95": half,
                "params_per_step": float(g["mean_params_per_step"].mean()),
                "violation_fraction": float(g["violation_fraction"].mean()),
                "mean_rank": float(g["mean_rank"].mean()),
                # Within-group rank spread (what a refinement adds to a coarse decision).
                "group_rank_spread": float(g["group_rank_spread"].mean())
                if "group_rank_spread" in g
                else math.nan,
                "best_validation_accuracy": float(g["best_validation_accuracy"].mean()),
            }
        )
    return pd.DataFrame(rows)


def _pareto(summary: pd.DataFrame, folder: Path) -> Path:
    r_values = sorted(summary.r_max.unique())
    fig, axes = plt.subplots(1, len(r_values), figsize=(5 * len(r_values), 3.8), squeeze=False)
    for ax, r_max in zip(axes[0], r_values, strict=True):
        for _, row in summary[summary.r_max == r_max].iterrows():
            err = 0 if math.isnan(row.test_accuracy_ci95) else row.test_accuracy_ci95
            ax.errorbar(row.params_per_step, row.test_accuracy, yerr=err, fmt="o", label=row.method)
        ax.set_title(f"r_max = {r_max}")
        ax.set_xlabel("parameters sent per training step")
        ax.set_ylabel("test accuracy (95 % CI)")
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
    fig.suptitle("Online formulation: accuracy against payload (up and left is better)")
    path = folder / "online_pareto.png"
    fig.savefig(path, dpi=130, bbox_inches="tight")
    fig.savefig(path.with_suffix(".pdf"), bbox_inches="tight")
    plt.close(fig)
    return path


def write_online_report(
    sweep_dir: Path, config: SweepConfig, table: pd.DataFrame, revision: str
) -> Path:
    folder = sweep_dir / REPORT_DIR
    folder.mkdir(exist_ok=True)
    summary = online_summary(table)
    summary.to_csv(folder / "summary.csv", index=False)
    comparisons = compare_to_reference(table, REFERENCE, metric="test_accuracy", pair_on=["seed"])
    comparisons.to_csv(folder / "comparisons.csv", index=False)
    figure = _pareto(summary, folder)
    o = config.online
    lines = [
        f"# Online sweep report: {config.name}",
        "",
        f"Generated {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC from `{sweep_dir}` "
        f"({len(table)} runs). Code revision: `{revision}`.",
        "",
        f"- Model `{config.model.name_or_path}`, data `{config.data.source}`, batch "
        f"{config.data.batch_size}; {o.steps} training steps per run in episodes of "
        f"{o.episode_steps}; validation every {o.validate_every} steps, the best state scored "
        "on the test split (never used for any choice).",
        f"- Shannon cost: B {o.bandwidth_hz:g} Hz, slot {o.slot_s:g} s, {o.bits_per_param} "
        f"bits per parameter; SNR per step from {o.snr_levels_db} dB; lambda {o.cost_weight}, "
        f"penalty {o.violation_penalty}.",
        f"- r_max {config.r_max}, seeds {config.seeds} (paired: every method sees the same "
        "data order and the same SNR draws for a seed).",
        "",
    ]
    show = pd.DataFrame(
        {
            "r_max": summary.r_max,
            "method": summary.method,
            "seeds": summary.seeds,
            "test accuracy": [
                fmt_ci(m, h)
                for m, h in zip(summary.test_accuracy, summary.test_accuracy_ci95, strict=True)
            ],
            "params / step": summary.params_per_step.map(lambda v: f"{v:,.0f}"),
            "violations": summary.violation_fraction.map(lambda v: f"{v:.3f}"),
            "mean rank": summary.mean_rank.map(lambda v: f"{v:.2f}"),
            "rank spread in groups": summary.group_rank_spread.map(
                lambda v: "-" if math.isnan(v) else f"{v:.2f}"
            ),
        }
    )
    lines += ["## Per method", "", markdown_table(show), ""]
    if not comparisons.empty:
        paired = comparison_frame(comparisons)
        lines += [
            "## Paired comparisons against airllm",
            "",
            "Test accuracy of each method minus airllm's, paired on seeds, with its 95 % CI; "
            "p-values of the paired t and Wilcoxon tests, the t ones Holm-adjusted over the "
            "table; MDD: the smallest true difference this design detects with power 0.8 at 5 %.",
            "",
            markdown_table(paired),
            "",
        ]
    lines += ["## Figure", "", f"![online_pareto](report/{figure.name})", ""]
    path = sweep_dir / REPORT_FILE
    path.write_text("\n".join(lines), encoding="utf-8")
    return path
