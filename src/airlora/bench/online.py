"""`airlora bench online`: the online formulation's training speed with AirLLM deciding.

project = training steps per second of the online loop with the airllm policy picking the
rank vector at every step and learning as it goes (PPO update per episode window, denoiser
phases); peer = the same loop, same model, data and steps, at fixed ranks (LoRA at r_max).
Both run in this process on the default model and the packaged AG News sample, alternating,
each on a fresh environment, after one untimed warm-up run; the first episode of each is
left out. A repeat is a
pair of runs on the same seed (the same batches, so the same sequence lengths): ratio = the
median over repeats of project / peer within the pair (1.0: deciding costs nothing; the target
is >= 0.95), so that a slow patch of the machine moves both sides of a pair rather than the
ratio.

``--config`` (a run config YAML) and the model options measure another set-up, such as the
reference preset's model on a GPU; a step whose rank vector does not fit its slot does not
train, so a set-up where fixed ranks violate compares unequal work: give such a bench a link
on which r_max fits (a large ``online.bandwidth_hz``).
"""

from __future__ import annotations

import statistics
import time

from airlora.config import RunConfig
from airlora.devices import resolve_device

DEFAULT_BASE: dict = {
    "link": {"scheme": "shannon"},
    "data": {"max_train_samples": 2048, "validation_size": 64},
}


def _config(base: dict, method: str, steps: int, episode: int, seed: int) -> RunConfig:
    """``base`` (a run config's mapping) with the bench's own method, length and seed."""
    online = {**base.get("online", {}), "steps": steps, "episode_steps": episode}
    online["validate_every"] = 10**9  # the validation pass is the same for both sides
    mapping = {**base, "method": method, "formulation": "online", "online": online, "seed": seed}
    return RunConfig.model_validate(mapping)


def _steps_per_s(base: dict, method: str, steps: int, episode: int, seed: int) -> float:
    from airlora.online import build_online_env, learn_policy_online

    config = _config(base, method, steps, episode, seed)
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


def bench_online(
    steps: int = 60, episode: int = 15, repeats: int = 3, base: dict | None = None
) -> dict:
    """Run the bench; ``base`` is a run config's mapping (model, data, link, online, policy
    settings; default: the default model on the packaged data, shannon link)."""
    base = DEFAULT_BASE if base is None else base
    config = _config(base, "airllm", steps, episode, 0)  # fails early on a bad config
    # Untimed: the first run of a process pays one-off costs that the first episode alone
    # does not absorb (on a GPU, kernel selection and the allocator's growth).
    _steps_per_s(base, "lora", episode + 2, episode, seed=repeats)
    project, peer = [], []
    for r in range(repeats):
        peer.append(_steps_per_s(base, "lora", steps, episode, seed=r))
        project.append(_steps_per_s(base, "airllm", steps, episode, seed=r))
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
            "model": config.model.name_or_path,
            "r_max": config.model.r_max,
            "batch_size": config.data.batch_size,
            "max_length": config.data.max_length,
            "device": str(resolve_device(config.train.device)),
            "inference_steps": config.airllm.inference_steps,
        },
    }
