"""`airlora run`: one real episode of one method, top to bottom.

Check the inputs (model, data, link, the saved policy) before anything is written, create the
run folder, then for each of T rounds: observe the state, let the method pick the rank vector
(timed: the decision's compute), run the round (train, transmit, rebuild at the edge,
evaluate), log it; finally export the edge's adapter and write the summary. The round's
end-to-end latency is decision + server training + airtime.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np

from airlora.config import RunConfig
from airlora.env.real import RankSelectionEnv
from airlora.policies import ActionLayout, FixedRankPolicy, RankPolicy, load_policy, make_policy
from airlora.runs import RunFolder


@dataclass
class EpisodeResult:
    run_dir: Path
    rounds: list[dict]
    summary: dict


def method_policy(config: RunConfig, layout: ActionLayout) -> RankPolicy:
    """The decision rule of a method (AdaLoRA's ranks are its own: any vector will do)."""
    if config.method in ("airllm", "ppo"):
        assert config.policy is not None
        policy = load_policy(config.policy)
        if policy.method != config.method:
            raise ValueError(f"{config.policy} holds a {policy.method} policy, not {config.method}")
        if list(policy.layout.projection_names) != list(layout.projection_names) or (
            policy.layout.r_max != layout.r_max
        ):
            raise ValueError(
                f"the policy in {config.policy} was trained for other projections or r_max"
            )
        return policy
    if config.method in ("lora", "adalora"):
        return FixedRankPolicy(layout, config.seed, config.rank)
    return make_policy(config.method, layout, config.seed)


def summarize(rounds: list[dict]) -> dict:
    """Episode figures. A diverged episode (its last round) has no accuracy: None, not a
    number that could be averaged in by mistake."""
    diverged = bool(rounds[-1].get("diverged"))
    acc = [r["accuracy"] for r in rounds]
    ranks = np.asarray([r["rank_vector"] for r in rounds], dtype=np.float64)
    return {
        "diverged": diverged,
        "diverged_round": rounds[-1]["round"] if diverged else None,
        "final_accuracy": None if diverged else acc[-1],
        "mean_accuracy": None if diverged else float(np.mean(acc)),
        "episode_return": float(sum(r["reward"] for r in rounds)),
        "total_payload_params": int(sum(r["payload_params"] for r in rounds)),
        "mean_payload_params": float(np.mean([r["payload_params"] for r in rounds])),
        "total_airtime_s": float(sum(r["airtime_s"] for r in rounds)),
        "mean_rank": float(ranks.mean()),
        "mean_decision_time_s": float(np.mean([r["decision_time_s"] for r in rounds])),
        "mean_train_time_s": float(np.mean([r["train_time_s"] for r in rounds])),
        "mean_latency_s": float(np.mean([r["latency_s"] for r in rounds])),
    }


def run_episode(
    config: RunConfig, on_round: Callable[[dict], None] | None = None, out: Path | None = None
) -> EpisodeResult:
    """Play one real episode; ``out`` overrides the run folder path (sweeps use it)."""
    started = time.perf_counter()
    env = RankSelectionEnv.build(
        config.data, config.model, config.train, config.link, config.env, config.seed
    )
    layout = ActionLayout.of_env(env)
    policy = method_policy(config, layout)
    if out is None:
        stamp = f"{datetime.now():%Y%m%d-%H%M%S}"
        name = config.run_name or f"run-{config.method}-{stamp}-seed{config.seed}"
        out = Path(config.out_dir) / name
    run = RunFolder.create(
        out.parent, out.name, config, config.seed, kind="run", data_source=env.engine.task.source
    )
    rounds: list[dict] = []
    try:
        obs, _ = env.reset(seed=config.seed)
        done = False
        while not done:
            start = time.perf_counter()
            ranks = policy.act(obs, deterministic=True)
            decision = time.perf_counter() - start
            obs, reward, done, _, _ = env.step(ranks)
            metrics = env.last_metrics.as_dict()
            row = {
                "method": config.method,
                "reward": reward,
                "decision_time_s": decision,
                "latency_s": decision + metrics["train_time_s"] + metrics["airtime_s"],
                **metrics,
            }
            rounds.append(row)
            run.append_metrics(row)
            if on_round:
                on_round(row)
        summary = summarize(rounds)
        if not summary["diverged"]:
            if config.final_test:
                engine = env.engine
                summary["test_accuracy"] = engine.evaluate(engine.edge, engine.task.test)[0]
            env.engine.edge.export_peft(run.path / "adapter")
        run.finish(summary, started, status="diverged" if summary["diverged"] else "completed")
    except BaseException as err:
        run.fail(err)
        raise
    return EpisodeResult(run.path, rounds, summary)
