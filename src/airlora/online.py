"""`airlora run --formulation online`: the authors' formulation, top to bottom.

1. Check every input by building the engine (model, data) with a schedule that spans the
   run's ``online.steps`` training steps, and the online environment over it.
2. Create the run folder (config, manifest with seed, versions, code revision, data source).
3. Run ``online.steps`` environment steps, each one training step (or a violated step that
   trains nothing):
   - ``lora`` plays its fixed rank (at least ``min_rank``) on every projection; ``random``
     draws ranks; ``heuristic`` takes the largest uniform rank that fits this step's slot;
     ``oracle`` fills the slot (that rank, plus one more on as many projections as still fit);
     ``adalora`` (PEFT) prunes on its own budget schedule and its current ranks are priced;
   - ``airllm`` and ``ppo`` *learn while the model trains*: their ``learn`` drives the
     environment, PPO updates once per episode window, and the model is never reset.
   Every ``validate_every`` steps (and at the end) the server model is scored on the
   validation split; the best state is kept.
4. Restore the best state, score it on the test split, export the adapter, and write one
   summary: ``test_accuracy``, ``best_validation_accuracy``, ``steps``,
   ``violation_fraction``, ``mean_params_per_step`` (over the steps that sent), ...
"""

from __future__ import annotations

import gc
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

import numpy as np

from airlora.config import ModelConfig, RunConfig
from airlora.engine import RoundEngine
from airlora.env.observation import projection_groups
from airlora.env.online import OnlineRankEnv
from airlora.errors import ConfigError
from airlora.link import build_link
from airlora.policies import ActionLayout, make_policy
from airlora.runs import ADAPTER_DIR, RunFolder


def build_online_env(config: RunConfig) -> OnlineRankEnv:
    """The engine (a schedule over the run's steps) and the online environment over it.
    ``link.scheme: shannon`` prices each step at capacity and sends nothing; a simulated link
    (digital, coded, analog) runs at ``online.bandwidth_hz`` without a deadline of its own,
    prices each step by its airtime against the slot and carries the trained adapter to the
    edge.
    With ``adalora_budget: link`` the AdaLoRA model is built a second time, at the budget the
    first one's link prices."""
    steps = config.online.steps
    train = config.train.model_copy(update={"rounds": 1, "steps_per_round": steps})
    simulated = config.link.scheme != "shannon"
    if simulated:
        link = config.link.model_copy(
            update={"bandwidth_hz": config.online.bandwidth_hz, "deadline_s": None}
        )
    else:  # the engine's link is never used
        link = config.link.model_copy(update={"scheme": "perfect"})

    def build(model: ModelConfig) -> OnlineRankEnv:
        engine = RoundEngine.build(
            config.data, model, train, build_link(link, config.seed), config.seed
        )
        return OnlineRankEnv(
            engine,
            config.online,
            unk_token_id=engine.unk_token_id,
            special_ids=tuple(engine.special_ids),
            seed=config.seed,
            use_complexity=config.env.use_complexity,
            simulated_link=simulated,
        )

    env = build(config.model)
    if config.method == "adalora" and config.online.adalora_budget == "link":
        start, target = adalora_link_budget(env)
        settings = config.model.adalora.model_copy(update={"target_rank": target})
        del env  # one model in memory at a time
        env = build(config.model.model_copy(update={"r_max": start, "adalora": settings}))
    return env


def adalora_link_budget(env: OnlineRankEnv) -> tuple[int, int]:
    """AdaLoRA's start and target ranks matched to the link: the target is the mean, over
    the SNR levels, of the largest uniform rank that fits a slot (``min_rank`` at a level
    where nothing fits), rounded half to even; the start is 1.5 times it (PEFT's default
    ratio, 12 to 8), at most r_max and at most what fits at the best SNR (a start that fits
    nowhere would never train, so never prune)."""
    fitting = [env.largest_uniform_rank(s) for s in env.settings.snr_levels_db]
    target = max(1, round(float(np.mean(fitting))))
    start = min(env.r_max, max(fitting), math.ceil(1.5 * target))
    if start <= 1:
        raise ConfigError(
            "adalora_budget link: only rank 1 fits a slot at the best SNR level, so AdaLoRA "
            "has nothing to prune; raise bandwidth_hz or use adalora_budget r_max"
        )
    return start, min(target, start - 1)


