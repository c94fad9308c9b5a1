"""The ``airlora`` command line: a thin layer over the Python API."""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from typer.core import TyperGroup

from airlora import __version__
from airlora.config import DATA_DIR_ENV, FinetuneConfig, read_yaml_mapping
from airlora.errors import config_error, os_error_message


class _UserErrorsGroup(TyperGroup):
    """Every command, of every sub-group, runs inside :func:`user_errors`: one place maps
    what a user can fix to ``error: ...`` and exit status 2."""

    def invoke(self, ctx):  # type: ignore[no-untyped-def]
        with user_errors():
            return super().invoke(ctx)


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Bad input of any kind (a setting, a file, a data row, a model folder, a failed sweep
    cell, a full disk) becomes ``error: <message>`` on stderr and exit status 2."""
    try:
        yield
    except ValidationError as err:  # before ValueError: pydantic's is one too
        raise _fail(str(config_error(err))) from err
    except ValueError as err:  # AirLoraError and its kinds (DataError, CellError, ...)
        raise _fail(str(err)) from err
    except OSError as err:
        raise _fail(os_error_message(err)) from err


app = typer.Typer(
    cls=_UserErrorsGroup,
    name="airlora",
    help="Communication-aware remote fine-tuning of language models over wireless links.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # Help texts are plain: "[runs]" is a default, not a rich style tag to swallow.
    rich_markup_mode=None,
)
bench_app = typer.Typer(
    cls=_UserErrorsGroup,
    help="Benchmarks: the project against its peer, in the same run.",
    rich_markup_mode=None,
)
app.add_typer(bench_app, name="bench")
link_app = typer.Typer(
    cls=_UserErrorsGroup,
    help="The link model on its own: BER against theory, curves.",
    rich_markup_mode=None,
)
app.add_typer(link_app, name="link")

console = Console()
if not console.is_terminal:  # piped or captured: do not squeeze tables into 80 columns
    console = Console(width=160)
err_console = Console(stderr=True)

# Options that several commands share, word for word.
QuietOption = Annotated[bool, typer.Option(help="No progress bar.")]
JsonOption = Annotated[bool, typer.Option("--json", help="Print one JSON object.")]
ThreadsOption = Annotated[int | None, typer.Option(help="torch threads (0: default).")]
OutOption = Annotated[Path | None, typer.Option(help="Folder for run folders. [runs]")]
RunNameOption = Annotated[str | None, typer.Option(help="Name of this run's folder.")]
DataDirOption = Annotated[
    Path | None, typer.Option(help=f"Folder of local data copies [env: {DATA_DIR_ENV}].")
]
DeviceOption = Annotated[
    str | None,
    typer.Option(help="Device of the language model: auto, cpu, cuda or cuda:N. [auto]"),
]
TargetsOption = Annotated[
    str | None,
    typer.Option(
        help="LoRA target projections, comma-separated module-name suffixes "
        "(q_proj,v_proj). [the family's attention projections]"
    ),
]
TextColumnOption = Annotated[
    str | None, typer.Option(help="Text column(s); join several with '+'. [text]")
]
LabelColumnOption = Annotated[str | None, typer.Option(help="Integer label column. [label]")]
NoHeaderOption = Annotated[
    bool,
    typer.Option(
        "--no-header",
        help="The CSV has no header row: --text-column and --label-column are 0-based "
        "positions (--text-column 1 --label-column 0).",
    ),
]
LabelOffsetOption = Annotated[
    int | None,
    typer.Option(help="Subtracted from every label (1 for classes numbered 1..C). [0]"),
]
PrecisionOption = Annotated[
    str | None, typer.Option(help="auto (bf16 on a GPU, fp32 on the CPU), fp32 or bf16. [auto]")
]


def _version(value: bool) -> None:
    if value:
        typer.echo(f"airlora {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="Print the version."),
    ] = False,
) -> None:
    """airlora: AirLLM and its baselines for LoRA fine-tuning over the air."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # Deprecation notices from inside transformers/PEFT say nothing a user can act on.
    warnings.filterwarnings("ignore", category=FutureWarning)


def _fail(message: str, code: int = 2) -> typer.Exit:
    err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    return typer.Exit(code)


def _parse_rank_vector(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(x) for x in text.replace(" ", "").split(",") if x != ""]
    except ValueError:
        raise _fail(f"--rank-vector must be comma-separated integers, got '{text}'") from None


def _names(text: str | None) -> list[str] | None:
    if text is None:
        return None
    names = [x.strip() for x in text.split(",") if x.strip()]
    if not names:
        raise _fail(f"--target-modules needs at least one module name, got '{text}'")
    return names


