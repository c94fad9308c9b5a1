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

import errno
import hashlib
import json
import multiprocessing
import os
import shutil
import socket
import tempfile
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import pandas as pd

from airlora.config import (
    PolicyTrainConfig,
    RunConfig,
    SurrogateConfig,
    SweepConfig,
    dump_config,
    load_config,
)
from airlora.errors import CellError, os_error_message
from airlora.runs import atomic_write_text, config_hash

CELLS = "cells"
CELL_SEAL = "cell.json"
RESULTS = "results"
TRAINED = ("airllm", "ppo")


def _merge(section, overrides: dict):
    """A config section with overrides merged in, nested mappings included."""
    merged = section.model_dump(mode="json")
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = {**merged[key], **value}
        else:
            merged[key] = value
    return type(section).model_validate(merged)


def _model(config: SweepConfig, r_max: int, overrides: dict | None = None):
    return _merge(config.model, {**(overrides or {}), "r_max": r_max})


def plan(config: SweepConfig) -> list[list[dict]]:
    """The cells of each stage, in order: rounds, policies, evaluations."""
    rounds, policies, evals = [], [], []
    trained = [m for m in config.methods if m.method in TRAINED]
    for r_max in config.r_max:
        for seed in config.seeds:
            if trained:
                rounds.append(
                    {
                        "kind": "rounds",
                        "id": f"rounds-r{r_max}-s{seed}",
                        "r_max": r_max,
                        "seed": seed,
                    }
                )
            for m in trained:
                policies.append(
                    {
                        "kind": "policy",
                        "id": f"policy-{m.name}-r{r_max}-s{seed}",
                        "name": m.name,
                        "r_max": r_max,
                        "seed": seed,
                        "rounds": f"rounds-r{r_max}-s{seed}",
                    }
                )
            for m in config.methods:
                for snr in config.snr_db:
                    cell = {
                        "kind": "eval",
                        "id": f"eval-{m.name}-r{r_max}-snr{snr:g}-s{seed}",
                        "name": m.name,
                        "r_max": r_max,
                        "snr_db": snr,
                        "seed": seed,
                    }
                    if m.method in TRAINED:
                        cell["policy"] = f"policy-{m.name}-r{r_max}-s{seed}"
                    evals.append(cell)
    return [rounds, policies, evals]


# ----------------------------------------------------------------------------- one cell


def _spec(config: SweepConfig, name: str):
    return next(m for m in config.methods if m.name == name)


def run_cell(sweep_dir: str, cell: dict, threads: int) -> str:
    """Do one cell in a temporary folder, then rename it into place. Runs in a worker."""
    import warnings

    import torch

    # Workers are fresh interpreters: repeat the CLI's silencing of library deprecations.
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    if threads:
        torch.set_num_threads(threads)
    sweep_dir_p = Path(sweep_dir)
    config = load_config(sweep_dir_p / "sweep.yaml", SweepConfig)
    cells = sweep_dir_p / CELLS
    final = cells / cell["id"]
    if final.exists():
        return cell["id"]
    tmp = cells / f".tmp-{cell['id']}"
    if tmp.exists():
        shutil.rmtree(tmp)
    spec = _spec(config, cell["name"]) if "name" in cell else None
    model = _model(config, cell["r_max"], spec.model if spec else None)
    train = _merge(config.train, spec.train) if spec else config.train
    if cell["kind"] == "rounds":
        from airlora.env.real import RankSelectionEnv
        from airlora.env.surrogate import ROUNDS_FILE, collect_rounds, write_rounds

        env = RankSelectionEnv.build(
            config.data, model, config.train, config.link, config.env, cell["seed"]
        )
        rows = collect_rounds(env, config.surrogate.real_episodes, seed=cell["seed"])
        tmp.mkdir(parents=True)
        write_rounds(rows, tmp / ROUNDS_FILE)
    elif cell["kind"] == "policy":
        from airlora.train_policy import run_train_policy

        assert spec is not None
        rounds_file = cells / cell["rounds"] / "rounds.jsonl"
        policy_config = PolicyTrainConfig(
            method=spec.method,
            data=config.data,
            model=model,
            train=train,
            link=config.link,
            env=_merge(config.env, spec.env),
            ppo=_merge(config.ppo, spec.ppo),
            airllm=_merge(config.airllm, spec.airllm),
            surrogate=SurrogateConfig(
                **{**config.surrogate.model_dump(), "rounds_file": rounds_file}
            ),
            total_steps=config.total_steps,
            seed=cell["seed"],
            out_dir=cells,
            run_name=tmp.name,
        )
        run_train_policy(policy_config)
    else:
        from airlora.experiment import run_episode

        assert spec is not None
        link = _merge(config.link, {"snr_process": "fixed", "snr_db": cell["snr_db"]})
        policy = cells / cell["policy"] / "policy" if "policy" in cell else None
        run_config = RunConfig(
            method=spec.method,
            data=config.data,
            model=model,
            train=train,
            link=link,
            env=_merge(config.env, spec.env),
            rank=spec.rank,
            policy=policy,
            seed=cell["seed"],
            out_dir=cells,
        )
        result = run_episode(run_config, out=tmp)
        record = {
            "cell": cell["id"],
            "name": spec.name,
            "method": spec.method,
            "r_max": cell["r_max"],
            "snr_db": cell["snr_db"],
            "seed": cell["seed"],
            # The policy by its cell id, not its path: the same sweep anywhere hashes the same.
            "config_hash": config_hash(
                run_config.model_copy(update={"policy": cell.get("policy")})
            ),
            "run_id": uuid.uuid4().hex,
            **result.summary,
        }
        atomic_write_text(tmp / "result.json", json.dumps(record, indent=2) + "\n")
    seal_cell(tmp, cell["id"])
    os.replace(tmp, final)
    return cell["id"]


