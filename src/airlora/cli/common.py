"""What every command shares: consoles, the one error mapping, options and the one place
where options map to config fields, progress bars and tables."""

from __future__ import annotations

import contextlib
import json
import math
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from typer.core import TyperGroup

from airlora.config import DATA_DIR_ENV, apply_overrides, read_yaml_mapping
from airlora.errors import DeployError, config_error, os_error_message

console = Console()
if not console.is_terminal:  # piped or captured: do not squeeze tables into 80 columns
    console = Console(width=160)
err_console = Console(stderr=True)
DIVERGED_EXIT = 3


def fail(message: str, code: int = 2) -> typer.Exit:
    err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    return typer.Exit(code)


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Bad input of any kind (a setting, a file, a data row, a model folder, a failed sweep
    cell, a full disk) becomes ``error: <message>`` on stderr and exit status 2; a deployment
    that failed (its logs are kept), the same with exit status 1."""
    try:
        yield
    except DeployError as err:
        raise fail(str(err), code=1) from err
    except ValidationError as err:  # before ValueError: pydantic's is one too
        raise fail(str(config_error(err))) from err
    except ValueError as err:  # AirLoraError and its kinds (DataError, CellError, ...)
        raise fail(str(err)) from err
    except OSError as err:
        raise fail(os_error_message(err)) from err


class UserErrorsGroup(TyperGroup):
    """Every command of every sub-group runs inside :func:`user_errors`."""

    def invoke(self, ctx):  # type: ignore[no-untyped-def]
        with user_errors():
            return super().invoke(ctx)


def typer_group(help_text: str, **kwargs: Any) -> typer.Typer:
    # Help texts are plain: "[runs]" is a default, not a rich style tag to swallow.
    return typer.Typer(cls=UserErrorsGroup, help=help_text, rich_markup_mode=None, **kwargs)


# ----------------------------------------------------------------------------- options

QuietOption = Annotated[bool, typer.Option(help="No progress bar.")]
JsonOption = Annotated[bool, typer.Option("--json", help="Print one JSON object.")]
ConfigOption = Annotated[Path | None, typer.Option("--config", help="A YAML config file.")]
ThreadsOption = Annotated[int | None, typer.Option(help="torch threads (0: default).")]
OutOption = Annotated[Path | None, typer.Option(help="Folder for run folders. [runs]")]
RunNameOption = Annotated[str | None, typer.Option(help="Name of this run's folder.")]
SeedOption = Annotated[int | None, typer.Option(help="Seed of the whole run. [0]")]
ModelOption = Annotated[
    str | None,
    typer.Option(help="'default' (all-MiniLM-L6-v2, packaged), a model folder or a hub id."),
]
DataOption = Annotated[
    str | None,
    typer.Option(
        help="Data set: a file, a folder, a name under --data-dir, a packaged set "
        "(ag_news) or a hub id."
    ),
]
DataDirOption = Annotated[
    Path | None, typer.Option(help=f"Folder of local data copies [env: {DATA_DIR_ENV}].")
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
RmaxOption = Annotated[int | None, typer.Option(help="r_max: the largest (allocated) rank. [8]")]
RoundsOption = Annotated[int | None, typer.Option(help="Rounds T per episode.")]
StepsOption = Annotated[int | None, typer.Option(help="Server training steps K per round.")]
LinkOption = Annotated[
    str | None,
    typer.Option(help="Link scheme: perfect, analog, digital, coded, or shannon (online)."),
]
SnrOption = Annotated[float | None, typer.Option(help="Es/N0 of the downlink, dB.")]
SnrProcessOption = Annotated[
    str | None, typer.Option(help="fixed, uniform, gauss_markov or trace.")
]
SnrTraceOption = Annotated[Path | None, typer.Option(help="CSV of per-round SNRs, dB.")]
DeviceOption = Annotated[
    str | None,
    typer.Option(help="Device of the language model: auto, cpu, cuda or cuda:N. [auto]"),
]
PrecisionOption = Annotated[
    str | None, typer.Option(help="auto (bf16 on a GPU, fp32 on the CPU), fp32 or bf16. [auto]")
]
TargetsOption = Annotated[
    str | None,
    typer.Option(
        help="LoRA target projections, comma-separated module-name suffixes "
        "(q_proj,v_proj). [the family's attention projections]"
    ),
]
SweepFileArgument = Annotated[
    Path | None, typer.Argument(help="YAML file with a SweepConfig.", show_default=False)
]
PresetOption = Annotated[
    str | None, typer.Option(help="A shipped preset instead of a file (airlora presets).")
]


def sweep_file_or_preset(config_file: Path | None, preset: str | None) -> dict:
    """The mapping of a sweep config file or of a shipped preset (exactly one of them)."""
    from airlora.presets import preset_mapping

    if (config_file is None) == (preset is None):
        raise ValueError("give a sweep config file or --preset, not both and not neither")
    return read_yaml_mapping(config_file) if config_file else preset_mapping(preset)


def _rank_vector(text: str) -> list[int]:
    try:
        return [int(x) for x in text.replace(" ", "").split(",") if x != ""]
    except ValueError:
        raise fail(f"--rank-vector must be comma-separated integers, got '{text}'") from None


def _names(text: str) -> list[str]:
    names = [x.strip() for x in text.split(",") if x.strip()]
    if not names:
        raise fail(f"--target-modules needs at least one module name, got '{text}'")
    return names


# Every option that sets a config field, in one place: parameter name -> dotted field path,
# with a parser where the text needs one. Commands pass their parameters (``locals()``);
# names that are not here (quiet, config_file...) are not config fields.
FIELDS: dict[str, str | tuple[str, Callable[[Any], Any]]] = {
    "method": "method",
    "formulation": "formulation",
    "steps": "online.steps",
    "constraint": "online.constraint",
    "rank_levels": "online.rank_levels",
    "adapter": "model.adapter",
    "model": "model.name_or_path",
    "rmax": "model.r_max",
    "target_modules": ("model.target_modules", _names),
    "adalora_target_rank": "model.adalora.target_rank",
    "data": "data.source",
    "data_dir": "data.data_dir",
    "text_column": "data.text_column",
    "label_column": "data.label_column",
    "label_offset": "data.label_offset",
    "batch_size": "data.batch_size",
    "max_length": "data.max_length",
    "rank": "rank",
    "rank_vector": ("rank_vector", _rank_vector),
    "policy": "policy",
    "rounds": "train.rounds",
    "steps_per_round": "train.steps_per_round",
    "lr": "train.learning_rate",
    "threads": "train.threads",
    "device": "train.device",
    "precision": "train.precision",
    "link": "link.scheme",
    "snr_db": "link.snr_db",
    "snr_process": "link.snr_process",
    "snr_low_db": "link.snr_low_db",
    "snr_high_db": "link.snr_high_db",
    "snr_trace": "link.snr_trace",
    "channel": "link.channel",
    "modulation": "link.modulation",
    "quant_bits": "link.quant_bits",
    "packet_bits": "link.packet_bits",
    "arq_retries": "link.arq_retries",
    "deadline_s": "link.deadline_s",
    "cost_weight": "env.cost_weight",
    "reward_form": "env.reward_form",
    "total_steps": "total_steps",
    "workers": "workers",
    "seed": "seed",
    "out": "out_dir",
    "run_name": "run_name",
}
# Switches that set a field only when given.
SWITCHES: dict[str, tuple[str, Any]] = {
    "no_header": ("data.header", False),
    "no_crc": ("link.crc_check", False),
    "no_test": ("final_test", False),
    "test": ("final_test", True),
    "tensorboard": ("tensorboard", True),
}


def overrides(params: dict[str, Any]) -> dict[str, Any]:
    """Dotted config paths -> values, for the options that were given."""
    out: dict[str, Any] = {}
    for name, value in params.items():
        if name in SWITCHES and value:
            path, setting = SWITCHES[name]
            out[path] = setting
        elif name in FIELDS and value is not None:
            target = FIELDS[name]
            path, parse = target if isinstance(target, tuple) else (target, None)
            out[path] = parse(value) if parse else value
    return out


def config_mapping(config_file: Path | None, params: dict[str, Any]) -> dict:
    """The YAML file's mapping (or {}) with the given options applied on top."""
    base = read_yaml_mapping(config_file) if config_file else {}
    return apply_overrides(base, overrides(params))


