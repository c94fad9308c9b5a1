"""`airlora bench deploy`: rounds/s of the Flower deployment against the same loop in process.

Project: ``airlora deploy`` on loopback (a SuperLink, one SuperNode per edge, each edge's
ClientApps forked from its warm launcher, :mod:`airlora.deploy.warm`). Peer: the same
deployment with every edge an object in this process (:func:`~airlora.deploy.cloud.
run_in_process`), the same config: the same cloud training, payloads, channels and scoring,
no network. Both time the deployment loop only (``summary.wall_time_s``: from the first
round's batches to the last round's replies), not the start of processes or the models' load;
the wall time of the whole Flower run, start-up included, is in the details. The two runs
must produce the same per-edge rows (``details.rows_equal``): a speed-up that changes the
results is not one.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from airlora.config import DeployConfig

# The fields of a metrics row that depend only on the config and seed (not on timing).
COMPARED = (
    "round",
    "edge",
    "rank_vector",
    "sent_bytes",
    "missed",
    "edge_accuracy",
    "edge_received_bytes",
    "edge_snr_db",
    "edge_erased_params",
)


def _rows(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines]


def _compared(rows: list[dict]) -> list[dict]:
    return [{k: r.get(k) for k in COMPARED} for r in rows]


def _round_medians(rows: list[dict]) -> dict[str, float]:
    """Per round (one row per edge carries it): the cloud's training and its time on the
    transport (handing over, and waiting for replies it did not have once it had trained
    the next round; in process, the edges' whole work), medians in seconds."""
    first = {r["round"]: r for r in rows}
    return {
        "train_s": statistics.median(r["train_time_s"] for r in first.values()),
        "transport_s": statistics.median(r["transport_time_s"] for r in first.values()),
    }


def bench_deploy(
    config: DeployConfig | None = None,
    warm: bool = True,
    progress: Callable[[str], None] | None = None,
) -> dict:
    """Rounds per second, Flower loopback (project) and in process (peer)."""
    from airlora.deploy.cloud import run_in_process
    from airlora.deploy.launch import deploy_loopback

    config = config or DeployConfig()
    say = progress or (lambda _m: None)
    with tempfile.TemporaryDirectory(prefix="airlora-bench-deploy-") as tmp:
        base = config.model_copy(update={"out_dir": Path(tmp)})
        say(f"in process: {config.train.rounds} rounds, {len(config.edges)} edges")
        peer_dir, peer_summary = run_in_process(base.model_copy(update={"run_name": "peer"}))
        say(f"over Flower: {config.train.rounds} rounds, {len(config.edges)} SuperNodes")
        started = time.perf_counter()
        project_dir = deploy_loopback(base.model_copy(update={"run_name": "project"}), warm=warm)
        flower_wall = time.perf_counter() - started
        manifest = json.loads((project_dir / "manifest.json").read_text(encoding="utf-8"))
        project_summary = manifest["summary"]
        project_rows, peer_rows = _rows(project_dir), _rows(peer_dir)
        rows_equal = _compared(project_rows) == _compared(peer_rows)
    if not rows_equal:
        raise RuntimeError(
            "the Flower run's rows differ from the in-process run's: not a "
            "speed comparison of the same work"
        )
    rounds = config.train.rounds
    project = rounds / project_summary["wall_time_s"]
    peer = rounds / peer_summary["wall_time_s"]
    return {
        "name": "deploy",
        "unit": "rounds/s",
        "project": project,
        "peer": peer,
        "ratio": project / peer,
        "details": {
            "edges": [{"name": e.name, "snr_db": e.snr_db} for e in config.edges],
            "rounds": rounds,
            "steps_per_round": config.train.steps_per_round,
            "model": str(config.model.name_or_path),
            "method": config.method,
            "launcher": "warm (forked ClientApps)" if warm else "Flower subprocess (cold)",
            "project_loop_s": project_summary["wall_time_s"],
            "peer_loop_s": peer_summary["wall_time_s"],
            "project_wall_with_startup_s": flower_wall,
            "project_round_medians": _round_medians(project_rows),
            "peer_round_medians": _round_medians(peer_rows),
            "rows_equal": rows_equal,
            "peer_description": "the same deployment loop with the edges in this process",
        },
    }