def _set(d: dict, path: str, value: Any) -> None:
    if value is None:
        return
    *parents, leaf = path.split(".")
    for key in parents:
        d = d.setdefault(key, {})
    d[leaf] = value


def _num(x: float | None, fmt: str = ".4f") -> str:
    """A figure for a table; a missing or non-finite one (a diverged round) says so."""
    if x is None or not math.isfinite(x):
        return "nan"
    return format(x, fmt)


DIVERGED_EXIT = 3


def _diverged(run_dir: Path, round_index: int) -> typer.Exit:
    return _fail(
        f"the run diverged in round {round_index} (non-finite loss or parameters; a learning "
        f"rate too high?); {run_dir}/manifest.json is marked 'diverged' and its figures are "
        "null, not numbers",
        DIVERGED_EXIT,
    )


def _round_table(rows: list) -> Table:
    table = Table(
        title="Rounds (rank: mean over projections; acc: edge accuracy on its evaluation subset)",
        title_justify="left",
    )
    for col, justify in [
        ("round", "right"),
        ("SNR dB", "right"),
        ("mean rank", "right"),
        ("accuracy", "right"),
        ("eval loss", "right"),
        ("train loss", "right"),
        ("payload params", "right"),
        ("airtime ms", "right"),
        ("train s", "right"),
        ("tx s", "right"),
        ("eval s", "right"),
    ]:
        table.add_column(col, justify=justify)
    for m in rows:
        table.add_row(
            str(m.round),
            f"{m.snr_db:.1f}",
            f"{sum(m.rank_vector) / len(m.rank_vector):.2f}",
            _num(m.accuracy),
            _num(m.eval_loss),
            _num(m.train_loss),
            f"{m.payload_params:,}",
            f"{m.airtime_s * 1e3:.2f}",
            f"{m.train_time_s:.2f}",
            f"{m.transmit_time_s:.3f}",
            f"{m.eval_time_s:.2f}",
        )
    return table


