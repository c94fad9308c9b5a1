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


def timestep_frequencies(dim: int = 32) -> torch.Tensor:
    """The ``dim // 2`` frequencies of :func:`timestep_embedding`."""
    half = dim // 2
    return torch.exp(-math.log(10_000.0) * torch.arange(half, dtype=torch.float32) / half)


def timestep_embedding(
    t: torch.Tensor, dim: int = 32, freqs: torch.Tensor | None = None
) -> torch.Tensor:
    """Sinusoidal embedding of integer diffusion timesteps, shape (batch, dim)."""
    freqs = timestep_frequencies(dim) if freqs is None else freqs
    angles = t.float()[:, None] * freqs[None, :]
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


def reward_weights(rewards: torch.Tensor, scale: float = 0.1) -> torch.Tensor:
    """Per-sample weights of the reward-weighted loss: ``clip(1 + scale z, 0.1, 10)`` with
    ``z`` the rewards standardised over the minibatch (population std, +1e-6); the minibatch
    is the last dimension (a leading dimension holds several minibatches)."""
    mean = rewards.mean(dim=-1, keepdim=True)
    z = (rewards - mean) / (rewards.std(dim=-1, unbiased=False, keepdim=True) + 1e-6)
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
        # Not saved (persistent=False): a constant, and saved policies keep their keys.
        self.register_buffer("freqs", timestep_frequencies(self.t_dim), persistent=False)
        self.net = nn.Sequential(
            nn.Linear(sample_dim + self.t_dim + cond_dim + 1, hidden),
            nn.SiLU(),
            nn.Linear(hidden, hidden),
            nn.SiLU(),
            nn.Linear(hidden, hidden),
            nn.SiLU(),
            nn.Linear(hidden, sample_dim),
        )

    def inputs(
        self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, present: torch.Tensor
    ) -> torch.Tensor:
        """The network's input rows for (x_t, t, condition, present flag); any leading shape."""
        return torch.cat([x, self.context(t, cond, present)], dim=-1)

    def context(self, t: torch.Tensor, cond: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        """The part of the input that is not x_t: timestep embedding, condition, flag. A DDIM
        chain computes it for all its timesteps at once."""
        present = present.unsqueeze(-1)
        emb = timestep_embedding(t.reshape(-1), self.t_dim, self.freqs)
        emb = emb.reshape(*t.shape, self.t_dim)
        return torch.cat([emb, cond * present, present], dim=-1)

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, present: torch.Tensor
    ) -> torch.Tensor:
        return self.net(self.inputs(x, t, cond, present))


