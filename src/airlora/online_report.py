"""The report of an online sweep: test accuracy per method and r_max, and every method
against airllm paired on seeds (same data order and SNR draws), Holm-adjusted, with the
minimum detectable difference of the design."""

from __future__ import annotations

import math
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.axes import Axes

from airlora.config import SweepConfig
from airlora.report import _legend, _per_rmax_axes, _save, _title, tuning_lines, tuning_table
from airlora.runs import METRICS_FILE, REPORT_DIR, REPORT_FILE
from airlora.stats import compare_to_reference, mean_ci
from airlora.sweep.store import cell_records
from airlora.tables import comparison_frame, fmt_ci, markdown_table

REFERENCE = "airllm"


def steps_to_fraction(returns: list[float], episode_steps: int, fraction: float = 0.95) -> float:
    """Training steps until an episode return first covers ``fraction`` of the way from the
    first episode's return to the final one (the mean of the last two episodes); NaN when
    the final return is no better than the first."""
    if len(returns) < 2:
        return math.nan
    first, final = returns[0], float(np.mean(returns[-2:]))
    if final <= first:
        return math.nan
    threshold = first + fraction * (final - first)
    reached = next(i for i, r in enumerate(returns) if r >= threshold or i == len(returns) - 1)
    return float((reached + 1) * episode_steps)


def step_logs(sweep_dir: Path, table: pd.DataFrame) -> dict[str, list[dict]]:
    """Every cell's step log (metrics.jsonl), read once for the curves and the ranks."""
    return {cell: cell_records(sweep_dir, cell, METRICS_FILE) for cell in table["cell"]}


def online_curves(
    table: pd.DataFrame, logs: dict[str, list[dict]], episode_steps: int
) -> pd.DataFrame:
    """Per cell and episode window: the return at the window's last step."""
    rows = []
    for cell in table.itertuples():
        steps = logs[cell.cell]
        for start in range(0, len(steps), episode_steps):
            window = steps[start : start + episode_steps]
            rows.append(
                {
                    "cell": cell.cell,
                    "name": cell.name,
                    "r_max": cell.r_max,
                    "seed": cell.seed,
                    "step": start + len(window),
                    "episode_return": float(sum(r["reward"] for r in window)),
                }
            )
    return pd.DataFrame(rows)


def rank_by_snr(table: pd.DataFrame, logs: dict[str, list[dict]]) -> pd.DataFrame:
    """Mean executed rank per (r_max, method, SNR level) over the second half of every run:
    whether a policy reads the channel."""
    rows = []
    for cell in table.itertuples():
        steps = logs[cell.cell]
        for r in steps[len(steps) // 2 :]:
            rows.append(
                {
                    "r_max": cell.r_max,
                    "name": cell.name,
                    "snr_db": r["snr_db"],
                    "mean_rank": float(np.mean(r["rank_vector"])),
                }
            )
    frame = pd.DataFrame(rows)
    if frame.empty:
        return frame
    return frame.groupby(["r_max", "name", "snr_db"], as_index=False)["mean_rank"].mean()


def online_summary(table: pd.DataFrame, curves: pd.DataFrame | None = None) -> pd.DataFrame:
    """One row per (r_max, method): means over seeds, the test accuracy with its 95 % CI,
    and the median over seeds of the steps to 95 % of the final episode return."""
    to_95: dict[str, float] = {}
    if curves is not None and not curves.empty:
        window = int(curves.groupby("cell").step.min().max())
        for cell, g in curves.groupby("cell"):
            to_95[cell] = steps_to_fraction(g.sort_values("step").episode_return.tolist(), window)
    rows = []
    for (r_max, name), g in table.groupby(["r_max", "name"], sort=True):
        acc, half = mean_ci(g["test_accuracy"])
        reach = [to_95.get(c, math.nan) for c in g["cell"]]
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
                "projected_fraction": float(g["projected_fraction"].mean())
                if "projected_fraction" in g
                else 0.0,
                "steps_to_95": float(np.nanmedian(reach)) if np.isfinite(reach).any() else math.nan,
            }
        )
        if {"edge_test_accuracy", "erased_fraction"} <= set(g):  # a simulated link
            edge, edge_half = mean_ci(g["edge_test_accuracy"])
            rows[-1].update(
                edge_test_accuracy=edge,
                edge_test_accuracy_ci95=edge_half,
                erased_fraction=float(g["erased_fraction"].mean()),
            )
    return pd.DataFrame(rows)


