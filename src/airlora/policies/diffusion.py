"""The AirLLM denoiser: a conditional noise-prediction MLP sampled with DDIM and
classifier-free guidance.

The sampler is diffusers' :class:`~diffusers.DDIMScheduler` (cosine schedule, epsilon
prediction, samples clipped to [-1, 1]); this module adds what it does not have: the network,
condition dropout in training, and the guided prediction

    eps = eps(x, t, null) + w * (eps(x, t, c) - eps(x, t, null))

where w = 0 gives the unconditional model and w = 1 the conditional one. A dropped condition
is a zero vector plus a "condition present" flag of 0, so the network can tell it apart from a
real condition that happens to be zero.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from diffusers import DDIMScheduler
from torch import nn

from airlora.config import AirLLMConfig


def timestep_embedding(t: torch.Tensor, dim: int = 32) -> torch.Tensor:
    """Sinusoidal embedding of integer diffusion timesteps, shape (batch, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10_000.0) * torch.arange(half, dtype=torch.float32) / half)
    angles = t.float()[:, None] * freqs[None, :]
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


def reward_weights(rewards: torch.Tensor, scale: float = 0.1) -> torch.Tensor:
    """Per-sample weights of the reward-weighted loss: ``clip(1 + scale z, 0.1, 10)`` with
    ``z`` the rewards standardised over the minibatch (population std, +1e-6)."""
    z = (rewards - rewards.mean()) / (rewards.std(unbiased=False) + 1e-6)
    return torch.clamp(1.0 + scale * z, 0.1, 10.0).detach()


