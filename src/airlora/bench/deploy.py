"""`airlora bench deploy`: rounds/s of the Flower deployment against the same loop in process.

Project: ``airlora deploy`` on loopback (a SuperLink, one SuperNode per edge, each edge's
ClientApps forked from its warm launcher, :mod:`airlora.deploy.warm`). Peer: the same
deployment with every edge an object in this process (:func:`~airlora.deploy.cloud.
run_in_process`), the same config: the same cloud training, payloads, channels and scoring,
no network. Both time the deployment loop only (``summary.wall_time_s``: from the first
round's batches to the last round's replies), not the start of processes or the models' load;
the wall time of the whole Flower run, start-up included, is in the details. Every run must
produce the same per-edge rows (the bench stops with an error otherwise;
``details.rows_compared``: the rows each run matched): a speed-up that changes the results
is not one.
``--repeats N`` (the command's default 3, the function's 1) runs N pairs in alternating order
and reports the medians: on the 2-core development machine one pair's ratio moved between
0.70 and 0.99 from run to run, with the same code, and a 3-pair median between 0.76 and 1.03
from one hour to the next (docs/results.md, section 3).
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
    repeats: int = 1,
) -> dict:
    """Rounds per second, Flower loopback (project) and in process (peer).

    ``repeats`` pairs of runs, in alternating order (peer then project, then project then
    peer, ...), so that a machine whose speed drifts during the bench favours neither side;
    project and peer are the medians of their runs' rounds/s (the ratio is theirs; each
    pair's own ratio is in ``details.pair_ratios``), and every run is in the details."""
    from airlora.deploy.cloud import run_in_process
    from airlora.deploy.launch import deploy_loopback

    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    config = config or DeployConfig()
    say = progress or (lambda _m: None)
    rounds = config.train.rounds
    runs: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="airlora-bench-deploy-") as tmp:
        base = config.model_copy(update={"out_dir": Path(tmp)})
        reference: list[dict] | None = None

        def peer(i: int) -> dict:
            say(f"in process ({i + 1}/{repeats}): {rounds} rounds, {len(config.edges)} edges")
            run_dir, summary = run_in_process(base.model_copy(update={"run_name": f"peer{i}"}))
            return {"side": "peer", "loop_s": summary["wall_time_s"], "dir": run_dir}

        def project(i: int) -> dict:
            say(f"over Flower ({i + 1}/{repeats}): {rounds} rounds, {len(config.edges)} SuperNodes")
            started = time.perf_counter()
            run_dir = deploy_loopback(
                base.model_copy(update={"run_name": f"project{i}"}), warm=warm
            )
            wall = time.perf_counter() - started
            manifest = json.loads((run_dir / "manifest.json").read_text(encoding="utf-8"))
            loop = manifest["summary"]["wall_time_s"]
            return {"side": "project", "loop_s": loop, "wall_with_startup_s": wall, "dir": run_dir}

        for i in range(repeats):
            for side in (peer, project) if i % 2 == 0 else (project, peer):
                run = side(i)
                compared = _compared(_rows(run["dir"]))
                reference = reference if reference is not None else compared
                if compared != reference:
                    raise RuntimeError(
                        f"run {len(runs) + 1} ({run['side']}) gave other rows than run 1 "
                        f"({runs[0]['side'] if runs else run['side']}): not a speed "
                        "comparison of the same work"
                    )
                runs.append(run)
        assert reference is not None  # repeats >= 1: at least one run
        first_project = next(r for r in runs if r["side"] == "project")
        first_peer = next(r for r in runs if r["side"] == "peer")
        project_medians = _round_medians(_rows(first_project["dir"]))
        peer_medians = _round_medians(_rows(first_peer["dir"]))
    loops = {side: [r["loop_s"] for r in runs if r["side"] == side] for side in ("project", "peer")}
    project = rounds / statistics.median(loops["project"])
    peer = rounds / statistics.median(loops["peer"])
    pairs = [
        loops["peer"][i] / loops["project"][i] for i in range(repeats)
    ]  # each pair's own ratio (rounds/s, project over peer)
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
            "repeats": repeats,
            "order": [r["side"] for r in runs],
            "project_loop_s": statistics.median(loops["project"]),
            "peer_loop_s": statistics.median(loops["peer"]),
            "project_loops_s": loops["project"],
            "peer_loops_s": loops["peer"],
            "pair_ratios": pairs,
            "project_wall_with_startup_s": statistics.median(
                r["wall_with_startup_s"] for r in runs if r["side"] == "project"
            ),
            "project_round_medians": project_medians,
            "peer_round_medians": peer_medians,
            # Every run's rows matched the first run's (else the bench stopped, above).
            "rows_compared": len(reference),
            "fields_compared": list(COMPARED),
            "peer_description": "the same deployment loop with the edges in this process",
        },
    }