def _with_ci(summary: pd.DataFrame, column: str) -> list[str]:
    """``column`` formatted with its 95 % CI (the ``{column}_ci95`` column)."""
    return [fmt_ci(m, h) for m, h in zip(summary[column], summary[f"{column}_ci95"], strict=True)]


def _per_rmax_figure(
    frame: pd.DataFrame,
    folder: Path,
    stem: str,
    title: str,
    draw: Callable[[Axes, pd.DataFrame], None],
) -> Path:
    """One panel per r_max, drawn by ``draw``; saved as PNG and PDF (the PNG is returned)."""
    r_values = sorted(frame.r_max.unique())
    fig, axes = _per_rmax_axes(r_values)
    for ax, r_max in zip(axes[0], r_values, strict=True):
        draw(ax, frame[frame.r_max == r_max])
        ax.set_title(f"r_max = {r_max}")
        ax.grid(alpha=0.3)
    _legend(axes[0][-1])
    _title(fig, title)
    return _save(fig, folder, stem)[0]


def _pareto(summary: pd.DataFrame, folder: Path) -> Path:
    def draw(ax: Axes, panel: pd.DataFrame) -> None:
        for row in panel.itertuples():
            err = 0 if math.isnan(row.test_accuracy_ci95) else row.test_accuracy_ci95
            ax.errorbar(row.params_per_step, row.test_accuracy, yerr=err, fmt="o", label=row.method)
        ax.set_xlabel("parameters sent per training step")
        ax.set_ylabel("test accuracy (95 % CI)")

    title = "Online formulation: accuracy against payload (up and left is better)"
    return _per_rmax_figure(summary, folder, "online_pareto", title, draw)


def _learning_curves(curves: pd.DataFrame, folder: Path) -> Path:
    def draw(ax: Axes, panel: pd.DataFrame) -> None:
        for name, g in panel.groupby("name", sort=True):
            mean = g.groupby("step").episode_return.mean()
            ax.plot(mean.index, mean.values, marker=".", label=name)
        ax.set_xlabel("training step")
        ax.set_ylabel("episode return (mean over seeds)")

    title = "Online formulation: episode return during the run"
    return _per_rmax_figure(curves, folder, "online_returns", title, draw)


def _ranks_by_snr(ranks: pd.DataFrame, folder: Path) -> Path:
    def draw(ax: Axes, panel: pd.DataFrame) -> None:
        for name, g in panel.groupby("name", sort=True):
            ax.plot(g.snr_db, g.mean_rank, marker="o", label=name)
        ax.set_xlabel("SNR of the step (dB)")
        ax.set_ylabel("mean executed rank (second half of the run)")
        ax.set_yscale("log", base=2)

    return _per_rmax_figure(
        ranks, folder, "online_rank_by_snr", "Does the rank follow the channel?", draw
    )


def tuning_curves(tuning: pd.DataFrame, folder: Path, stem: str = "online_tuning") -> Path:
    """The validation accuracy of each method against the learning rate, per r_max."""

    def draw(ax: Axes, panel: pd.DataFrame) -> None:
        for name, g in panel.groupby("name", sort=True):
            g = g.sort_values("learning_rate")
            (line,) = ax.plot(g.learning_rate, g.validation_accuracy, marker=".", label=name)
            chosen = g[g.chosen]
            ax.scatter(
                chosen.learning_rate,
                chosen.validation_accuracy,
                s=80,
                facecolors="none",
                edgecolors=line.get_color(),
            )
        ax.set_xscale("log")
        rates = sorted(panel.learning_rate.unique())
        ax.set_xticks(rates, [f"{v:g}" for v in rates])
        ax.minorticks_off()
        ax.set_xlabel("learning rate (circled: the rate the evaluation runs used)")
        ax.set_ylabel("validation accuracy (tuning seeds)")

    title = "Learning-rate tuning: the same grid for every method, scored on validation"
    return _per_rmax_figure(tuning, folder, stem, title, draw)


