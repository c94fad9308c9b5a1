"""One episode driver for every method, top to bottom.

``airlora finetune`` (fixed ranks), ``airlora run`` (any method) and ``airlora
evaluate-policy`` (a saved policy at a fixed SNR) all play episodes through this file:

1. check every input by building the real environment (model, data, link) and the method's
   policy; nothing is written before this succeeds;
2. create the run folder (config, manifest with seed, versions, code revision, data source);
3. for each of T rounds: the policy picks the rank vector from the state (timed: the
   decision's compute), the environment runs the round (train K steps, transmit, rebuild at
   the edge, evaluate), the round is logged and reported to the callback;
4. score the edge's final model on the test split when asked, export its adapter (PEFT
   format), and write one summary with one set of keys (:func:`summarize`).

A diverged round (non-finite loss or parameters) ends the episode; its summary says where,
and its figures are ``None``, never numbers that could be averaged in by mistake.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np

from airlora.config import EnvConfig, FinetuneConfig, PolicyTrainConfig, RunConfig, load_config
from airlora.env.real import RankSelectionEnv
from airlora.errors import PolicyError
from airlora.policies import ActionLayout, FixedRankPolicy, RankPolicy, load_policy, make_policy
from airlora.runs import (
    ADAPTER_DIR,
    CONFIG_FILE,
    EVAL_DIR,
    POLICY_DIR,
    RunFolder,
    atomic_write_text,
)


@dataclass
class EpisodeResult:
    """What an episode (or several, for evaluate-policy) produced.

    ``rounds``: one dict per round (the round's metrics, the reward, decision time and
    latency; ``episode`` numbers them when there are several). ``summary``: see
    :func:`summarize`. ``run_dir``: where it was written."""

    run_dir: Path
    rounds: list[dict]
    summary: dict


class EpisodeCallback:
    """Progress hooks of the driver; subclass and override what you need (as with
    Stable-Baselines3's callbacks). A plain function ``f(row)`` works as ``on_round``."""

    def on_episode_start(self, episode: int, total_rounds: int) -> None:
        """Before the first round of an episode."""

    def on_round(self, row: dict) -> None:
        """After every round, with its row (the same dict that goes to ``metrics.jsonl``)."""


class _FunctionCallback(EpisodeCallback):
    def __init__(self, on_round: Callable[[dict], None]) -> None:
        self._on_round = on_round

    def on_round(self, row: dict) -> None:
        self._on_round(row)


def as_callback(callback: EpisodeCallback | Callable[[dict], None] | None) -> EpisodeCallback:
    if callback is None:
        return EpisodeCallback()
    if isinstance(callback, EpisodeCallback):
        return callback
    return _FunctionCallback(callback)


# ----------------------------------------------------------------------------- policies


def method_policy(config: RunConfig | FinetuneConfig, layout: ActionLayout) -> RankPolicy:
    """The decision rule of a run (AdaLoRA's ranks are its own: any vector will do)."""
    if isinstance(config, FinetuneConfig):
        return FixedRankPolicy(
            layout, config.seed, rank_vector=config.rank_vector_for(layout.num_projections)
        )
    if config.method in ("airllm", "ppo"):
        assert config.policy is not None
        policy = load_policy(config.policy)
        if policy.method != config.method:
            raise PolicyError(
                f"{config.policy} holds a {policy.method} policy, not {config.method}"
            )
        check_layout(policy, layout, config.policy)
        return policy
    if config.method in ("lora", "adalora"):
        return FixedRankPolicy(layout, config.seed, config.rank)
    return make_policy(config.method, layout, config.seed)


def check_layout(policy: RankPolicy, layout: ActionLayout, where: Path | str) -> None:
    if list(policy.layout.projection_names) != list(layout.projection_names) or (
        policy.layout.r_max != layout.r_max
    ):
        raise PolicyError(f"the policy in {where} was trained for other projections or r_max")


# ----------------------------------------------------------------------------- the loop


def play_episode(
    env: RankSelectionEnv,
    policy: RankPolicy,
    seed: int,
    callback: EpisodeCallback,
    log: Callable[[dict], None] | None = None,
    extra: dict | None = None,
    method: str | None = None,
) -> list[dict]:
    """One episode from ``env.reset(seed)``: greedy decisions, one row per round;
    ``method`` names the rows (default: the policy's; AdaLoRA plays a fixed-rank one)."""
    rows: list[dict] = []
    obs, _ = env.reset(seed=seed)
    callback.on_episode_start(int((extra or {}).get("episode", 0)), env.episode_rounds)
    done = False
    while not done:
        start = time.perf_counter()
        ranks = policy.act(obs, deterministic=True)
        decision = time.perf_counter() - start
        obs, reward, done, _, _ = env.step(ranks)
        metrics = env.last_metrics.as_dict()
        row = {
            **(extra or {}),
            "method": method or policy.method,
            "reward": reward,
            "decision_time_s": decision,
            "latency_s": decision + metrics["train_time_s"] + metrics["airtime_s"],
            **metrics,
        }
        rows.append(row)
        if log:
            log(row)
        callback.on_round(row)
    return rows


def summarize(rounds: Sequence[dict], steps_per_round: int, batch_size: int) -> dict:
    """One summary with one set of keys, for every method and command. Figures of several
    episodes are means over them (``final_accuracy``: of each episode's last round)."""
    episodes = [[r for r in rounds if r.get("episode", 0) == e] for e in _episodes(rounds)]
    last = [ep[-1] for ep in episodes]
    diverged = any(r.get("diverged") for r in last)
    acc = [r["accuracy"] for r in rounds]
    ranks = np.asarray([r["rank_vector"] for r in rounds], dtype=np.float64)
    train_time = sum(r["train_time_s"] for r in rounds)
    steps = len(rounds) * steps_per_round
    return {
        "episodes": len(episodes),
        "rounds": len(rounds),
        "diverged": diverged,
        "diverged_round": next((r["round"] for r in last if r.get("diverged")), None),
        "final_accuracy": None if diverged else float(np.mean([r["accuracy"] for r in last])),
        "mean_accuracy": None if diverged else float(np.mean(acc)),
        "test_accuracy": None,
        "test_loss": None,
        "episode_return": float(np.mean([sum(r["reward"] for r in ep) for ep in episodes])),
        "total_payload_params": int(sum(r["payload_params"] for r in rounds)),
        "mean_payload_params": float(np.mean([r["payload_params"] for r in rounds])),
        "total_airtime_s": float(sum(r["airtime_s"] for r in rounds)),
        "mean_rank": float(ranks.mean()),
        "training_steps": steps,
        "train_samples_per_s": steps * batch_size / train_time if train_time else 0.0,
        "mean_decision_time_s": float(np.mean([r["decision_time_s"] for r in rounds])),
        "mean_train_time_s": float(np.mean([r["train_time_s"] for r in rounds])),
        "mean_latency_s": float(np.mean([r["latency_s"] for r in rounds])),
    }


def _episodes(rounds: Sequence[dict]) -> list[int]:
    return sorted({int(r.get("episode", 0)) for r in rounds})


# ----------------------------------------------------------------------------- commands


def run_episode(
    config: RunConfig | FinetuneConfig,
    callback: EpisodeCallback | Callable[[dict], None] | None = None,
    out: Path | None = None,
    score_validation: bool = False,
) -> EpisodeResult:
    """Play one real episode of the config's method; ``out`` overrides the run folder path
    (sweeps use it). A :class:`~airlora.config.FinetuneConfig` plays its fixed rank vector.

    ``score_validation``: the summary's ``validation_accuracy`` is the edge's final model on
    the whole validation split (a tuning run's score; the rounds score its first
    ``edge_eval_size`` rows only)."""
    callback = as_callback(callback)
    if isinstance(config, RunConfig) and config.formulation == "online":
        from airlora.online import run_online

        run_dir, rows, summary = run_online(config, callback.on_round, out)
        return EpisodeResult(run_dir, rows, summary)
    started = time.perf_counter()
    env_config = config.env if isinstance(config, RunConfig) else EnvConfig()
    env = RankSelectionEnv.build(
        config.data, config.model, config.train, config.link, env_config, config.seed
    )
    policy = method_policy(config, ActionLayout.of_env(env))
    kind = "finetune" if isinstance(config, FinetuneConfig) else "run"
    if out is None:
        prefix = "finetune" if kind == "finetune" else f"run-{config.method}"
        stamp = f"{datetime.now():%Y%m%d-%H%M%S}"
        out = Path(config.out_dir) / (config.run_name or f"{prefix}-{stamp}-seed{config.seed}")
    run = RunFolder.create(
        out.parent, out.name, config, config.seed, kind, data_source=env.engine.task.source
    )
    try:
        method = config.method if isinstance(config, RunConfig) else "lora"
        rounds = play_episode(env, policy, config.seed, callback, run.append_metrics, method=method)
        summary = summarize(rounds, config.train.steps_per_round, config.data.batch_size)
        if score_validation:
            summary["validation_accuracy"] = None
        if not summary["diverged"]:
            engine = env.engine
            if config.final_test:
                acc, loss = engine.evaluate(engine.edge, engine.task.test)
                summary.update(test_accuracy=acc, test_loss=loss)
            if score_validation:
                summary["validation_accuracy"] = engine.evaluate(
                    engine.edge, engine.task.validation
                )[0]
            env.engine.edge.export_peft(run.path / ADAPTER_DIR)
        run.finish(summary, started, status="diverged" if summary["diverged"] else "completed")
    except BaseException as err:
        run.fail(err)
        raise
    return EpisodeResult(run.path, rounds, summary)


def run_finetune(
    config: FinetuneConfig, callback: EpisodeCallback | Callable[[dict], None] | None = None
) -> EpisodeResult:
    """Fine-tune with the config's fixed ranks (``airlora finetune``); see :func:`run_episode`."""
    return run_episode(config, callback)


def evaluate_policy(
    run_dir: Path,
    snr_db: float,
    episodes: int = 1,
    seed: int = 10_000,
    callback: EpisodeCallback | Callable[[dict], None] | None = None,
    device: str | None = None,
) -> EpisodeResult:
    """Play ``episodes`` real episodes (never the surrogate) at a fixed SNR with the saved
    policy of a train-policy run; ``device`` overrides its ``train.device``. Every round and
    the summary go to ``RUN_DIR/eval/snr<S>dB.json``."""
    run_dir = Path(run_dir)
    if not math.isfinite(snr_db):
        raise ValueError(f"SNR must be a finite number of dB, got {snr_db}")
    if not (run_dir / CONFIG_FILE).is_file():
        raise FileNotFoundError(f"{run_dir} is not a train-policy run folder (no {CONFIG_FILE})")
    config = load_config(run_dir / CONFIG_FILE, PolicyTrainConfig)
    policy = load_policy(run_dir / POLICY_DIR)
    link = config.link.model_copy(update={"snr_process": "fixed", "snr_db": snr_db})
    train = config.train
    if device is not None:
        train = type(train).model_validate({**train.model_dump(), "device": device})
    env = RankSelectionEnv.build(config.data, config.model, train, link, config.env, seed)
    check_layout(policy, ActionLayout.of_env(env), run_dir / POLICY_DIR)
    callback = as_callback(callback)
    rounds: list[dict] = []
    for episode in range(episodes):
        rounds += play_episode(env, policy, seed + episode, callback, extra={"episode": episode})
    summary = {
        "snr_db": snr_db,
        "method": policy.method,
        **summarize(rounds, config.train.steps_per_round, config.data.batch_size),
        "mean_rank_vector": np.mean([r["rank_vector"] for r in rounds], axis=0).round(3).tolist(),
        "projection_names": list(policy.layout.projection_names),
    }
    out = run_dir / EVAL_DIR
    out.mkdir(exist_ok=True)
    text = json.dumps({"summary": summary, "rounds": rounds}, indent=1) + "\n"
    atomic_write_text(out / f"snr{snr_db:g}dB.json", text)
    return EpisodeResult(out, rounds, summary)
