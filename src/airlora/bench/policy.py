"""`airlora bench policy`: what an AirLLM decision costs next to the round it decides.

project = median wall time of one AirLLM decision (PPO forward pass plus the full DDIM
sampling, guidance on, stochastic) for the default model's 24 projections; peer = median wall
time of one real round of the default configuration (all-MiniLM-L6-v2, AG News, 16 steps of
batch 16, rank 8, edge evaluation on 256 rows); both measured in the same process.
ratio = round / decision (peer / project): how many decisions one round costs.
"""

from __future__ import annotations

import statistics
import time

import numpy as np
import torch

from airlora.config import FinetuneConfig
from airlora.engine import RoundEngine
from airlora.env.observation import build_observation
from airlora.link import build_link
from airlora.policies import ActionLayout, AirLLMPolicy


def bench_policy(decisions: int = 50, rounds: int = 3) -> dict:
    config = FinetuneConfig()
    engine = RoundEngine.build(
        config.data, config.model, config.train, build_link(config.link), config.seed
    )
    layout = ActionLayout(tuple(p.name for p in engine.server.projections), config.model.r_max)
    policy = AirLLMPolicy(layout, seed=0)
    ranks = [config.model.r_max] * engine.server.num_projections

    round_times = []
    for _ in range(rounds + 1):  # the first round warms caches up; it is left out
        start = time.perf_counter()
        complexity = engine.observe_round()
        obs = build_observation(
            10.0,
            complexity,
            engine.round_index,
            config.train.rounds,
            engine.last_accuracy,
            ranks,
            config.model.r_max,
            policy.layout.env,
        )
        engine.run_round(ranks, 10.0)
        round_times.append(time.perf_counter() - start)
    round_times = round_times[1:]

    obs_batch = np.asarray(obs, np.float32)[None, :]
    decision_times = []
    for _ in range(decisions + 1):
        start = time.perf_counter()
        with torch.no_grad():
            policy.act_batch(obs_batch, deterministic=False)
        decision_times.append(time.perf_counter() - start)
    decision_times = decision_times[1:]

    round_median = statistics.median(round_times)
    decision_median = statistics.median(decision_times)
    return {
        "name": "policy",
        "unit": "seconds (median wall time)",
        "project": decision_median,
        "peer": round_median,
        "ratio": round_median / decision_median,
        "details": {
            "decision": "AirLLM: PPO forward + DDIM sampling "
            f"({policy.airllm_config.inference_steps} steps, guidance weight "
            f"{policy.airllm_config.guidance_weight}, 2 denoiser passes per step)",
            "round": "one real round: 16 steps of batch 16 at rank 8, link, edge evaluation "
            "on 256 rows",
            "projections": layout.num_projections,
            "torch_threads": torch.get_num_threads(),
            "decision_times_s": decision_times,
            "round_times_s": round_times,
        },
    }
