"""`airlora finetune`, `airlora run` and `airlora demo`: episodes, and the main job."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from airlora.cli.common import (
    DIVERGED_EXIT,
    ConfigOption,
    DataDirOption,
    DataOption,
    DeviceOption,
    JsonOption,
    LabelColumnOption,
    LabelOffsetOption,
    LinkOption,
    ModelOption,
    NoHeaderOption,
    OutOption,
    PrecisionOption,
    QuietOption,
    RmaxOption,
    RoundsOption,
    RunNameOption,
    SeedOption,
    SnrOption,
    SnrProcessOption,
    SnrTraceOption,
    StepsOption,
    TargetsOption,
    TextColumnOption,
    ThreadsOption,
    config_mapping,
    console,
    fail,
    key_value_table,
    num,
    print_json,
    progress_bar,
    shown,
)
from airlora.runs import REPORT_DIR

ROUND_COLUMNS = [
    ("round", lambda r: str(r["round"])),
    ("SNR dB", lambda r: f"{r['snr_db']:.1f}"),
    ("mean rank", lambda r: f"{sum(r['rank_vector']) / len(r['rank_vector']):.2f}"),
    ("accuracy", lambda r: num(r["accuracy"])),
    ("eval loss", lambda r: num(r["eval_loss"])),
    ("train loss", lambda r: num(r["train_loss"])),
    ("payload params", lambda r: f"{r['payload_params']:,}"),
    ("airtime ms", lambda r: f"{r['airtime_s'] * 1e3:.2f}"),
    ("train s", lambda r: f"{r['train_time_s']:.2f}"),
    ("tx s", lambda r: f"{r['transmit_time_s']:.3f}"),
    ("eval s", lambda r: f"{r['eval_time_s']:.2f}"),
]
SUMMARY_KEYS = (
    "final_accuracy",
    "test_accuracy",
    "mean_accuracy",
    "episode_return",
    "mean_rank",
    "total_payload_params",
    "total_airtime_s",
    "training_steps",
    "train_samples_per_s",
    "mean_decision_time_s",
    "mean_latency_s",
)


def round_table(rows: list[dict]) -> Table:
    table = Table(
        title="Rounds (rank: mean over projections; acc: edge accuracy on its evaluation subset)",
        title_justify="left",
    )
    for name, _ in ROUND_COLUMNS:
        table.add_column(name, justify="right")
    for row in rows:
        table.add_row(*(cell(row) for _, cell in ROUND_COLUMNS))
    return table


def play(config, quiet: bool, as_json: bool = False) -> None:
    """Run one episode with a progress bar; print its rounds and summary."""
    from airlora.driver import run_episode

    if getattr(config, "formulation", "round") == "online":
        play_online(config, quiet, as_json)
        return

    label = getattr(config, "method", "finetune")
    rounds = config.train.rounds
    with progress_bar(label, "rounds", quiet, status=True) as progress:
        task = progress.add_task("rounds", total=rounds, status="loading model and data")

        def on_round(row: dict) -> None:
            status = f"round {row['round']}/{rounds} acc {num(row['accuracy'], '.3f')}"
            progress.update(task, advance=1, status=status)

        result = run_episode(config, on_round)
    if as_json:
        print_json({**result.summary, "run_dir": str(result.run_dir)})
    else:
        console.print(round_table(result.rounds))
    if result.summary["diverged"]:
        raise fail(
            f"the run diverged in round {result.summary['diverged_round']} (non-finite loss or "
            f"parameters; a learning rate too high?); {result.run_dir}/manifest.json is marked "
            "'diverged' and its figures are null, not numbers",
            DIVERGED_EXIT,
        )
    if as_json:
        return
    summary = result.summary
    rows = [
        (k.replace("_", " "), shown(summary[k])) for k in SUMMARY_KEYS if summary[k] is not None
    ]
    console.print(key_value_table("Summary", [*rows, ("run folder", str(result.run_dir))]))


def play_online(config, quiet: bool, as_json: bool) -> None:
    from airlora.driver import run_episode

    with progress_bar(f"online {config.method}", "steps", quiet, status=True) as progress:
        task = progress.add_task("steps", total=config.online.steps, status="loading")

        def on_step(row: dict) -> None:
            status = "violated" if row["violated"] else f"loss {num(row['train_loss'], '.3f')}"
            progress.update(task, completed=row["step"], status=status)

        result = run_episode(config, on_step)
    if as_json:
        print_json({**result.summary, "run_dir": str(result.run_dir)})
        return
    skip = ("validations",)
    rows = [(k.replace("_", " "), shown(v)) for k, v in result.summary.items() if k not in skip]
    console.print(key_value_table("Online run", [*rows, ("run folder", str(result.run_dir))]))


def finetune(
    config_file: ConfigOption = None,
    model: ModelOption = None,
    data: DataOption = None,
    data_dir: DataDirOption = None,
    text_column: TextColumnOption = None,
    label_column: LabelColumnOption = None,
    no_header: NoHeaderOption = False,
    label_offset: LabelOffsetOption = None,
    rank: Annotated[
        int | None, typer.Option(help="Rank of every adapted projection (0..r_max). [r_max]")
    ] = None,
    rank_vector: Annotated[
        str | None, typer.Option(help="Comma-separated rank per projection; overrides --rank.")
    ] = None,
    rmax: RmaxOption = None,
    rounds: RoundsOption = None,
    steps_per_round: StepsOption = None,
    lr: Annotated[float | None, typer.Option(help="LoRA learning rate. [2e-3]")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Training batch size. [16]")] = None,
    max_length: Annotated[int | None, typer.Option(help="Tokens per text. [64]")] = None,
    link: LinkOption = None,
    snr_db: SnrOption = None,
    snr_process: SnrProcessOption = None,
    snr_trace: SnrTraceOption = None,
    channel: Annotated[str | None, typer.Option(help="awgn, rayleigh or rician. [awgn]")] = None,
    modulation: Annotated[
        str | None, typer.Option(help="bpsk, qpsk, 16qam, 64qam or adaptive. [qpsk]")
    ] = None,
    quant_bits: Annotated[int | None, typer.Option(help="Quantiser bits, 2..16. [8]")] = None,
    packet_bits: Annotated[int | None, typer.Option(help="Data bits per packet. [8192]")] = None,
    arq_retries: Annotated[int | None, typer.Option(help="ARQ retransmissions. [0]")] = None,
    no_crc: Annotated[
        bool, typer.Option("--no-crc", help="Keep corrupted packets instead of erasing them.")
    ] = False,
    seed: SeedOption = None,
    threads: ThreadsOption = None,
    device: DeviceOption = None,
    precision: PrecisionOption = None,
    target_modules: TargetsOption = None,
    out: OutOption = None,
    run_name: RunNameOption = None,
    no_test: Annotated[
        bool, typer.Option("--no-test", help="Skip the final test-split evaluation.")
    ] = False,
    quiet: QuietOption = False,
) -> None:
    """Fine-tune with fixed ranks over the link; print a per-round table; write a run folder.

    Defaults: rank r_max on every projection, a perfect link, 25 rounds x 16 steps. The run
    folder holds config.yaml, metrics.jsonl (one line per round), manifest.json (seed,
    versions, code revision, data source) and adapter/ (a PEFT adapter folder).
    """
    from airlora.config import FinetuneConfig

    play(FinetuneConfig.model_validate(config_mapping(config_file, locals())), quiet)


def run(
    config_file: ConfigOption = None,
    method: Annotated[
        str | None,
        typer.Option(
            help="airllm, ppo, lora, adalora, random, heuristic or oracle (online). [lora]"
        ),
    ] = None,
    rmax: RmaxOption = None,
    rank: Annotated[
        int | None, typer.Option(help="lora: rank of every projection. [r_max]")
    ] = None,
    adalora_target_rank: Annotated[
        int | None, typer.Option(help="adalora: average rank at the end. [r_max / 2]")
    ] = None,
    policy: Annotated[
        Path | None, typer.Option(help="airllm / ppo: a saved policy folder (train-policy).")
    ] = None,
    formulation: Annotated[
        str | None,
        typer.Option(
            help="round (an episode of rounds; the default) or online (one step = one "
            "training step; airllm and ppo learn during the run; --link shannon prices a "
            "step at capacity, digital / coded / analog by its airtime on that link)."
        ),
    ] = None,
    steps: Annotated[
        int | None, typer.Option(help="online: training steps of the run. [150]")
    ] = None,
    constraint: Annotated[
        str | None,
        typer.Option(
            help="online: penalty (C > 1 trains nothing, the reference) or project (scale "
            "the ranks down until they fit). [penalty]"
        ),
    ] = None,
    rank_levels: Annotated[
        str | None,
        typer.Option(help="online: ranks a policy picks from: linear or log2. [linear]"),
    ] = None,
    adapter: Annotated[
        str | None,
        typer.Option(
            help="lora (rank-masked LoRA) or svd (P diag(E) Q, the reference's); adalora "
            "follows --method adalora. [lora]"
        ),
    ] = None,
    snr_db: SnrOption = None,
    snr_process: SnrProcessOption = None,
    snr_low_db: Annotated[float | None, typer.Option(help="Uniform SNR low end, dB.")] = None,
    snr_high_db: Annotated[float | None, typer.Option(help="Uniform SNR high end, dB.")] = None,
    snr_trace: SnrTraceOption = None,
    link: LinkOption = None,
    rounds: RoundsOption = None,
    steps_per_round: StepsOption = None,
    model: ModelOption = None,
    data: DataOption = None,
    data_dir: DataDirOption = None,
    text_column: TextColumnOption = None,
    label_column: LabelColumnOption = None,
    no_header: NoHeaderOption = False,
    label_offset: LabelOffsetOption = None,
    seed: SeedOption = None,
    threads: ThreadsOption = None,
    device: DeviceOption = None,
    precision: PrecisionOption = None,
    target_modules: TargetsOption = None,
    test: Annotated[
        bool, typer.Option("--test", help="Also score the edge's final model on the test split.")
    ] = False,
    out: OutOption = None,
    run_name: RunNameOption = None,
    as_json: JsonOption = False,
    quiet: QuietOption = False,
) -> None:
    """One real episode of one method through the shared engine, link and edge evaluation.

    --snr-db alone means a fixed SNR in every round. The run folder holds config.yaml,
    metrics.jsonl (one line per round: ranks, accuracy, payload, link report, decision /
    training / airtime latency), manifest.json and adapter/.
    """
    from airlora.config import RunConfig

    play(RunConfig.model_validate(config_mapping(config_file, locals())), quiet, as_json)


def demo(
    out: Annotated[Path, typer.Option(help="Sweep folder.")] = Path("runs/demo"),
    quiet: QuietOption = False,
) -> None:
    """The main job on the embedded defaults (what `make demo` runs).

    The `demo` preset: a short surrogate-assisted training of airllm and ppo, then every
    method (airllm, ppo, lora at r_max and at 2, adalora, heuristic, random) for one real
    episode at 5, 15 and 25 dB; then the report (figures and report.md) and its summary table.
    Re-running resumes: finished cells are kept.
    """
    from airlora.cli.sweep import print_headline, sweep_progress
    from airlora.presets import run_demo

    with sweep_progress(quiet) as (on_cell, on_problem):
        sweep_dir, report = run_demo(out, on_cell=on_cell, on_problem=on_problem)
    print_headline(sweep_dir)
    console.print(f"report: {report} (figures in {report.parent / REPORT_DIR})")
