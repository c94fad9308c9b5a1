"""`airlora sweep`: every method in one harness over r_max x SNR x seeds, resumable.

The sweep folder holds ``sweep.yaml`` (the configuration), ``cells/`` and the results table.
A cell is one unit of work with a stable id:

- ``rounds-r{R}-s{seed}``: real episodes logged for the surrogate (once per r_max and seed);
- ``policy-{name}-r{R}-s{seed}``: a policy trained on that surrogate (a train-policy folder);
- ``eval-{name}-r{R}-snr{S}-s{seed}``: one real episode at a fixed SNR (a run folder).

Every cell is built in ``cells/.tmp-<id>`` and renamed to ``cells/<id>`` when it is complete
(a rename is atomic), so a finished cell is whole and an interrupted one leaves only a
temporary folder, removed when the sweep runs again. A finished cell is sealed: ``cell.json``
holds the SHA-256 of each of its files, checked when the sweep runs again, so that a file cut
short or corrupted on disk is reported and its cell redone. Re-running the same command skips
the finished cells and redoes the rest. Cells of a stage run in parallel: in worker processes on
this machine (the ``local`` engine), or as Ray tasks on a local Ray instance or a cluster (the
``ray`` engine); both write the same cells, so a sweep may be resumed under either.
``results.csv`` and ``results.parquet`` gather the evaluation cells with their config hash.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pandas as pd

from airlora.config import SweepConfig, dump_config, load_config
from airlora.runs import SWEEP_FILE, atomic_write_text, config_hash
from airlora.sweep.cells import FAILED_CELLS, run_cell, run_cell_reporting
from airlora.sweep.executors import LocalExecutor, RayExecutor
from airlora.sweep.planning import TRAINED, parse_cell_id, plan
from airlora.sweep.store import (
    CELL_SEAL,
    CELLS,
    RESULTS,
    check_cell,
    check_writable,
    collect_results,
    discard_damaged_cells,
    seal_cell,
)

MIN_FREE_BYTES = 64 * 2**20


def prepare(config: SweepConfig, sweep_dir: Path) -> Path:
    """Create the sweep folder, or check that an existing one holds the same configuration
    and can take more files."""
    try:
        sweep_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        msg = f"cannot create the sweep folder {sweep_dir}: {err.strerror}"
        raise OSError(err.errno, msg) from err
    check_writable(sweep_dir, MIN_FREE_BYTES)
    path = sweep_dir / SWEEP_FILE
    if path.exists():
        existing = load_config(path, SweepConfig)
        if config_hash(existing) != config_hash(config):
            raise ValueError(
                f"{sweep_dir} holds a sweep with another configuration; choose another folder"
            )
    else:
        atomic_write_text(path, dump_config(config))
    (sweep_dir / CELLS).mkdir(exist_ok=True)
    for stale in (sweep_dir / CELLS).glob(".tmp-*"):
        shutil.rmtree(stale)  # an interrupted cell: redone from scratch
    return sweep_dir


ENGINES = ("local", "ray")


def run_sweep(
    config: SweepConfig,
    sweep_dir: Path | None = None,
    on_cell: Callable[[str, int, int], None] | None = None,
    on_problem: Callable[[str], None] | None = None,
    engine: str = "local",
    address: str | None = None,
    cpus_per_cell: float | None = None,
    gpus_per_cell: float = 0.0,
) -> pd.DataFrame:
    """Run (or resume) a sweep; returns the results table. ``on_cell(id, done, total)``
    reports progress; ``on_problem(message)`` each damaged cell found (and redone) on resume.

    Parameters
    ----------
    engine:
        ``local`` (``config.workers`` processes on this machine, the default) or ``ray``
        (every cell a Ray task; ``pip install airlora[ray]``).
    address:
        Ray only: an existing cluster (``host:port`` or ``ray://host:port``); None starts a
        local Ray instance for this sweep and stops it at the end.
    cpus_per_cell, gpus_per_cell:
        Ray only: resources each cell requests. CPUs default to ``threads_per_worker``, else
        1, and a cell runs that many torch threads (``threads_per_worker`` wins if set); GPUs
        default to 0.

    Both engines write the same cells and results: a cell is a pure function of the sweep
    configuration, its id and its torch threads, whichever process runs it (set
    ``threads_per_worker`` to compare engines bit for bit).
    """
    if engine not in ENGINES:
        raise ValueError(f"unknown sweep engine '{engine}': expected one of {', '.join(ENGINES)}")
    sweep_dir = prepare(config, Path(sweep_dir or config.out_dir / config.name))
    stages = plan(config)
    total = sum(len(s) for s in stages)
    cells = sweep_dir / CELLS
    discard_damaged_cells(sweep_dir, stages, on_problem)
    done = sum(1 for s in stages for c in s if (cells / c["id"]).exists())
    if engine == "ray":
        cpus = cpus_per_cell or config.threads_per_worker or 1
        threads = config.threads_per_worker or max(1, int(cpus))
        executor = RayExecutor(address, cpus, gpus_per_cell, threads)
    else:
        threads = config.threads_per_worker or max(1, (os.cpu_count() or 1) // config.workers)
        executor = LocalExecutor(config.workers, threads)
    with executor:
        for stage in stages:
            todo = [c for c in stage if not (cells / c["id"]).exists()]
            # Absolute: a Ray worker's working folder need not be ours.
            for cell_id in executor.run(str(sweep_dir.resolve()), todo):
                done += 1
                if on_cell:
                    on_cell(cell_id, done, total)
    return collect_results(sweep_dir)


__all__ = [
    "CELLS",
    "CELL_SEAL",
    "ENGINES",
    "FAILED_CELLS",
    "RESULTS",
    "TRAINED",
    "check_cell",
    "collect_results",
    "parse_cell_id",
    "plan",
    "prepare",
    "run_cell",
    "run_cell_reporting",
    "run_sweep",
    "seal_cell",
]