class _Tracker:
    """Logs every step, validates every ``validate_every`` steps, keeps the best state."""

    def __init__(self, env: OnlineRankEnv, run: RunFolder, on_step: Callable[[dict], None]):
        self.env, self.run, self.on_step = env, run, on_step
        self.rows: list[dict] = []
        self.best_accuracy = -math.inf
        self.best_state: dict | None = None
        self.validations: list[tuple[int, float]] = []

    def record(self, info: dict) -> None:
        row = dict(info)
        self.run.append_metrics(row)
        self.rows.append(row)
        self.on_step(row)
        if row["step"] % self.env.settings.validate_every == 0:
            self.validate()

    def validate(self) -> None:
        step = self.env.steps_done
        if self.validations and self.validations[-1][0] == step:
            return
        accuracy = self.env.validate()
        self.validations.append((step, accuracy))
        if accuracy > self.best_accuracy:
            self.best_accuracy = accuracy
            self.best_state = self.env.engine.server.snapshot()


@contextmanager
def long_lived_objects_frozen() -> Iterator[None]:
    """Objects alive now (the model, the data, the tokenizer: several hundred thousand) are
    left out of the garbage collector's scans until the loop ends.

    Why: the policy's many short-lived objects trigger full collections, and each full
    collection walks every live object, tens of milliseconds at a time in the middle of a
    training step. Frozen objects are still freed by reference counting; unfreezing at the
    end hands any cycles among them back to the collector.
    """
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def _play_fixed(env: OnlineRankEnv, config: RunConfig, tracker: _Tracker) -> None:
    with long_lived_objects_frozen():
        _play_fixed_steps(env, config, tracker)


def _play_fixed_steps(env: OnlineRankEnv, config: RunConfig, tracker: _Tracker) -> None:
    rng = np.random.default_rng(config.seed)
    m = len(env.projection_names)
    env.reset(seed=config.seed)
    for _ in range(config.online.steps):
        if config.method == "lora":
            rank = env.r_max if config.rank is None else config.rank
            ranks = np.full(m, max(rank, env.min_rank))
        elif config.method == "heuristic":
            ranks = np.full(m, env.largest_uniform_rank())
        elif config.method == "oracle":
            ranks = env.slot_filling_ranks()
        elif config.method == "adalora":  # its own ranks (the environment prices them)
            ranks = np.full(m, env.r_max)
        else:  # random: uniform over the levels a learned policy chooses from
            ranks = rng.choice(np.asarray(env.rank_levels), size=m)
        _, _, done, _, info = env.step_ranks(ranks)
        tracker.record(info)
        if done:
            env.reset()


def learn_policy_online(
    env: OnlineRankEnv, config: RunConfig, on_steps: Callable[[int], bool]
) -> list[float]:
    """The policy learns from the environment, whose steps train the model; ``on_steps``
    returning False stops it. Returns the episode returns."""
    episode = config.online.episode_steps
    # One PPO update per episode window, on its transitions (as the reference does).
    ppo = config.ppo.model_copy(update={"n_steps": episode, "batch_size": episode, "n_envs": 1})
    policy = make_policy(config.method, ActionLayout.of_env(env), config.seed, ppo, config.airllm)
    with long_lived_objects_frozen():
        log = policy.learn(lambda _seed: env, config.online.steps, 1, on_steps=on_steps)
    return log.episode_returns


def _learn_online(env: OnlineRankEnv, config: RunConfig, tracker: _Tracker) -> dict:
    def on_steps(_steps: int) -> bool:
        if env.last_info and env.last_info["step"] > len(tracker.rows):
            tracker.record(env.last_info)
        return env.steps_done < config.online.steps  # PPO would finish its rollout: stop

    return {"episode_returns": learn_policy_online(env, config, on_steps)}


