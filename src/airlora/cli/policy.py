"""`airlora train-policy` and `airlora evaluate-policy`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from airlora.cli.common import (
    ConfigOption,
    DataDirOption,
    DataOption,
    DeviceOption,
    JsonOption,
    LabelColumnOption,
    LabelOffsetOption,
    LinkOption,
    ModelOption,
    NoHeaderOption,
    OutOption,
    PrecisionOption,
    PresetOption,
    QuietOption,
    RmaxOption,
    RoundsOption,
    RunNameOption,
    SeedOption,
    StepsOption,
    SweepFileArgument,
    TargetsOption,
    TextColumnOption,
    ThreadsOption,
    config_mapping,
    console,
    err_console,
    key_value_table,
    print_json,
    progress_bar,
    shown,
    sweep_file_or_preset,
)


def train_policy(
    config_file: ConfigOption = None,
    method: Annotated[
        str | None, typer.Option(help="airllm, ppo, random or heuristic. [airllm]")
    ] = None,
    rmax: RmaxOption = None,
    surrogate: Annotated[
        bool | None,
        typer.Option(
            "--surrogate/--real",
            help="Train on a reward model fitted to logged real rounds, or on real rounds.",
        ),
    ] = None,
    surrogate_episodes: Annotated[
        int | None, typer.Option(help="Real episodes logged to fit the surrogate. [8]")
    ] = None,
    surrogate_rounds: Annotated[
        Path | None,
        typer.Option(
            help="rounds.jsonl of an earlier run to fit the surrogate on (no new logging)."
        ),
    ] = None,
    force_surrogate: Annotated[
        bool,
        typer.Option(
            "--force-surrogate",
            help="Train on the surrogate even if its held-out R^2 is below surrogate.min_r2.",
        ),
    ] = False,
    total_steps: Annotated[
        int | None, typer.Option(help="Environment steps (rounds) of training. [20000]")
    ] = None,
    rounds: RoundsOption = None,
    steps_per_round: StepsOption = None,
    model: ModelOption = None,
    data: DataOption = None,
    data_dir: DataDirOption = None,
    text_column: TextColumnOption = None,
    label_column: LabelColumnOption = None,
    no_header: NoHeaderOption = False,
    label_offset: LabelOffsetOption = None,
    link: LinkOption = None,
    snr_low_db: Annotated[
        float | None, typer.Option(help="Lowest SNR of the uniform SNR process, dB. [-5]")
    ] = None,
    snr_high_db: Annotated[
        float | None, typer.Option(help="Highest SNR of the uniform SNR process, dB. [25]")
    ] = None,
    deadline_s: Annotated[
        float | None, typer.Option(help="Per-round airtime deadline, s. [0.25]")
    ] = None,
    cost_weight: Annotated[
        float | None, typer.Option(help="lambda of the payload cost in the reward. [0.5]")
    ] = None,
    reward_form: Annotated[str | None, typer.Option(help="accuracy or gain. [accuracy]")] = None,
    seed: SeedOption = None,
    threads: ThreadsOption = None,
    device: DeviceOption = None,
    precision: PrecisionOption = None,
    target_modules: TargetsOption = None,
    tensorboard: Annotated[
        bool, typer.Option("--tensorboard", help="Also log to TensorBoard in the run folder.")
    ] = False,
    out: OutOption = None,
    run_name: RunNameOption = None,
    quiet: QuietOption = False,
) -> None:
    """Train a rank policy on the real environment or a fitted surrogate; save it.

    The run folder holds config.yaml, manifest.json, episodes.jsonl (one line per finished
    episode), with --surrogate rounds.jsonl and surrogate/ (the logged real rounds and the
    fit's held-out R^2 and MAE), and policy/ (policy.json, ppo.zip, denoiser.safetensors).
    """
    from airlora.config import PolicyTrainConfig, surrogate_section
    from airlora.train_policy import run_train_policy

    mapping = config_mapping(config_file, locals())
    section = surrogate_section(
        mapping.get("surrogate"), surrogate, surrogate_episodes, surrogate_rounds
    )
    if section is not None or surrogate is False:
        mapping["surrogate"] = section
    if force_surrogate and mapping.get("surrogate") is not None:
        mapping["surrogate"] = {**mapping["surrogate"], "min_r2": None}
    config = PolicyTrainConfig.model_validate(mapping)
    with progress_bar("train-policy", "env steps", quiet) as progress:
        task = progress.add_task("steps", total=config.total_steps)
        result = run_train_policy(
            config,
            on_status=lambda m: err_console.print(m) if not quiet else None,
            on_steps=lambda n: progress.update(task, completed=min(n, config.total_steps)),
        )
    returns = result.episode_returns
    rows = [("method", config.method), ("episodes", str(len(returns)))]
    if returns:
        k = max(1, min(20, len(returns) // 5))
        rows.append((f"mean return, first {k} episodes", f"{sum(returns[:k]) / k:.4f}"))
        rows.append((f"mean return, last {k} episodes", f"{sum(returns[-k:]) / k:.4f}"))
    if result.surrogate_fit:
        fit = result.surrogate_fit
        rows.append(("surrogate held-out R^2", f"{fit['loeo_r2']:.3f}"))
        rows.append(("surrogate held-out MAE", f"{fit['loeo_mae']:.4f}"))
        rows.append(("  MAE of predicting the mean", f"{fit['loeo_mae_of_mean']:.4f}"))
    rows.append(("run folder", str(result.run_dir)))
    console.print(key_value_table("Policy training", rows))


def evaluate_policy(
    run_dir: Annotated[Path, typer.Argument(help="A train-policy run folder.")],
    snr_db: Annotated[float, typer.Option(help="Es/N0 of every round, dB.")] = 10.0,
    episodes: Annotated[int, typer.Option(help="Real episodes to play.", min=1)] = 1,
    seed: Annotated[int, typer.Option(help="Seed of the first episode.")] = 10_000,
    as_json: JsonOption = False,
    device: DeviceOption = None,
) -> None:
    """Play real episodes (real fine-tuning, real link) at a fixed SNR with a saved policy.

    Writes RUN_DIR/eval/snr<S>dB.json (every round and a summary).
    """
    from airlora.driver import evaluate_policy as play_policy

    def on_round(row: dict) -> None:
        if not as_json:
            ranks = ",".join(str(r) for r in row["rank_vector"])
            err_console.print(
                f"episode {row['episode']} round {row['round']}: accuracy {row['accuracy']:.4f}, "
                f"reward {row['reward']:.4f}, ranks {ranks}"
            )

    summary = play_policy(run_dir, snr_db, episodes, seed, on_round, device).summary
    if as_json:
        print_json(summary)
        return
    keys = ("method", "episodes", "mean_rank", "episode_return", "final_accuracy")
    rows = [(k, shown(summary[k])) for k in (*keys, "mean_payload_params")]
    rows.append(("mean rank vector", " ".join(f"{r:.1f}" for r in summary["mean_rank_vector"])))
    console.print(key_value_table(f"evaluate-policy at {snr_db:g} dB", rows))


def log_rounds(
    config_file: SweepFileArgument = None,
    preset: PresetOption = None,
    rmax: Annotated[
        int | None, typer.Option(help="r_max of the logged rounds. [default: 8]")
    ] = None,
    design_episodes: Annotated[
        int | None,
        typer.Option(
            help="Sobol-designed episodes (each also re-scored twice). [default: 44]", min=2
        ),
    ] = None,
    replicates: Annotated[
        int,
        typer.Option(
            help="Plays of each design and anchor episode from different seeds (paired).", min=1
        ),
    ] = 1,
    out: Annotated[Path, typer.Option(help="Output folder (resumed if it exists).")] = Path(
        "runs/rounds"
    ),
    extend: Annotated[
        str | None,
        typer.Option(
            help="A finished log (folder, or shipped:NAME) to give --replicates plays of each "
            "design and anchor episode: its config and plan, its episodes kept, only the new "
            "replicates played. Takes no config, preset, --rmax or --design-episodes."
        ),
    ] = None,
    quiet: QuietOption = False,
) -> None:
    """Log real rounds for a round surrogate: Sobol-designed episodes with counterfactual
    re-scores, rank-0 and rank-r_max anchors, and fixed policies at the preset's SNRs on
    paired seeds. Writes rounds.jsonl, policies.jsonl and manifest.json; a stopped run
    resumes where it stopped. The shipped sets (airlora bench surrogate) are
    `airlora log-rounds --preset paper-cpu --rmax 8 --replicates 2` and `--rmax 64`;
    `--extend shipped:paper-cpu-r64 --replicates 2` adds a second seed to the latter.
    """
    from airlora.config import SweepConfig
    from airlora.env.surrogate import SHIPPED, shipped_log
    from airlora.surrogate_log import LogPlan, extend_log
    from airlora.surrogate_log import log_rounds as run

    if extend is not None:
        given = [config_file, preset, rmax, design_episodes]
        if any(v is not None for v in given):
            raise ValueError(
                "--extend takes the config and plan of the log it extends: give no config "
                "file, --preset, --rmax or --design-episodes with it"
            )
        source = shipped_log(extend[len(SHIPPED) :]) if extend.startswith(SHIPPED) else Path(extend)
    else:
        config = SweepConfig.model_validate(sweep_file_or_preset(config_file, preset))
        plan = LogPlan(
            r_max=8 if rmax is None else rmax,
            design_episodes=44 if design_episodes is None else design_episodes,
            policy_snrs_db=tuple(config.snr_db),
            replicates=replicates,
        )
    with progress_bar("log-rounds", "episodes", quiet) as progress:
        task = progress.add_task("episodes", total=None)

        def on_episode(job: str, done: int, total: int) -> None:
            progress.update(task, completed=done, total=total)

        if extend is not None:
            folder = extend_log(source, out, replicates, on_episode=on_episode)
        else:
            folder = run(config, plan, out, on_episode=on_episode)
    console.print(f"logged rounds in {folder}")
