"""A warm edge: Flower's SuperExec with ClientApps forked from a process that has the model.

Flower runs every message to an edge in a fresh ClientApp process (``flwr-clientapp``), which
must import torch, transformers and airlora and load the model before it can score anything:
about 12 s of CPU per message here, against 3-4 s to rebuild and score the adapter. A real
edge keeps its model resident. This module is that edge's SuperExec (Flower's task launcher
for a SuperNode started with ``--isolation process``): it imports the app, optionally builds
the edge's model and rows once, then serves each ClientApp task by ``os.fork()``: the child
runs Flower's own ``run_clientapp`` with the task's token and exits. Flower's protocol is
untouched (one process per message, state in the node's Context); only the start-up is gone.

Start it beside a SuperNode (``airlora deploy`` does this for every edge)::

    flower-supernode --isolation process --port 9094 --node-config 'edge="edge0"' ...
    python -m airlora.deploy.warm --runtime-api-address 127.0.0.1:9094 --insecure \\
        --config deploy.yaml --edge edge0

Without ``--config`` only the imports are warm and the first task builds the model in its
own child (each task then does, as under Flower's default launcher).
"""

from __future__ import annotations

import argparse
import functools
import gc
import logging
import os
import signal
import sys
import threading
from pathlib import Path

log = logging.getLogger("airlora.deploy")

# Printed once the edge's model and rows are built: the loopback launcher
# (:meth:`~airlora.deploy.launch.LoopbackFederation.check_edges_starting`) reads it in the log.
READY = "airlora-warm-edge-ready"


class ForkExecutor:
    """A Flower SuperExec executor that forks ClientApp tasks from this (warm) process and
    starts any other task type as Flower's subprocess executor would."""

    def __init__(self) -> None:
        from flwr.supercore.superexec.executor.subprocess_executor import SubprocessExecutor

        self.fallback = SubprocessExecutor()
        self.children: set[int] = set()

    def get_eligible_capacity(self, supported_task_types, **kwargs):
        return self.fallback.get_eligible_capacity(supported_task_types, **kwargs)

    def wait_for_capacity(self, task_type=None, **kwargs) -> None:
        self.fallback.wait_for_capacity(task_type, **kwargs)

    def launch(self, spec):
        from flwr.supercore.constant import TaskType
        from flwr.supercore.superexec.executor.types import LaunchResult

        if spec.task_type != TaskType.CLIENT_APP:
            return self.fallback.launch(spec)
        self.reconcile()
        try:
            pid = os.fork()
        except OSError as err:  # out of processes or memory: this task fails, the edge goes on
            return LaunchResult.failed(f"could not fork a ClientApp: {err}")
        if pid == 0:  # the child: never returns into the SuperExec loop
            os._exit(_run_forked_clientapp(spec))
        self.children.add(pid)
        return LaunchResult.accepted()

    def reconcile(self) -> None:
        """Reap finished children (no zombies over a long deployment)."""
        for pid in list(self.children):
            try:
                done, _status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                done = pid
            if done:
                self.children.discard(pid)

    def close(self) -> None:
        self.reconcile()


def _run_forked_clientapp(spec) -> int:
    """In the forked child: Flower's ClientApp runtime for one task; returns the exit code."""
    try:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        # The parent's exit handlers (its Runtime API client, its executor) are not ours, and
        # the lock guarding them may have been held by a thread that the fork did not copy.
        from flwr.supercore.exit import exit_handler

        exit_handler.registered_exit_handlers.clear()
        exit_handler._lock_handlers = threading.Lock()
        from flwr.supercore.tls import validate_and_resolve_root_certificates
        from flwr.supernode.runtime.run_clientapp import run_clientapp

        run_clientapp(
            runtime_api_address=spec.runtime_api_address,
            token=spec.token,
            insecure=spec.insecure,
            certificates=validate_and_resolve_root_certificates(
                spec.root_certificates_path, spec.insecure
            ),
            parent_pid=spec.parent_pid,
            runtime_dependency_install=spec.runtime_dependency_install,
        )
        return 0
    except SystemExit as done:  # run_clientapp ends with flwr_exit -> sys.exit(code)
        if done.code is None:
            return 0
        return done.code if isinstance(done.code, int) else 1
    except BaseException:  # a crash in the child must not run the parent's loop
        logging.getLogger("airlora.deploy").exception("forked ClientApp failed")
        return 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()


