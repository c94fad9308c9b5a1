"""`airlora report SWEEP_DIR`: figures (PNG and PDF) and a Markdown report of a sweep.

Figures: final edge accuracy against SNR per method; payload (parameters per round, and
airtime per episode) against SNR; accuracy against payload (the Pareto view); policy training
reward against environment steps with 95 % bands over seeds; the rank vectors chosen round by
round (projection x round) at the lowest and highest SNR. Tables: mean +- 95 % confidence
interval over seeds (Student t) and a Welch t-test of each method against airllm on the final
accuracy. The report states the configuration, the seeds and the code revision.
"""

from __future__ import annotations

import json
import math
from datetime import datetime, timezone
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from airlora.config import SweepConfig, load_config
from airlora.runs import (
    EPISODES_FILE,
    METRICS_FILE,
    REPORT_DIR,
    REPORT_FILE,
    RESULT_FILE,
    SWEEP_FILE,
)
from airlora.stats import compare_to_reference, mean_ci, paired_comparison
from airlora.sweep.cells import tuning_score
from airlora.sweep.planning import parse_cell_id, tuning_snr_db
from airlora.sweep.store import CELLS, cell_records, finished_cells, first_manifest, read_results
from airlora.tables import comparison_frame, fmt_ci, markdown_table

REFERENCE = "airllm"


def paired_p(mine: pd.DataFrame, ref: pd.DataFrame, metric: str = "final_accuracy") -> float:
    """Paired t-test p-value of a method against the reference on the seeds they share
    (same data order and channel draws); NaN with fewer than two pairs or no spread."""
    joined = (
        mine.set_index("seed")[metric]
        .to_frame("x")
        .join(ref.set_index("seed")[metric].to_frame("ref"), how="inner")
        .dropna()
    )
    return paired_comparison(joined["x"], joined["ref"])["p_t"]


def _usable(table: pd.DataFrame) -> pd.DataFrame:
    """The results with a boolean ``diverged`` column (tables of older sweeps lack it)."""
    table = table.copy()
    if "diverged" not in table:
        table["diverged"] = False
    table["diverged"] = table["diverged"].fillna(False).astype(bool)
    return table


def scored_metric(table: pd.DataFrame) -> str:
    """The accuracy methods are compared on: ``test_accuracy`` (the edge's final model on the
    test split), or ``final_accuracy`` (its last round on the edge's validation rows) for a
    sweep from before round episodes scored the test split."""
    usable = _usable(table)
    usable = usable[~usable.diverged]
    if "test_accuracy" in usable and len(usable) and usable["test_accuracy"].notna().all():
        return "test_accuracy"
    return "final_accuracy"


def summary_table(table: pd.DataFrame) -> pd.DataFrame:
    """One row per (r_max, SNR, method): means and CIs over seeds, p-value against airllm on
    the :func:`scored_metric`.

    Diverged episodes have no accuracy: they are counted in ``diverged`` and left out of
    every mean, never averaged in as numbers."""
    rows = []
    table = _usable(table)
    metric = scored_metric(table)
    for (r_max, snr, name), g_all in table.groupby(["r_max", "snr_db", "name"], sort=True):
        g = g_all[~g_all.diverged]
        acc, acc_ci = mean_ci(g[metric])
        edge, edge_ci = mean_ci(g["final_accuracy"])
        ref = table[
            (table.r_max == r_max)
            & (table.snr_db == snr)
            & (table.name == REFERENCE)
            & ~table.diverged
        ]
        rows.append(
            {
                "r_max": r_max,
                "snr_db": snr,
                "method": name,
                "seeds": len(g),
                "diverged": int(g_all.diverged.sum()),
                "scored_metric": metric,
                "accuracy": acc,
                "accuracy_ci95": acc_ci,
                "final_accuracy": edge,
                "final_accuracy_ci95": edge_ci,
                "mean_accuracy": float(g["mean_accuracy"].mean()),
                "payload_params_per_round": float(g["mean_payload_params"].mean()),
                "airtime_s_per_episode": float(g["total_airtime_s"].mean()),
                "mean_rank": float(g["mean_rank"].mean()),
                "episode_return": float(g["episode_return"].mean()),
                "p_vs_airllm": (
                    math.nan if name == REFERENCE or ref.empty else paired_p(g, ref, metric)
                ),
            }
        )
    return pd.DataFrame(rows)


