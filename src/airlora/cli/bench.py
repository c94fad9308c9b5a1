"""`airlora bench ...` (the project against its peer, in the same run) and `airlora link ...`."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Annotated

import typer

from airlora.cli.common import (
    JsonOption,
    config_mapping,
    console,
    err_console,
    key_value_table,
    overrides,
    print_bench,
    print_json,
    typer_group,
    user_errors,
)

bench_app = typer_group("Benchmarks: the project against its peer, in the same run.")
link_app = typer_group("The link model on its own: BER against theory, curves.")


@bench_app.command("train")
def bench_train(
    as_json: JsonOption = False,
    model: Annotated[str, typer.Option(help="Model name or folder.")] = "default",
    rmax: Annotated[int, typer.Option(help="r_max (every projection at r_max).")] = 8,
    batch_size: Annotated[int, typer.Option(help="Batch size.")] = 16,
    max_length: Annotated[int, typer.Option(help="Tokens per text.")] = 64,
    steps: Annotated[int, typer.Option(help="Training steps per timed repeat.")] = 8,
    repeats: Annotated[int, typer.Option(help="Interleaved repeats per side.")] = 5,
    threads: Annotated[int, typer.Option(help="torch threads (0: default).")] = 0,
) -> None:
    """Training samples/s of the round engine against a plain PEFT LoRA loop."""
    from airlora.bench.train import bench_train as run
    from airlora.config import DataConfig, ModelConfig

    given = config_mapping(
        None, {"model": model, "rmax": rmax, "batch_size": batch_size, "max_length": max_length}
    )
    with err_console.status("benchmarking training steps (project vs. plain PEFT loop)"):
        result = run(
            ModelConfig.model_validate(given["model"]),
            DataConfig.model_validate(given["data"]),
            steps=steps,
            repeats=repeats,
            threads=threads,
        )
    print_bench(result, as_json)


@bench_app.command("link")
def bench_link(
    as_json: JsonOption = False,
    n_params: Annotated[int, typer.Option(help="float32 parameters sent.")] = 1_000_000,
    repeats: Annotated[int, typer.Option(help="Interleaved repeats per chain.")] = 5,
) -> None:
    """Bit/s of the uncoded digital chain (8-bit, QPSK, AWGN 5 dB) against Sionna's chain."""
    from airlora.bench.link import bench_link as run

    with err_console.status("benchmarking the digital chain (project, Sionna, naive NumPy)"):
        result = run(n_params=n_params, repeats=repeats)
    print_bench(result, as_json)


@bench_app.command("policy")
def bench_policy(
    decisions: Annotated[int, typer.Option(help="Decisions timed.")] = 50,
    rounds: Annotated[int, typer.Option(help="Real rounds timed.")] = 3,
    as_json: JsonOption = False,
) -> None:
    """Wall time of one AirLLM decision (PPO + full DDIM sampling) against one real round."""
    from airlora.bench.policy import bench_policy as run

    with err_console.status("benchmarking a decision against a real round"):
        result = run(decisions=decisions, rounds=rounds)
    print_bench(result, as_json)


@bench_app.command("convergence")
def bench_convergence(
    seeds: Annotated[int, typer.Option(help="Evaluation seeds per method.", min=1)] = 5,
    budget: Annotated[int, typer.Option(help="Environment steps per run at most.")] = 30_000,
    search: Annotated[
        bool, typer.Option(help="Run the hyper-parameter grid for both methods first.")
    ] = True,
    ablation: Annotated[
        bool,
        typer.Option(
            help="Also run the group-level methods: airllm with its denoiser frozen, and PPO "
            "on the grouped actions (no denoiser)."
        ),
    ] = True,
    as_json: JsonOption = False,
) -> None:
    """Steps to 95 % of the optimum on the synthetic environment where one rank per group
    cannot reach it: airllm against ppo (the headroom above the group-level ceiling in the
    details)."""
    from airlora.bench.convergence import bench_convergence as run

    with err_console.status("benchmarking convergence") as status:
        result = run(
            seeds=seeds,
            budget=budget,
            search=search,
            ablation=ablation,
            progress=lambda m: status.update(f"benchmarking convergence: {m}"),
        )
    print_bench(result, as_json)


@bench_app.command("surrogate")
def bench_surrogate(
    log: Annotated[
        str, typer.Option(help="Shipped logged rounds to fit and check on.")
    ] = "paper-cpu-r8",
    as_json: JsonOption = False,
) -> None:
    """Leave-one-episode-out R^2 of the round surrogate against the earlier ridge, and the
    rank correlation of the fixed policies' surrogate and real returns (details.spearman)."""
    from airlora.bench.surrogate import bench_surrogate as run

    with err_console.status("benchmarking the surrogate on the shipped logged rounds"):
        result = run(log)
    print_bench(result, as_json)