def edge_threads() -> int:
    """Torch threads of each ClientApp, from ``AIRLORA_EDGE_THREADS`` (default 1)."""
    text = os.environ.get("AIRLORA_EDGE_THREADS", "1")
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise SystemExit(f"AIRLORA_EDGE_THREADS must be a whole number >= 1, got {text!r}")
    return value


def warm_up(config_path: Path | None, edge: str | None) -> None:
    """Import the app and, given the deployment and the edge's name, build that edge's model
    and rows now (:func:`airlora.deploy.flower_app.edge_device`), so that every forked task
    finds them built."""
    import torch

    # What a ClientApp process imports before it runs the app, imported once here.
    from flwr.supernode.runtime import run_clientapp

    from airlora.deploy import flower_app

    # A warm ClientApp starts before its SuperNode has pulled the message's objects from the
    # SuperLink; Flower retries those pulls with a backoff from 1 s to 10 s, sized for a cold
    # process that takes longer than that to start. Poll every 0.1-0.5 s instead.
    run_clientapp.pull_and_inflate_object_from_tree = functools.partial(
        run_clientapp.pull_and_inflate_object_from_tree, initial_backoff=0.1, backoff_cap=0.5
    )

    # Several edges' tasks may run at once on one machine; forked children each get their
    # own thread pool of this size.
    torch.set_num_threads(edge_threads())
    if config_path is not None:
        if edge is None:
            raise ValueError("--config needs --edge (the name of this node's edge)")
        text = Path(config_path).read_text(encoding="utf-8")
        flower_app.edge_device(flower_app.config_from_text(text), edge)


def freeze_for_fork() -> None:
    """Move every object built so far out of the garbage collector's reach (``gc.freeze``).

    They live as long as this process, and a forked child's collections would otherwise
    write to (so copy) every page holding them: one full collection in a child of a warm
    edge touched 32k pages (0.5 s of CPU) before, 146 after."""
    gc.collect()
    gc.freeze()


def serve(
    runtime_api_address: str,
    insecure: bool,
    root_certificates: str | None = None,
    parent_pid: int | None = None,
) -> None:
    """Flower's SuperExec loop with :class:`ForkExecutor` (blocks until SIGTERM or until
    ``parent_pid`` exits)."""
    from flwr.supercore.constant import ExecutorType
    from flwr.supercore.superexec import run_superexec as superexec

    executor = ForkExecutor()
    freeze_for_fork()
    # run_superexec builds its executor from a closed set of kinds (subprocess, kubernetes);
    # ours is handed in where it looks the executor up (flwr pinned to 1.42.x).
    superexec.get_executor = lambda *args, **kwargs: executor
    superexec.run_superexec(
        runtime_api_address=runtime_api_address,
        insecure=insecure,
        root_certificates_path=root_certificates,
        parent_pid=parent_pid,
        runtime_dependency_install=False,
        executor_type=ExecutorType.SUBPROCESS,
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m airlora.deploy.warm", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--runtime-api-address", required=True, help="the SuperNode's HOST:PORT")
    security = parser.add_mutually_exclusive_group(required=True)
    security.add_argument("--insecure", action="store_true")
    security.add_argument("--root-certificates", help="CA of the SuperNode's Runtime API")
    parser.add_argument(
        "--parent-pid", type=int, help="exit when this process (the SuperNode) does"
    )
    parser.add_argument("--config", type=Path, help="the deployment's YAML (builds the model now)")
    parser.add_argument("--edge", help="this node's edge name (with --config)")
    args = parser.parse_args(argv)
    warm_up(args.config, args.edge)
    print(f"{READY} {args.edge or ''}".rstrip(), flush=True)
    serve(args.runtime_api_address, args.insecure, args.root_certificates, args.parent_pid)


if __name__ == "__main__":
    main()
