"""`airlora train-policy`, top to bottom.

Check the inputs by building the real environment (model, data, link), create the run
folder, optionally log real rounds and fit the surrogate (its held-out R^2 and MAE go to the
manifest and the console), train the policy on the surrogate or on real rounds (episode
returns to ``episodes.jsonl``, TensorBoard when asked), save it to ``policy/``. Playing a
saved policy is :func:`airlora.driver.evaluate_policy`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np

from airlora.config import PolicyTrainConfig
from airlora.env.real import RankSelectionEnv
from airlora.env.surrogate import (
    LoggedRound,
    SurrogateEnv,
    collect_rounds,
    fit_surrogate,
    read_rounds,
    resolve_rounds_file,
)
from airlora.policies import ActionLayout, RankPolicy, make_policy
from airlora.runs import (
    EPISODES_FILE,
    POLICY_DIR,
    ROUNDS_FILE,
    SURROGATE_DIR,
    TENSORBOARD_DIR,
    RunFolder,
)


@dataclass
class PolicyTrainResult:
    run_dir: Path
    policy: RankPolicy
    episode_returns: list[float]
    surrogate_fit: dict | None


def run_train_policy(
    config: PolicyTrainConfig,
    on_status: Callable[[str], None] | None = None,
    on_steps: Callable[[int], None] | None = None,
) -> PolicyTrainResult:
    """Train a rank policy; see the module docstring. Returns the run folder and the policy."""
    say = on_status or (lambda _m: None)
    started = time.perf_counter()
    real = RankSelectionEnv.build(
        config.data, config.model, config.train, config.link, config.env, config.seed
    )
    layout = ActionLayout.of_env(real)
    reused = None
    if config.surrogate is not None and config.surrogate.rounds_file is not None:
        source = resolve_rounds_file(config.surrogate.rounds_file, config.model.r_max)
        reused = read_rounds(source)
        _check_rounds(reused, layout)  # before the run folder exists: bad input leaves nothing
    stamp = f"{datetime.now():%Y%m%d-%H%M%S}"
    name = config.run_name or f"policy-{config.method}-{stamp}-seed{config.seed}"
    run = RunFolder.create(config.out_dir, name, config, config.seed, kind="train-policy")
    try:
        fit = None
        if config.surrogate is not None:
            if reused is not None:
                rows = reused
                say(f"surrogate: {len(rows)} rounds from {source}")
            else:
                n = config.surrogate.real_episodes
                say(f"logging {n} real episodes of {real.episode_rounds} rounds for the surrogate")
                rows = collect_rounds(
                    real,
                    n,
                    seed=config.seed,
                    on_round=lambda r: run.append_record(ROUNDS_FILE, r.__dict__),
                )
            server = real.engine.server
            per_rank = [p.d_in + p.d_out for p in server.projections]
            head = server.payload().head_params
            surrogate = fit_surrogate(
                rows,
                layout.projection_names,
                layout.r_max,
                per_rank,
                head,
                config.link,
                config.env,
                min_r2=config.surrogate.min_r2,
                eval_rows=len(real.engine.task.edge_eval),
                seed=config.seed,
            )
            surrogate.save(run.path / SURROGATE_DIR, rows)
            fit = surrogate.model.metrics
            floor = fit.get("noise_floor_r2")
            say(
                f"surrogate, leave-one-episode-out: R^2 {fit['loeo_r2']:.3f}, "
                f"MAE {fit['loeo_mae']:.4f} ({fit['held_out_rounds']} rounds, "
                f"{fit['episodes']} episodes"
                + (f"; the noise floor allows R^2 {floor:.2f})" if floor is not None else ")")
            )

            def make_env(seed: int) -> SurrogateEnv:
                return SurrogateEnv(
                    surrogate.model, rows, config.link, config.env, per_rank, head, seed
                )

            n_envs = config.ppo.n_envs
        else:

            def make_env(seed: int) -> RankSelectionEnv:
                return real  # one model in memory: real rounds run one at a time

            n_envs = 1

        policy = make_policy(config.method, layout, config.seed, config.ppo, config.airllm)
        returns: list[float] = []

        def on_episode(steps: int, episode_return: float) -> None:
            returns.append(episode_return)
            run.append_record(
                EPISODES_FILE, {"steps": steps, "episode": len(returns), "return": episode_return}
            )

        tensorboard = run.path / TENSORBOARD_DIR if config.tensorboard else None
        say(f"training {config.method} for {config.total_steps} environment steps")
        policy.learn(make_env, config.total_steps, n_envs, on_episode, on_steps, tensorboard)
        policy.save(run.path / POLICY_DIR)
        summary = {
            "episodes": len(returns),
            "first_returns_mean": _mean(returns[:20]),
            "last_returns_mean": _mean(returns[-20:]),
            "surrogate_fit": fit,
        }
        run.finish(summary, started)
    except BaseException as err:
        run.fail(err)
        raise
    return PolicyTrainResult(run.path, policy, returns, fit)


def _check_rounds(rows: list[LoggedRound], layout: ActionLayout) -> None:
    bad = [
        r
        for r in rows
        if len(r.rank_vector) != layout.num_projections or max(r.rank_vector) > layout.r_max
    ]
    if bad:
        raise ValueError(
            f"logged rounds do not fit this model: {len(bad)} rank vectors are not "
            f"{layout.num_projections} ranks in 0..{layout.r_max}"
        )


def _mean(xs: list[float]) -> float | None:
    return float(np.mean(xs)) if xs else None
