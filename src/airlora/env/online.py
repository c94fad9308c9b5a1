"""The online environment: one step is one training step (the authors' formulation).

The server model is never reset: episodes are windows of ``episode_steps`` consecutive
training steps, so a policy that learns from this environment learns during the single
fine-tuning run, and every RL sample costs one optimiser step.

State (``4 + M`` floats): the step's SNR and bandwidth, each min-max scaled over its levels
(0.5 when there is one level), the token entropy of the next batch (bits, over the distinct
tokens' maximum) and its out-of-vocabulary rate, and the current rank of every projection
over ``r_max``. Action: the rank vector (clipped to ``min_rank..r_max``). Step: the payload
of those ranks is priced by the Shannon cost C; if ``C > 1`` the step does not train (every
weight unchanged, the batch kept for the next step) and the reward is
``-penalty C - lambda C``; otherwise one optimiser step on the batch with those ranks, and
the reward is ``-loss - lambda C``. The SNR is drawn anew from its levels every step.
"""

from __future__ import annotations

import math
from typing import Any

import gymnasium as gym
import numpy as np

from airlora.config import EnvConfig, OnlineSettings
from airlora.engine import RoundEngine
from airlora.env.observation import observation_space, rank_space
from airlora.link import ShannonCost


class OnlineRankEnv(gym.Env):
    """Gymnasium environment over the server side of a :class:`~airlora.engine.RoundEngine`.

    Parameters
    ----------
    engine: the model, data and optimiser (its schedule should span ``settings.steps``).
    settings: the online formulation (:class:`~airlora.config.OnlineSettings`).
    unk_token_id, special_ids: the tokenizer's unknown token and its special tokens (left
        out of the entropy and the OOV rate).
    seed: seeds the SNR draws.
    """

    metadata = {"render_modes": []}  # noqa: RUF012 - gymnasium's convention

    def __init__(
        self,
        engine: RoundEngine,
        settings: OnlineSettings,
        unk_token_id: int | None = None,
        special_ids: tuple[int, ...] = (),
        seed: int = 0,
    ) -> None:
        self.engine = engine
        self.settings = settings
        self.config = EnvConfig(cost_weight=settings.cost_weight)
        self.cost_model = ShannonCost(
            settings.bandwidth_hz, settings.slot_s, settings.bits_per_param
        )
        self.r_max = engine.server.r_max
        self.min_rank = min(settings.min_rank, self.r_max)
        self.projection_names = [p.name for p in engine.server.projections]
        m = len(self.projection_names)
        self.observation_space = observation_space(4 + m)
        self.action_space = rank_space(m, self.r_max)
        self.unk_token_id = unk_token_id
        self.special_ids = np.asarray(sorted(set(special_ids)), dtype=np.int64)
        self._rng = np.random.default_rng(seed)
        self._ranks = [max(self.min_rank, self.r_max // 2)] * m
        self._batch: np.ndarray | None = None
        self._snr_db = float(settings.snr_levels_db[0])
        self._t = 0
        self.steps_done = 0
        self.last_info: dict = {}

    # ------------------------------------------------------------------ state

    def _draw_snr(self) -> None:
        self._snr_db = float(self._rng.choice(self.settings.snr_levels_db))

    def _next_batch(self) -> None:
        self._batch = self.engine.stream.next_index()

    def batch_statistics(self) -> tuple[float, float]:
        """Token entropy (normalised to [0, 1]) and OOV rate of the pending batch."""
        ids = self.engine.task.train.input_ids
        tokens = np.concatenate([np.asarray(ids[i]) for i in self._batch])
        tokens = tokens[~np.isin(tokens, self.special_ids)]
        if tokens.size == 0:
            return 0.0, 0.0
        _, counts = np.unique(tokens, return_counts=True)
        p = counts / counts.sum()
        entropy = float(-(p * np.log2(p)).sum()) / max(math.log2(max(len(counts), 2)), 1.0)
        oov = float(np.mean(tokens == self.unk_token_id)) if self.unk_token_id is not None else 0.0
        return min(max(entropy, 0.0), 1.0), oov

    def _observation(self) -> np.ndarray:
        levels = self.settings.snr_levels_db
        lo, hi = min(levels), max(levels)
        snr = 0.5 if hi == lo else (self._snr_db - lo) / (hi - lo)
        entropy, oov = self.batch_statistics()
        ranks = np.asarray(self._ranks, dtype=np.float32) / self.r_max
        return np.concatenate([[snr, 0.5, entropy, oov], ranks]).astype(np.float32)

    # ------------------------------------------------------------------ gymnasium

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict]:
        """A new episode window; the model, its optimiser and the batch order carry on."""
        super().reset(seed=seed)
        if seed is not None:
            self._rng = np.random.default_rng(seed)
        self._t = 0
        self._ranks = [max(self.min_rank, self.r_max // 2)] * len(self.projection_names)
        if self._batch is None:
            self._next_batch()
        self._draw_snr()
        return self._observation(), {"snr_db": self._snr_db}

    def payload_params(self, ranks: list[int]) -> int:
        """Adapter parameters the ranks send (the head is not priced, as in the reference)."""
        return int(self.engine.server.payload(ranks).adapter_params)

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool, dict]:
        server = self.engine.server
        if server.chooses_ranks:  # AdaLoRA prunes on its own schedule: its ranks are priced
            ranks = list(server.rank_vector)
            if not any(ranks):  # before its first update E is all zero: the budget is r_max
                ranks = [self.r_max] * len(ranks)
        else:
            ranks = np.clip(
                np.asarray(action, dtype=np.int64).reshape(-1), self.min_rank, self.r_max
            )
            ranks = [int(r) for r in ranks]
        params = self.payload_params(ranks)
        cost = self.cost_model.cost(params, self._snr_db)
        s = self.settings
        violated = cost > 1.0
        if violated:  # nothing trains: the update would not fit its slot
            loss = math.nan
            reward = -s.violation_penalty * cost - s.cost_weight * cost
        else:
            if not server.chooses_ranks:
                server.set_rank_vector(ranks)
            self._ranks = ranks
            loss = self.engine.train_steps([self._batch])
            reward = -loss - s.cost_weight * cost
            self._next_batch()
        if not math.isfinite(reward):  # a diverged step: a large finite penalty, flagged
            reward = -s.violation_penalty * max(cost, 1.0) * 10
        self.steps_done += 1
        self._t += 1
        self.last_info = {
            "step": self.steps_done,
            "snr_db": self._snr_db,
            "rank_vector": ranks,
            "payload_params": params,
            "cost": cost,
            "violated": violated,
            "train_loss": None if not math.isfinite(loss) else loss,
            "reward": float(reward),
        }
        terminated = self._t >= s.episode_steps
        self._draw_snr()
        return self._observation(), float(reward), terminated, False, dict(self.last_info)

    # ------------------------------------------------------------------ baselines

    def largest_uniform_rank(self) -> int:
        """The largest rank, the same on every projection, that fits this step's slot (at
        least ``min_rank``): the constraint-aware heuristic of the online harness."""
        for r in range(self.r_max, self.min_rank - 1, -1):
            if self.cost_model.cost(self.payload_params([r] * len(self._ranks)), self._snr_db) <= 1:
                return r
        return self.min_rank

    def validate(self) -> float:
        """Accuracy of the server model (current ranks) on the validation split."""
        return self.engine.evaluate(self.engine.server, self.engine.task.validation)[0]