def weighted_noise_loss(
    predicted: torch.Tensor, noise: torch.Tensor, weights: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean over samples of (weight x mean over dimensions of the squared error)."""
    per_sample = ((predicted - noise) ** 2).mean(dim=1)
    return per_sample.mean() if weights is None else (weights * per_sample).mean()


class Denoiser(nn.Module):
    """eps-prediction MLP: (x_t, t, condition, present flag) -> predicted noise.

    Parameters
    ----------
    sample_dim: length of the sample x (the rank residual vector, M).
    cond_dim: length of the condition (observation and coarse decision).
    hidden: width of the three hidden layers. Default 128.
    """

    def __init__(self, sample_dim: int, cond_dim: int, hidden: int = 128) -> None:
        super().__init__()
        self.sample_dim = sample_dim
        self.cond_dim = cond_dim
        self.t_dim = 32
        self.net = nn.Sequential(
            nn.Linear(sample_dim + self.t_dim + cond_dim + 1, hidden),
            nn.SiLU(),
            nn.Linear(hidden, hidden),
            nn.SiLU(),
            nn.Linear(hidden, hidden),
            nn.SiLU(),
            nn.Linear(hidden, sample_dim),
        )

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, present: torch.Tensor
    ) -> torch.Tensor:
        cond = cond * present[:, None]
        h = torch.cat([x, timestep_embedding(t, self.t_dim), cond, present[:, None]], dim=1)
        return self.net(h)


class DDIMSampler:
    """A denoiser with its DDIM schedule: train it, sample from it with guidance.

    Parameters
    ----------
    sample_dim, cond_dim: sizes of the sample and the condition.
    config: schedule, sampler and training settings (:class:`~airlora.config.AirLLMConfig`).
    seed: seeds the network's initialisation and the training draws.
    """

    def __init__(self, sample_dim: int, cond_dim: int, config: AirLLMConfig, seed: int = 0):
        self.config = config
        torch.manual_seed(seed)
        self.denoiser = Denoiser(sample_dim, cond_dim, config.hidden)
        self.scheduler = DDIMScheduler(
            num_train_timesteps=config.train_timesteps,
            beta_schedule="squaredcos_cap_v2",
            prediction_type="epsilon",
            clip_sample=True,
            clip_sample_range=1.0,
            set_alpha_to_one=True,
        )
        self.scheduler.set_timesteps(config.inference_steps)
        self.optimizer = torch.optim.Adam(self.denoiser.parameters(), lr=config.learning_rate)
        self.generator = torch.Generator().manual_seed(seed)

    @property
    def sample_dim(self) -> int:
        return self.denoiser.sample_dim

    @property
    def cond_dim(self) -> int:
        return self.denoiser.cond_dim

    # ------------------------------------------------------------------ training

    def train(
        self,
        x0: np.ndarray,
        cond: np.ndarray,
        updates: int,
        batch_size: int,
        rewards: np.ndarray | None = None,
        reward_scale: float = 0.1,
    ) -> float:
        """``updates`` Adam steps of the denoising loss on (x0, cond) pairs; mean loss.

        Each step drops the condition of a ``cond_dropout`` share of the batch. With
        ``rewards``, the loss of each sample is weighted by :func:`reward_weights` of the
        minibatch's rewards (the reference's reward-weighted noise prediction).
        """
        if updates <= 0 or len(x0) == 0:
            return float("nan")
        x0_t = torch.as_tensor(x0, dtype=torch.float32)
        c_t = torch.as_tensor(cond, dtype=torch.float32)
        r_t = None if rewards is None else torch.as_tensor(rewards, dtype=torch.float32)
        n = len(x0_t)
        g = self.generator
        self.denoiser.train()
        losses = []
        for _ in range(updates):
            idx = torch.randint(0, n, (min(batch_size, n),), generator=g)
            x, c = x0_t[idx], c_t[idx]
            noise = torch.randn(x.shape, generator=g)
            t = torch.randint(0, self.config.train_timesteps, (len(idx),), generator=g)
            xt = self.scheduler.add_noise(x, noise, t)
            present = (torch.rand(len(idx), generator=g) >= self.config.cond_dropout).float()
            weights = None if r_t is None else reward_weights(r_t[idx], reward_scale)
            loss = weighted_noise_loss(self.denoiser(xt, t, c, present), noise, weights)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            losses.append(float(loss.detach()))
        self.denoiser.eval()
        return float(np.mean(losses))

    # ------------------------------------------------------------------ sampling

    @torch.no_grad()
    def sample(
        self,
        cond: np.ndarray | torch.Tensor | None,
        n: int | None = None,
        guidance_weight: float | None = None,
        noise: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Draw samples in [-1, 1] by DDIM (eta = 0) with classifier-free guidance.

        Parameters
        ----------
        cond: one condition per sample, shape (n, cond_dim); ``None`` samples unconditionally.
        n: number of samples when ``cond`` is ``None``.
        guidance_weight: w; default the config's.
        noise: the starting x_T, shape (n, sample_dim); default drawn from ``generator``.
            A zero start gives the deterministic "central" sample used for greedy decisions.
        generator: torch generator for x_T; default this sampler's own.
        """
        w = self.config.guidance_weight if guidance_weight is None else guidance_weight
        if cond is None:
            if n is None:
                raise ValueError("give n when sampling without a condition")
            c = torch.zeros(n, self.cond_dim)
            present = torch.zeros(n)
        else:
            c = torch.as_tensor(cond, dtype=torch.float32).reshape(-1, self.cond_dim)
            n = len(c)
            present = torch.ones(n)
        x = (
            noise
            if noise is not None
            else torch.randn(n, self.sample_dim, generator=generator or self.generator)
        )
        x = x.clone().float()
        self.denoiser.eval()
        null = torch.zeros(n)
        for t in self.scheduler.timesteps:
            tt = torch.full((n,), int(t), dtype=torch.long)
            if cond is None or w == 0.0:
                eps = self.denoiser(x, tt, c, null)
            elif w == 1.0:
                eps = self.denoiser(x, tt, c, present)
            else:
                both = self.denoiser(
                    torch.cat([x, x]),
                    torch.cat([tt, tt]),
                    torch.cat([c, c]),
                    torch.cat([null, present]),
                )
                eps_u, eps_c = both[:n], both[n:]
                eps = eps_u + w * (eps_c - eps_u)
            x = self.scheduler.step(eps, int(t), x, eta=0.0).prev_sample
        return x.clamp(-1.0, 1.0)

    # ------------------------------------------------------------------ persistence

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.denoiser.state_dict().items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.denoiser.load_state_dict(state)
        self.denoiser.eval()