def tuning_table(sweep_dir: Path, table: pd.DataFrame) -> pd.DataFrame:
    """The tuning runs: mean validation accuracy per (r_max, method, learning rate), and the
    rate the evaluation runs of that (r_max, method) used (``chosen``)."""
    records = [
        json.loads(p.read_text(encoding="utf-8"))
        for p in sorted((Path(sweep_dir) / CELLS).glob(f"tune-*/{RESULT_FILE}"))
    ]
    if not records:
        return pd.DataFrame()
    frame = pd.DataFrame(records)
    frame["tuning_score"] = [tuning_score(r) for r in records]
    out = (
        frame.groupby(["r_max", "name", "learning_rate"])
        .agg(runs=("seed", "size"), validation_accuracy=("tuning_score", "mean"))
        .reset_index()
    )
    used = table.groupby(["r_max", "name"]).learning_rate.first().to_dict()
    out["chosen"] = [
        used.get((r, n)) == lr
        for r, n, lr in zip(out.r_max, out.name, out.learning_rate, strict=True)
    ]
    return out


def tuning_lines(tuning: pd.DataFrame, config: SweepConfig) -> list[str]:
    """The report's learning-rate tuning section (a :func:`tuning_table`)."""
    assert config.tuning is not None
    show = pd.DataFrame(
        {
            "r_max": tuning.r_max,
            "method": tuning.name,
            "learning rate": tuning.learning_rate.map(lambda v: f"{v:g}"),
            "tuning runs": tuning.runs,
            "validation accuracy": tuning.validation_accuracy.map(
                lambda v: f"{v:.4f}" if math.isfinite(v) else "diverged"
            ),
            "chosen": tuning.chosen.map(lambda v: "yes" if v else ""),
        }
    )
    where = (
        ""
        if config.formulation == "online"
        else f" (one episode at {tuning_snr_db(config):g} dB, the median SNR)"
    )
    return [
        "## Learning-rate tuning",
        "",
        f"Every method ran the same grid ({config.tuning.learning_rates}) on tuning seeds "
        f"{config.tuning.seeds}{where}, not evaluation seeds; the rate with the best mean "
        "validation accuracy is the one its evaluation runs used. No test row took part.",
        "",
        markdown_table(show),
        "",
    ]


# ----------------------------------------------------------------------------- figures


def _title(fig, text: str) -> None:
    fig.suptitle(text, y=1.03)  # above the subplot titles, not on them


def _legend(ax) -> None:
    """Outside the plot, on the right: with ten methods a legend inside hides data points."""
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)


def _save(fig, folder: Path, stem: str) -> list[Path]:
    paths = [folder / f"{stem}.png", folder / f"{stem}.pdf"]
    for p in paths:
        fig.savefig(p, dpi=130, bbox_inches="tight")
    plt.close(fig)
    return paths


def _per_rmax_axes(r_values: list[int], rows: int = 1, height: float = 3.6):
    fig, axes = plt.subplots(
        rows, len(r_values), figsize=(5.2 * len(r_values), height * rows), squeeze=False
    )
    return fig, axes


_ACCURACY_LABEL = {
    "test_accuracy": "test accuracy (edge's final model)",
    "final_accuracy": "final edge accuracy (edge validation rows)",
}


def plot_vs_snr(summary: pd.DataFrame, folder: Path) -> list[Path]:
    r_values = sorted(summary.r_max.unique())
    fig, axes = _per_rmax_axes(r_values)
    for ax, r_max in zip(axes[0], r_values, strict=True):
        sub = summary[summary.r_max == r_max]
        for name, g in sub.groupby("method"):
            err = np.nan_to_num(g.accuracy_ci95.to_numpy())
            ax.errorbar(g.snr_db, g.accuracy, yerr=err, marker="o", capsize=3, label=name)
        ax.set_title(f"r_max = {r_max}")
        ax.set_xlabel("SNR (Es/N0), dB")
        ax.set_ylabel(_ACCURACY_LABEL[summary.scored_metric.iloc[0]])
        ax.grid(alpha=0.3)
    _legend(axes[0][-1])
    _title(fig, "Accuracy of the edge's final model (mean, 95 % CI over seeds)")
    return _save(fig, folder, "accuracy_vs_snr")


def plot_payload(summary: pd.DataFrame, folder: Path) -> list[Path]:
    r_values = sorted(summary.r_max.unique())
    fig, axes = _per_rmax_axes(r_values, rows=2, height=3.2)
    for col, r_max in enumerate(r_values):
        sub = summary[summary.r_max == r_max]
        for name, g in sub.groupby("method"):
            axes[0][col].plot(g.snr_db, g.payload_params_per_round, marker="o", label=name)
            axes[1][col].plot(g.snr_db, g.airtime_s_per_episode, marker="o", label=name)
        axes[0][col].set_title(f"r_max = {r_max}")
        axes[0][col].set_ylabel("parameters sent per round")
        axes[1][col].set_ylabel("airtime per episode, s")
        axes[1][col].set_xlabel("SNR (Es/N0), dB")
        for ax in (axes[0][col], axes[1][col]):
            ax.grid(alpha=0.3)
    _legend(axes[0][-1])
    _title(fig, "What each method sends")
    return _save(fig, folder, "payload_vs_snr")