def _run_finetune_cli(config: FinetuneConfig, quiet: bool = False) -> None:
    from airlora.finetune import run_finetune

    total = config.train.rounds * config.train.steps_per_round
    progress = Progress(
        TextColumn("[bold]fine-tuning"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("steps"),
        TimeElapsedColumn(),
        TextColumn("{task.fields[status]}"),
        console=err_console,
        disable=quiet,
    )
    with progress:
        task = progress.add_task("train", total=total, status="loading model and data")

        def on_round(m) -> None:
            status = f"round {m.round}/{config.train.rounds} acc {_num(m.accuracy, '.3f')}"
            progress.update(task, status=status)

        result = run_finetune(
            config, on_round=on_round, on_step=lambda n: progress.advance(task, n)
        )
    console.print(_round_table(result.rounds))
    if result.diverged_round is not None:
        raise _diverged(result.run_dir, result.diverged_round)
    summary = Table(show_header=False, title="Summary", title_justify="left")
    summary.add_column("what")
    summary.add_column("value", justify="right")
    summary.add_row("final edge accuracy", f"{result.rounds[-1].accuracy:.4f}")
    if result.test_accuracy is not None:
        summary.add_row("test accuracy", f"{result.test_accuracy:.4f}")
    steps = len(result.rounds) * config.train.steps_per_round
    summary.add_row("training steps (batch)", f"{steps} ({config.data.batch_size})")
    summary.add_row("training samples/s", f"{result.train_samples_per_s:.1f}")
    sent = sum(r.payload_params for r in result.rounds)
    summary.add_row("parameters sent (all rounds)", f"{sent:,}")
    summary.add_row("run folder", str(result.run_dir))
    console.print(summary)


@app.command()
def finetune(
    config_file: Annotated[
        Path | None, typer.Option("--config", help="YAML file with a FinetuneConfig.")
    ] = None,
    model: Annotated[
        str | None,
        typer.Option(help="'default' (all-MiniLM-L6-v2, packaged), a model folder or a hub id."),
    ] = None,
    data: Annotated[
        str | None,
        typer.Option(help="Data set: a file, a folder, a name under --data-dir, or a hub id."),
    ] = None,
    data_dir: Annotated[
        Path | None,
        typer.Option(help=f"Folder of local data copies [env: {DATA_DIR_ENV}]."),
    ] = None,
    text_column: Annotated[
        str | None, typer.Option(help="Text column(s); join several with '+'.")
    ] = None,
    label_column: Annotated[str | None, typer.Option(help="Integer label column.")] = None,
    no_header: NoHeaderOption = False,
    label_offset: LabelOffsetOption = None,
    rank: Annotated[
        int | None, typer.Option(help="Rank of every adapted projection (0..r_max). [r_max]")
    ] = None,
    rank_vector: Annotated[
        str | None, typer.Option(help="Comma-separated rank per projection; overrides --rank.")
    ] = None,
    rmax: Annotated[int | None, typer.Option(help="r_max: allocated LoRA rank. [8]")] = None,
    rounds: Annotated[int | None, typer.Option(help="Rounds T. [25]")] = None,
    steps_per_round: Annotated[
        int | None, typer.Option(help="Server training steps K per round. [16]")
    ] = None,
    lr: Annotated[float | None, typer.Option(help="LoRA learning rate. [2e-3]")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Training batch size. [16]")] = None,
    max_length: Annotated[int | None, typer.Option(help="Tokens per text. [64]")] = None,
    link: Annotated[
        str | None,
        typer.Option(help="Link scheme: perfect, analog, digital or coded. [perfect]"),
    ] = None,
    snr_db: Annotated[float | None, typer.Option(help="Es/N0 of the downlink, dB. [10]")] = None,
    snr_process: Annotated[
        str | None, typer.Option(help="fixed, uniform, gauss_markov or trace. [fixed]")
    ] = None,
    snr_trace: Annotated[
        Path | None, typer.Option(help="CSV of per-round SNRs in dB (snr-process trace).")
    ] = None,
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
    seed: Annotated[int | None, typer.Option(help="Seed of the whole run. [0]")] = None,
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

    The run folder holds config.yaml, metrics.jsonl (one line per round), manifest.json (seed,
    versions, code revision) and adapter/ (a PEFT adapter folder).
    """
    base = read_yaml_mapping(config_file) if config_file else {}
    for path, value in [
        ("model.name_or_path", model),
        ("data.source", data),
        ("data.data_dir", data_dir),
        ("data.text_column", text_column),
        ("data.label_column", label_column),
        ("data.header", False if no_header else None),
        ("data.label_offset", label_offset),
        ("rank", rank),
        ("rank_vector", _parse_rank_vector(rank_vector)),
        ("model.r_max", rmax),
        ("train.rounds", rounds),
        ("train.steps_per_round", steps_per_round),
        ("train.learning_rate", lr),
        ("data.batch_size", batch_size),
        ("data.max_length", max_length),
        ("link.scheme", link),
        ("link.snr_db", snr_db),
        ("link.snr_process", snr_process),
        ("link.snr_trace", snr_trace),
        ("link.channel", channel),
        ("link.modulation", modulation),
        ("link.quant_bits", quant_bits),
        ("link.packet_bits", packet_bits),
        ("link.arq_retries", arq_retries),
        ("seed", seed),
        ("train.threads", threads),
        ("train.device", device),
        ("train.precision", precision),
        ("model.target_modules", _names(target_modules)),
        ("out_dir", out),
        ("run_name", run_name),
    ]:
        _set(base, path, value)
    if no_test:
        base["final_test"] = False
    if no_crc:
        _set(base, "link.crc_check", False)
    config = FinetuneConfig.model_validate(base)
    _run_finetune_cli(config, quiet=quiet)


@app.command()
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
    from airlora.config import SweepConfig
    from airlora.presets import preset_mapping
    from airlora.report import write_report

    config = SweepConfig.model_validate(preset_mapping("demo"))
    sweep_dir, _ = _run_sweep_cli(config, out, quiet)
    path = write_report(sweep_dir)
    _print_headline(sweep_dir)
    console.print(f"report: {path} (figures in {path.parent / 'report'})")


@bench_app.command("train")
def bench_train_cmd(
    as_json: JsonOption = False,
    model: Annotated[str, typer.Option(help="Model name or folder.")] = "default",
    rmax: Annotated[int, typer.Option(help="r_max (every projection at r_max).")] = 8,
    batch_size: Annotated[int, typer.Option(help="Batch size.")] = 16,
    max_length: Annotated[int, typer.Option(help="Tokens per text.")] = 64,
    steps: Annotated[int, typer.Option(help="Training steps per timed repeat.")] = 8,
    repeats: Annotated[int, typer.Option(help="Interleaved repeats per side.")] = 5,
    threads: Annotated[int, typer.Option(help="torch threads (0: default).")] = 0,
) -> None:
    """Training samples/s of the round engine against a plain PEFT LoRA loop."""
    from airlora.bench.train import bench_train
    from airlora.config import DataConfig, ModelConfig

    with err_console.status("benchmarking training steps (project vs. plain PEFT loop)"):
        result = bench_train(
            ModelConfig(name_or_path=model, r_max=rmax),
            DataConfig(batch_size=batch_size, max_length=max_length),
            steps=steps,
            repeats=repeats,
            threads=threads,
        )
    _print_bench(result, as_json)


@bench_app.command("link")
def bench_link_cmd(
    as_json: JsonOption = False,
    n_params: Annotated[int, typer.Option(help="float32 parameters sent.")] = 1_000_000,
    repeats: Annotated[int, typer.Option(help="Interleaved repeats per chain.")] = 5,
) -> None:
    """Bit/s of the uncoded digital chain (8-bit, QPSK, AWGN 5 dB) against Sionna's chain."""
    from airlora.bench.link import bench_link

    with err_console.status("benchmarking the digital chain (project, Sionna, naive NumPy)"):
        result = bench_link(n_params=n_params, repeats=repeats)
    _print_bench(result, as_json)


@link_app.command("simulate")
def link_simulate(
    modulation: Annotated[str, typer.Option(help="bpsk, qpsk, 16qam or 64qam.")] = "qpsk",
    snr_db: Annotated[float, typer.Option(help="Es/N0 in dB (energy per symbol).")] = 6.0,
    n_bits: Annotated[int, typer.Option(help="Bits to send.")] = 1_000_000,
    channel: Annotated[str, typer.Option(help="awgn, rayleigh or rician.")] = "awgn",
    rician_k: Annotated[float, typer.Option(help="Rician K factor (linear).")] = 4.0,
    seed: Annotated[int, typer.Option(help="Seed.")] = 0,
    fast_path: Annotated[
        bool, typer.Option(help="Draw bit errors directly where exact (BPSK/QPSK, AWGN).")
    ] = False,
    as_json: JsonOption = False,
) -> None:
    """Measure the BER of mapper -> channel -> hard demapper and compare it with theory."""
    from airlora.link.simulate import simulate_ber

    result = simulate_ber(modulation, snr_db, n_bits, channel, rician_k, seed, fast_path)
    if as_json:
        sys.stdout.write(json.dumps(result, indent=2) + "\n")
        return
    table = Table(show_header=False, title="BER: measured against theory", title_justify="left")
    table.add_column("what")
    table.add_column("value", justify="right")
    for key, value in result.items():
        table.add_row(key, f"{value:.4g}" if isinstance(value, float) else str(value))
    console.print(table)


@link_app.command("plot")
def link_plot(
    out: Annotated[Path, typer.Option(help="PNG file to write.")] = Path("ber_curves.png"),
    n_bits: Annotated[int, typer.Option(help="Bits per simulated point.")] = 200_000,
    seed: Annotated[int, typer.Option(help="Seed.")] = 0,
) -> None:
    """Draw measured against theoretical BER for every modulation, AWGN and Rayleigh."""
    from airlora.link.simulate import plot_ber_curves

    with err_console.status("simulating BER curves"):
        path = plot_ber_curves(out, n_bits=n_bits, seed=seed)
    console.print(f"wrote {path}")


@app.command("run")
def run_cmd(
    config_file: Annotated[
        Path | None, typer.Option("--config", help="YAML file with a RunConfig.")
    ] = None,
    method: Annotated[
        str | None, typer.Option(help="airllm, ppo, lora, adalora, random or heuristic. [lora]")
    ] = None,
    rmax: Annotated[int | None, typer.Option(help="r_max: largest rank. [8]")] = None,
    rank: Annotated[
        int | None, typer.Option(help="lora: rank of every projection. [r_max]")
    ] = None,
    adalora_target_rank: Annotated[
        int | None, typer.Option(help="adalora: average rank at the end. [r_max / 2]")
    ] = None,
    policy: Annotated[
        Path | None, typer.Option(help="airllm / ppo: a saved policy folder (train-policy).")
    ] = None,
    snr_db: Annotated[
        float | None, typer.Option(help="Fixed SNR (Es/N0) of every round, dB.")
    ] = None,
    snr_process: Annotated[
        str | None, typer.Option(help="fixed, uniform, gauss_markov or trace. [uniform]")
    ] = None,
    snr_low_db: Annotated[float | None, typer.Option(help="Uniform SNR low end, dB.")] = None,
    snr_high_db: Annotated[float | None, typer.Option(help="Uniform SNR high end, dB.")] = None,
    snr_trace: Annotated[Path | None, typer.Option(help="CSV of per-round SNRs, dB.")] = None,
    link: Annotated[
        str | None, typer.Option(help="perfect, analog, digital or coded. [digital]")
    ] = None,
    rounds: Annotated[int | None, typer.Option(help="Rounds T. [5]")] = None,
    steps_per_round: Annotated[int | None, typer.Option(help="Steps K per round. [8]")] = None,
    model: Annotated[
        str | None, typer.Option(help="'default', a model folder or a hub id.")
    ] = None,
    data: Annotated[str | None, typer.Option(help="Data set (see finetune --help).")] = None,
    data_dir: DataDirOption = None,
    text_column: TextColumnOption = None,
    label_column: LabelColumnOption = None,
    no_header: NoHeaderOption = False,
    label_offset: LabelOffsetOption = None,
    seed: Annotated[int | None, typer.Option(help="Seed. [0]")] = None,
    threads: ThreadsOption = None,
    device: DeviceOption = None,
    precision: PrecisionOption = None,
    target_modules: TargetsOption = None,
    test: Annotated[
        bool, typer.Option("--test", help="Also score the edge's final model on the test split.")
    ] = False,
    out: OutOption = None,
    run_name: RunNameOption = None,
    quiet: QuietOption = False,
) -> None:
    """One real episode of one method through the shared engine, link and edge evaluation.

    The run folder holds config.yaml, metrics.jsonl (one line per round: ranks, accuracy,
    payload, link report, decision / training / airtime latency), manifest.json and adapter/.
    """
    from airlora.config import RunConfig

    base = read_yaml_mapping(config_file) if config_file else {}
    if snr_db is not None and snr_process is None:
        snr_process = "fixed"
    for path, value in [
        ("method", method),
        ("model.r_max", rmax),
        ("rank", rank),
        ("model.adalora.target_rank", adalora_target_rank),
        ("policy", policy),
        ("link.snr_db", snr_db),
        ("link.snr_process", snr_process),
        ("link.snr_low_db", snr_low_db),
        ("link.snr_high_db", snr_high_db),
        ("link.snr_trace", snr_trace),
        ("link.scheme", link),
        ("train.rounds", rounds),
        ("train.steps_per_round", steps_per_round),
        ("model.name_or_path", model),
        ("data.source", data),
        ("data.data_dir", data_dir),
        ("data.text_column", text_column),
        ("data.label_column", label_column),
        ("data.header", False if no_header else None),
        ("data.label_offset", label_offset),
        ("seed", seed),
        ("train.threads", threads),
        ("train.device", device),
        ("train.precision", precision),
        ("model.target_modules", _names(target_modules)),
        ("out_dir", out),
        ("run_name", run_name),
    ]:
        _set(base, path, value)
    if test:
        base["final_test"] = True
    config = RunConfig.model_validate(base)

    from types import SimpleNamespace

    from airlora.experiment import run_episode

    progress = Progress(
        TextColumn(f"[bold]run {config.method}[/]"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("rounds"),
        TimeElapsedColumn(),
        console=err_console,
        disable=quiet,
    )
    with progress:
        task = progress.add_task("rounds", total=config.train.rounds)
        result = run_episode(config, on_round=lambda _r: progress.advance(task))
    console.print(_round_table([SimpleNamespace(**r) for r in result.rounds]))
    if result.summary["diverged"]:
        raise _diverged(result.run_dir, result.summary["diverged_round"])
    table = Table(show_header=False, title="Summary", title_justify="left")
    table.add_column("what")
    table.add_column("value", justify="right")
    for key, value in result.summary.items():
        if isinstance(value, float):
            text = f"{value:.4g}"
        elif isinstance(value, int) and not isinstance(value, bool):
            text = f"{value:,}"
        else:
            text = str(value)  # a flag, or None where a diverged run has no figure
        table.add_row(key, text)
    table.add_row("run folder", str(result.run_dir))
    console.print(table)


@app.command("sweep")
def sweep_cmd(
    config_file: Annotated[
        Path | None, typer.Argument(help="YAML file with a SweepConfig.", show_default=False)
    ] = None,
    preset: Annotated[
        str | None, typer.Option(help="A shipped preset instead of a file (airlora presets).")
    ] = None,
    out: Annotated[
        Path | None, typer.Option(help="Sweep folder. [<out_dir>/<name> of the config]")
    ] = None,
    workers: Annotated[
        int | None, typer.Option(help="Parallel worker processes (local engine).")
    ] = None,
    engine: Annotated[
        str, typer.Option(help="local (worker processes here) or ray (Ray tasks).")
    ] = "local",
    address: Annotated[
        str | None,
        typer.Option(help="Ray cluster address (host:port); none starts a local Ray instance."),
    ] = None,
    cpus_per_cell: Annotated[
        float | None,
        typer.Option(
            help="CPUs each Ray task requests; its torch threads follow. "
            "[threads_per_worker, else 1]"
        ),
    ] = None,
    gpus_per_cell: Annotated[float, typer.Option(help="GPUs each Ray task requests.")] = 0.0,
    device: DeviceOption = None,
    precision: PrecisionOption = None,
    quiet: QuietOption = False,
) -> None:
    """Run or resume a sweep; finished cells are kept, unfinished ones redone.

    With --engine ray every cell is a Ray task (pip install 'airlora[ray]'): on a local Ray
    instance started for the sweep, or on the cluster at --address.

    Writes sweep.yaml, cells/<id>/ (one folder per finished cell) and results.csv /
    results.parquet. Run `airlora report SWEEP_DIR` afterwards for figures and tables.
    """
    from airlora.config import SweepConfig
    from airlora.presets import preset_mapping

    if (config_file is None) == (preset is None):
        raise ValueError("give a sweep config file or --preset, not both and not neither")
    base = read_yaml_mapping(config_file) if config_file else preset_mapping(preset)
    if workers is not None:
        base["workers"] = workers
    _set(base, "train.device", device)
    _set(base, "train.precision", precision)
    config = SweepConfig.model_validate(base)
    _run_sweep_cli(config, out, quiet, engine, address, cpus_per_cell, gpus_per_cell)


def _run_sweep_cli(
    config,
    out: Path | None,
    quiet: bool,
    engine: str = "local",
    address: str | None = None,
    cpus_per_cell: float | None = None,
    gpus_per_cell: float = 0.0,
):
    from airlora.sweep import plan, run_sweep

    total = sum(len(s) for s in plan(config))
    progress = Progress(
        TextColumn("[bold]sweep[/]"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("cells {task.description}"),
        TimeElapsedColumn(),
        console=err_console,
        disable=quiet,
    )
    with progress:
        task = progress.add_task("", total=total)
        table = run_sweep(
            config,
            out,
            on_cell=lambda cid, done, _t: progress.update(task, completed=done, description=cid),
            on_problem=lambda m: err_console.print(
                f"[yellow]warning:[/] {escape(m)}", soft_wrap=True, highlight=False
            ),
            engine=engine,
            address=address,
            cpus_per_cell=cpus_per_cell,
            gpus_per_cell=gpus_per_cell,
        )
    sweep_dir = out or config.out_dir / config.name
    console.print(f"{len(table)} evaluation cells in {sweep_dir / 'results.csv'}")
    return sweep_dir, table


@app.command("report")
def report_cmd(
    sweep_dir: Annotated[Path, typer.Argument(help="A sweep folder (airlora sweep).")],
) -> None:
    """Figures (PNG and PDF) and report.md for a sweep folder; prints the summary table."""
    from airlora.report import write_report

    with err_console.status("writing the report"):
        path = write_report(sweep_dir)
    _print_headline(sweep_dir)
    console.print(f"report: {path} (figures in {path.parent / 'report'})")


def _print_headline(sweep_dir: Path) -> None:
    from airlora.report import headline

    frame = headline(sweep_dir)
    table = Table(
        title="Per method, averaged over every SNR, r_max and seed of the sweep",
        title_justify="left",
    )
    for col in ("method", "final accuracy", "params / round", "mean rank", "episode return"):
        table.add_column(col, justify="left" if col == "method" else "right")
    for name, row in frame.iterrows():
        table.add_row(
            str(name),
            f"{row.final_accuracy:.4f}",
            f"{row.params_per_round:,.0f}",
            f"{row.mean_rank:.2f}",
            f"{row.episode_return:.4f}",
        )
    console.print(table)


@app.command("presets")
def presets_cmd() -> None:
    """List the shipped sweep presets (use with `airlora sweep --preset NAME`)."""
    from airlora.presets import list_presets

    table = Table(title="Presets", title_justify="left")
    table.add_column("name")
    table.add_column("what")
    for name, description in list_presets():
        table.add_row(name, description)
    console.print(table)


@app.command("train-policy")
def train_policy(
    config_file: Annotated[
        Path | None, typer.Option("--config", help="YAML file with a PolicyTrainConfig.")
    ] = None,
    method: Annotated[
        str | None, typer.Option(help="airllm, ppo, random or heuristic. [airllm]")
    ] = None,
    rmax: Annotated[int | None, typer.Option(help="r_max: largest rank. [8]")] = None,
    surrogate: Annotated[
        bool | None,
        typer.Option(
            "--surrogate/--real",
            help="Train on a reward model fitted to logged real rounds, or on real rounds.",
        ),
    ] = None,
    surrogate_episodes: Annotated[
        int | None, typer.Option(help="Real episodes logged to fit the surrogate. [8]")
    ] = None,
    surrogate_rounds: Annotated[
        Path | None,
        typer.Option(
            help="rounds.jsonl of an earlier run to fit the surrogate on (no new logging)."
        ),
    ] = None,
    total_steps: Annotated[
        int | None, typer.Option(help="Environment steps (rounds) of training. [20000]")
    ] = None,
    rounds: Annotated[int | None, typer.Option(help="Rounds T per episode. [5]")] = None,
    steps_per_round: Annotated[
        int | None, typer.Option(help="Server training steps K per round. [8]")
    ] = None,
    model: Annotated[
        str | None, typer.Option(help="'default', a model folder or a hub id.")
    ] = None,
    data: Annotated[str | None, typer.Option(help="Data set (see finetune --help).")] = None,
    data_dir: DataDirOption = None,
    text_column: TextColumnOption = None,
    label_column: LabelColumnOption = None,
    no_header: NoHeaderOption = False,
    label_offset: LabelOffsetOption = None,
    link: Annotated[
        str | None, typer.Option(help="Link scheme: perfect, analog, digital or coded.")
    ] = None,
    snr_low_db: Annotated[
        float | None, typer.Option(help="Lowest SNR of the uniform SNR process, dB. [-5]")
    ] = None,
    snr_high_db: Annotated[
        float | None, typer.Option(help="Highest SNR of the uniform SNR process, dB. [25]")
    ] = None,
    deadline_s: Annotated[
        float | None, typer.Option(help="Per-round airtime deadline, s. [0.25]")
    ] = None,
    cost_weight: Annotated[
        float | None, typer.Option(help="lambda of the payload cost in the reward. [0.5]")
    ] = None,
    reward_form: Annotated[str | None, typer.Option(help="accuracy or gain. [accuracy]")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed. [0]")] = None,
    threads: ThreadsOption = None,
    device: DeviceOption = None,
    precision: PrecisionOption = None,
    target_modules: TargetsOption = None,
    tensorboard: Annotated[
        bool, typer.Option("--tensorboard", help="Also log to TensorBoard in the run folder.")
    ] = False,
    out: OutOption = None,
    run_name: RunNameOption = None,
    quiet: QuietOption = False,
) -> None:
    """Train a rank policy on the real environment or a fitted surrogate; save it.

    The run folder holds config.yaml, manifest.json, episodes.jsonl (one line per finished
    episode), with --surrogate rounds.jsonl and surrogate/ (the logged real rounds and the
    fit's held-out R^2 and MAE), and policy/ (policy.json, ppo.zip, denoiser.safetensors).
    """
    from airlora.config import PolicyTrainConfig

    base = read_yaml_mapping(config_file) if config_file else {}
    for path, value in [
        ("method", method),
        ("model.r_max", rmax),
        ("total_steps", total_steps),
        ("train.rounds", rounds),
        ("train.steps_per_round", steps_per_round),
        ("model.name_or_path", model),
        ("data.source", data),
        ("data.data_dir", data_dir),
        ("data.text_column", text_column),
        ("data.label_column", label_column),
        ("data.header", False if no_header else None),
        ("data.label_offset", label_offset),
        ("link.scheme", link),
        ("link.snr_low_db", snr_low_db),
        ("link.snr_high_db", snr_high_db),
        ("link.deadline_s", deadline_s),
        ("env.cost_weight", cost_weight),
        ("env.reward_form", reward_form),
        ("seed", seed),
        ("train.threads", threads),
        ("train.device", device),
        ("train.precision", precision),
        ("model.target_modules", _names(target_modules)),
        ("out_dir", out),
        ("run_name", run_name),
    ]:
        _set(base, path, value)
    if tensorboard:
        base["tensorboard"] = True
    if surrogate is True or surrogate_episodes is not None or surrogate_rounds is not None:
        sur = base.get("surrogate") or {}
        if surrogate_episodes is not None:
            sur["real_episodes"] = surrogate_episodes
        if surrogate_rounds is not None:
            sur["rounds_file"] = str(surrogate_rounds)
        base["surrogate"] = sur
    elif surrogate is False:
        base["surrogate"] = None
    config = PolicyTrainConfig.model_validate(base)
    _run_train_policy_cli(config, quiet)


def _run_train_policy_cli(config, quiet: bool) -> None:
    from airlora.train_policy import run_train_policy

    progress = Progress(
        TextColumn("[bold]train-policy[/]"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("env steps"),
        TimeElapsedColumn(),
        console=err_console,
        disable=quiet,
    )
    with progress:
        task = progress.add_task("steps", total=config.total_steps)
        result = run_train_policy(
            config,
            on_status=lambda m: err_console.print(m) if not quiet else None,
            on_steps=lambda n: progress.update(task, completed=min(n, config.total_steps)),
        )
    returns = result.episode_returns
    table = Table(show_header=False, title="Policy training", title_justify="left")
    table.add_column("what")
    table.add_column("value", justify="right")
    table.add_row("method", config.method)
    table.add_row("episodes", str(len(returns)))
    if returns:
        k = max(1, min(20, len(returns) // 5))
        table.add_row(f"mean return, first {k} episodes", f"{sum(returns[:k]) / k:.4f}")
        table.add_row(f"mean return, last {k} episodes", f"{sum(returns[-k:]) / k:.4f}")
    if result.surrogate_fit:
        fit = result.surrogate_fit
        table.add_row("surrogate held-out R^2", f"{fit['holdout_r2']:.3f}")
        table.add_row("surrogate held-out MAE", f"{fit['holdout_mae']:.4f}")
        if "holdout_mae_of_mean" in fit:
            table.add_row("  MAE of predicting the mean", f"{fit['holdout_mae_of_mean']:.4f}")
    table.add_row("run folder", str(result.run_dir))
    console.print(table)


@app.command("evaluate-policy")
def evaluate_policy(
    run_dir: Annotated[Path, typer.Argument(help="A train-policy run folder.")],
    snr_db: Annotated[float, typer.Option(help="Es/N0 of every round, dB.")] = 10.0,
    episodes: Annotated[int, typer.Option(help="Real episodes to play.", min=1)] = 1,
    seed: Annotated[int, typer.Option(help="Seed of the first episode.")] = 10_000,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
    device: DeviceOption = None,
) -> None:
    """Play real episodes (real fine-tuning, real link) at a fixed SNR with a saved policy.

    Writes RUN_DIR/eval/snr<S>dB.json (every round and a summary).
    """
    from airlora.train_policy import run_evaluate_policy

    def on_round(row: dict) -> None:
        if not as_json:
            ranks = ",".join(str(r) for r in row["rank_vector"])
            err_console.print(
                f"episode {row['episode']} round {row['round']}: accuracy {row['accuracy']:.4f}, "
                f"reward {row['reward']:.4f}, ranks {ranks}"
            )

    summary = run_evaluate_policy(run_dir, snr_db, episodes, seed, on_round, device)
    if as_json:
        sys.stdout.write(json.dumps(summary, indent=2) + "\n")
        return
    table = Table(
        show_header=False, title=f"evaluate-policy at {snr_db:g} dB", title_justify="left"
    )
    table.add_column("what")
    table.add_column("value", justify="right")
    for key in (
        "method",
        "episodes",
        "mean_rank",
        "mean_reward",
        "final_accuracy",
        "mean_payload_params",
    ):
        value = summary[key]
        table.add_row(key, f"{value:.4f}" if isinstance(value, float) else str(value))
    table.add_row("mean rank vector", " ".join(f"{r:.1f}" for r in summary["mean_rank_vector"]))
    console.print(table)


@bench_app.command("policy")
def bench_policy_cmd(
    decisions: Annotated[int, typer.Option(help="Decisions timed.")] = 50,
    rounds: Annotated[int, typer.Option(help="Real rounds timed.")] = 3,
    as_json: JsonOption = False,
) -> None:
    """Wall time of one AirLLM decision (PPO + full DDIM sampling) against one real round."""
    from airlora.bench.policy import bench_policy

    with err_console.status("benchmarking a decision against a real round"):
        result = bench_policy(decisions=decisions, rounds=rounds)
    _print_bench(result, as_json)


@bench_app.command("convergence")
def bench_convergence_cmd(
    seeds: Annotated[int, typer.Option(help="Evaluation seeds per method.", min=1)] = 5,
    budget: Annotated[int, typer.Option(help="Environment steps per run at most.")] = 30_000,
    search: Annotated[
        bool, typer.Option(help="Run the hyper-parameter grid for both methods first.")
    ] = True,
    ablation: Annotated[
        bool, typer.Option(help="Also run airllm with the denoiser frozen (coarse only).")
    ] = True,
    as_json: JsonOption = False,
) -> None:
    """Steps to 95 % of the optimum on the synthetic environment: airllm against ppo."""
    from airlora.bench.convergence import bench_convergence

    with err_console.status("benchmarking convergence") as status:
        result = bench_convergence(
            seeds=seeds,
            budget=budget,
            search=search,
            ablation=ablation,
            progress=lambda m: status.update(f"benchmarking convergence: {m}"),
        )
    _print_bench(result, as_json)


def _print_bench(result: dict, as_json: bool) -> None:
    if as_json:
        sys.stdout.write(json.dumps(result, indent=2) + "\n")
        return
    table = Table(title=f"bench {result['name']}", title_justify="left")
    table.add_column("side")
    table.add_column(result["unit"], justify="right")
    table.add_row("project", f"{result['project']:.2f}")
    table.add_row("peer", f"{result['peer']:.2f}")
    table.add_row("ratio", f"{result['ratio']:.3f}")
    console.print(table)
