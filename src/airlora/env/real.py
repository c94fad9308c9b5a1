"""The real environment: every step is one round of remote fine-tuning over the link model.

An episode is T = ``train.rounds`` rounds from the fresh adapter. Before each round the
environment draws the SNR from the link's SNR process and the round's batches (their
complexity is in the observation); the action is the rank vector; the step trains K local
steps, transmits, rebuilds the edge's copy and scores it. ``info`` carries the round's
:class:`~airlora.engine.RoundMetrics` (accuracy, payload, link report).
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np

from airlora.config import DataConfig, EnvConfig, LinkConfig, ModelConfig, TrainConfig
from airlora.data import ComplexityFeatures
from airlora.engine import RoundEngine
from airlora.env.observation import build_observation, observation_space, rank_space
from airlora.env.reward import round_reward
from airlora.link import SNRProcess, build_link, build_snr_process


class RankSelectionEnv(gym.Env):
    """Gymnasium environment over :class:`~airlora.engine.RoundEngine`.

    Parameters
    ----------
    engine: the round engine (its model, data and link).
    link_config: the SNR process of the rounds comes from here.
    env_config: reward and observation settings.
    seed: default seed of the first episode; later episodes without a seed count on from it.
    """

    metadata = {"render_modes": []}  # noqa: RUF012 - gymnasium's convention

    def __init__(
        self, engine: RoundEngine, link_config: LinkConfig, env_config: EnvConfig, seed: int = 0
    ) -> None:
        self.engine = engine
        self.link_config = link_config
        self.config = env_config
        self.r_max = engine.server.r_max
        self.episode_rounds = engine.config.rounds
        self.projection_names = [p.name for p in engine.server.projections]
        self.observation_space = observation_space()
        self.action_space = rank_space(len(self.projection_names), self.r_max)
        self._next_seed = seed
        self._snr: SNRProcess = build_snr_process(link_config, seed)
        self._snr_db = 0.0
        self._last_ranks: list[int] | None = None
        self._prev_acc = float("nan")
        self._complexity: ComplexityFeatures | None = None
        self.last_metrics = None

    @classmethod
    def build(
        cls,
        data: DataConfig,
        model: ModelConfig,
        train: TrainConfig,
        link: LinkConfig,
        env: EnvConfig,
        seed: int = 0,
    ) -> RankSelectionEnv:
        """Load data and model and wire the link (errors name the bad input; nothing written)."""
        engine = RoundEngine.build(
            data, model, train, build_link(link, seed), seed, protect_head=link.protect_head
        )
        return cls(engine, link, env, seed)

    @property
    def previous_accuracy(self) -> float:
        """The edge accuracy the next round's reward is measured against (the unadapted
        model's after a reset)."""
        return self._prev_acc

    def _observation(self, complexity: ComplexityFeatures | None = None) -> np.ndarray:
        """The state before the next round; the terminal one repeats the last complexity."""
        if complexity is None:
            complexity = self._complexity = self.engine.observe_round()
        return build_observation(
            self._snr_db,
            complexity,
            self.engine.round_index,
            self.episode_rounds,
            self.engine.last_accuracy,
            self._last_ranks,
            self.r_max,
            self.config,
        )

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict]:
        super().reset(seed=seed)
        if seed is not None:
            self._next_seed = seed
            self._snr = build_snr_process(self.link_config, seed)
            self.engine.link = build_link(self.link_config, seed)
        episode_seed = self._next_seed
        self._next_seed += 1
        self.engine.reset(episode_seed)
        self._last_ranks = None
        self._prev_acc = self.engine.initial_accuracy()
        self._snr_db = float(self._snr.next())
        return self._observation(), {"snr_db": self._snr_db, "episode_seed": episode_seed}

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool, dict]:
        ranks = [int(r) for r in np.asarray(action).reshape(-1)]
        metrics = self.engine.run_round(ranks, self._snr_db)
        # A diverged round's edge model is worthless: it scores zero and ends the episode.
        accuracy = 0.0 if metrics.diverged else metrics.accuracy
        reward = round_reward(
            accuracy,
            self._prev_acc,
            metrics.payload_params,
            metrics.max_payload_params,
            self.config,
        )
        self._prev_acc = accuracy
        self._last_ranks = ranks
        terminated = metrics.diverged or self.engine.round_index >= self.episode_rounds
        self.last_metrics = metrics
        # Wall times stay out of info (Gymnasium expects a seeded step to repeat exactly);
        # they are in ``last_metrics``.
        measured = {k: v for k, v in metrics.as_dict().items() if not k.endswith("_time_s")}
        info = {
            "metrics": measured,
            "accuracy": metrics.accuracy,
            "reward": reward,
            "diverged": metrics.diverged,
        }
        if terminated:
            obs = self._observation(self._complexity)
        else:
            self._snr_db = float(self._snr.next())
            obs = self._observation()
        return obs, float(reward), terminated, False, info
