"""The ``airlora`` command line: a thin layer over the Python API.

One module per command group: ``run`` (finetune, run, demo), ``policy`` (train-policy,
evaluate-policy), ``sweep`` (sweep, report, presets), ``bench`` (bench ..., link ...),
``deploy`` (deploy).
``common`` holds what they share: options and the one table that maps them to config
fields, the one error mapping (bad input -> ``error: ...``, exit 2), progress and tables.
"""

from __future__ import annotations

import os
import warnings
from typing import Annotated

import typer

from airlora import __version__
from airlora.cli import deploy, policy, run, sweep
from airlora.cli.bench import bench_app, link_app
from airlora.cli.common import typer_group

app = typer_group(
    "Communication-aware remote fine-tuning of language models over wireless links.",
    name="airlora",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.add_typer(bench_app, name="bench")
app.add_typer(link_app, name="link")
app.command()(run.finetune)
app.command("run")(run.run)
app.command()(run.demo)
app.command("train-policy")(policy.train_policy)
app.command("evaluate-policy")(policy.evaluate_policy)
app.command("log-rounds")(policy.log_rounds)
app.command("sweep")(sweep.sweep)
app.command("report")(sweep.report)
app.command("presets")(sweep.presets)
app.command("deploy")(deploy.deploy)


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


__all__ = ["app"]
