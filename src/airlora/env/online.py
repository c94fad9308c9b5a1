"""The online environment: one step is one training step (the authors' formulation).

The server model is never reset: episodes are windows of ``episode_steps`` consecutive
training steps, so a policy that learns from this environment learns during the single
fine-tuning run, and every RL sample costs one optimiser step.

State (``4 + M`` floats): the step's SNR and bandwidth, each min-max scaled over its levels
(0.5 when there is one level), the token entropy of the next batch (bits, over the distinct
tokens' maximum) and its out-of-vocabulary rate, and the current rank of every projection
over ``r_max``. Action: one index per projection into the rank levels (``settings.rank_levels``:
every rank ``min_rank..r_max``, the index being the rank, or a log2 grid); baselines that
pick ranks themselves call :meth:`OnlineRankEnv.step_ranks`. Step: the payload
of those ranks is priced by the Shannon cost C (or, on a simulated link, its airtime over the
slot); if ``C > 1`` the step does not train (every
weight unchanged, the batch kept for the next step) and the reward is
``-penalty C - lambda C`` (with ``settings.constraint = "project"`` the ranks are first
scaled down until they fit); otherwise one optimiser step on the batch with those ranks, and
the reward is ``-loss - lambda C``; on a simulated link the trained adapter then travels
over it to the edge's copy (erasures and airtime in the step's info). The SNR is drawn anew
from its levels every step.
"""

from __future__ import annotations

import math
from typing import Any

import gymnasium as gym
import numpy as np
import torch

from airlora.config import EnvConfig, OnlineSettings
from airlora.engine import RoundEngine
from airlora.env.observation import observation_space, rank_space
from airlora.link import ShannonCost
from airlora.link.slot import SlotCost


def rank_levels(min_rank: int, r_max: int, kind: str) -> tuple[int, ...]:
    """The ranks a policy picks from: every rank ``min_rank..r_max`` (``linear``), or
    ``min_rank``, the powers of two between and ``r_max`` (``log2``)."""
    if kind == "linear":
        return tuple(range(min_rank, r_max + 1))
    if kind != "log2":
        raise ValueError(f"unknown rank_levels {kind!r}: use linear or log2")
    powers = {2**k for k in range(r_max.bit_length()) if min_rank <= 2**k <= r_max}
    return tuple(sorted(powers | {min_rank, r_max}))


