"""The sweep folder on disk: seals that prove a cell whole, checks on resume, the results.

A finished cell is sealed: ``cell.json`` holds the SHA-256 of each of its files, checked
when the sweep runs again, so that a file cut short or corrupted on disk is reported and its
cell redone. ``results.csv`` and ``results.parquet`` gather the evaluation cells.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import pandas as pd

from airlora.runs import MANIFEST_FILE, RESULT_FILE, atomic_write, atomic_write_text, read_jsonl

CELLS = "cells"
CELL_SEAL = "cell.json"
RESULTS = "results"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def seal_cell(folder: Path, cell_id: str) -> None:
    """Checksum every file of a finished cell into ``cell.json``, written last."""
    files = {
        p.relative_to(folder).as_posix(): _sha256(p)
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != CELL_SEAL
    }
    text = json.dumps({"cell": cell_id, "sha256": files}, indent=1) + "\n"
    atomic_write_text(folder / CELL_SEAL, text)


def check_cell(folder: Path) -> str | None:
    """None when a finished cell is whole, else what is wrong with it (a file cut short,
    changed or missing, or an unreadable seal)."""
    try:
        seal = json.loads((folder / CELL_SEAL).read_text(encoding="utf-8"))
        files = dict(seal["sha256"])
    except FileNotFoundError:
        return _check_unsealed(folder)
    except (OSError, ValueError, KeyError, TypeError) as err:
        return f"{CELL_SEAL} is unreadable ({type(err).__name__}: {err})"
    if seal.get("cell") != folder.name:
        return f"{CELL_SEAL} names another cell ({seal.get('cell')!r})"
    for rel, digest in files.items():
        path = folder / rel
        if not path.is_file():
            return f"{rel} is missing"
        if _sha256(path) != digest:
            return f"{rel} does not match its checksum (cut short or corrupted)"
    return None


def _check_unsealed(folder: Path) -> str | None:
    """A cell of a sweep written before seals existed: every JSON file must parse."""
    for path in sorted(folder.rglob("*.json")):
        try:
            json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            return f"{path.relative_to(folder)} is unreadable ({type(err).__name__}) and unsealed"
    if folder.name.startswith(("eval-", "online-")) and not (folder / RESULT_FILE).is_file():
        return f"{RESULT_FILE} is missing"
    return None


def discard_damaged_cells(
    sweep_dir: Path, stages: list[list[dict]], on_problem: Callable[[str], None] | None
) -> list[str]:
    """Check every finished cell; remove the damaged ones (they are redone) and report each."""
    damaged = []
    for stage in stages:
        for c in stage:
            folder = sweep_dir / CELLS / c["id"]
            if not folder.exists():
                continue
            problem = check_cell(folder)
            if problem is None:
                continue
            shutil.rmtree(folder)
            damaged.append(c["id"])
            if on_problem:
                on_problem(f"cell {c['id']} was damaged ({problem}): it will be redone")
    return damaged


def check_writable(folder: Path, min_free_bytes: int) -> None:
    """Fail before any work when the sweep folder cannot take files or the disk is full."""
    try:
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".write-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        msg = f"cannot write to the sweep folder {folder}: {err.strerror}"
        raise OSError(err.errno, msg) from err
    free = shutil.disk_usage(folder).free
    if free < min_free_bytes:
        raise OSError(
            errno.ENOSPC,
            f"only {free / 2**20:.0f} MiB free on the disk of {folder} (a sweep wants at least "
            f"{min_free_bytes / 2**20:.0f} MiB for its cells); free some space and run again",
        )


def read_results(sweep_dir: Path) -> pd.DataFrame:
    """Every finished evaluation cell's result, one row each (reads only)."""
    folder = Path(sweep_dir) / CELLS
    paths = sorted([*folder.glob(f"eval-*/{RESULT_FILE}"), *folder.glob(f"online-*/{RESULT_FILE}")])
    table = pd.DataFrame([json.loads(p.read_text(encoding="utf-8")) for p in paths])
    if not table.empty:
        table = table.sort_values(["name", "r_max", "snr_db", "seed"]).reset_index(drop=True)
    return table


def collect_results(sweep_dir: Path) -> pd.DataFrame:
    """Gather every finished evaluation cell into results.csv and results.parquet."""
    table = read_results(sweep_dir)
    atomic_write_text(Path(sweep_dir) / f"{RESULTS}.csv", table.to_csv(index=False))
    atomic_write(Path(sweep_dir) / f"{RESULTS}.parquet", lambda t: table.to_parquet(t, index=False))
    return table


def cell_records(sweep_dir: Path, cell_id: str, filename: str) -> list[dict]:
    """The JSON lines of one file of a finished cell ([] when absent)."""
    return read_jsonl(Path(sweep_dir) / CELLS / cell_id / filename)


def finished_cells(sweep_dir: Path, kind: str) -> list[str]:
    """Ids of the finished cells of a kind (``rounds``, ``policy``, ``eval``), sorted."""
    folder = Path(sweep_dir) / CELLS
    return sorted(p.name for p in folder.glob(f"{kind}-*") if p.is_dir())


def first_manifest(sweep_dir: Path) -> dict:
    """The manifest of the first finished cell, or {} (the report names the code from it)."""
    for path in sorted((Path(sweep_dir) / CELLS).glob(f"*/{MANIFEST_FILE}")):
        return json.loads(path.read_text(encoding="utf-8"))
    return {}