def plot_pareto(summary: pd.DataFrame, folder: Path) -> list[Path]:
    r_values = sorted(summary.r_max.unique())
    fig, axes = _per_rmax_axes(r_values)
    for ax, r_max in zip(axes[0], r_values, strict=True):
        sub = summary[summary.r_max == r_max]
        for name, g in sub.groupby("method"):
            ax.scatter(g.payload_params_per_round, g.accuracy, label=name, s=28)
            for _, row in g.iterrows():
                ax.annotate(
                    f"{row.snr_db:g}",
                    (row.payload_params_per_round, row.accuracy),
                    fontsize=6,
                    xytext=(2, 2),
                    textcoords="offset points",
                )
        ax.set_title(f"r_max = {r_max} (labels: SNR dB)")
        ax.set_xlabel("parameters sent per round")
        ax.set_ylabel(_ACCURACY_LABEL[summary.scored_metric.iloc[0]])
        ax.grid(alpha=0.3)
    _legend(axes[0][-1])
    _title(fig, "Accuracy against payload (up and left is better)")
    return _save(fig, folder, "pareto")


def training_curves(sweep_dir: Path, bins: int = 40) -> pd.DataFrame:
    """Episode return against environment steps for every policy cell, on a common grid."""
    rows = []
    for cell in finished_cells(sweep_dir, "policy"):
        eps = pd.DataFrame(cell_records(sweep_dir, cell, EPISODES_FILE))
        if eps.empty:
            continue
        parts = parse_cell_id(cell)
        name, r_max, seed = parts["name"], parts["r_max"], parts["seed"]
        edges = np.linspace(0, eps.steps.max(), bins + 1)
        idx = np.clip(np.digitize(eps.steps, edges[1:-1]), 0, bins - 1)
        for b in range(bins):
            vals = eps["return"][idx == b]
            if len(vals):
                rows.append(
                    {
                        "name": name,
                        "r_max": r_max,
                        "seed": seed,
                        "steps": float(edges[b + 1]),
                        "return": float(vals.mean()),
                    }
                )
    return pd.DataFrame(rows)


def plot_convergence(curves: pd.DataFrame, folder: Path) -> list[Path]:
    if curves.empty:
        return []
    r_values = sorted(curves.r_max.unique())
    fig, axes = _per_rmax_axes(r_values)
    for ax, r_max in zip(axes[0], r_values, strict=True):
        sub = curves[curves.r_max == r_max]
        for name, g in sub.groupby("name"):
            stats_ = g.groupby("steps")["return"].agg(list)
            steps = stats_.index.to_numpy()
            means, halves = zip(*(mean_ci(v) for v in stats_), strict=True)
            means, halves = np.asarray(means), np.nan_to_num(np.asarray(halves))
            ax.plot(steps, means, label=name)
            ax.fill_between(steps, means - halves, means + halves, alpha=0.2)
        ax.set_title(f"r_max = {r_max}")
        ax.set_xlabel("environment steps (surrogate)")
        ax.set_ylabel("episode return")
        ax.grid(alpha=0.3)
    _legend(axes[0][-1])
    _title(fig, "Policy training: episode return (mean, 95 % band over seeds)")
    return _save(fig, folder, "convergence")


def rank_heatmaps(sweep_dir: Path, table: pd.DataFrame, folder: Path) -> list[Path]:
    """Ranks per projection and round at the lowest and highest SNR (first seed and r_max)."""
    names = [n for n in (REFERENCE, "ppo", "heuristic") if n in set(table.name)]
    if not names:
        names = [sorted(table.name)[0]]
    name = names[0]
    r_max = sorted(table.r_max.unique())[0]
    seed = sorted(table.seed.unique())[0]
    snrs = sorted(table.snr_db.unique())
    picks = [snrs[0], snrs[-1]] if len(snrs) > 1 else snrs
    fig, axes = plt.subplots(1, len(picks), figsize=(5.5 * len(picks), 5.5), squeeze=False)
    for ax, snr in zip(axes[0], picks, strict=True):
        cell = table[
            (table.name == name)
            & (table.r_max == r_max)
            & (table.snr_db == snr)
            & (table.seed == seed)
        ].cell.iloc[0]
        rounds = cell_records(sweep_dir, cell, METRICS_FILE)
        ranks = np.asarray([r["rank_vector"] for r in rounds]).T
        im = ax.imshow(ranks, aspect="auto", cmap="viridis", vmin=0, vmax=r_max)
        ax.set_title(f"{name}, SNR {snr:g} dB")
        ax.set_xlabel("round")
        ax.set_ylabel("projection (layer-major: q k v o per layer)")
        ax.set_xticks(range(ranks.shape[1]), [str(i + 1) for i in range(ranks.shape[1])])
        fig.colorbar(im, ax=ax, label="rank")
    _title(fig, f"Rank vectors round by round (r_max {r_max}, seed {seed})")
    return _save(fig, folder, "rank_heatmap")


