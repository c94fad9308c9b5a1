"""A synthetic rank-selection environment with a known, SNR-dependent optimum.

It has the observation and action spaces of the real environment on the default model (24
projections: 6 layers x query/key/value/attention-output, ranks 0..r_max) and costs nothing to
step, so that policy learning can be measured over many seeds (``airlora bench convergence``).

Reward model, per round t with linear SNR g_t and data difficulty m_t (0.75 to 1 as the
model-loss feature goes from 0.8 to 1.6, drawn with the other complexity features each round):

    U_i(r) = (a_top - a_chance) / W * [ w_i m_t (1 - exp(-r / kappa))  -  s_i r / (r_max g_t) ]
             - lambda * r / (M r_max)
    reward_t = sum_i U_i(r_i)      (accuracy proxy a_t = a_chance + the first two terms)

``w_i`` (importance) and ``s_i`` (noise sensitivity) are a product of a per-type and a per-layer
factor: deeper layers matter more (x0.75..1.25), earlier ones are more sensitive (x1.3..0.7:
their errors propagate); W = sum_i w_i. The first term is the diminishing return of rank, the
second the analog noise on the rebuilt update (it grows with the rank and falls with the SNR, as
in design section 1), the third the payload cost (lambda as in the real reward). The
chance-level accuracy a_chance is left out of the reward, so that 95 % of the optimum means 95 %
of the achievable improvement over the unadapted model rather than of a constant. The reward is
separable, so the optimum of every round is found exactly by enumerating 0..r_max per
projection:
``info["optimal_reward"]`` and ``optimal_rank_vector``.

**Where refinement matters** (``deadline=True``, ``depth_tilt > 0``; what ``airlora bench
convergence`` runs). In the model above a group's layers want nearly the same rank, so one
level per group (AirLLM's coarse action) reaches ~99 % of the optimum and a denoiser has
nothing to add. Two state-dependent effects make the best rank differ *within* a group:

- a deadline: the adapter streams projection by projection, earliest layer first, and a slot
  at SNR g carries ``slot_share M r_max log2(1 + g) / log2(1 + g_top)`` rank units; the
  first projection that does not fit and all after it are lost: they cost airtime and add
  nothing. At low SNR the early layers matter
  more, because only they arrive;
- depth importance that follows the data: ``w_i`` is multiplied by
  ``exp(depth_tilt (2 z - 1) (depth_i - 1/2))``, ``z`` the difficulty in [0, 1], and the
  weights rescaled to their untilted total: easy batches want early layers, hard ones deep
  layers.

The optimum is still exact: sending a projection that is lost only costs, so the best vector
sends what fits, and ``max sum_i U_i(r_i)`` subject to ``sum_i r_i <= units`` is a knapsack
solved by dynamic programming over the projections. :meth:`SyntheticRankEnv.coarse_ceiling`
bounds what one level per group can reach (a Lagrangian upper bound, and the best group-level
vector it finds as a lower bound), so a benchmark can state the headroom a refinement has.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import gymnasium as gym
import numpy as np

from airlora.config import EnvConfig
from airlora.data import ComplexityFeatures
from airlora.env.observation import build_observation, observation_space, rank_space

DEFAULT_TYPES: tuple[str, ...] = ("query", "key", "value", "output.dense")
TYPE_IMPORTANCE: tuple[float, ...] = (1.0, 0.6, 1.4, 0.8)
TYPE_SENSITIVITY: tuple[float, ...] = (0.6, 0.4, 1.0, 0.8)
A_CHANCE, A_TOP = 0.25, 0.92


def _bert_prefix(kind: str) -> str:
    # BERT names: attention.self.query, ..., attention.output.dense.
    return "self." if kind in ("query", "key", "value") else ""


class SyntheticRankEnv(gym.Env):
    """Rank selection against a closed-form reward (see the module docstring).

    Parameters
    ----------
    num_layers:
        Transformer layers; M = num_layers * len(types). Default 6.
    types:
        Projection types per layer. Default query, key, value, attention.output.dense.
    r_max:
        Largest rank. Default 8.
    episode_rounds:
        Rounds T per episode. Default 10.
    snr_low_db, snr_high_db:
        Each round's SNR (Es/N0) is uniform over this range, i.i.d. Default -5 and 25 dB.
    kappa:
        Rank scale of the diminishing return. Default 3.
    noise_scale:
        Multiplies the noise term. Default 1.
    env_config:
        lambda (``cost_weight``) and the observation's SNR scaling. Default
        ``EnvConfig(cost_weight=0.5)``: this accuracy proxy spans a wider range than a real
        round's accuracy, so its cost weight is larger.
    deadline:
        Stream the ranks layer by layer into a slot whose capacity grows with log2(1 + SNR);
        what misses it is lost (module docstring). Default False.
    depth_tilt:
        How strongly the data's difficulty tilts importance toward early (easy) or deep (hard)
        layers; 0 is no tilt. Default 0.
    slot_share:
        With ``deadline``: the share of all rank units (M r_max) a slot carries at the top of
        the SNR range. Default 1.
    """

    metadata = {"render_modes": []}  # noqa: RUF012 - gymnasium's convention

    def __init__(
        self,
        num_layers: int = 6,
        types: Sequence[str] = DEFAULT_TYPES,
        r_max: int = 8,
        episode_rounds: int = 10,
        snr_low_db: float = -5.0,
        snr_high_db: float = 25.0,
        kappa: float = 3.0,
        noise_scale: float = 1.0,
        env_config: EnvConfig | None = None,
        deadline: bool = False,
        depth_tilt: float = 0.0,
        slot_share: float = 1.0,
    ) -> None:
        if r_max <= 0:
            raise ValueError(f"r_max must be positive, got {r_max}")
        if depth_tilt < 0:
            raise ValueError(f"depth_tilt must be >= 0, got {depth_tilt}")
        if not 0 < slot_share <= 1:
            raise ValueError(f"slot_share must be in (0, 1], got {slot_share}")
        self.deadline = deadline
        self.depth_tilt = depth_tilt
        self.slot_share = slot_share
        # Its hidden difficulty is shown in the model-loss slot of the observation.
        self.config = env_config or EnvConfig(cost_weight=0.5, model_loss_in_state=True)
        self.r_max = r_max
        self.episode_rounds = episode_rounds
        self.snr_range = (snr_low_db, snr_high_db)
        self.kappa = kappa
        self.noise_scale = noise_scale
        self.projection_names = [
            f"bert.encoder.layer.{layer}.attention.{_bert_prefix(t)}{t}"
            for layer in range(num_layers)
            for t in types
        ]
        n_types = len(types)
        imp = np.resize(np.asarray(TYPE_IMPORTANCE), n_types)
        sens = np.resize(np.asarray(TYPE_SENSITIVITY), n_types)
        depth = np.linspace(0.0, 1.0, num_layers)
        self.depth = np.repeat(depth, n_types)  # each projection's depth, in stream order
        self.importance = np.outer(0.75 + 0.5 * depth, imp).ravel()
        self.sensitivity = np.outer(1.3 - 0.6 * depth, sens).ravel()
        self.num_projections = self.importance.size
        self.observation_space = observation_space()
        self.action_space = rank_space(self.num_projections, r_max)
        self._ranks = np.arange(r_max + 1, dtype=np.float64)
        self._t = 0
        self._snr_db = 0.0
        self._complexity = ComplexityFeatures(0.5, 0.7, 0.45, 1.25, 1.2)
        self._last_acc = float("nan")
        self._last_ranks: np.ndarray | None = None

    # ------------------------------------------------------------------ reward model

    def utilities(self, snr_db: float, difficulty: float) -> np.ndarray:
        """U_i(r) for every projection and rank, payload cost included: shape (M, r_max + 1)."""
        return self.delivered_value(snr_db, difficulty) - self.send_cost()

    def delivered_value(self, snr_db: float, difficulty: float) -> np.ndarray:
        """What ranks r of projection i add when they arrive (gain less noise), (M, r_max + 1)."""
        g = 10.0 ** (snr_db / 10.0)
        w = self.importance_now(difficulty)[:, None]
        s, r = self.sensitivity[:, None], self._ranks[None, :]
        scale = (A_TOP - A_CHANCE) / self.importance.sum()
        gain = w * difficulty * (1.0 - np.exp(-r / self.kappa))
        noise = self.noise_scale * s * r / (self.r_max * g)
        return scale * (gain - noise)

    def send_cost(self) -> np.ndarray:
        """lambda's share of every rank sent, (1, r_max + 1): paid whether or not it arrives."""
        return self.config.cost_weight * self._ranks[None, :] / (self.num_projections * self.r_max)

    def importance_now(self, difficulty: float) -> np.ndarray:
        """w_i at this difficulty: the base importance, tilted in depth by the data."""
        if self.depth_tilt == 0:
            return self.importance
        z = (difficulty - 0.75) / 0.25
        tilted = self.importance * np.exp(self.depth_tilt * (2 * z - 1) * (self.depth - 0.5))
        # The same total: the tilt moves importance across depth, it does not add any (the
        # accuracy proxy stays below a_top).
        return tilted * (self.importance.sum() / tilted.sum())

    def capacity(self, snr_db: float) -> int:
        """Rank units a slot carries at ``snr_db`` (every unit when there is no deadline)."""
        total = self.num_projections * self.r_max
        if not self.deadline:
            return total
        top = np.log2(1.0 + 10.0 ** (self.snr_range[1] / 10.0))
        share = np.log2(1.0 + 10.0 ** (snr_db / 10.0)) / top
        return int(np.clip(np.floor(self.slot_share * total * share), 0, total))

    def delivered(self, ranks: np.ndarray, snr_db: float) -> np.ndarray:
        """Which projections arrive: the longest prefix of the stream that fits the slot."""
        return np.cumsum(ranks) <= self.capacity(snr_db)

    def reward_of(self, ranks: np.ndarray, snr_db: float, difficulty: float) -> float:
        ranks = np.asarray(ranks, dtype=np.int64)
        value = self.delivered_value(snr_db, difficulty)[np.arange(self.num_projections), ranks]
        arrived = self.delivered(ranks, snr_db)
        return float((value * arrived).sum() - self.send_cost()[0, ranks].sum())

    def optimum(self, snr_db: float, difficulty: float) -> tuple[np.ndarray, float]:
        """The best rank vector and its reward at this SNR and difficulty (exact)."""
        u = self.utilities(snr_db, difficulty)
        best = u.argmax(axis=1)
        units = self.capacity(snr_db)
        if best.sum() <= units:  # the slot does not bind (always so without a deadline)
            return best, float(u.max(axis=1).sum())
        # Knapsack over the projections: value[c] = best sum of U with c units used so far.
        m, k = u.shape
        value = np.full(units + 1, -np.inf)
        value[0] = 0.0
        choice = np.zeros((m, units + 1), dtype=np.int64)
        for i in range(m):
            # candidates[r, c] = value[c - r] + U_i(r)
            candidates = np.full((k, units + 1), -np.inf)
            for r in range(min(k - 1, units) + 1):
                candidates[r, r:] = value[: units + 1 - r] + u[i, r]
            choice[i] = candidates.argmax(axis=0)
            value = candidates.max(axis=0)
        c = int(value.argmax())
        ranks = np.zeros(m, dtype=np.int64)
        for i in range(m - 1, -1, -1):
            ranks[i] = choice[i, c]
            c -= ranks[i]
        return ranks, float(value.max())

    def coarse_ceiling(
        self, snr_db: float, difficulty: float, groups: Sequence[int], mus: int = 200
    ) -> tuple[float, float]:
        """(lower, upper) bounds on the best reward of a vector with one rank per group
        (``groups[i]`` = projection i's group).

        Upper: for any mu >= 0, the delivered ranks use at most ``units``, so the reward is at
        most ``mu units + sum_i [max(V_i(r_g) - mu r_g, 0) - cost(r_g)]``, which separates by
        group; the least of these over a grid of mu. Lower: the best true reward among the
        group-level vectors that maximise those relaxations.
        """
        group = np.asarray(groups, dtype=np.int64)
        n_groups = int(group.max()) + 1
        value = self.delivered_value(snr_db, difficulty)
        cost = self.send_cost()[0]
        units = self.capacity(snr_db)
        top = float(np.max(value[:, 1:] / self._ranks[None, 1:])) if self.r_max else 0.0
        upper, lower = np.inf, -np.inf
        for mu in np.linspace(0.0, max(top, 0.0), mus):
            per_rank = np.maximum(value - mu * self._ranks[None, :], 0.0) - cost[None, :]
            by_group = np.zeros((n_groups, self.r_max + 1))
            np.add.at(by_group, group, per_rank)
            upper = min(upper, mu * units + float(by_group.max(axis=1).sum()))
            levels = by_group.argmax(axis=1)[group]
            lower = max(lower, self.reward_of(levels, snr_db, difficulty))
        return lower, upper

    @property
    def difficulty(self) -> float:
        return 0.75 + 0.25 * (self._complexity.model_loss - 0.8) / 0.8

    @property
    def snr_db(self) -> float:
        return self._snr_db

    # ------------------------------------------------------------------ gymnasium API

    def _draw_round(self) -> None:
        rng = self.np_random
        self._snr_db = float(rng.uniform(*self.snr_range))
        self._complexity = ComplexityFeatures(
            length=float(rng.uniform(0.3, 0.8)),
            type_token_ratio=float(rng.uniform(0.5, 0.9)),
            rarity=float(rng.uniform(0.3, 0.6)),
            tokens_per_word=float(rng.uniform(1.1, 1.4)),
            model_loss=float(rng.uniform(0.8, 1.6)),
        )

    def _observation(self) -> np.ndarray:
        return build_observation(
            self._snr_db,
            self._complexity,
            self._t,
            self.episode_rounds,
            self._last_acc,
            None if self._last_ranks is None else self._last_ranks.tolist(),
            self.r_max,
            self.config,
        )

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict]:
        super().reset(seed=seed)
        self._t = 0
        self._last_acc = float("nan")
        self._last_ranks = None
        self._draw_round()
        return self._observation(), self._info_now()

    def _info_now(self) -> dict:
        best, best_reward = self.optimum(self._snr_db, self.difficulty)
        return {
            "snr_db": self._snr_db,
            "optimal_rank_vector": best,
            "optimal_reward": best_reward,
        }

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool, dict]:
        ranks = np.asarray(action, dtype=np.int64).reshape(-1)
        if ranks.size != self.num_projections or ranks.min() < 0 or ranks.max() > self.r_max:
            raise ValueError(
                f"action must hold {self.num_projections} ranks in 0..{self.r_max}, got {ranks}"
            )
        info = self._info_now()
        reward = self.reward_of(ranks, self._snr_db, self.difficulty)
        cost = float(ranks.sum() / (self.num_projections * self.r_max))
        accuracy = A_CHANCE + reward + self.config.cost_weight * cost
        info.update(accuracy=accuracy, payload_share=cost, rank_vector=ranks)
        if self.config.reward_form == "gain":
            prev = A_CHANCE if not np.isfinite(self._last_acc) else self._last_acc
            reward = accuracy - prev - self.config.cost_weight * cost
        self._last_acc = accuracy
        self._last_ranks = ranks
        self._t += 1
        terminated = self._t >= self.episode_rounds
        if not terminated:
            self._draw_round()
        return self._observation(), float(reward), terminated, False, info
