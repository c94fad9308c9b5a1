"""Sweep presets shipped with the package (YAML files beside this module)."""

from __future__ import annotations

from importlib import resources

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