# ----------------------------------------------------------------------------- the report


def _code_revision(sweep_dir: Path) -> str:
    rev = first_manifest(sweep_dir).get("code_revision", {})
    dirty = " (uncommitted changes)" if rev.get("dirty") else ""
    return f"{rev.get('commit', 'unknown')}{dirty}"


_ACCURACY_TEXT = {
    "test_accuracy": "Test accuracy: the edge's final model scored on the test split, which "
    "nothing was fitted, tuned or selected on",
    "final_accuracy": "Final accuracy: the edge's accuracy after the last round, on its "
    "validation rows (this sweep predates test-split scoring of round episodes)",
}


def _comparison_lines(comparisons: pd.DataFrame, metric: str) -> list[str]:
    if comparisons.empty:
        return []
    show = comparison_frame(comparisons)
    what = "Test" if metric == "test_accuracy" else "Final"
    return [
        "## Paired comparisons against airllm",
        "",
        f"{what} accuracy of each method minus airllm's, paired on (SNR, seed), with its 95 % "
        "CI; paired t and Wilcoxon signed-rank p-values, the t p-values Holm-adjusted over "
        "this table; MDD: the smallest true difference this design detects with power 0.8 at "
        "5 %. A difference below its MDD that is not significant is not detectable here.",
        "",
        markdown_table(show),
        "",
    ]


