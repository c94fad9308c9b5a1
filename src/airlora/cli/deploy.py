"""`airlora deploy`: the cloud and N edges as Flower processes on this machine."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from airlora.cli.common import (
    ConfigOption,
    DataOption,
    JsonOption,
    LinkOption,
    ModelOption,
    OutOption,
    QuietOption,
    RmaxOption,
    RoundsOption,
    RunNameOption,
    SeedOption,
    StepsOption,
    config_mapping,
    console,
    key_value_table,
    num,
    print_json,
    progress_bar,
    user_errors,
)


def _follow(show, edges: int):
    """An ``on_start`` hook: a thread that counts the finished rounds in the run folder's
    metrics (one row per edge and round) while Flower runs the app."""
    import threading
    import time

    def start(federation, run_dir) -> None:
        def watch() -> None:
            metrics = run_dir / "metrics.jsonl"
            while not federation.stopped:
                if metrics.exists():
                    show(len(metrics.read_text(encoding="utf-8").splitlines()) // edges)
                time.sleep(1.0)

        threading.Thread(target=watch, daemon=True).start()

    return start


def edges_mapping(mapping: dict, edges: int | None, edge_snr_db: str | None) -> dict:
    """``--snr-db 5,15,25`` or ``--edges N`` (SNRs spread over 5-25 dB) into a config
    mapping's ``edges``."""
    if edge_snr_db is not None:
        values = [float(v) for v in edge_snr_db.split(",") if v.strip()]
        mapping["edges"] = [{"snr_db": v} for v in values]
    elif edges is not None:
        if edges < 1:
            raise ValueError(f"--edges must be at least 1, got {edges}")
        spread = [5.0 + 20.0 * i / max(1, edges - 1) for i in range(edges)]
        mapping["edges"] = [{"snr_db": round(v, 2)} for v in spread]
    return mapping


ColdOption = Annotated[
    bool,
    typer.Option(
        "--cold",
        help="Flower's own ClientApp launcher (a fresh process per message loads the model); "
        "default: each edge's ClientApps forked from a process that holds its model.",
    ),
]


def deploy(
    config_file: ConfigOption = None,
    edges: Annotated[
        int | None, typer.Option(help="Number of edges; SNRs spread over --snr-range. [3]")
    ] = None,
    edge_snr_db: Annotated[
        str | None,
        typer.Option(
            "--snr-db", help="Comma-separated SNR (dB) of each edge, e.g. 5,15,25 (sets --edges)."
        ),
    ] = None,
    method: Annotated[
        str | None, typer.Option(help="heuristic, lora, random, airllm or ppo. [heuristic]")
    ] = None,
    rmax: RmaxOption = None,
    rounds: RoundsOption = None,
    steps_per_round: StepsOption = None,
    link: LinkOption = None,
    model: ModelOption = None,
    data: DataOption = None,
    seed: SeedOption = None,
    timeout: Annotated[
        float, typer.Option(help="Seconds the whole deployment may take. [3600]")
    ] = 3600.0,
    tls: Annotated[
        bool, typer.Option("--tls", help="TLS on every connection (certificates made here).")
    ] = False,
    authenticate: Annotated[
        bool,
        typer.Option("--authenticate", help="Let in registered SuperNodes only (needs --tls)."),
    ] = False,
    cold: ColdOption = False,
    simulation: Annotated[
        bool,
        typer.Option(
            "--simulation",
            help="Flower's simulation engine: every edge a virtual SuperNode on Ray workers "
            "(needs ray).",
        ),
    ] = False,
    in_process: Annotated[
        bool,
        typer.Option(
            "--in-process", help="No Flower: every edge an object in this process (the peer)."
        ),
    ] = False,
    resume: Annotated[
        Path | None,
        typer.Option(
            help="A deployment's run folder whose cloud stopped: take it up from its last "
            "finished round, with its own config (other config options are not read).",
            file_okay=False,
        ),
    ] = None,
    out: OutOption = None,
    run_name: RunNameOption = None,
    as_json: JsonOption = False,
    quiet: QuietOption = False,
) -> None:
    """Run the cloud trainer and N edges as real Flower processes on loopback.

    A SuperLink and one SuperNode per edge start on free ports of 127.0.0.1; `flwr run`
    runs the app (the cloud as ServerApp, each edge as ClientApp with its own channel and
    evaluation rows); then everything stops. The run folder holds config.yaml, manifest.json
    (per-edge summary) and metrics.jsonl (one row per round and edge: ranks, bytes sent and
    received, accuracy, SNR, airtime); logs/ holds the processes' logs.
    """
    from airlora.config import DeployConfig

    with user_errors():
        params = dict(locals())
        if resume is not None:
            from airlora.deploy.cloud import require_cloud_state, resume_config

            if config_file is not None or run_name is not None or out is not None:
                raise ValueError("--resume takes the run folder's own config, name and place")

            config = resume_config(resume)
            require_cloud_state(resume)
        else:
            mapping = edges_mapping(config_mapping(config_file, params), edges, edge_snr_db)
            config = DeployConfig.model_validate(mapping)
        if (in_process or simulation) and (tls or authenticate):
            raise ValueError(
                "--tls and --authenticate secure Flower's network links: not with "
                "--in-process or --simulation"
            )
        if in_process and simulation:
            raise ValueError("choose one of --in-process and --simulation")
        if cold and (in_process or simulation):
            raise ValueError(
                "--cold chooses the loopback SuperNodes' launcher: not with "
                "--in-process or --simulation"
            )
        rounds = config.train.rounds
        with progress_bar("deploy", "rounds", quiet or as_json, status=True) as progress:
            task = progress.add_task("rounds", total=rounds, status="starting")

            def show(done: int) -> None:
                progress.update(task, completed=done, status=f"{len(config.edges)} edges")

            if in_process:
                from airlora.deploy.cloud import run_in_process

                run_dir, summary = run_in_process(
                    config,
                    resume,
                    on_round=lambda t, _r: show(t + 1),
                    resume=resume is not None,
                )
            elif simulation:
                import json

                from airlora.deploy.simulation import simulate
                from airlora.runs import MANIFEST_FILE

                if resume is not None:
                    raise ValueError("--resume takes up a loopback or in-process deployment")
                progress.update(task, status=f"{len(config.edges)} virtual edges")
                run_dir = simulate(config)
                summary = json.loads((run_dir / MANIFEST_FILE).read_text())["summary"]
                show(rounds)
            else:
                import json

                from airlora.deploy.launch import deploy_loopback
                from airlora.runs import MANIFEST_FILE

                run_dir = deploy_loopback(
                    config,
                    timeout,
                    on_start=_follow(show, len(config.edges)),
                    tls=tls,
                    authenticate=authenticate,
                    warm=not cold,
                    resume=resume,
                )
                summary = json.loads((run_dir / MANIFEST_FILE).read_text())["summary"]
    if as_json:
        print_json({**summary, "run_dir": str(run_dir)})
        return
    rows = [
        (
            f"{name} ({e['snr_db']:g} dB)",
            f"acc {num(e['final_accuracy'], '.3f')}  rank {num(e['mean_rank'], '.2f')}  "
            f"bytes {e['received_bytes']:,}/{e['sent_bytes']:,}  missed {e['rounds_missed']}",
        )
        for name, e in summary["edges"].items()
    ]
    console.print(key_value_table(f"deployment: {run_dir}", rows))
