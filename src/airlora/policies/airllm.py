"""AirLLM: a PPO agent picks a coarse decision; a DDIM-sampled denoiser turns it into the full
rank vector (design section 3).

Coarse action space: one rank level (0..r_max) per group of projections, a group being a
projection *type* (query, key, value, attention output for BERT) within a *depth band* (the
layers cut into ``depth_bands`` contiguous bands; default 2: 8 numbers instead of 24 for
MiniLM). Why this one: types differ in how much a rank buys and how much noise hurts, and
depth changes both (early layers feed every later one); those are the differences the channel
state moves, and PPO's credit assignment over 8 categorical heads is far easier than over M.
The denoiser then adds what a group level cannot say, the per-layer refinement:

    rank_i = clip(round(level[type(i)] + (r_max / 2) * x_i), 0, r_max),   x ~ DDIM(obs, level)

with x in [-1, 1]^M the residual the denoiser samples, centred to mean zero within each group,
so that the level is the group's mean rank and the denoiser only spreads it over the layers.
Without the centring the split between level and residual is not identifiable: PPO lowers
its levels as the denoiser learns to add ranks, the denoiser then sees more reward in adding,
and the two drift apart. Before any training the denoiser is
fitted to a small Gaussian residual (``explore_std`` ranks) around the level, so the first PPO
phase explores near its own decisions instead of at random.

Training alternates (``AirLLMConfig.ppo_rollouts_per_phase``): a PPO phase with the denoiser
frozen (SB3 sees the denoiser as part of the environment), then a denoiser phase on the
(state, coarse, fine, reward) tuples collected so far: a ridge regression separates the part of
each reward that the residual earned from what the state and the coarse decision explain
(:func:`refinement_gain`); the tuples whose residual earned the most (the ``elite_fraction``)
are the training set, with the condition dropped at random (classifier-free guidance).
Greedy decisions start the DDIM chain from x_T = 0.

``AirLLMConfig.action: latent`` is the reference implementation's design instead: PPO's action
is a Gaussian vector of ``latent_dim`` numbers, squashed by tanh (PPO's probabilities are those
of the unsquashed sample); the denoiser, conditioned on that vector alone, samples the whole
rank vector x in [-1, 1]^M, decoded as level = lo + floor((x + 1) / 2 * (r_max - lo)) with lo
the layout's ``min_level``; it trains on every (latent, executed x, reward) tuple with the
reward-weighted loss, and starts untrained.
"""

from __future__ import annotations

from collections import deque
from pathlib import Path

import numpy as np
import torch
from gymnasium import spaces
from safetensors.torch import load_file, save_file
from stable_baselines3 import PPO
from stable_baselines3.common.vec_env import VecEnv, VecEnvWrapper

from airlora.config import AirLLMConfig, PPOConfig
from airlora.env.observation import (
    observation_space,
    projection_groups,
    rank_space,
)
from airlora.policies.base import (
    ActionLayout,
    EnvFactory,
    EpisodeCallback,
    RankPolicy,
    StepCallback,
    TrainingLog,
)
from airlora.policies.diffusion import DDIMSampler
from airlora.policies.ppo import (
    PPO_FILE,
    EpisodeLogger,
    SpacesOnlyEnv,
    load_ppo,
    make_vec_env,
    new_ppo,
    unchecked_distributions,
)

DENOISER_FILE = "denoiser.safetensors"
# PPO's Gaussian latent is clipped here before tanh: tanh(5) = 0.99991, so the clip moves the
# denoiser's condition by less than 1e-4, while SB3 needs a bounded Box.
LATENT_BOUND = 5.0


class TransitionBuffer:
    """The most recent (state, coarse, fine, reward) tuples."""

    def __init__(self, size: int) -> None:
        self.items: deque[tuple[np.ndarray, np.ndarray, np.ndarray, float]] = deque(maxlen=size)

    def add(self, obs: np.ndarray, coarse: np.ndarray, fine: np.ndarray, rewards: np.ndarray):
        for o, c, f, r in zip(obs, coarse, fine, rewards, strict=True):
            self.items.append((o.copy(), c.copy(), f.copy(), float(r)))

    def __len__(self) -> int:
        return len(self.items)

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        obs, coarse, fine, reward = zip(*self.items, strict=True)
        return np.stack(obs), np.stack(coarse), np.stack(fine), np.asarray(reward)