def write_report(sweep_dir: Path) -> Path:
    """Figures under ``SWEEP_DIR/report/`` and ``report.md``; returns the Markdown path."""
    sweep_dir = Path(sweep_dir)
    if not (sweep_dir / SWEEP_FILE).is_file():
        raise FileNotFoundError(f"{sweep_dir} is not a sweep folder (no {SWEEP_FILE})")
    config = load_config(sweep_dir / SWEEP_FILE, SweepConfig)
    table = read_results(sweep_dir)
    if table.empty:
        raise ValueError(f"{sweep_dir} has no finished evaluation cell yet")
    if config.formulation == "online":
        from airlora.online_report import write_online_report

        return write_online_report(sweep_dir, config, table, _code_revision(sweep_dir))
    folder = sweep_dir / REPORT_DIR
    folder.mkdir(exist_ok=True)
    summary = summary_table(table)
    summary.to_csv(folder / "summary.csv", index=False)
    metric = scored_metric(table)
    curves = training_curves(sweep_dir)
    figures = [
        *plot_vs_snr(summary, folder),
        *plot_payload(summary, folder),
        *plot_pareto(summary, folder),
        *plot_convergence(curves, folder),
        *rank_heatmaps(sweep_dir, table, folder),
    ]

    lines = [
        f"# Sweep report: {config.name}",
        "",
        f"Generated {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC from `{sweep_dir}` "
        f"({len(table)} evaluation cells). Code revision: `{_code_revision(sweep_dir)}`.",
        "",
        f"- Model `{config.model.name_or_path}`, data `{config.data.source}`, episode "
        f"{config.train.rounds} rounds x {config.train.steps_per_round} steps of batch "
        f"{config.data.batch_size}; edge evaluation on {config.data.edge_eval_size} rows.",
        f"- Link: {config.link.scheme}, modulation {config.link.modulation}, packets of "
        f"{config.link.packet_bits} bits, CRC {'on' if config.link.crc_check else 'off'}, "
        f"deadline {config.link.deadline_s} s at {config.link.bandwidth_hz:g} Hz; fixed SNR "
        f"per evaluation cell; reward lambda {config.env.cost_weight}.",
        f"- r_max {config.r_max}, SNR {config.snr_db} dB, seeds {config.seeds}; policies "
        f"trained {config.total_steps} steps on a surrogate fitted to "
        + (
            f"the given log `{config.surrogate.rounds_file}` (the same for every seed)."
            if config.surrogate.rounds_file is not None
            else f"{config.surrogate.real_episodes} logged real episodes per (r_max, seed)."
        ),
        f"- {_ACCURACY_TEXT[metric]} (mean ± 95 % CI over seeds); p: paired t-test against "
        "airllm on the seeds both ran (same data order, same channel draws), unadjusted; the "
        "paired comparisons below are Holm-adjusted and state the minimum detectable "
        "difference (MDD, power 0.8 at 5 %).",
        f"- Diverged episodes (non-finite loss or parameters; left out of every mean and "
        f"test, counted in the `diverged` column): {int(summary.diverged.sum())}.",
        "",
    ]
    for r_max in sorted(summary.r_max.unique()):
        lines += [f"## r_max = {r_max}", ""]
        sub = summary[summary.r_max == r_max]
        columns = {"accuracy": "test accuracy" if metric == "test_accuracy" else "final accuracy"}
        if metric == "test_accuracy":
            columns["final_accuracy"] = "edge accuracy, last round"
        show = pd.DataFrame(
            {
                "SNR dB": sub.snr_db.map(lambda v: f"{v:g}"),
                "method": sub.method,
                **{
                    label: [fmt_ci(m, h) for m, h in zip(sub[col], sub[f"{col}_ci95"], strict=True)]
                    for col, label in columns.items()
                },
                "params / round": sub.payload_params_per_round.map(lambda v: f"{v:,.0f}"),
                "airtime / episode s": sub.airtime_s_per_episode.map(lambda v: f"{v:.3f}"),
                "mean rank": sub.mean_rank.map(lambda v: f"{v:.2f}"),
                "p vs airllm": sub.p_vs_airllm.map(lambda v: "-" if math.isnan(v) else f"{v:.3f}"),
            }
        )
        if summary.diverged.any():
            show["diverged"] = sub.diverged.to_numpy()
        lines += [markdown_table(show), ""]
    usable = _usable(table)
    comparisons = compare_to_reference(usable[~usable.diverged], REFERENCE, metric)
    comparisons.to_csv(folder / "comparisons.csv", index=False)
    lines += _comparison_lines(comparisons, metric)
    tuning = tuning_table(sweep_dir, table)
    if not tuning.empty:
        from airlora.online_report import tuning_curves

        tuning.to_csv(folder / "tuning.csv", index=False)
        lines += tuning_lines(tuning, config)
        figures.append(tuning_curves(tuning, folder, "tuning"))
    overhead = table.groupby("name")[
        ["mean_decision_time_s", "mean_train_time_s", "mean_latency_s"]
    ].mean()
    lines += [
        "## Compute and latency per round",
        "",
        "Decision: the method's compute to pick the ranks; latency: decision + server "
        "training + airtime.",
        "",
        markdown_table(
            pd.DataFrame(
                {
                    "method": overhead.index,
                    "decision ms": (overhead.mean_decision_time_s * 1e3).map(lambda v: f"{v:.2f}"),
                    "training s": overhead.mean_train_time_s.map(lambda v: f"{v:.2f}"),
                    "latency s": overhead.mean_latency_s.map(lambda v: f"{v:.2f}"),
                }
            )
        ),
        "",
        "## Figures",
        "",
    ]
    for fig in figures:
        if fig.suffix == ".png":
            lines.append(f"![{fig.stem}](report/{fig.name})")
            lines.append("")
    path = sweep_dir / REPORT_FILE
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def headline(sweep_dir: Path) -> pd.DataFrame:
    """Per method over every cell, with display column names: the mean final accuracy and
    parameters per round (the demo's print; and the test accuracy of sweeps that scored
    it); for an online sweep, the test accuracy,
    parameters per step and mean reward per step."""
    table = _usable(read_results(sweep_dir))
    table = table[~table.diverged]
    if "violation_fraction" in table:  # an online sweep
        out = table.groupby("name").agg(
            **{
                "test accuracy": ("test_accuracy", "mean"),
                "params / step": ("mean_params_per_step", "mean"),
                "mean rank": ("mean_rank", "mean"),
                "mean reward": ("mean_reward", "mean"),
            }
        )
        return out.sort_values("test accuracy", ascending=False)
    scored = {}
    if scored_metric(table) == "test_accuracy":
        scored = {"test accuracy": ("test_accuracy", "mean")}
    out = table.groupby("name").agg(
        **scored,
        **{
            "final accuracy": ("final_accuracy", "mean"),
            "params / round": ("mean_payload_params", "mean"),
            "mean rank": ("mean_rank", "mean"),
            "episode return": ("episode_return", "mean"),
        },
    )
    return out.sort_values("episode return", ascending=False)
