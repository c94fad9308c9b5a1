"""Sanity baselines: uniformly random ranks, a channel-rate heuristic, and fixed-rank LoRA."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from airlora.env.observation import denormalise_snr
from airlora.errors import PolicyError
from airlora.policies.base import ActionLayout, RankPolicy


class RandomPolicy(RankPolicy):
    """Every rank uniform over 0..r_max, independently (``deterministic`` is ignored)."""

    method = "random"

    def act_batch(self, observations: np.ndarray, deterministic: bool = True) -> np.ndarray:
        n = len(observations)
        return self.rng.integers(0, self.layout.r_max + 1, size=(n, self.layout.num_projections))


class HeuristicPolicy(RankPolicy):
    """Rank budget proportional to the channel rate at the current SNR.

    Every projection gets round(r_max * min(1, log2(1 + g) / log2(1 + g_ref))), g the linear SNR
    read back from the observation and g_ref the SNR at which the full rank is sent.

    Parameters
    ----------
    layout, seed: see :class:`~airlora.policies.base.RankPolicy`.
    full_rank_snr_db: g_ref in dB. Default 20.
    """

    method = "heuristic"

    def __init__(self, layout: ActionLayout, seed: int = 0, full_rank_snr_db: float = 20.0):
        super().__init__(layout, seed)
        self.full_rank_snr_db = full_rank_snr_db

    def rank_at(self, snr_db: float) -> int:
        rate = math.log2(1.0 + 10.0 ** (snr_db / 10.0))
        ref = math.log2(1.0 + 10.0 ** (self.full_rank_snr_db / 10.0))
        return round(self.layout.r_max * min(1.0, rate / ref))

    def act_batch(self, observations: np.ndarray, deterministic: bool = True) -> np.ndarray:
        snrs = [denormalise_snr(o[0], self.layout.env) for o in np.asarray(observations)]
        ranks = [self.rank_at(s) for s in snrs]
        return np.repeat(np.asarray(ranks, dtype=np.int64)[:, None], self.layout.num_projections, 1)

    def config_dict(self) -> dict:
        return {"full_rank_snr_db": self.full_rank_snr_db}

    @classmethod
    def _from_saved(cls, layout, seed, config, folder):
        return cls(layout, seed, float(config.get("full_rank_snr_db", 20.0)))


class FixedRankPolicy(RankPolicy):
    """LoRA: the same rank on every projection, whatever the state.

    Parameters
    ----------
    layout, seed: see :class:`~airlora.policies.base.RankPolicy`.
    rank: the rank; default r_max.
    rank_vector: one rank per projection instead (``airlora finetune --rank-vector``).
    """

    method = "lora"

    def __init__(
        self,
        layout: ActionLayout,
        seed: int = 0,
        rank: int | None = None,
        rank_vector: Sequence[int] | None = None,
    ):
        super().__init__(layout, seed)
        self.rank = layout.r_max if rank is None else int(rank)
        vector = [self.rank] * layout.num_projections if rank_vector is None else rank_vector
        self.rank_vector = np.asarray(vector, dtype=np.int64)
        if self.rank_vector.shape != (layout.num_projections,):
            raise PolicyError(
                f"rank vector has {len(vector)} entries; the model has "
                f"{layout.num_projections} adapted projections"
            )
        if self.rank_vector.min() < 0 or self.rank_vector.max() > layout.r_max:
            bad = int(
                self.rank_vector[(self.rank_vector < 0) | (self.rank_vector > layout.r_max)][0]
            )
            raise PolicyError(f"rank {bad} lies outside 0..r_max={layout.r_max}")

    def act_batch(self, observations: np.ndarray, deterministic: bool = True) -> np.ndarray:
        return np.tile(self.rank_vector, (len(observations), 1))

    def config_dict(self) -> dict:
        return {"rank": self.rank, "rank_vector": self.rank_vector.tolist()}

    @classmethod
    def _from_saved(cls, layout, seed, config, folder):
        return cls(layout, seed, config.get("rank"), config.get("rank_vector"))
