"""The same Flower app on Flower's simulation engine: many virtual edges on one machine.

The ServerApp runs the same cloud loop (:func:`~airlora.deploy.flower_app.run_cloud`); each
edge is a virtual SuperNode whose ClientApp (the same :data:`~airlora.deploy.flower_app.
client_app`) runs in one of Flower's Ray workers. A virtual node has no node config of its
own: node ``partition-id`` i is the deployment's i-th edge. Each worker keeps the models of
the edges it served (built once), so a worker serving 10 edges holds 10 copies of the model.

Needs ``ray`` (``pip install "airlora[ray]"``).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from airlora.config import DeployConfig, dump_config
from airlora.runs import MANIFEST_FILE


def simulate(config: DeployConfig, cpus_per_edge: float = 1.0) -> Path:
    """Run the deployment with ``len(config.edges)`` virtual edges; returns the run folder
    (as :func:`~airlora.deploy.launch.deploy_loopback`'s). ``cpus_per_edge``: the CPUs
    Flower reserves per ClientApp (how many run at once: the machine's CPUs / this)."""
    try:
        from flwr.serverapp import Grid, ServerApp
        from flwr.simulation import run_simulation
    except ImportError as err:  # pragma: no cover - the deploy extra is missing
        raise RuntimeError("the simulation needs flwr: pip install 'airlora[deploy]'") from err
    if cpus_per_edge <= 0:
        raise ValueError(f"cpus_per_edge must be positive, got {cpus_per_edge}")
    from airlora.deploy.flower_app import client_app, run_cloud

    name = config.run_name or f"simulate-{time.strftime('%Y%m%d-%H%M%S')}-seed{config.seed}"
    out = (Path(config.out_dir) / name).resolve()
    if out.exists():
        raise FileExistsError(f"run folder {out} already exists; choose another run name")
    text = dump_config(config)
    app = ServerApp()

    @app.main()
    def cloud(grid: Grid, _context) -> None:
        run_cloud(grid, text, out)

    run_simulation(
        server_app=app,
        client_app=client_app,
        num_supernodes=len(config.edges),
        backend_config={"client_resources": {"num_cpus": cpus_per_edge, "num_gpus": 0.0}},
    )
    manifest = out / MANIFEST_FILE
    if not manifest.is_file():
        raise RuntimeError("the simulated ServerApp wrote no run folder (see the log above)")
    status = json.loads(manifest.read_text(encoding="utf-8")).get("status")
    if status != "completed":
        raise RuntimeError(f"the simulated deployment ended {status}: see {out}")
    return out
