"""A surrogate environment: the real environment's interface with a fitted reward model.

Real rounds are slow on a CPU, so policies may train against a model of them, as model-based RL
does (design section 3). :func:`collect_rounds` logs real rounds with exploratory rank vectors
(:mod:`airlora.surrogate_log` logs a designed set); :class:`~airlora.env.response.
ResponseModel` predicts the edge accuracy with the link's part computed by the link code and
only the learning response fitted; :func:`fit_surrogate` checks it leave-one-episode-out and
refuses one below ``surrogate.min_r2``; :class:`SurrogateEnv` replays logged complexity
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

from airlora.config import EnvConfig, LinkConfig
from airlora.data import ComplexityFeatures
from airlora.env.observation import (
    build_observation,
    observation_space,
    rank_space,
)
from airlora.env.response import (
    Delivery,
    ResponseModel,
    RoundInputs,
    inputs_from_rows,
    leave_one_episode_out,
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
    # The seed of the episode this one replays from another seed (same rank vectors, SNRs and
    # counterfactual draws: a paired replicate); None for an original episode.
    replicate_of: int | None = None

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


SHIPPED = "shipped:"


def shipped_log(name: str) -> Path:
    """The folder of a logged-rounds set shipped with the package
    (``airlora/datasets/surrogate/<name>``: rounds.jsonl, policies.jsonl, manifest.json)."""
    from importlib import resources

    folder = Path(str(resources.files("airlora") / "datasets" / "surrogate" / name))
    if not (folder / "manifest.json").is_file():
        known = sorted(p.name for p in folder.parent.iterdir() if p.is_dir())
        raise FileNotFoundError(f"no shipped logged rounds named '{name}' (known: {known})")
    return folder


def resolve_rounds_file(rounds_file: Path | str, r_max: int) -> Path:
    """A ``surrogate.rounds_file`` setting as a path: ``{r_max}`` is replaced by the model's
    r_max, and ``shipped:NAME`` names a set shipped with the package (``shipped:paper-cpu-r8``,
    or ``shipped:paper-cpu-r{r_max}`` in a sweep over r_max)."""
    text = str(rounds_file).replace("{r_max}", str(r_max))
    if text.startswith(SHIPPED):
        return shipped_log(text[len(SHIPPED) :]) / ROUNDS_FILE
    return Path(text)


class SurrogateRejected(ValueError):
    """The fitted surrogate explains too little of the held-out rounds to train on."""


def link_delivery(link_config: LinkConfig) -> Delivery | None:
    """The link's expected-delivery function, or None where everything arrives (perfect,
    coded)."""
    if link_config.scheme not in ("analog", "digital"):
        return None
    from airlora.link import WirelessLink

    link = WirelessLink(link_config, seed=0)
    return link.expected_delivery


class SurrogateEnv(gym.Env):
    """The real environment's spaces and reward with a fitted response model.

    Parameters
    ----------
    model: the fitted :class:`~airlora.env.response.ResponseModel`.
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
        model: ResponseModel,
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
        # Real rounds only, one sequence per episode: re-scores repeat their round's data.
        by_episode: dict[tuple, list[LoggedRound]] = {}
        for r in rows:
            if r.kind != "counterfactual":
                by_episode.setdefault((r.kind, r.episode, r.seed, r.policy), []).append(r)
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
        self._trained_means: list[float] = []
        self._prev_snr_db = 0.0

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
        self._trained_means = []
        self._snr_db = self._prev_snr_db = float(self._snr.next())
        return self._observation(), {"snr_db": self._snr_db}

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool, dict]:
        ranks = np.asarray(action, dtype=np.int64).reshape(-1)
        if ranks.size != len(self.projection_names) or ranks.min() < 0 or ranks.max() > self.r_max:
            raise ValueError(
                f"action must hold {len(self.projection_names)} ranks in 0..{self.r_max}"
            )
        self._trained_means.append(float(ranks.mean()) / self.r_max)
        previous = (
            np.zeros(len(ranks)) if self._last_ranks is None else np.asarray(self._last_ranks)
        )
        x = RoundInputs(
            trained=ranks[None, :].astype(np.float64),
            trained_share=np.asarray([np.mean(self._trained_means)]),
            sent=ranks[None, :].astype(np.float64),
            snr_db=np.asarray([self._snr_db]),
            complexity=self._sequence[self._t].as_array()[None, :4],
            progress=np.asarray([(self._t + 1) / self.episode_rounds]),
            round_index=np.asarray([self._t]),
            previous_accuracy=np.asarray([self._prev_acc]),
            previous_sent=previous[None, :].astype(np.float64),
            previous_snr_db=np.asarray([self._prev_snr_db]),
        )
        accuracy = float(self.model.predict(x)[0])
        payload = int(ranks @ self.params_per_rank + self.head_params)
        reward = round_reward(accuracy, self._prev_acc, payload, self.max_payload, self.config)
        info = {"accuracy": accuracy, "payload_params": payload, "snr_db": self._snr_db}
        self._prev_acc = self._last_acc = accuracy
        self._last_ranks = ranks.tolist()
        self._t += 1
        terminated = self._t >= self.episode_rounds
        self._prev_snr_db = self._snr_db
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
    min_r2: float | None = None,
    eval_rows: int | None = None,
    seed: int = 0,
) -> SurrogateEnv:
    """Check the response model leave-one-episode-out (its R^2 and MAE in ``model.metrics``),
    fit it on every logged round and wrap it.

    Raises :class:`SurrogateRejected` when the held-out R^2 is below ``min_r2`` (None: no
    check); ``eval_rows`` (the edge split's size) adds the binomial noise floor."""
    delivery = link_delivery(link_config)

    def make() -> ResponseModel:
        return ResponseModel(projection_names, r_max, params_per_rank, delivery)

    metrics = leave_one_episode_out(make, rows, r_max, eval_rows)
    if not all(math.isfinite(metrics[k]) for k in ("loeo_r2", "loeo_mae")):
        raise ValueError("the surrogate fit produced a non-finite score")
    if min_r2 is not None and metrics["loeo_r2"] < min_r2:
        raise SurrogateRejected(
            f"the surrogate explains too little of the held-out rounds: leave-one-episode-out "
            f"R^2 {metrics['loeo_r2']:.3f} < surrogate.min_r2 {min_r2} "
            f"({metrics['held_out_rounds']} rounds of {metrics['episodes']} episodes); log "
            "more episodes (--surrogate-episodes), or train on it anyway with --force-surrogate"
        )
    model = make().fit(inputs_from_rows(rows, r_max), [r.accuracy for r in rows])
    model.metrics = metrics
    return SurrogateEnv(model, rows, link_config, env_config, params_per_rank, head_params, seed)
