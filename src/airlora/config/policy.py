"""The rank-selection environment and the policies that learn in it."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from airlora.config.base import ConfigBase


class EnvConfig(ConfigBase):
    """The rank-selection environment (design section 1): reward and observation scaling.

    Parameters
    ----------
    cost_weight:
        lambda in R_t = a_t - lambda * C_t / C_max. Default 0.1: sending every projection at
        r_max then costs 0.1 of accuracy, about what rank 8 gains over rank 1 early in training
        (docs/link-sweep.md), so neither term swamps the other.
    reward_form:
        ``accuracy`` (a_t minus the cost) or ``gain`` (a_t - a_{t-1} minus the cost; a_0 is the
        accuracy of the unadapted model). Default ``accuracy``.
    snr_norm_low_db, snr_norm_high_db:
        SNR range mapped to [-1, 1] in the observation (values outside go beyond, clipped at
        +-3). Default -10 and 30 dB.
    use_complexity:
        Put the data's complexity features in the observation; false zeroes them (an
        ablation). Default true.
    model_loss_in_state:
        Also show the server model's current loss on the round's first batch (the fifth
        complexity entry). Default false: the complexity then describes the data alone, and
        the no-complexity ablation removes the data's description, not a progress signal.
        (The layout keeps the entry, zeroed, so saved policies load either way.)
    """

    cost_weight: float = Field(default=0.1, ge=0)
    reward_form: Literal["accuracy", "gain"] = "accuracy"
    snr_norm_low_db: float = -10.0
    snr_norm_high_db: float = 30.0
    use_complexity: bool = True
    model_loss_in_state: bool = False

    @model_validator(mode="after")
    def _range(self) -> EnvConfig:
        if self.snr_norm_high_db <= self.snr_norm_low_db:
            raise ValueError("snr_norm_high_db must exceed snr_norm_low_db")
        return self


class PPOConfig(ConfigBase):
    """Stable-Baselines3 PPO hyper-parameters (SB3 names; defaults tuned for short episodes).

    ``n_steps`` is per environment copy; one PPO update sees ``n_steps * n_envs`` steps.
    ``log_std_init`` is the initial log standard deviation of a Gaussian (continuous) action,
    such as AirLLM's latent (the reference: -0.5); discrete actions ignore it.
    """

    learning_rate: float = Field(default=1e-3, gt=0)
    n_steps: int = Field(default=128, ge=2)
    n_envs: int = Field(default=4, ge=1)
    batch_size: int = Field(default=128, ge=2)
    n_epochs: int = Field(default=10, ge=1)
    gamma: float = Field(default=0.9, ge=0, le=1)
    gae_lambda: float = Field(default=0.95, ge=0, le=1)
    clip_range: float = Field(default=0.2, gt=0)
    ent_coef: float = Field(default=0.0, ge=0)
    net_arch: list[int] = [64, 64]
    log_std_init: float = 0.0


# The round formulation's denoiser schedule, 200 updates per phase of 512 PPO samples (128
# steps x 4 copies), as a rate: what ``AirLLMConfig.updates_per_phase = None`` scales by.
DENOISER_UPDATES_PER_512 = 200


class AirLLMConfig(ConfigBase):
    """AirLLM beyond its PPO agent: the coarse decision, the denoiser, its DDIM sampler and the
    alternation of PPO and denoiser phases.

    Parameters
    ----------
    action:
        ``grouped`` (this project's design, the default): PPO picks one rank level per group
        of projections and the denoiser, conditioned on the state and those levels, spreads
        each level over its group's layers. ``latent`` (the reference implementation's): PPO
        picks a ``latent_dim`` Gaussian vector (squashed by tanh), the denoiser, conditioned on
        it alone, samples the whole rank vector in [-1, 1], decoded linearly to 0..r_max;
        it needs ``denoiser_objective: reward_weighted``.
    latent_dim:
        Size of the latent action (``action: latent``). Default 16 (the reference's).
    use_denoiser:
        False: the rank vector is the coarse decision expanded to its groups, with no
        denoiser (an ablation; ``action: grouped`` only). Default true.
    depth_bands:
        The coarse decision is one rank level per (projection type, depth band); the layers
        are cut into this many contiguous bands. Default 2.
    spread_within:
        Where the denoiser's residual may move ranks: ``group`` (default) keeps each group's
        mean rank at its level, so ranks move only among the layers of one depth band;
        ``type`` keeps the mean over all layers of a projection type, so ranks may also move
        between bands (the coarse levels still set each type's total).
    train_timesteps:
        Diffusion steps of the noise schedule (``DDIMScheduler.num_train_timesteps``). Default 100.
    beta_schedule:
        ``squaredcos_cap_v2`` (the cosine schedule, default) or ``scaled_linear`` (betas from
        1e-4 to 2e-2 evenly spaced in square root, as the reference).
    inference_steps:
        DDIM steps per decision. Default 10.
    hidden:
        Width of the denoiser MLP (3 hidden layers). Default 128.
    cond_dropout:
        Probability that the condition is dropped in training (classifier-free guidance).
        Default 0.1.
    guidance_weight:
        w in eps = eps_uncond + w (eps_cond - eps_uncond); 0 is unconditional, 1 conditional,
        above 1 guidance in the literature's sense. Default 0.5 (a damped condition: below 1
        mixes toward the unconditional prediction; the reference and its presets use 1.5).
    learning_rate:
        Adam learning rate of the denoiser. Default 1e-3.
    max_grad_norm:
        Gradient-norm clip of the denoiser's updates; 0 is none (default; the reference: 1).
    updates_per_phase:
        Gradient steps of one denoiser phase. Default None: 200 per 512 transitions collected
        since the last phase (:data:`DENOISER_UPDATES_PER_512`; rounded, at least 1), which
        is 200 in the round formulation's phase of 512 PPO samples and 6 in the online
        formulation's episode of 15 steps. A fixed 200 in every 15-step episode re-fits a
        buffer of a few dozen tuples with about 3,400 sample-gradients per new tuple (the
        round formulation's rate is 100, the reference's 8.5) and, once the buffer holds a
        full minibatch, costs about a tenth of every MiniLM training step on a CPU.
    batch_size:
        Denoiser minibatch. Default 256.
    denoiser_objective:
        ``elite``: fit the samples whose refinement earned the most (the default here);
        ``reward_weighted``: the reference's loss on every sample, weighted by
        ``clip(1 + 0.1 z, 0.1, 10)`` with ``z`` the minibatch-standardised reward;
        ``advantage``: every sample, weighted by ``min(exp(A / std(A)), 20)`` with ``A`` the
        reward less a baseline of the condition alone (state and coarse decision), predicted
        out of fold (advantage-weighted regression; grouped actions only).
    elite_fraction:
        Share of the buffer (highest reward residual after a fitted state+coarse baseline) the
        denoiser is trained on. Default 0.2.
    buffer_size:
        Most recent (state, coarse, fine, reward) tuples kept. Default 8192.
    min_buffer:
        Tuples the buffer must hold before the first denoiser phase. Default 32 (the
        reference: 128).
    explore_std:
        Std (in ranks) of the residual prior the denoiser starts from. Default 1.0.
    warm_start_updates:
        Gradient steps fitting the denoiser to that prior before training. Default 1000.
    ppo_rollouts_per_phase:
        PPO rollouts (each ``n_steps * n_envs`` steps) between two denoiser phases. Default 1.
    """

    action: Literal["grouped", "latent"] = "grouped"
    latent_dim: int = Field(default=16, ge=1)
    use_denoiser: bool = True
    depth_bands: int = Field(default=2, ge=1)
    spread_within: Literal["group", "type"] = "group"
    train_timesteps: int = Field(default=100, ge=2)
    beta_schedule: Literal["squaredcos_cap_v2", "scaled_linear"] = "squaredcos_cap_v2"
    inference_steps: int = Field(default=10, ge=1)
    hidden: int = Field(default=128, ge=8)
    cond_dropout: float = Field(default=0.1, ge=0, lt=1)
    guidance_weight: float = Field(default=0.5, ge=0)
    learning_rate: float = Field(default=1e-3, gt=0)
    max_grad_norm: float = Field(default=0.0, ge=0)
    updates_per_phase: int | None = Field(default=None, ge=0)
    batch_size: int = Field(default=256, ge=2)
    elite_fraction: float = Field(default=0.2, gt=0, le=1)
    denoiser_objective: Literal["elite", "reward_weighted", "advantage"] = "elite"
    buffer_size: int = Field(default=8192, ge=16)
    min_buffer: int = Field(default=32, ge=1)
    explore_std: float = Field(default=1.0, ge=0)
    warm_start_updates: int = Field(default=1000, ge=0)
    ppo_rollouts_per_phase: int = Field(default=1, ge=1)

    def denoiser_updates(self, samples: int) -> int:
        """Gradient steps of a denoiser phase after ``samples`` new transitions."""
        if self.updates_per_phase is not None:
            return self.updates_per_phase
        return max(1, round(DENOISER_UPDATES_PER_512 * samples / 512))

    @model_validator(mode="after")
    def _steps(self) -> AirLLMConfig:
        if self.inference_steps > self.train_timesteps:
            raise ValueError("inference_steps cannot exceed train_timesteps")
        if self.action == "latent" and self.denoiser_objective != "reward_weighted":
            raise ValueError(
                "airllm action 'latent' trains its denoiser reward_weighted (the elite's "
                "refinement gain is defined for grouped actions): set denoiser_objective: "
                "reward_weighted"
            )
        if self.min_buffer > self.buffer_size:
            raise ValueError(
                f"min_buffer {self.min_buffer} exceeds buffer_size {self.buffer_size}: the "
                "denoiser would never train"
            )
        if self.action == "latent" and not self.use_denoiser:
            raise ValueError("airllm action 'latent' has no rank vector without its denoiser")
        return self


class SurrogateConfig(ConfigBase):
    """Reward model fitted on logged real rounds (design section 3).

    Parameters
    ----------
    real_episodes:
        Real episodes logged before fitting (random and heuristic rank vectors over the SNR
        process). Default 8.
    rounds_file:
        A ``rounds.jsonl`` logged by an earlier run (same model and r_max) to fit on instead of
        logging new real episodes (``airlora log-rounds`` writes a designed one); ``{r_max}``
        in it is replaced by the r_max, and ``shipped:NAME`` names a log shipped with the
        package (``shipped:paper-cpu-r8``). In a sweep it replaces the per-seed logging.
        Default none.
    min_r2:
        The least leave-one-episode-out R^2 of the fitted surrogate that a policy may train
        on; below it ``train-policy`` stops with an error that names the score. Default 0.3:
        the surrogate must explain at least 30 % of the variance of rounds it was not fitted
        on (on the shipped paper-cpu rounds it scores 0.47, the binomial noise of the edge's
        128 evaluation rows allowing up to 0.92). None trains on any fit
        (``--force-surrogate``).
    """

    real_episodes: int = Field(default=8, ge=2)
    rounds_file: Path | None = None
    min_r2: float | None = 0.3

    @model_validator(mode="before")
    @classmethod
    def _former_holdout(cls, data: object) -> object:
        # Configs saved before the leave-one-episode-out check (every earlier run folder and
        # sweep) hold this key; they must still load for reports, resumes and evaluations.
        if isinstance(data, dict) and "holdout_fraction" in data:
            warnings.warn(
                "surrogate.holdout_fraction is no longer used: the surrogate is checked "
                "leave-one-episode-out",
                DeprecationWarning,
                stacklevel=2,
            )
            data = {k: v for k, v in data.items() if k != "holdout_fraction"}
        return data