FAILED_CELLS = "failed-cells"


def run_cell_reporting(sweep_dir: str, cell: dict, threads: int) -> dict:
    """Run one cell; never raise. Returns ``{"id": ...}``, or with ``"error"`` the message of
    what went wrong, so that the failure crosses any process boundary (a worker process, a
    Ray task) as plain data and the driver raises :class:`~airlora.errors.CellError`.

    A user error (bad data, a bad setting, a full disk) keeps its message. Anything else is a
    bug: its traceback goes to ``failed-cells/<id>.log`` in the sweep folder and the message
    says so. The cell's temporary folder is removed either way: nothing half-made is left.
    """
    try:
        return {"id": run_cell(sweep_dir, cell, threads)}
    except Exception as err:  # every failure becomes a message; see the docstring
        import traceback

        shutil.rmtree(Path(sweep_dir) / CELLS / f".tmp-{cell['id']}", ignore_errors=True)
        if isinstance(err, OSError):
            return {"id": cell["id"], "error": os_error_message(err)}
        if isinstance(err, ValueError):  # AirLoraError and the validation errors
            return {"id": cell["id"], "error": str(err)}
        log = Path(sweep_dir) / FAILED_CELLS / f"{cell['id']}.log"
        try:
            log.parent.mkdir(exist_ok=True)
            atomic_write_text(log, traceback.format_exc())
            where = f"; the traceback is in {log}"
        except OSError:
            where = ""
        return {
            "id": cell["id"],
            "error": f"internal error {type(err).__name__}: {err}{where}",
        }


def _outcome(result: dict) -> str:
    if "error" in result:
        raise CellError(result["id"], result["error"])
    return result["id"]


# ----------------------------------------------------------------------------- cell integrity


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
    if folder.name.startswith("eval-") and not (folder / "result.json").is_file():
        return "result.json is missing"
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


# ----------------------------------------------------------------------------- the sweep


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
    path = sweep_dir / "sweep.yaml"
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
        executor = _RayExecutor(address, cpus, gpus_per_cell, threads)
    else:
        threads = config.threads_per_worker or max(1, (os.cpu_count() or 1) // config.workers)
        executor = _LocalExecutor(config.workers, threads)
    with executor:
        for stage in stages:
            todo = [c for c in stage if not (cells / c["id"]).exists()]
            # Absolute: a Ray worker's working folder need not be ours.
            for cell_id in executor.run(str(sweep_dir.resolve()), todo):
                done += 1
                if on_cell:
                    on_cell(cell_id, done, total)
    return collect_results(sweep_dir)


class _LocalExecutor:
    """Cells in ``workers`` spawned processes on this machine (or inline for one worker)."""

    def __init__(self, workers: int, threads: int) -> None:
        self.workers = workers
        self.threads = threads

    def __enter__(self) -> _LocalExecutor:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def run(self, sweep_dir: str, todo: list[dict]) -> Iterator[str]:
        """Run the cells of one stage; yield each id as its cell is complete."""
        if not todo:
            return
        if self.workers == 1:
            for c in todo:
                yield _outcome(run_cell_reporting(sweep_dir, c, self.threads))
            return
        context = multiprocessing.get_context("spawn")
        pool = ProcessPoolExecutor(self.workers, mp_context=context)
        futures = {pool.submit(run_cell_reporting, sweep_dir, c, self.threads): c for c in todo}
        pending = set(futures)
        try:
            while pending:
                finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                for f in finished:
                    try:
                        result = f.result()
                    except BrokenProcessPool as err:
                        raise CellError(
                            futures[f]["id"],
                            "the worker process running it died (killed, or out of memory); "
                            "finished cells are kept: run the same command again to resume",
                        ) from err
                    # A failed cell stops the sweep: the cells in flight finish and are kept,
                    # the queued ones are not started.
                    yield _outcome(result)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)