# ----------------------------------------------------------------------------- rendering


def num(x: float | None, fmt: str = ".4f") -> str:
    """A figure for a table; a missing or non-finite one (a diverged round) says so."""
    if x is None or not math.isfinite(x):
        return "nan"
    return format(x, fmt)


def progress_bar(label: str, unit: str, quiet: bool, status: bool = False) -> Progress:
    columns = [TextColumn(f"[bold]{label}[/]"), BarColumn(), MofNCompleteColumn()]
    columns += [TextColumn(unit), TimeElapsedColumn()]
    if status:
        columns.append(TextColumn("{task.fields[status]}"))
    return Progress(*columns, console=err_console, disable=quiet)


def key_value_table(title: str, rows: list[tuple[str, str]]) -> Table:
    table = Table(show_header=False, title=title, title_justify="left")
    table.add_column("what")
    table.add_column("value", justify="right")
    for key, value in rows:
        table.add_row(key, value)
    return table


def shown(value: object) -> str:
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e4 else f"{value:,.0f}"
    return str(value)


def print_json(data: dict) -> None:
    sys.stdout.write(json.dumps(data, indent=2) + "\n")


def print_bench(result: dict, as_json: bool) -> None:
    if as_json:
        print_json(result)
        return
    table = Table(title=f"bench {result['name']}", title_justify="left")
    table.add_column("side")
    table.add_column(result["unit"], justify="right")
    table.add_row("project", f"{result['project']:.2f}")
    table.add_row("peer", f"{result['peer']:.2f}")
    table.add_row("ratio", f"{result['ratio']:.3f}")
    console.print(table)