class OnlineRankEnv(gym.Env):
    """Gymnasium environment over the server side of a :class:`~airlora.engine.RoundEngine`.

    Parameters
    ----------
    engine: the model, data and optimiser (its schedule should span ``settings.steps``).
    settings: the online formulation (:class:`~airlora.config.OnlineSettings`).
    unk_token_id, special_ids: the tokenizer's unknown token and its special tokens (left
        out of the entropy and the OOV rate).
    seed: seeds the SNR draws.
    use_complexity: false zeroes the batch's entropy and OOV rate in the observation (the
        no-complexity ablation; ``env.use_complexity`` of a run config).
    simulated_link: price steps by ``engine.link``'s airtime against the slot and send every
        trained step's adapter over it to ``engine.edge`` (default: the Shannon cost of
        ``settings``, nothing sent).
    """

    metadata = {"render_modes": []}  # noqa: RUF012 - gymnasium's convention

    def __init__(
        self,
        engine: RoundEngine,
        settings: OnlineSettings,
        unk_token_id: int | None = None,
        special_ids: tuple[int, ...] = (),
        seed: int = 0,
        use_complexity: bool = True,
        simulated_link: bool = False,
    ) -> None:
        self.engine = engine
        self.settings = settings
        self.config = EnvConfig(cost_weight=settings.cost_weight, use_complexity=use_complexity)
        self.simulated_link = simulated_link
        self.cost_model: ShannonCost | SlotCost = (
            SlotCost(engine.link, settings.slot_s)
            if simulated_link
            else ShannonCost(settings.bandwidth_hz, settings.slot_s, settings.bits_per_param)
        )
        self.r_max = engine.server.r_max
        self.min_rank = min(settings.min_rank, self.r_max)
        self.projection_names = [p.name for p in engine.server.projections]
        m = len(self.projection_names)
        self.observation_space = observation_space(4 + m)
        self.rank_levels = rank_levels(self.min_rank, self.r_max, settings.rank_levels)
        if settings.rank_levels == "linear":  # the index is the rank (clipped to min_rank)
            self.action_space = rank_space(m, self.r_max)
            self.min_level = self.min_rank
        else:
            self.action_space = rank_space(m, len(self.rank_levels) - 1)
            self.min_level = 0
        self.unk_token_id = unk_token_id
        self.special_ids = np.asarray(sorted(set(special_ids)), dtype=np.int64)
        self._rng = np.random.default_rng(seed)
        self._seed = seed
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
        entropy, oov = self.batch_statistics() if self.config.use_complexity else (0.0, 0.0)
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

    def decode(self, action: np.ndarray) -> list[int]:
        """The rank vector an action (indices into the rank levels) stands for."""
        index = np.asarray(action, dtype=np.int64).reshape(-1)
        if self.settings.rank_levels == "linear":
            return [int(r) for r in np.clip(index, self.min_rank, self.r_max)]
        levels = np.asarray(self.rank_levels)
        return [int(r) for r in levels[np.clip(index, 0, len(levels) - 1)]]

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool, dict]:
        return self.step_ranks(self.decode(action))

    def step_ranks(self, ranks: list[int]) -> tuple[np.ndarray, float, bool, bool, dict]:
        """One step at these ranks (clipped to ``min_rank..r_max``); AdaLoRA's own ranks
        replace them."""
        server = self.engine.server
        if server.chooses_ranks:  # AdaLoRA prunes on its own schedule: its ranks are priced
            ranks = list(server.rank_vector)
            if not any(ranks):  # before its first update E is all zero: the budget is r_max
                ranks = [self.r_max] * len(ranks)
        else:
            ranks = np.clip(np.asarray(ranks).reshape(-1), self.min_rank, self.r_max)
            ranks = [int(r) for r in ranks]
        proposed = ranks
        params = self.payload_params(ranks)
        cost = self.cost_model.cost(params, self._snr_db)
        s = self.settings
        if cost > 1.0 and s.constraint == "project" and not server.chooses_ranks:
            ranks = self.project(ranks)
            params = self.payload_params(ranks)
            cost = self.cost_model.cost(params, self._snr_db)
        violated = cost > 1.0
        delivery: dict = {}
        if violated:  # nothing trains: the update would not fit its slot
            loss = math.nan
            reward = -s.violation_penalty * cost - s.cost_weight * cost
        else:
            if not server.chooses_ranks:
                server.set_rank_vector(ranks)
            self._ranks = ranks
            # Dropout draws from a private stream fixed by (seed, step): every method of a seed
            # sees the same masks at the same step, and a policy's own draws (PPO sampling its
            # actions from torch's global generator) neither shift them nor are shifted.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self._seed * 1_000_003 + self.steps_done)
                loss = self.engine.train_steps([self._batch])
            reward = -loss - s.cost_weight * cost
            self._next_batch()
            if self.simulated_link:
                # AdaLoRA may have pruned in this step: what it sends is what it now keeps.
                kept = list(server.rank_vector) if server.chooses_ranks else ranks
                report = self.engine.deliver(kept, self._snr_db)
                delivery = {
                    "sent_params": self.payload_params(kept),
                    "airtime_s": report.airtime_s,
                    "erasures": report.erasures,
                    "erased_params": report.erased_params,
                    "retransmissions": report.retransmissions,
                }
        if not math.isfinite(reward):  # a diverged step: a large finite penalty, flagged
            reward = -s.violation_penalty * max(cost, 1.0) * 10
        self.steps_done += 1
        self._t += 1
        self.last_info = {
            "step": self.steps_done,
            "snr_db": self._snr_db,
            "rank_vector": ranks,
            "projected": ranks != proposed,
            "payload_params": params,
            "cost": cost,
            "violated": violated,
            "train_loss": None if not math.isfinite(loss) else loss,
            "reward": float(reward),
            **delivery,
        }
        terminated = self._t >= s.episode_steps
        self._draw_snr()
        return self._observation(), float(reward), terminated, False, dict(self.last_info)

    # ------------------------------------------------------------------ baselines

    def project(self, ranks: list[int]) -> list[int]:
        """The ranks above ``min_rank`` scaled down by one factor so that the payload fits
        this step's slot (floored). The payload is linear in each rank, so the result fits
        whenever ``min_rank`` everywhere does."""
        floor = [self.min_rank] * len(ranks)
        base = self.payload_params(floor)
        room = self.cost_model.max_params(self._snr_db) - base
        extra = self.payload_params(ranks) - base
        scale = min(1.0, max(room, 0) / extra) if extra > 0 else 0.0
        return [self.min_rank + math.floor(scale * (r - self.min_rank)) for r in ranks]

    def largest_uniform_rank(self, snr_db: float | None = None) -> int:
        """The largest rank, the same on every projection, that fits a slot at ``snr_db``
        (default: this step's SNR), at least ``min_rank``: the constraint-aware heuristic."""
        snr_db = self._snr_db if snr_db is None else snr_db
        m = len(self.projection_names)
        for r in range(self.r_max, self.min_rank - 1, -1):
            if self.fits([r] * m, snr_db):
                return r
        return self.min_rank

    def fits(self, ranks: list[int], snr_db: float) -> bool:
        """Whether the payload of ``ranks`` fits a slot at ``snr_db`` (C <= 1)."""
        return self.cost_model.cost(self.payload_params(ranks), snr_db) <= 1

    def slot_filling_ranks(self, snr_db: float | None = None) -> list[int]:
        """The constraint-tight rank vector at ``snr_db`` (default: this step's SNR): the
        largest uniform rank that fits, then one more rank at a time on the projections in
        order, earliest first, in passes, while the payload still fits a slot. When it stops,
        no single added rank fits: with projections of equal size the most a step can send
        without violating (with unequal sizes a maximal fill, not necessarily the largest).
        Where even ``min_rank`` everywhere overflows, that is returned and the step violates,
        as for every method. The ``oracle`` of the online harness."""
        snr_db = self._snr_db if snr_db is None else snr_db
        ranks = [self.largest_uniform_rank(snr_db)] * len(self.projection_names)
        grown = True
        while grown:
            grown = False
            for i in range(len(ranks)):
                if ranks[i] >= self.r_max:
                    continue
                ranks[i] += 1
                if self.fits(ranks, snr_db):
                    grown = True
                else:
                    ranks[i] -= 1
        return ranks

    def validate(self) -> float:
        """Accuracy of the server model (current ranks) on the validation split."""
        return self.engine.evaluate(self.engine.server, self.engine.task.validation)[0]
