"""Sweep presets shipped with the package (YAML files beside this module)."""

from __future__ import annotations

from collections.abc import Callable
from importlib import resources
from pathlib import Path

import yaml


def _files() -> dict[str, str]:
    root = resources.files(__name__)
    return {
        p.name.removesuffix(".yaml"): p.read_text(encoding="utf-8")
        for p in root.iterdir()
        if p.name.endswith(".yaml")
    }


def list_presets() -> list[tuple[str, str]]:
    """(name, first comment line) of every preset."""
    out = []
    for name, text in sorted(_files().items()):
        first = text.splitlines()[0].lstrip("# ").strip() if text else ""
        out.append((name, first))
    return out


def preset_mapping(name: str) -> dict:
    """The preset's YAML mapping; an unknown name lists the known ones."""
    files = _files()
    if name not in files:
        raise ValueError(f"unknown preset '{name}'; choose one of {sorted(files)}")
    return yaml.safe_load(files[name]) or {}


def run_demo(
    out: Path = Path("runs/demo"),
    on_cell: Callable[[str, int, int], None] | None = None,
    on_problem: Callable[[str], None] | None = None,
) -> tuple[Path, Path]:
    """The main job (``airlora demo``, ``make demo``): the ``demo`` preset swept into ``out``
    (resuming what is there), then its report. Returns the sweep folder and report.md."""
    from airlora.config import SweepConfig
    from airlora.report import write_report
    from airlora.sweep import run_sweep

    config = SweepConfig.model_validate(preset_mapping("demo"))
    run_sweep(config, out, on_cell=on_cell, on_problem=on_problem)
    return Path(out), write_report(out)