def _check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """Fail fast when nothing listens at a cluster address (Ray itself retries for minutes)."""
    hostport = address.split("://", 1)[-1]
    host, sep, port = hostport.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"Ray address '{address}' is not host:port (or ray://host:port)")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
            pass
    except OSError as err:
        raise ValueError(f"cannot reach the Ray cluster at {address}: {err}") from err


class _RayExecutor:
    """Cells as Ray tasks on a local instance or an existing cluster."""

    def __init__(self, address: str | None, cpus: float, gpus: float, threads: int) -> None:
        try:
            import ray
        except ImportError as err:
            raise ValueError(
                "the ray engine needs Ray: pip install 'airlora[ray]' (or pip install ray)"
            ) from err
        if cpus <= 0 or gpus < 0:
            raise ValueError(f"cells must request CPUs > 0 and GPUs >= 0, got {cpus}, {gpus}")
        self.ray = ray
        self.address = address
        self.cpus, self.gpus, self.threads = cpus, gpus, threads
        self._started = False

    def __enter__(self) -> _RayExecutor:
        ray = self.ray
        if ray.is_initialized():
            return self  # the caller's own Ray session: leave it to them
        if self.address and self.address != "auto":
            _check_reachable(self.address)
        try:
            # "local" starts a fresh instance even when another one runs on this machine.
            ray.init(
                address=self.address or "local",
                include_dashboard=False,
                log_to_driver=False,
                configure_logging=False,
            )
        except (ConnectionError, TimeoutError, RuntimeError, ValueError) as err:
            where = self.address or "a local instance"
            raise ValueError(f"cannot reach the Ray cluster at {where}: {err}") from err
        self._started = True
        return self

    def __exit__(self, *exc: object) -> None:
        if self._started:
            self.ray.shutdown()

    def run(self, sweep_dir: str, todo: list[dict]) -> Iterator[str]:
        if not todo:
            return
        ray = self.ray
        task = ray.remote(run_cell_reporting).options(
            num_cpus=self.cpus, num_gpus=self.gpus, max_retries=0
        )
        refs = {task.remote(sweep_dir, c, self.threads): c for c in todo}
        pending = list(refs)
        try:
            while pending:
                finished, pending = ray.wait(pending, num_returns=1)
                for ref in finished:
                    try:
                        result = ray.get(ref)
                    except ray.exceptions.RayError as err:  # the worker itself died
                        raise CellError(
                            refs[ref]["id"],
                            f"its Ray task failed ({type(err).__name__}); finished cells are "
                            "kept: run the same command again to resume",
                        ) from err
                    yield _outcome(result)  # a failed cell stops the sweep with its error
        finally:
            for ref in pending:  # stopped early: in-flight cells stay unfinished, redone later
                ray.cancel(ref, force=True)


def collect_results(sweep_dir: Path) -> pd.DataFrame:
    """Gather every finished evaluation cell into results.csv and results.parquet."""
    rows = [
        json.loads(p.read_text(encoding="utf-8"))
        for p in sorted((Path(sweep_dir) / CELLS).glob("eval-*/result.json"))
    ]
    table = pd.DataFrame(rows)
    if not table.empty:
        table = table.sort_values(["name", "r_max", "snr_db", "seed"]).reset_index(drop=True)
    atomic_write_text(Path(sweep_dir) / f"{RESULTS}.csv", table.to_csv(index=False))
    tmp = Path(sweep_dir) / f".{RESULTS}.parquet.tmp"
    table.to_parquet(tmp, index=False)
    os.replace(tmp, Path(sweep_dir) / f"{RESULTS}.parquet")
    return table
