"""What every rank policy shares: the action layout it serves, act/learn/save/load, and the
training log.

A saved policy is a folder of plain files: ``policy.json`` (method, layout and config), plus
the method's weights (``ppo.zip``, the Stable-Baselines3 archive, and ``denoiser.safetensors``).
Loading reads JSON, safetensors and the archive's tensors with ``weights_only=True``; nothing
is unpickled.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import gymnasium as gym
import numpy as np

from airlora.config import EnvConfig
from airlora.env.observation import OBSERVATION_FIELDS
from airlora.runs import POLICY_FILE, atomic_write_text


@dataclass(frozen=True)
class ActionLayout:
    """The rank vector a policy emits: one entry in 0..r_max per named projection, and the
    size of the observation it reads (the round formulation's fixed layout by default).
    The entry is the rank itself, except in an online environment with ``log2`` rank
    levels, where ``r_max`` is the top level's index and the environment decodes indices
    to ranks (a saved policy keeps the index space; the run's config names the levels)."""

    projection_names: tuple[str, ...]
    r_max: int
    env: EnvConfig = field(default_factory=EnvConfig)
    obs_dim: int = len(OBSERVATION_FIELDS)
    # The lowest entry that means a rank of its own: an online environment with linear levels
    # clips below its min_rank, so a policy that spreads its output over the entries (AirLLM's
    # latent decoding) starts there, as the reference does.
    min_level: int = 0

    @property
    def num_projections(self) -> int:
        return len(self.projection_names)

    def as_dict(self) -> dict:
        return {
            "projection_names": list(self.projection_names),
            "r_max": self.r_max,
            "env": self.env.model_dump(mode="json"),
            "obs_dim": self.obs_dim,
            "min_level": self.min_level,
        }

    @classmethod
    def from_dict(cls, d: dict) -> ActionLayout:
        obs_dim = int(d.get("obs_dim", len(OBSERVATION_FIELDS)))  # older saves: the fixed layout
        saved = dict(d["env"])
        # Saved before the state's complexity became data-only: those policies saw the loss.
        saved.setdefault("model_loss_in_state", True)
        env, min_level = EnvConfig(**saved), int(d.get("min_level", 0))
        return cls(tuple(d["projection_names"]), int(d["r_max"]), env, obs_dim, min_level)

    @classmethod
    def of_env(cls, env: gym.Env) -> ActionLayout:
        base = env.unwrapped
        obs_dim = int(base.observation_space.shape[0])
        # The largest action index: r_max, unless the environment offers fewer rank levels.
        top = int(np.max(base.action_space.nvec)) - 1
        min_level = int(getattr(base, "min_level", 0))
        return cls(tuple(base.projection_names), top, base.config, obs_dim, min_level)


@dataclass
class TrainingLog:
    """Episode returns in the order they finished, with the environment step at which each did."""

    episode_steps: list[int] = field(default_factory=list)
    episode_returns: list[float] = field(default_factory=list)
    extra: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)


EpisodeCallback = Callable[[int, float], None]
"""Called with (environment steps so far, episode return) when an episode ends."""

StepCallback = Callable[[int], "bool | None"]
"""Called with the environment steps so far after each batch of steps (progress bars,
evaluation); returning ``False`` stops training."""

EnvFactory = Callable[[int], gym.Env]
"""Builds one environment copy from a seed."""


class RankPolicy(ABC):
    """Picks a rank vector from an observation.

    Parameters
    ----------
    layout: projections and r_max of the action, and the environment settings it assumes.
    seed: seeds the policy's own randomness.
    """

    method: str = ""

    def __init__(self, layout: ActionLayout, seed: int = 0) -> None:
        self.layout = layout
        self.seed = seed
        self.rng = np.random.default_rng(seed)

    @abstractmethod
    def act_batch(self, observations: np.ndarray, deterministic: bool = True) -> np.ndarray:
        """Rank vectors (n, M) of int64 for observations (n, obs_dim)."""

    def act(self, observation: np.ndarray, deterministic: bool = True) -> np.ndarray:
        """The rank vector (M,) for one observation."""
        obs = np.asarray(observation, dtype=np.float32).reshape(1, -1)
        return self.act_batch(obs, deterministic)[0]

    def learn(
        self,
        make_env: EnvFactory,
        total_steps: int,
        n_envs: int = 1,
        on_episode: EpisodeCallback | None = None,
        on_steps: StepCallback | None = None,
        tensorboard_dir: Path | None = None,
    ) -> TrainingLog:
        """Train on environments built by ``make_env``; policies without training return at once."""
        return TrainingLog()

    # ------------------------------------------------------------------ persistence

    def config_dict(self) -> dict:
        return {}

    def save(self, folder: Path) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        meta = {
            "method": self.method,
            "seed": self.seed,
            "layout": self.layout.as_dict(),
            "config": self.config_dict(),
        }
        self._save_weights(folder)
        # policy.json last: its presence marks a whole save.
        atomic_write_text(folder / POLICY_FILE, json.dumps(meta, indent=2))
        return folder

    def _save_weights(self, folder: Path) -> None:
        return None

    @classmethod
    def _from_saved(cls, layout: ActionLayout, seed: int, config: dict, folder: Path) -> RankPolicy:
        return cls(layout, seed)


def clip_ranks(ranks: np.ndarray | Sequence, r_max: int) -> np.ndarray:
    return np.clip(np.rint(np.asarray(ranks, dtype=np.float64)), 0, r_max).astype(np.int64)
