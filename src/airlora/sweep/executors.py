"""Where cells run: worker processes on this machine, or Ray tasks on an instance or a cluster.

Both run :func:`~airlora.sweep.cells.run_cell_reporting` and yield each cell's id as it
completes; a failed cell stops the stage (cells in flight finish and are kept, queued ones
are not started) with a :class:`~airlora.errors.CellError`.
"""

from __future__ import annotations

import multiprocessing
import os
import socket
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from typing import TypeVar

from airlora.errors import CellError
from airlora.sweep.cells import outcome, run_cell_reporting

T = TypeVar("T")

# What every cell imports (torch, transformers, peft: ~10 s of CPU on a small machine), in
# order: the first silences library deprecations before the others import (as the CLI does).
WORKER_PRELOAD = ["airlora.sweep.quiet", "airlora.sweep.cells", "airlora.driver"]


def worker_context() -> multiprocessing.context.BaseContext:
    """Python's forkserver, preloaded with what cells import.

    One clean server process imports torch, transformers and peft once; every worker of every
    stage is forked from it, so a sweep's start-up costs one import instead of one per worker
    and stage, and workers share those pages. The server never runs a model, so no thread pool
    is forked (why plain ``fork`` from the driver is unsafe). It lives as long as the driver."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(WORKER_PRELOAD)
    return context


def with_environment(environment: dict[str, str], fn: Callable[..., T], *args: object) -> T:
    """``fn(*args)`` with ``os.environ`` replaced by ``environment``. A forked worker has the
    forkserver's environment, taken when the first pool of the process started; a cell must
    see the driver's environment of now. Only what is read at run time follows: settings
    that libraries read when imported (``HF_HOME``, ``HF_HUB_OFFLINE``, ``OMP_NUM_THREADS``)
    keep the values they had when the forkserver started, so set those before the first
    sweep of a session (a notebook), or run sweeps from the command line."""
    os.environ.clear()
    os.environ.update(environment)
    return fn(*args)


class LocalExecutor:
    """Cells in ``workers`` processes on this machine (or inline for one worker), forked from
    a preloaded server (:func:`worker_context`)."""

    def __init__(self, workers: int, threads: int) -> None:
        self.workers = workers
        self.threads = threads

    def __enter__(self) -> LocalExecutor:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def run(self, sweep_dir: str, todo: list[dict]) -> Iterator[str]:
        """Run the cells of one stage; yield each id as its cell is complete."""
        if not todo:
            return
        if self.workers == 1:
            for c in todo:
                yield outcome(run_cell_reporting(sweep_dir, c, self.threads))
            return
        pool = ProcessPoolExecutor(self.workers, mp_context=worker_context())
        environment = dict(os.environ)
        futures = {
            pool.submit(
                with_environment, environment, run_cell_reporting, sweep_dir, c, self.threads
            ): c
            for c in todo
        }
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
                    yield outcome(result)
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


class RayExecutor:
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

    def __enter__(self) -> RayExecutor:
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
                    yield outcome(result)  # a failed cell stops the sweep with its error
        finally:
            for ref in pending:  # stopped early: in-flight cells stay unfinished, redone later
                ray.cancel(ref, force=True)