def run_online(
    config: RunConfig,
    on_step: Callable[[dict], None] | None = None,
    out: Path | None = None,
    score_test: bool = True,
) -> tuple[Path, list[dict], dict]:
    """Run the online formulation; returns the run folder, the step rows and the summary.
    ``score_test=False`` (a tuning run) leaves the test split alone: ``test_accuracy`` None."""
    started = time.perf_counter()
    env = build_online_env(config)
    if out is None:
        stamp = f"{datetime.now():%Y%m%d-%H%M%S}"
        name = config.run_name or f"online-{config.method}-{stamp}-seed{config.seed}"
        out = Path(config.out_dir) / name
    run = RunFolder.create(
        out.parent, out.name, config, config.seed, "online", data_source=env.engine.task.source
    )
    try:
        tracker = _Tracker(env, run, on_step or (lambda _row: None))
        extra = {}
        if config.method in ("airllm", "ppo"):
            extra = _learn_online(env, config, tracker)
        else:
            _play_fixed(env, config, tracker)
        tracker.validate()  # the final state competes too
        env.engine.server.restore(tracker.best_state)
        engine = env.engine
        test_accuracy, test_loss = (
            engine.evaluate(engine.server, engine.task.test) if score_test else (None, None)
        )
        summary = summarize_online(tracker.rows, test_accuracy, test_loss, tracker, extra)
        if env.simulated_link:  # what the edge holds: the last adapter that arrived
            summary.update(delivery_summary(tracker.rows))
            summary["edge_test_accuracy"] = (
                engine.evaluate(engine.edge, engine.task.test)[0] if score_test else None
            )
        summary["group_rank_spread"] = group_rank_spread(
            tracker.rows, env.projection_names, config.airllm.depth_bands
        )
        if engine.server.chooses_ranks:  # AdaLoRA: the budget it ran with
            summary["adalora_start_rank"] = int(engine.server.r_max)
            summary["adalora_target_rank"] = int(engine.server.lora_config.target_r)
        engine.server.export_peft(run.path / ADAPTER_DIR)
        run.finish(summary, started)
    except BaseException as err:
        run.fail(err)
        raise
    return run.path, tracker.rows, summary


def group_rank_spread(rows: list[dict], names: list[str], depth_bands: int) -> float:
    """Mean over steps of the within-group standard deviation of the ranks (groups: AirLLM's
    coarse groups, projection type x depth band): 0 when every group is uniform, as a coarse
    decision alone makes it; what the denoiser's refinement adds shows here."""
    _, groups = projection_groups(names, depth_bands)
    index = np.asarray(groups)
    spreads = []
    for r in rows:
        ranks = np.asarray(r["rank_vector"], dtype=np.float64)
        spreads.append(np.mean([ranks[index == g].std() for g in np.unique(index)]))
    return float(np.mean(spreads)) if spreads else float("nan")


def delivery_summary(rows: list[dict]) -> dict:
    """What a simulated link did to the steps that sent: airtime (retransmissions and control
    data included), packets lost, parameters the edge had to fill in."""
    sent = [r for r in rows if "airtime_s" in r]
    params = sum(r["sent_params"] for r in sent)
    return {
        "total_airtime_s": float(sum(r["airtime_s"] for r in sent)),
        "erasures": int(sum(r["erasures"] for r in sent)),
        "retransmissions": int(sum(r["retransmissions"] for r in sent)),
        "erased_fraction": sum(r["erased_params"] for r in sent) / params if params else math.nan,
    }


def summarize_online(
    rows: list[dict],
    test_accuracy: float | None,
    test_loss: float | None,
    tracker: _Tracker,
    extra: dict,
) -> dict:
    sent = [r for r in rows if not r["violated"]]
    losses = [r["train_loss"] for r in sent if r["train_loss"] is not None]
    slot = tracker.env.settings.slot_s
    window = tracker.env.settings.episode_steps
    returns = [sum(r["reward"] for r in rows[i : i + window]) for i in range(0, len(rows), window)]
    validated = [acc for _, acc in tracker.validations]
    return {
        # The keys every episode summary has (driver.summarize), in this formulation's terms:
        # accuracies of the server model on the validation split, a step's airtime at capacity.
        "diverged": False,
        "diverged_round": None,
        "final_accuracy": validated[-1],
        "mean_accuracy": float(np.mean(validated)),
        "episode_return": float(np.mean(returns)),
        "total_payload_params": int(sum(r["payload_params"] for r in sent)),
        "total_airtime_s": float(sum(r["cost"] for r in sent) * slot),
        "training_steps": len(sent),
        # The online formulation's own figures.
        "steps": len(rows),
        "trained_steps": len(sent),
        "violation_fraction": 1 - len(sent) / len(rows) if rows else math.nan,
        "projected_fraction": float(np.mean([bool(r.get("projected")) for r in rows])),
        "test_accuracy": test_accuracy,
        "test_loss": test_loss,
        "best_validation_accuracy": tracker.best_accuracy,
        "best_validation_step": max(tracker.validations, key=lambda v: v[1])[0],
        "validations": [list(v) for v in tracker.validations],
        "mean_params_per_step": float(np.mean([r["payload_params"] for r in sent]))
        if sent
        else 0.0,
        "mean_cost": float(np.mean([r["cost"] for r in rows])),
        "mean_reward": float(np.mean([r["reward"] for r in rows])),
        "mean_rank": float(np.mean([np.mean(r["rank_vector"]) for r in rows])),
        "final_train_loss": losses[-1] if losses else None,
        "episodes": len(extra.get("episode_returns", [])) or None,
    }
