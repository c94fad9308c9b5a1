"""`airlora bench online`: the online formulation's training speed with AirLLM deciding.

project = training steps per second of the online loop with the airllm policy picking the
rank vector at every step and learning as it goes (PPO update per episode window, denoiser
phases); peer = the same loop, same model, data and steps, at fixed ranks (LoRA at r_max).
Both run in this process on the default model and the packaged AG News sample, alternating,
each on a fresh environment; the first episode of each is left out (warm-up). A repeat is a
pair of runs on the same seed (the same batches, so the same sequence lengths): ratio = the
median over repeats of project / peer within the pair (1.0: deciding costs nothing; the target
is >= 0.95), so that a slow patch of the machine moves both sides of a pair rather than the
ratio.
"""

from __future__ import annotations

import statistics
import time

from airlora.config import RunConfig


def _steps_per_s(method: str, steps: int, episode: int, seed: int) -> float:
    from airlora.online import build_online_env, learn_policy_online

    config = RunConfig.model_validate(
        {
            "method": method,
            "formulation": "online",
            "link": {"scheme": "shannon"},
            "online": {"steps": steps, "episode_steps": episode, "validate_every": 10**9},
            "data": {"max_train_samples": 2048, "validation_size": 64},
            "seed": seed,
        }
    )
    env = build_online_env(config)
    stamps: list[float] = []

    def on_step(_steps: int = 0) -> bool:
        stamps.append(time.perf_counter())
        return env.steps_done < steps

    if method == "airllm":
        learn_policy_online(env, config, on_step)
    else:
        import numpy as np

        env.reset(seed=seed)
        ranks = np.full(len(env.projection_names), env.r_max)
        for _ in range(steps):
            env.step(ranks)
            on_step()
    timed = stamps[episode:]  # the first episode warms caches and the policy up
    return (len(timed) - 1) / (timed[-1] - timed[0])


def bench_online(steps: int = 60, episode: int = 15, repeats: int = 3) -> dict:
    project, peer = [], []
    for r in range(repeats):
        peer.append(_steps_per_s("lora", steps, episode, seed=r))
        project.append(_steps_per_s("airllm", steps, episode, seed=r))
    ratios = [p / q for p, q in zip(project, peer, strict=True)]
    return {
        "name": "online",
        "unit": "training steps/s of the online loop (median; higher is better)",
        "project": statistics.median(project),
        "peer": statistics.median(peer),
        "ratio": statistics.median(ratios),
        "details": {
            "steps": steps,
            "episode_steps": episode,
            "repeats": repeats,
            "airllm_steps_per_s": project,
            "fixed_rank_steps_per_s": peer,
            "paired_ratios": ratios,
            "model": "default (all-MiniLM-L6-v2), batch 16, 64 tokens, r_max 8",
        },
    }