@bench_app.command("deploy")
def bench_deploy(
    config_file: Annotated[
        Path | None,
        typer.Option(
            "--config", help="Deployment YAML (DeployConfig).", exists=True, dir_okay=False
        ),
    ] = None,
    edges: Annotated[int | None, typer.Option(help="Number of edges (5-25 dB). [3]")] = None,
    edge_snr_db: Annotated[
        str | None, typer.Option("--snr-db", help="Comma-separated SNR (dB) per edge.")
    ] = None,
    rounds: Annotated[int | None, typer.Option(help="Rounds. [5]")] = None,
    steps_per_round: Annotated[int | None, typer.Option(help="Cloud steps per round. [8]")] = None,
    model: Annotated[str | None, typer.Option(help="Model name or folder.")] = None,
    cold: Annotated[
        bool, typer.Option("--cold", help="Flower's own launcher (a process per message).")
    ] = False,
    repeats: Annotated[
        int,
        typer.Option(help="Pairs of runs, in alternating order; the medians are reported.", min=1),
    ] = 3,
    as_json: JsonOption = False,
) -> None:
    """Rounds/s of `airlora deploy` on loopback (3 SuperNodes) against the same deployment
    loop with the edges in this process."""
    from airlora.bench.deploy import bench_deploy as run
    from airlora.cli.deploy import edges_mapping
    from airlora.config import DeployConfig

    with user_errors():
        given = {"rounds": rounds, "steps_per_round": steps_per_round, "model": model}
        mapping = edges_mapping(config_mapping(config_file, given), edges, edge_snr_db)
        config = DeployConfig.model_validate(mapping)
        with err_console.status("benchmarking the deployment") as status:
            result = run(
                config,
                warm=not cold,
                progress=lambda m: status.update(f"benchmarking the deployment: {m}"),
                repeats=repeats,
            )
    print_bench(result, as_json)


@bench_app.command("online")
def bench_online(
    config_file: Annotated[
        Path | None,
        typer.Option(
            "--config",
            help="Run config YAML: model, data, link, online and policy settings to time "
            "(method, steps and seed are the bench's).",
            exists=True,
            dir_okay=False,
        ),
    ] = None,
    steps: Annotated[int, typer.Option(help="Online steps per timed run.")] = 120,
    repeats: Annotated[
        int,
        typer.Option(
            help="Interleaved runs (airllm and fixed ranks step by step), one seed each; "
            "an even number balances which environment is built first."
        ),
    ] = 4,
    model: Annotated[str | None, typer.Option(help="Model name or folder.")] = None,
    rmax: Annotated[int | None, typer.Option(help="r_max.")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Batch size.")] = None,
    max_length: Annotated[int | None, typer.Option(help="Tokens per text.")] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu, cuda or cuda:N.")] = None,
    as_json: JsonOption = False,
) -> None:
    """Online training steps/s with airllm deciding (and learning) every step, against the
    same loop at fixed ranks."""
    from airlora.bench.online import DEFAULT_BASE
    from airlora.bench.online import bench_online as run
    from airlora.config.base import apply_overrides, read_yaml_mapping

    given = {"model": model, "rmax": rmax, "batch_size": batch_size, "max_length": max_length}
    base = read_yaml_mapping(config_file) if config_file else copy.deepcopy(DEFAULT_BASE)
    base = apply_overrides(base, overrides({**given, "device": device}))
    with err_console.status("benchmarking the online loop (airllm vs fixed ranks)"):
        result = run(steps=steps, repeats=repeats, base=base)
    print_bench(result, as_json)


@link_app.command("simulate")
def link_simulate(
    modulation: Annotated[str, typer.Option(help="bpsk, qpsk, 16qam or 64qam.")] = "qpsk",
    snr_db: Annotated[float, typer.Option(help="Es/N0 in dB (energy per symbol).")] = 6.0,
    n_bits: Annotated[int, typer.Option(help="Bits to send.")] = 1_000_000,
    channel: Annotated[str, typer.Option(help="awgn, rayleigh or rician.")] = "awgn",
    rician_k: Annotated[float, typer.Option(help="Rician K factor (linear).")] = 4.0,
    seed: Annotated[int, typer.Option(help="Seed.")] = 0,
    fast_path: Annotated[
        bool, typer.Option(help="Draw bit errors directly where exact (BPSK/QPSK, AWGN).")
    ] = False,
    as_json: JsonOption = False,
) -> None:
    """Measure the BER of mapper -> channel -> hard demapper and compare it with theory."""
    from airlora.link.simulate import simulate_ber

    result = simulate_ber(modulation, snr_db, n_bits, channel, rician_k, seed, fast_path)
    if as_json:
        print_json(result)
        return
    rows = [(k, f"{v:.4g}" if isinstance(v, float) else str(v)) for k, v in result.items()]
    console.print(key_value_table("BER: measured against theory", rows))


@link_app.command("plot")
def link_plot(
    out: Annotated[Path, typer.Option(help="PNG file to write.")] = Path("ber_curves.png"),
    n_bits: Annotated[int, typer.Option(help="Bits per simulated point.")] = 200_000,
    seed: Annotated[int, typer.Option(help="Seed.")] = 0,
) -> None:
    """Draw measured against theoretical BER for every modulation, AWGN and Rayleigh."""
    from airlora.link.simulate import plot_ber_curves

    with err_console.status("simulating BER curves"):
        path = plot_ber_curves(out, n_bits=n_bits, seed=seed)
    console.print(f"wrote {path}")