# Denoiser updates whose draws and inputs are built together (DDIMSampler.train).
TRAIN_CHUNK = 128


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
        # Seeded from `seed` without touching torch's global generator: reseeding it here made
        # the model's dropout draws depend on whether a policy had been built (unpaired runs).
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.denoiser = Denoiser(sample_dim, cond_dim, config.hidden)
        self.scheduler = DDIMScheduler(
            num_train_timesteps=config.train_timesteps,
            beta_schedule=config.beta_schedule,
            beta_start=1e-4,  # scaled_linear only (the reference's range)
            beta_end=2e-2,
            prediction_type="epsilon",
            clip_sample=True,
            clip_sample_range=1.0,
            set_alpha_to_one=True,
        )
        self.scheduler.set_timesteps(config.inference_steps)
        self._steps = self._ddim_steps()
        # Fused: the denoiser trains by many small steps, where the per-parameter loop of the
        # default Adam costs more than the arithmetic (about a quarter of a phase on a CPU).
        self.optimizer = torch.optim.Adam(
            self.denoiser.parameters(), lr=config.learning_rate, fused=True
        )
        self.generator = torch.Generator().manual_seed(seed)

    def _ddim_steps(
        self,
    ) -> list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Per inference timestep t: (t, sqrt(1 - a_t), sqrt(a_t), sqrt(a_prev), sqrt(1 - a_prev)),
        from the scheduler's own cumulative alphas, computed as its ``step`` computes them.

        Why not call ``scheduler.step``: it re-derives these and builds an output object at every
        call, about half of a small denoiser's sampling time, paid at every online decision.
        The update in :meth:`sample` is its eta = 0, epsilon, clipped path (tested equal).
        """
        s = self.scheduler
        stride = s.config.num_train_timesteps // s.num_inference_steps
        steps = []
        for t in s.timesteps.tolist():
            a_t = s.alphas_cumprod[t]
            a_prev = s.alphas_cumprod[t - stride] if t - stride >= 0 else s.final_alpha_cumprod
            steps.append((int(t), (1 - a_t) ** 0.5, a_t**0.5, a_prev**0.5, (1 - a_prev) ** 0.5))
        return steps

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
        sample_weights: np.ndarray | None = None,
    ) -> float:
        """``updates`` Adam steps of the denoising loss on (x0, cond) pairs; mean loss.

        Each step drops the condition of a ``cond_dropout`` share of the batch. With
        ``rewards``, the loss of each sample is weighted by :func:`reward_weights` of the
        minibatch's rewards (the reference's reward-weighted noise prediction); with
        ``sample_weights``, by those fixed per-sample weights (one of the two, or neither).
        """
        if rewards is not None and sample_weights is not None:
            raise ValueError("give rewards or sample_weights, not both")
        if updates <= 0 or len(x0) == 0:
            return float("nan")
        if sample_weights is not None and len(sample_weights) != len(x0):
            raise ValueError(f"{len(sample_weights)} sample weights for {len(x0)} samples")
        x0_t = torch.as_tensor(x0, dtype=torch.float32)
        c_t = torch.as_tensor(cond, dtype=torch.float32)
        r_t = None if rewards is None else torch.as_tensor(rewards, dtype=torch.float32)
        w_t = None if sample_weights is None else torch.as_tensor(sample_weights).float()
        n, b, g = len(x0_t), min(batch_size, len(x0_t)), self.generator
        net = self.denoiser.net
        self.denoiser.train()
        losses = torch.empty(updates)
        # The draws, input rows and loss weights of a chunk of updates are built at once (one
        # call each rather than several per update: the per-call overhead is what a small
        # denoiser's phase mostly spends); chunks bound the memory (updates x batch x input).
        for start in range(0, updates, TRAIN_CHUNK):
            k = min(TRAIN_CHUNK, updates - start)
            idx = torch.randint(0, n, (k, b), generator=g)
            noise = torch.randn((k, b, self.sample_dim), generator=g)
            t = torch.randint(0, self.config.train_timesteps, (k, b), generator=g)
            present = (torch.rand((k, b), generator=g) >= self.config.cond_dropout).float()
            xt = self.scheduler.add_noise(
                x0_t[idx].reshape(-1, self.sample_dim),
                noise.reshape(-1, self.sample_dim),
                t.reshape(-1),
            ).reshape(k, b, self.sample_dim)
            inputs = self.denoiser.inputs(xt, t, c_t[idx], present)
            weights = None if r_t is None else reward_weights(r_t[idx], reward_scale)
            if w_t is not None:
                weights = w_t[idx]
            for u in range(k):
                loss = weighted_noise_loss(
                    net(inputs[u]), noise[u], None if weights is None else weights[u]
                )
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if self.config.max_grad_norm > 0:
                    nn.utils.clip_grad_norm_(self.denoiser.parameters(), self.config.max_grad_norm)
                self.optimizer.step()
                losses[start + u] = loss.detach()
        self.denoiser.eval()
        return float(losses.mean())

    # ------------------------------------------------------------------ sampling

    @torch.inference_mode()
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
        guided = cond is not None and w not in (0.0, 1.0)
        if guided:  # one pass over both halves: [unconditional; conditional]
            c, flags = torch.cat([c, c]), torch.cat([null, present])
        else:
            flags = null if cond is None or w == 0.0 else present
        bound = self.scheduler.config.clip_sample_range
        rows = 2 * n if guided else n
        times = torch.tensor([step[0] for step in self._steps])[:, None].expand(-1, rows)
        context = self.denoiser.context(
            times, c.expand(len(times), -1, -1), flags.expand(len(times), -1)
        )
        net = self.denoiser.net
        for i, (_, sqrt_beta, sqrt_alpha, sqrt_alpha_prev, sqrt_beta_prev) in enumerate(
            self._steps
        ):
            xs = torch.cat([x, x]) if guided else x
            eps = net(torch.cat([xs, context[i]], dim=1))
            if guided:
                eps_u, eps_c = eps[:n], eps[n:]
                eps = eps_u + w * (eps_c - eps_u)
            # DDIM, eta = 0: the clipped x_0 estimate, moved to the previous timestep.
            x0 = ((x - sqrt_beta * eps) / sqrt_alpha).clamp(-bound, bound)
            x = sqrt_alpha_prev * x0 + sqrt_beta_prev * eps
        return x.clamp(-1.0, 1.0)

    # ------------------------------------------------------------------ persistence

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.denoiser.state_dict().items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.denoiser.load_state_dict(state)
        self.denoiser.eval()