def _quadratic(x: np.ndarray) -> np.ndarray:
    iu = np.triu_indices(x.shape[1])
    pairs = (x[:, :, None] * x[:, None, :])[:, iu[0], iu[1]]
    return np.concatenate([np.ones((len(x), 1)), x, pairs], axis=1)


def _ridge(z: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Coefficients of the ridge regression of y on z, penalty 1."""
    n, p = z.shape
    if n < p:  # the same ridge solution from the n x n system (z'z + I)^-1 z' = z'(zz' + I)^-1
        return z.T @ np.linalg.solve(z @ z.T + np.eye(n), y)
    return np.linalg.solve(z.T @ z + np.eye(p), z.T @ y)


def refinement_gain(cond: np.ndarray, residual: np.ndarray, rewards: np.ndarray) -> np.ndarray:
    """Estimated reward that each sample's residual added to its coarse decision.

    A ridge regression (standardised features, penalty 1) models the reward as quadratic in the
    condition (state and coarse decision) plus, for the residual x: linear and squared terms and
    x's products with the condition. The residual terms' part of the fit is the estimate; the
    condition-only part soaks up what the state and the coarse decision explain, which would
    otherwise swamp the refinement's own effect.
    """
    base = _quadratic(cond)
    res = np.concatenate(
        [residual, residual**2, (cond[:, :, None] * residual[:, None, :]).reshape(len(cond), -1)],
        axis=1,
    )
    phi = np.concatenate([base[:, 1:], res], axis=1)
    # Standardised columns: the squared residuals are tiny numbers, and an unscaled ridge
    # penalty would shrink their (curvature) coefficients away and leave a model linear in x,
    # whose elite only ever moves further out.
    mean, std = phi.mean(axis=0), phi.std(axis=0) + 1e-8
    z = (phi - mean) / std
    coef = _ridge(z, rewards - rewards.mean())
    n_base = base.shape[1] - 1
    return z[:, n_base:] @ coef[n_base:]


ADVANTAGE_FOLDS = 5
MAX_ADVANTAGE_WEIGHT = 20.0


def condition_advantage(cond: np.ndarray, rewards: np.ndarray, folds: int = ADVANTAGE_FOLDS):
    """Each reward less what the condition alone predicts for it (a ridge, quadratic in the
    standardised condition, penalty 1), the prediction made by a fit that did not see that
    sample (``folds``-fold cross-fitting).

    Why out of fold: with a few hundred features and fewer samples, an in-sample ridge all but
    interpolates the rewards, and its residuals, the advantages, would shrink toward zero. Why
    the condition alone: a baseline that also saw the residual x would explain away what the
    refinement earned (the elite's ridge does that on purpose, and ranks its own noise).
    """
    phi = _quadratic(np.asarray(cond, np.float64))[:, 1:]
    rewards = np.asarray(rewards, np.float64)
    n = len(rewards)
    if n < 2:  # nothing to fit a baseline on: no sample is better than expected
        return np.zeros(n)
    fold = np.arange(n) % max(2, min(folds, n))
    predicted = np.empty(n)
    for k in np.unique(fold):
        fit, out = fold != k, fold == k
        mean, std = phi[fit].mean(axis=0), phi[fit].std(axis=0) + 1e-8
        z, y0 = (phi[fit] - mean) / std, rewards[fit].mean()
        y = rewards[fit] - y0
        coef = _ridge(z, y)
        predicted[out] = y0 + ((phi[out] - mean) / std) @ coef
    return rewards - predicted


def advantage_weights(advantage: np.ndarray) -> np.ndarray:
    """``min(exp(A / std(A)), 20)``: advantage-weighted regression's weights, unitless."""
    a = np.asarray(advantage, np.float64)
    scale = a.std() + 1e-12
    return np.minimum(np.exp(a / scale), MAX_ADVANTAGE_WEIGHT)


class _CoarseToFine(VecEnvWrapper):
    """What PPO sees in AirLLM: coarse actions in, the denoiser fills in the rank vector."""

    def __init__(self, venv: VecEnv, policy: AirLLMPolicy) -> None:
        super().__init__(venv, action_space=policy.coarse_space)
        self.policy = policy
        self._obs: np.ndarray | None = None
        self._pending: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None

    def reset(self) -> np.ndarray:
        self._obs = self.venv.reset()
        return self._obs

    def step_async(self, actions: np.ndarray) -> None:
        assert self._obs is not None
        coarse = self.policy.coarse_array(actions, self.num_envs)
        fine = self.policy.refine(self._obs, coarse, deterministic=False)
        self._pending = (self._obs, coarse, fine)
        self.venv.step_async(fine)

    def step_wait(self):
        obs, rewards, dones, infos = self.venv.step_wait()
        assert self._pending is not None
        self.policy.buffer.add(*self._pending, rewards)
        self._obs = obs
        return obs, rewards, dones, infos


class AirLLMPolicy(RankPolicy):
    """Hierarchical PPO + DDIM rank policy (see the module docstring).

    Parameters
    ----------
    layout, seed: see :class:`~airlora.policies.base.RankPolicy`.
    ppo: PPO hyper-parameters of the coarse agent.
    airllm: coarse resolution, denoiser, sampler and alternation settings.
    """

    method = "airllm"

    def __init__(
        self,
        layout: ActionLayout,
        seed: int = 0,
        ppo: PPOConfig | None = None,
        airllm: AirLLMConfig | None = None,
    ) -> None:
        super().__init__(layout, seed)
        self.ppo_config = ppo or PPOConfig()
        self.airllm_config = airllm or AirLLMConfig()
        cfg = self.airllm_config
        self.latent = cfg.action == "latent"
        self.group_names, groups = projection_groups(layout.projection_names, cfg.depth_bands)
        self.group_index = np.asarray(groups, dtype=np.int64)
        # The sets whose mean rank the residual keeps (AirLLMConfig.spread_within).
        if cfg.spread_within == "type":
            _, types = projection_groups(layout.projection_names, 1)
            self.spread_index = np.asarray(types, dtype=np.int64)
        else:
            self.spread_index = self.group_index
        if self.latent:
            shape = (cfg.latent_dim,)
            self.coarse_space = spaces.Box(-LATENT_BOUND, LATENT_BOUND, shape, np.float32)
            cond_dim = cfg.latent_dim
        else:
            self.coarse_space = rank_space(len(self.group_names), layout.r_max)
            cond_dim = layout.obs_dim + len(self.group_names)
        self.sampler = DDIMSampler(layout.num_projections, cond_dim, self.airllm_config, seed=seed)
        # x = +-1 means +-r_max/2 ranks: a finer grid than +-r_max for the same model error.
        self.residual_scale = layout.r_max / 2.0
        self.buffer = TransitionBuffer(self.airllm_config.buffer_size)
        self.agent: PPO | None = None
        self.denoiser_losses: list[float] = []
        self._generator = torch.Generator().manual_seed(seed + 1)
        self._warm_started = False

    # ------------------------------------------------------------------ decisions

    def coarse_array(self, actions: np.ndarray, n: int) -> np.ndarray:
        """PPO's actions as an (n, coarse size) array: levels, or the latent's numbers."""
        actions = np.asarray(actions)
        if not np.isfinite(actions).all():  # a diverged PPO network: no rank vector from it
            raise FloatingPointError(f"PPO produced non-finite actions: {actions.tolist()}")
        dtype = np.float32 if self.latent else np.int64
        return actions.astype(dtype).reshape(n, -1)

    def decode(self, x: np.ndarray) -> np.ndarray:
        """Rank levels from a whole sampled vector in [-1, 1] (``action: latent``): the
        reference's ``lo + floor((x + 1) / 2 * (hi - lo))``, ``hi`` at x = 1 only."""
        lo, hi = self.layout.min_level, self.layout.r_max
        levels = lo + np.floor((np.asarray(x, np.float64) + 1.0) / 2.0 * (hi - lo))
        return np.clip(levels, lo, hi).astype(np.int64)

    def encode(self, ranks: np.ndarray) -> np.ndarray:
        """The vector in [-1, 1] that the denoiser learns for executed levels: the centre of
        each level's interval (its lower edge would decode one level down after rounding),
        1 for the top level."""
        lo, hi = self.layout.min_level, self.layout.r_max
        k = np.clip(np.asarray(ranks, np.float64), lo, hi)
        if hi == lo:
            return np.ones_like(k)
        return np.where(k >= hi, 1.0, 2.0 * (k - lo + 0.5) / (hi - lo) - 1.0)

    def condition(self, obs: np.ndarray, coarse: np.ndarray) -> np.ndarray:
        if self.latent:  # the reference conditions its denoiser on the latent alone
            return np.tanh(np.asarray(coarse, np.float32))
        return np.concatenate(
            [np.asarray(obs, np.float32), np.asarray(coarse, np.float32) / self.layout.r_max],
            axis=1,
        )

    def expand(self, coarse: np.ndarray) -> np.ndarray:
        """Each projection's rank level from its type's coarse level, shape (n, M)."""
        return np.asarray(coarse, dtype=np.int64)[:, self.group_index]

    def center(self, x: np.ndarray) -> np.ndarray:
        """Remove each group's (or type's: ``spread_within``) mean from a residual, so that it
        only redistributes the levels."""
        index = self.spread_index
        sets = int(index.max()) + 1
        sums = np.zeros((len(x), sets))
        np.add.at(sums.T, index, np.asarray(x, np.float64).T)
        counts = np.bincount(index, minlength=sets)
        return x - (sums / counts)[:, index]

    def refine(self, obs: np.ndarray, coarse: np.ndarray, deterministic: bool) -> np.ndarray:
        """The full rank vectors for coarse decisions, sampled from the denoiser."""
        if not self.airllm_config.use_denoiser:
            return self.expand(coarse)
        obs = np.asarray(obs, np.float32).reshape(len(coarse), -1)
        cond = self.condition(obs, coarse)
        noise = torch.zeros(len(coarse), self.layout.num_projections) if deterministic else None
        x = self.sampler.sample(cond, noise=noise, generator=self._generator).numpy()
        if self.latent:
            return self.decode(x)
        x = self.center(x)
        ranks = self.expand(coarse) + self.residual_scale * x
        return np.clip(np.rint(ranks), 0, self.layout.r_max).astype(np.int64)

    def _agent(self) -> PPO:
        if self.agent is None:
            self.agent = new_ppo(
                SpacesOnlyEnv(observation_space(self.layout.obs_dim), self.coarse_space),
                self.ppo_config,
                self.seed,
                None,
            )
        return self.agent

    def act_batch(self, observations: np.ndarray, deterministic: bool = True) -> np.ndarray:
        obs = np.asarray(observations, np.float32)
        with unchecked_distributions():
            coarse, _ = self._agent().predict(obs, deterministic=deterministic)
        coarse = self.coarse_array(coarse, len(obs))
        return self.refine(obs, coarse, deterministic)

    # ------------------------------------------------------------------ training

    def warm_start(self, n: int = 4096) -> float:
        """Fit the denoiser to the exploration prior: small Gaussian residuals, any condition.
        A latent-action denoiser starts untrained, as the reference's."""
        cfg = self.airllm_config
        if self.latent:
            self._warm_started = True
            return float("nan")
        rng = np.random.default_rng(self.seed)
        cond = np.concatenate(
            [
                rng.uniform(-1, 1, (n, self.layout.obs_dim)),
                rng.integers(0, self.layout.r_max + 1, (n, len(self.group_names)))
                / self.layout.r_max,
            ],
            axis=1,
        )
        std = cfg.explore_std / self.residual_scale
        x0 = np.clip(rng.normal(0.0, std, (n, self.layout.num_projections)), -1, 1)
        self._warm_started = True
        return self.sampler.train(x0, cond, cfg.warm_start_updates, cfg.batch_size)

    def denoiser_phase(self, samples: int) -> float:
        """Train the denoiser on the buffer after ``samples`` new transitions (the number of
        updates follows :meth:`~airlora.config.AirLLMConfig.denoiser_updates`): the elite of
        the buffer, or all of it reward- or advantage-weighted; returns the mean loss."""
        cfg = self.airllm_config
        updates = cfg.denoiser_updates(samples)
        if not cfg.use_denoiser or updates == 0 or len(self.buffer) < cfg.min_buffer:
            return float("nan")
        obs, coarse, fine, reward = self.buffer.arrays()
        cond = self.condition(obs, coarse)
        if self.latent:  # the whole executed vector (the reference)
            target = self.encode(fine)
        else:
            target = self.center((fine - self.expand(coarse)) / self.residual_scale)
        if self.latent or cfg.denoiser_objective == "reward_weighted":  # every sample, weighted
            loss = self.sampler.train(target, cond, updates, cfg.batch_size, rewards=reward)
            self.denoiser_losses.append(loss)
            return loss
        if cfg.denoiser_objective == "advantage":  # every sample, advantage-weighted
            weights = advantage_weights(condition_advantage(cond, reward))
            loss = self.sampler.train(target, cond, updates, cfg.batch_size, sample_weights=weights)
            self.denoiser_losses.append(loss)
            return loss
        residual = target
        gain = refinement_gain(cond.astype(np.float64), residual, reward)
        keep = np.argsort(gain)[-max(1, round(cfg.elite_fraction * len(gain))) :]
        loss = self.sampler.train(residual[keep], cond[keep], updates, cfg.batch_size)
        self.denoiser_losses.append(loss)
        return loss

    def learn(
        self,
        make_env: EnvFactory,
        total_steps: int,
        n_envs: int = 1,
        on_episode: EpisodeCallback | None = None,
        on_steps: StepCallback | None = None,
        tensorboard_dir: Path | None = None,
    ) -> TrainingLog:
        if not self._warm_started and self.airllm_config.use_denoiser:
            self.warm_start()
        venv = _CoarseToFine(make_vec_env(make_env, n_envs, self.seed), self)
        log = TrainingLog()
        if self.agent is None:
            self.agent = new_ppo(venv, self.ppo_config, self.seed, tensorboard_dir)
        else:
            self.agent.set_env(venv)
        phase = self.ppo_config.n_steps * n_envs * self.airllm_config.ppo_rollouts_per_phase
        callback = EpisodeLogger(log, on_episode, on_steps)
        done = 0
        while done < total_steps:
            chunk = min(phase, total_steps - done)
            with unchecked_distributions():
                self.agent.learn(
                    chunk, callback=callback, reset_num_timesteps=False, tb_log_name=self.method
                )
            done += chunk
            if callback.stopped:
                break
            self.denoiser_phase(chunk)
        log.extra["denoiser_losses"] = list(self.denoiser_losses)
        venv.close()
        return log

    # ------------------------------------------------------------------ persistence

    def config_dict(self) -> dict:
        return {
            "ppo": self.ppo_config.model_dump(mode="json"),
            "airllm": self.airllm_config.model_dump(mode="json"),
            "coarse_groups": [] if self.latent else self.group_names,
        }

    def _save_weights(self, folder: Path) -> None:
        self._agent().save(folder / PPO_FILE)
        save_file(self.sampler.state_dict(), str(folder / DENOISER_FILE))

    @classmethod
    def _from_saved(cls, layout, seed, config, folder):
        policy = cls(layout, seed, PPOConfig(**config["ppo"]), AirLLMConfig(**config["airllm"]))
        policy.agent = load_ppo(
            folder / PPO_FILE,
            observation_space(layout.obs_dim),
            policy.coarse_space,
            policy.ppo_config,
            seed,
        )
        path = folder / DENOISER_FILE
        if not path.is_file():
            raise FileNotFoundError(f"saved policy is missing {path}")
        policy.sampler.load_state_dict(load_file(str(path)))
        policy._warm_started = True
        return policy
