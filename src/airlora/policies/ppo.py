"""Vanilla PPO (Stable-Baselines3) emitting the full rank vector, and the SB3 plumbing that
the AirLLM policy shares: vectorised environments, episode logging, save and safe load."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch
from stable_baselines3 import PPO
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.logger import Logger
from stable_baselines3.common.monitor import Monitor
from stable_baselines3.common.vec_env import DummyVecEnv, VecEnv

from airlora.config import PPOConfig
from airlora.env.observation import observation_space, rank_space
from airlora.policies.base import (
    ActionLayout,
    EnvFactory,
    EpisodeCallback,
    RankPolicy,
    StepCallback,
    TrainingLog,
)

PPO_FILE = "ppo.zip"


class EpisodeLogger(BaseCallback):
    """Collects finished episodes' returns (from SB3's Monitor) and reports progress."""

    def __init__(
        self,
        log: TrainingLog,
        on_episode: EpisodeCallback | None = None,
        on_steps: StepCallback | None = None,
    ) -> None:
        super().__init__()
        self.log = log
        self.on_episode = on_episode
        self.on_steps = on_steps
        self.stopped = False

    def _on_step(self) -> bool:
        for info in self.locals.get("infos", []):
            episode = info.get("episode")
            if episode is not None:
                self.log.episode_steps.append(int(self.num_timesteps))
                self.log.episode_returns.append(float(episode["r"]))
                if self.on_episode:
                    self.on_episode(int(self.num_timesteps), float(episode["r"]))
        if self.on_steps and self.on_steps(int(self.num_timesteps)) is False:
            self.stopped = True
            return False
        return True


@contextmanager
def unchecked_distributions() -> Iterator[None]:
    """torch.distributions' argument checks off while SB3 acts and learns, restored after.

    SB3 builds a distribution object (one Categorical per rank head) at every decision and
    every minibatch; the checks (probabilities in the simplex, finite logits) cost about a
    third of an online decision and change no value. What they caught, a diverged network's
    NaN, is caught elsewhere: a categorical sample raises on it, and AirLLM refuses non-finite
    PPO actions before they become ranks (a greedy argmax over NaN logits would not raise).
    """
    previous = torch.distributions.Distribution._validate_args
    torch.distributions.Distribution.set_default_validate_args(False)
    try:
        yield
    finally:
        torch.distributions.Distribution.set_default_validate_args(previous)


def make_vec_env(make_env: EnvFactory, n_envs: int, seed: int) -> DummyVecEnv:
    """``n_envs`` Monitor-wrapped copies, seeded ``seed``, ``seed + 1``, ..."""
    venv = DummyVecEnv([lambda i=i: Monitor(make_env(seed + i)) for i in range(n_envs)])
    venv.seed(seed)
    return venv


class SpacesOnlyEnv(gym.Env):
    """Carries the spaces SB3 needs to rebuild a saved agent; never stepped."""

    def __init__(self, obs_space: gym.Space, act_space: gym.Space) -> None:
        self.observation_space = obs_space
        self.action_space = act_space

    def reset(self, *, seed=None, options=None):  # pragma: no cover - never called
        raise RuntimeError("a spaces-only environment is not meant to run")

    def step(self, action):  # pragma: no cover - never called
        raise RuntimeError("a spaces-only environment is not meant to run")


def new_ppo(env: VecEnv | gym.Env, config: PPOConfig, seed: int, tensorboard_dir: Path | None):
    agent = PPO(
        "MlpPolicy",
        env,
        learning_rate=config.learning_rate,
        n_steps=config.n_steps,
        batch_size=config.batch_size,
        n_epochs=config.n_epochs,
        gamma=config.gamma,
        gae_lambda=config.gae_lambda,
        clip_range=config.clip_range,
        ent_coef=config.ent_coef,
        policy_kwargs={"net_arch": list(config.net_arch), "log_std_init": config.log_std_init},
        tensorboard_log=str(tensorboard_dir) if tensorboard_dir else None,
        seed=seed,
        device="cpu",
        verbose=0,
    )
    if tensorboard_dir is None:
        # SB3's default logger makes an empty /tmp/SB3-<time> folder at every learn().
        agent.set_logger(Logger(folder=None, output_formats=[]))
    return agent


def load_ppo(
    path: Path, obs_space: gym.Space, act_space: gym.Space, config: PPOConfig, seed: int
) -> PPO:
    """Rebuild the agent from the config and read only the archive's tensors (weights_only)."""
    if not path.is_file():
        raise FileNotFoundError(f"saved policy is missing {path}")
    agent = new_ppo(SpacesOnlyEnv(obs_space, act_space), config, seed, None)
    with warnings.catch_warnings():
        # torch's weights-only reader notes foreign pickle protocols before refusing them.
        warnings.filterwarnings("ignore", message="Detected pickle protocol")
        agent.set_parameters(str(path), exact_match=True, device="cpu")
    return agent


class PPOPolicy(RankPolicy):
    """Vanilla PPO: a MultiDiscrete head of M categorical ranks over the observation.

    Parameters
    ----------
    layout, seed: see :class:`~airlora.policies.base.RankPolicy`.
    config: PPO hyper-parameters (:class:`~airlora.config.PPOConfig`).
    """

    method = "ppo"

    def __init__(self, layout: ActionLayout, seed: int = 0, config: PPOConfig | None = None):
        super().__init__(layout, seed)
        self.config = config or PPOConfig()
        self.agent: PPO | None = None

    @property
    def action_space(self) -> gym.Space:
        return rank_space(self.layout.num_projections, self.layout.r_max)

    @property
    def observation_space(self) -> gym.Space:
        return observation_space(self.layout.obs_dim)

    def _agent(self) -> PPO:
        if self.agent is None:
            self.agent = new_ppo(
                SpacesOnlyEnv(self.observation_space, self.action_space),
                self.config,
                self.seed,
                None,
            )
        return self.agent

    def learn(
        self,
        make_env: EnvFactory,
        total_steps: int,
        n_envs: int = 1,
        on_episode: EpisodeCallback | None = None,
        on_steps: StepCallback | None = None,
        tensorboard_dir: Path | None = None,
    ) -> TrainingLog:
        venv = make_vec_env(make_env, n_envs, self.seed)
        log = TrainingLog()
        if self.agent is None:
            self.agent = new_ppo(venv, self.config, self.seed, tensorboard_dir)
        else:
            self.agent.set_env(venv)
        with unchecked_distributions():
            self.agent.learn(
                total_steps,
                callback=EpisodeLogger(log, on_episode, on_steps),
                reset_num_timesteps=False,
                tb_log_name=self.method,
            )
        venv.close()
        return log

    def act_batch(self, observations: np.ndarray, deterministic: bool = True) -> np.ndarray:
        with unchecked_distributions():
            actions, _ = self._agent().predict(
                np.asarray(observations, np.float32), deterministic=deterministic
            )
        return np.asarray(actions, dtype=np.int64).reshape(len(observations), -1)

    def config_dict(self) -> dict:
        return {"ppo": self.config.model_dump(mode="json")}

    def _save_weights(self, folder: Path) -> None:
        self._agent().save(folder / PPO_FILE)

    @classmethod
    def _from_saved(cls, layout, seed, config, folder):
        policy = cls(layout, seed, PPOConfig(**config["ppo"]))
        policy.agent = load_ppo(
            folder / PPO_FILE, policy.observation_space, policy.action_space, policy.config, seed
        )
        return policy
