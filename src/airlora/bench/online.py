"""`airlora bench online`: the online formulation's training speed with AirLLM deciding.

project = training steps per second of the online loop with the airllm policy picking the
rank vector at every step and learning as it goes (PPO update per episode window, denoiser
phases); peer = the same loop, same model, data and steps, at fixed ranks (LoRA at r_max).

Both loops run in this process at once, **interleaved step by step**: each environment has its
own copy of the model, and after every airllm step (whatever the policy did since the last
one included: its decision, its PPO update, its denoiser phase) one fixed-rank step runs and
is timed on its own. Both see the same batches (same seed), so the same sequence lengths; a
slow patch of the machine (another process, a frequency change) lands on both sides within
a fraction of a second instead of on one run of a pair, which is what made the earlier
run-after-run pairs swing by +-5 %. The first episode of each is left out (caches, the
policy's warm start); 120 steps take in seven PPO updates and seven denoiser phases (five of
which train: the buffer first reaches ``min_buffer`` 32 at step 45), the steady state of the
policy's cost rather than its first episodes. A repeat is one interleaved run on its own seed;
the environment built first steps ~0.5 % slower at identical work (measured with two
fixed-rank copies), so the airllm environment is built first in odd repeats and second in even
ones, and the default 4 repeats balance the two orders: ratio = the median over repeats of
project / peer (1.0: deciding costs nothing; the target is >= 0.95). A step whose rank vector
does not fit its slot trains nothing, so ``details`` counts each side's violated steps.

``--config`` (a run config YAML) and the model options measure another set-up, such as the
reference preset's model on a GPU; a step whose rank vector does not fit its slot does not
train, so a set-up where fixed ranks violate compares unequal work: give such a bench a link
on which r_max fits (a large ``online.bandwidth_hz``).
"""

from __future__ import annotations

import statistics
import time

import numpy as np

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


def interleaved_steps_per_s(base: dict, steps: int, episode: int, seed: int) -> tuple[float, float]:
    """(airllm, fixed-rank) training steps/s of one interleaved run (see the module doc)."""
    from airlora.online import build_online_env, learn_policy_online

    project_config = _config(base, "airllm", steps, episode, seed)
    peer_config = _config(base, "lora", steps, episode, seed)
    if seed % 2:  # the build order alternates with the repeat (module docstring)
        project_env, peer_env = build_online_env(project_config), build_online_env(peer_config)
    else:
        peer_env, project_env = build_online_env(peer_config), build_online_env(project_config)
    peer_env.reset(seed=seed)
    fixed = np.full(len(peer_env.projection_names), peer_env.r_max)
    project_s: list[float] = []
    peer_s: list[float] = []
    violated = {"airllm": 0, "fixed": 0}
    last = time.perf_counter()

    def on_step(_steps: int = 0) -> bool:
        nonlocal last
        now = time.perf_counter()
        project_s.append(now - last)
        info = peer_env.step(fixed)[4]
        last = time.perf_counter()
        peer_s.append(last - now)
        violated["airllm"] += bool(project_env.last_info["violated"])
        violated["fixed"] += bool(info["violated"])
        return project_env.steps_done < steps

    learn_policy_online(project_env, project_config, on_step)
    # The first episode warms caches and the policy up (the denoiser's warm start included).
    project_time, peer_time = sum(project_s[episode:]), sum(peer_s[episode:])
    timed = len(project_s) - episode
    return timed / project_time, timed / peer_time, violated


def bench_online(
    steps: int = 120, episode: int = 15, repeats: int = 4, base: dict | None = None
) -> dict:
    """Run the bench; ``base`` is a run config's mapping (model, data, link, online, policy
    settings; default: the default model on the packaged data, shannon link)."""
    base = DEFAULT_BASE if base is None else base
    if steps <= episode:
        raise ValueError(f"steps ({steps}) must exceed the untimed first episode ({episode})")
    config = _config(base, "airllm", steps, episode, 0)  # fails early on a bad config
    project, peer, violated = [], [], []
    for r in range(repeats):
        a, b, v = interleaved_steps_per_s(base, steps, episode, seed=r)
        project.append(a)
        peer.append(b)
        violated.append(v)
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
            "timing": "interleaved step by step in one process, first episode untimed",
            "airllm_steps_per_s": project,
            "fixed_rank_steps_per_s": peer,
            "paired_ratios": ratios,
            "model": config.model.name_or_path,
            "r_max": config.model.r_max,
            "batch_size": config.data.batch_size,
            "max_length": config.data.max_length,
            "device": str(resolve_device(config.train.device)),
            "airllm_action": config.airllm.action,
            "inference_steps": config.airllm.inference_steps,
            "denoiser_updates_per_episode": config.airllm.denoiser_updates(episode),
            "violated_steps": violated,
            "ppo_epochs": config.ppo.n_epochs,
        },
    }
