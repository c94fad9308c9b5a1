"""`airlora sweep`, `airlora report` and `airlora presets`."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from airlora.cli.common import (
    DeviceOption,
    PrecisionOption,
    PresetOption,
    QuietOption,
    SweepFileArgument,
    console,
    err_console,
    overrides,
    progress_bar,
    sweep_file_or_preset,
)
from airlora.runs import REPORT_DIR


@contextlib.contextmanager
def sweep_progress(quiet: bool) -> Iterator[tuple]:
    """A progress bar over cells, and the two callbacks a sweep reports to."""
    with progress_bar("sweep", "cells {task.description}", quiet) as progress:
        task = progress.add_task("", total=None)

        def on_cell(cell_id: str, done: int, total: int) -> None:
            progress.update(task, completed=done, total=total, description=cell_id)

        def on_problem(message: str) -> None:
            err_console.print(f"[yellow]warning:[/] {escape(message)}", soft_wrap=True)

        yield on_cell, on_problem


def sweep(
    config_file: SweepFileArgument = None,
    preset: PresetOption = None,
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
    from airlora.config import SweepConfig, apply_overrides
    from airlora.sweep import RESULTS, run_sweep

    base = sweep_file_or_preset(config_file, preset)
    params = {"workers": workers, "device": device, "precision": precision}
    config = SweepConfig.model_validate(apply_overrides(base, overrides(params)))
    with sweep_progress(quiet) as (on_cell, on_problem):
        table = run_sweep(
            config,
            out,
            on_cell=on_cell,
            on_problem=on_problem,
            engine=engine,
            address=address,
            cpus_per_cell=cpus_per_cell,
            gpus_per_cell=gpus_per_cell,
        )
    sweep_dir = out or config.out_dir / config.name
    console.print(f"{len(table)} evaluation cells in {sweep_dir / f'{RESULTS}.csv'}")


def report(
    sweep_dir: Annotated[Path, typer.Argument(help="A sweep folder (airlora sweep).")],
) -> None:
    """Figures (PNG and PDF) and report.md for a sweep folder; prints the summary table."""
    from airlora.report import write_report

    with err_console.status("writing the report"):
        path = write_report(sweep_dir)
    print_headline(sweep_dir)
    console.print(f"report: {path} (figures in {path.parent / REPORT_DIR})")


def print_headline(sweep_dir: Path) -> None:
    from airlora.report import headline

    frame = headline(sweep_dir)
    table = Table(
        title="Per method, averaged over every SNR, r_max and seed of the sweep",
        title_justify="left",
    )
    table.add_column("method", justify="left")
    for col in frame.columns:
        table.add_column(col, justify="right")

    def cell(col: str, v: float) -> str:
        if col.startswith("params"):
            return f"{v:,.0f}"
        return f"{v:.2f}" if col == "mean rank" else f"{v:.4f}"

    for name, row in frame.iterrows():
        table.add_row(str(name), *(cell(col, v) for col, v in row.items()))
    console.print(table)


def presets() -> None:
    """List the shipped sweep presets (use with `airlora sweep --preset NAME`)."""
    from airlora.presets import list_presets

    table = Table(title="Presets", title_justify="left")
    table.add_column("name")
    table.add_column("what")
    for name, description in list_presets():
        table.add_row(name, description)
    console.print(table)