def _cost_line(config: SweepConfig) -> str:
    o, link = config.online, config.link
    if link.scheme == "shannon":
        return (
            f"- Shannon cost: B {o.bandwidth_hz:g} Hz, slot {o.slot_s:g} s, {o.bits_per_param} "
            "bits per parameter"
        )
    if link.scheme == "analog":
        carried = "analog, two parameters per symbol"
    elif link.scheme == "coded":
        carried = (
            f"LDPC-coded {link.modulation}, rate {link.code_rate:g}, {link.packet_bits}-bit "
            f"codewords, {link.quant_bits}-bit parameters"
        )
    else:
        carried = (
            f"{link.modulation} modulation, {link.packet_bits}-bit packets with CRC, "
            f"{link.quant_bits}-bit parameters"
        )
    return (
        f"- Cost: airtime on the simulated {link.scheme} link ({carried}, {link.channel} "
        f"channel) at {o.bandwidth_hz:g} symbols/s against a {o.slot_s:g} s slot; each trained "
        "step's adapter travels over it to the edge, whose last copy is scored on the test split"
    )


def write_online_report(
    sweep_dir: Path, config: SweepConfig, table: pd.DataFrame, revision: str
) -> Path:
    folder = sweep_dir / REPORT_DIR
    folder.mkdir(exist_ok=True)
    o = config.online
    logs = step_logs(sweep_dir, table)
    curves = online_curves(table, logs, o.episode_steps)
    ranks = rank_by_snr(table, logs)
    summary = online_summary(table, curves)
    summary.to_csv(folder / "summary.csv", index=False)
    ranks.to_csv(folder / "rank_by_snr.csv", index=False)
    comparisons = compare_to_reference(table, REFERENCE, metric="test_accuracy", pair_on=["seed"])
    comparisons.to_csv(folder / "comparisons.csv", index=False)
    figures = [_pareto(summary, folder)]
    if not curves.empty:
        figures += [_learning_curves(curves, folder), _ranks_by_snr(ranks, folder)]
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
        _cost_line(config) + f"; SNR per step from {o.snr_levels_db} dB; lambda {o.cost_weight}, "
        f"penalty {o.violation_penalty}; an overflowing rank vector is "
        + ("scaled down until it fits (projection)" if o.constraint == "project" else "not sent")
        + f"; learned policies pick ranks from the {o.rank_levels} levels; AdaLoRA's budget: "
        f"{o.adalora_budget}.",
        f"- r_max {config.r_max}, seeds {config.seeds} (paired: every method sees the same "
        "data order and the same SNR draws for a seed).",
        "",
    ]
    show = pd.DataFrame(
        {
            "r_max": summary.r_max,
            "method": summary.method,
            "seeds": summary.seeds,
            "test accuracy": _with_ci(summary, "test_accuracy"),
            "params / step": summary.params_per_step.map(lambda v: f"{v:,.0f}"),
            "violations": summary.violation_fraction.map(lambda v: f"{v:.3f}"),
            "projected": summary.projected_fraction.map(lambda v: f"{v:.3f}"),
            "steps to 95 %": summary.steps_to_95.map(
                lambda v: "-" if math.isnan(v) else f"{v:.0f}"
            ),
            "mean rank": summary.mean_rank.map(lambda v: f"{v:.2f}"),
            "rank spread in groups": summary.group_rank_spread.map(
                lambda v: "-" if math.isnan(v) else f"{v:.2f}"
            ),
        }
    )
    if "edge_test_accuracy" in summary:
        show.insert(4, "edge test accuracy", _with_ci(summary, "edge_test_accuracy"))
        show.insert(5, "erased", summary.erased_fraction.map(lambda v: f"{v:.3f}"))
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
    tuning = tuning_table(sweep_dir, table)
    if not tuning.empty:
        tuning.to_csv(folder / "tuning.csv", index=False)
        figures.append(tuning_curves(tuning, folder))
        lines += tuning_lines(tuning, config)
    lines += [
        "Steps to 95 %: the median over seeds of the training steps until an episode return "
        "first covers 95 % of the way from the first episode's return to the final one.",
        "",
        "## Figures",
        "",
        *[f"![{f.stem}](report/{f.name})" for f in figures],
        "",
    ]
    path = sweep_dir / REPORT_FILE
    path.write_text("\n".join(lines), encoding="utf-8")
    return path
