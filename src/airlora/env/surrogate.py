"""A surrogate environment: the real environment's interface with a fitted reward model.

Real rounds are slow on a CPU, so policies may train against a model of them, as model-based RL
does (design section 3). :func:`collect_rounds` logs real rounds with exploratory rank vectors;
:class:`AccuracyModel` fits the edge accuracy from (ranks, SNR, complexity, round, last
accuracy) with a ridge regression on a few features that follow the link physics (the mean rank
sent; the mean rank *delivered*, from the link's expected packet survival and deadline, its
square, its products with training progress and with the noise level 1 / (1 + SNR), and whether
anything arrived; progress t/T; the last accuracy), and reports its R^2 and mean absolute error
on held-out episodes every time it is fitted; :class:`SurrogateEnv` replays logged complexity
sequences, draws SNRs from the link's process and predicts the accuracy. Final numbers are never
taken from it.

Saved as plain files: the logged rounds (``rounds.jsonl``) and ``surrogate.json``; loading
refits the model from the rounds (deterministic), nothing is unpickled.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
from sklearn.linear_model import RidgeCV
from sklearn.metrics import mean_absolute_error, r2_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from airlora.config import EnvConfig, LinkConfig
from airlora.data import ComplexityFeatures
from airlora.env.observation import (
    build_observation,
    observation_space,
    rank_space,
)
from airlora.env.reward import round_reward
from airlora.link import build_snr_process
from airlora.runs import ROUNDS_FILE, SURROGATE_FILE, atomic_write_text


@dataclass(frozen=True)
class LoggedRound:
    """One real round, as the surrogate learns from it."""

    episode: int
    round: int
    rounds: int
    snr_db: float
    complexity: dict[str, float | None]
    rank_vector: list[int]
    previous_accuracy: float
    accuracy: float
    payload_params: int
    max_payload_params: int
    # ``design`` (a trained and sent round), ``counterfactual`` (a trained checkpoint re-scored
    # under ``sent_vector`` instead), ``anchor`` or ``policy`` (:mod:`airlora.surrogate_log`).
    kind: str = "design"
    sent_vector: list[int] | None = None
    seed: int | None = None
    policy: str | None = None

    @property
    def sent(self) -> list[int]:
        """The ranks that went out (the trained ones unless re-scored)."""
        return self.rank_vector if self.sent_vector is None else self.sent_vector

    def complexity_features(self) -> ComplexityFeatures:
        vals = {k: (float("nan") if v is None else float(v)) for k, v in self.complexity.items()}
        return ComplexityFeatures(**vals)


def collect_rounds(
    env, episodes: int, seed: int = 0, on_round: Callable[[LoggedRound], None] | None = None
) -> list[LoggedRound]:
    """Run real episodes with exploratory ranks and log every round.

    Even episodes draw every projection's rank uniformly; odd ones draw one rank per round for
    all projections, so that both the spread and the extremes of the payload are covered.
    """
    rng = np.random.default_rng(seed)
    base = env.unwrapped
    m, r_max = len(base.projection_names), base.r_max
    out: list[LoggedRound] = []
    for episode in range(episodes):
        env.reset(seed=seed + episode)
        prev = base.previous_accuracy
        done = False
        while not done:
            if episode % 2 == 0:
                ranks = rng.integers(0, r_max + 1, size=m)
            else:
                ranks = np.full(m, rng.integers(0, r_max + 1))
            _obs, _, done, _, info = env.step(ranks)
            metrics = info["metrics"]
            if info["diverged"]:  # no accuracy to learn from; the episode has ended
                break
            row = LoggedRound(
                episode=episode,
                round=metrics["round"] - 1,
                rounds=base.episode_rounds,
                snr_db=metrics["snr_db"],
                complexity=metrics["complexity"],
                rank_vector=[int(r) for r in ranks],
                previous_accuracy=float(prev),
                accuracy=float(metrics["accuracy"]),
                payload_params=int(metrics["payload_params"]),
                max_payload_params=int(metrics["max_payload_params"]),
            )
            prev = row.accuracy
            out.append(row)
            if on_round:
                on_round(row)
    return out


def write_rounds(rows: Sequence[LoggedRound], path: Path) -> None:
    atomic_write_text(path, "".join(json.dumps(r.__dict__) + "\n" for r in rows))


def read_rounds(path: Path) -> list[LoggedRound]:
    rows = []
    for i, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(LoggedRound(**json.loads(line)))
        except (json.JSONDecodeError, TypeError) as err:
            raise ValueError(f"{path}, line {i}: not a logged round ({err})") from err
    if not rows:
        raise ValueError(f"{path} holds no logged rounds")
    return rows


Delivery = Callable[[Sequence[int], float], np.ndarray]
"""Expected delivered share of each item of a stream (sizes, SNR in dB): see
:meth:`airlora.link.WirelessLink.expected_delivery`."""


def link_delivery(link_config: LinkConfig) -> Delivery | None:
    """The link's expected-delivery function, or None where everything arrives (perfect,
    coded)."""
    if link_config.scheme not in ("analog", "digital"):
        return None
    from airlora.link import WirelessLink

    link = WirelessLink(link_config, seed=0)
    return link.expected_delivery


class AccuracyModel:
    """Ridge regression of the edge accuracy on physics-shaped features (module docstring).

    Parameters
    ----------
    projection_names: the adapted projections, in rank-vector order (they define the groups).
    r_max: largest rank.
    params_per_rank: d_in + d_out of each projection (its parameters per unit of rank).
    delivery: the link's expected delivered share per projection (packet losses, deadline);
        the model then also sees the *delivered* ranks. Default: everything arrives.

    The ridge penalty is chosen by leave-one-out cross-validation (``RidgeCV``) on the
    training rounds.
    """

    def __init__(
        self,
        projection_names: Sequence[str],
        r_max: int,
        params_per_rank: Sequence[int] | None = None,
        delivery: Delivery | None = None,
    ) -> None:
        self.projection_names = list(projection_names)
        self.r_max = r_max
        self.params_per_rank = (
            np.ones(len(self.projection_names), np.int64)
            if params_per_rank is None
            else np.asarray(params_per_rank, np.int64)
        )
        self.delivery = delivery
        self.pipeline = make_pipeline(StandardScaler(), RidgeCV(alphas=np.logspace(-3, 3, 13)))
        self.metrics: dict[str, float] = {}

    def features(
        self,
        ranks: np.ndarray,
        snr_db: np.ndarray,
        complexity: np.ndarray,
        progress: np.ndarray,
        previous_accuracy: np.ndarray,
    ) -> np.ndarray:
        """Eight features per round; few on purpose, since a surrogate is fitted on tens of
        rounds (a per-group version over-fitted: negative held-out R^2 on 30 rounds)."""
        snr_db = np.asarray(snr_db, np.float64)
        raw = np.asarray(ranks, np.float64).reshape(len(snr_db), -1)
        if self.delivery is None:
            delivered = raw
        else:
            delivered = np.stack(
                [
                    r * self.delivery(r * self.params_per_rank, s)
                    for r, s in zip(raw, snr_db, strict=True)
                ]
            )
        sent = raw.mean(axis=1) / self.r_max
        got = delivered.mean(axis=1) / self.r_max
        noise = 1.0 / (1.0 + 10.0 ** (snr_db / 10.0))
        progress = np.asarray(progress, np.float64)
        return np.column_stack(
            [
                got,
                sent,
                progress,
                np.asarray(previous_accuracy, np.float64),
                got**2,
                got * progress,
                (got > 0).astype(np.float64),
                got * noise,
            ]
        )

    def _xy(self, rows: Sequence[LoggedRound]) -> tuple[np.ndarray, np.ndarray]:
        x = self.features(
            np.asarray([r.rank_vector for r in rows]),
            np.asarray([r.snr_db for r in rows]),
            np.stack([r.complexity_features().as_array() for r in rows]),
            np.asarray([r.round / r.rounds for r in rows]),
            np.asarray([r.previous_accuracy for r in rows]),
        )
        return x, np.asarray([r.accuracy for r in rows])

    def fit(self, rows: Sequence[LoggedRound], holdout_fraction: float = 0.25) -> dict[str, float]:
        """Fit on all but the last ``holdout_fraction`` of episodes, score on those, refit on all.

        Returns (and keeps in ``metrics``) R^2 and mean absolute error on the held-out rounds,
        beside the error of predicting the training mean (``holdout_mae_of_mean``).
        """
        episodes = sorted({r.episode for r in rows})
        n_hold = max(1, round(holdout_fraction * len(episodes)))
        if len(episodes) - n_hold < 1:
            raise ValueError("need at least two logged episodes to fit and check a surrogate")
        held = set(episodes[-n_hold:])
        train = [r for r in rows if r.episode not in held]
        test = [r for r in rows if r.episode in held]
        x, y = self._xy(train)
        self.pipeline.fit(x, y)
        xt, yt = self._xy(test)
        pred = self.predict_features(xt)
        self.metrics = {
            "holdout_r2": float(r2_score(yt, pred)) if len(yt) > 1 else float("nan"),
            "holdout_mae": float(mean_absolute_error(yt, pred)),
            # What a fit must beat to mean anything: the training mean as the prediction.
            "holdout_mae_of_mean": float(np.mean(np.abs(yt - float(np.mean(y))))),
            "holdout_rounds": len(test),
            "train_rounds": len(train),
        }
        x_all, y_all = self._xy(rows)
        self.pipeline.fit(x_all, y_all)
        return self.metrics

    def predict_features(self, x: np.ndarray) -> np.ndarray:
        return np.clip(self.pipeline.predict(x), 0.0, 1.0)


class SurrogateEnv(gym.Env):
    """The real environment's spaces and reward with a fitted :class:`AccuracyModel`.

    Parameters
    ----------
    model: the fitted accuracy model.
    rows: the logged real rounds (complexity sequences are replayed from them; a_0 too).
    link_config: the SNR process.
    env_config: reward and observation settings.
    params_per_rank: d_in + d_out of every projection (payload per unit of rank).
    head_params: parameters of the task head (always sent).
    seed: seed of the first episode.
    """

    metadata = {"render_modes": []}  # noqa: RUF012 - gymnasium's convention

    def __init__(
        self,
        model: AccuracyModel,
        rows: Sequence[LoggedRound],
        link_config: LinkConfig,
        env_config: EnvConfig,
        params_per_rank: Sequence[int],
        head_params: int,
        seed: int = 0,
    ) -> None:
        self.model = model
        self.config = env_config
        self.link_config = link_config
        self.projection_names = list(model.projection_names)
        self.r_max = model.r_max
        self.params_per_rank = np.asarray(params_per_rank, dtype=np.int64)
        self.head_params = int(head_params)
        self.max_payload = int(self.params_per_rank.sum() * self.r_max + self.head_params)
        self.observation_space = observation_space()
        self.action_space = rank_space(len(self.projection_names), self.r_max)
        by_episode: dict[int, list[LoggedRound]] = {}
        for r in rows:
            by_episode.setdefault(r.episode, []).append(r)
        self._episodes = [sorted(v, key=lambda r: r.round) for v in by_episode.values()]
        self.episode_rounds = self._episodes[0][0].rounds
        self.initial_accuracy = float(np.mean([e[0].previous_accuracy for e in self._episodes]))
        self._snr = build_snr_process(link_config, seed)
        self._seed = seed
        self._t = 0
        self._sequence: list[ComplexityFeatures] = []
        self._snr_db = 0.0
        self._prev_acc = self.initial_accuracy
        self._last_acc = float("nan")
        self._last_ranks: list[int] | None = None

    def _observation(self) -> np.ndarray:
        t = min(self._t, self.episode_rounds - 1)
        return build_observation(
            self._snr_db,
            self._sequence[t],
            self._t,
            self.episode_rounds,
            self._last_acc,
            self._last_ranks,
            self.r_max,
            self.config,
        )

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict]:
        super().reset(seed=seed)
        if seed is not None:
            self._snr = build_snr_process(self.link_config, seed)
        episode = self._episodes[int(self.np_random.integers(len(self._episodes)))]
        self._sequence = [r.complexity_features() for r in episode]
        while len(self._sequence) < self.episode_rounds:
            self._sequence.append(self._sequence[-1])
        self._t = 0
        self._prev_acc = self.initial_accuracy
        self._last_acc = float("nan")
        self._last_ranks = None
        self._snr_db = float(self._snr.next())
        return self._observation(), {"snr_db": self._snr_db}

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool, dict]:
        ranks = np.asarray(action, dtype=np.int64).reshape(-1)
        if ranks.size != len(self.projection_names) or ranks.min() < 0 or ranks.max() > self.r_max:
            raise ValueError(
                f"action must hold {len(self.projection_names)} ranks in 0..{self.r_max}"
            )
        x = self.model.features(
            ranks[None, :],
            np.asarray([self._snr_db]),
            self._sequence[self._t].as_array()[None, :],
            np.asarray([self._t / self.episode_rounds]),
            np.asarray([self._prev_acc]),
        )
        accuracy = float(self.model.predict_features(x)[0])
        payload = int(ranks @ self.params_per_rank + self.head_params)
        reward = round_reward(accuracy, self._prev_acc, payload, self.max_payload, self.config)
        info = {"accuracy": accuracy, "payload_params": payload, "snr_db": self._snr_db}
        self._prev_acc = self._last_acc = accuracy
        self._last_ranks = ranks.tolist()
        self._t += 1
        terminated = self._t >= self.episode_rounds
        if not terminated:
            self._snr_db = float(self._snr.next())
        return self._observation(), reward, terminated, False, info

    # ------------------------------------------------------------------ persistence

    def save(self, folder: Path, rows: Sequence[LoggedRound]) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        write_rounds(rows, folder / ROUNDS_FILE)
        meta = {
            "projection_names": self.projection_names,
            "r_max": self.r_max,
            "params_per_rank": self.params_per_rank.tolist(),
            "head_params": self.head_params,
            "fit": self.model.metrics,
        }
        atomic_write_text(folder / SURROGATE_FILE, json.dumps(meta, indent=2))


def fit_surrogate(
    rows: Sequence[LoggedRound],
    projection_names: Sequence[str],
    r_max: int,
    params_per_rank: Sequence[int],
    head_params: int,
    link_config: LinkConfig,
    env_config: EnvConfig,
    holdout_fraction: float = 0.25,
    seed: int = 0,
) -> SurrogateEnv:
    """Fit the accuracy model on logged rounds (reporting its held-out fit) and wrap it."""
    model = AccuracyModel(projection_names, r_max, params_per_rank, link_delivery(link_config))
    model.fit(rows, holdout_fraction)
    if not all(math.isfinite(v) for k, v in model.metrics.items() if k.startswith("holdout_mae")):
        raise ValueError("the surrogate fit produced a non-finite error")
    return SurrogateEnv(model, rows, link_config, env_config, params_per_rank, head_params, seed)
