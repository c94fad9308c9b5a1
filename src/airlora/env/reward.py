"""The round reward of design section 1, shared by the real and the surrogate environment."""

from __future__ import annotations

import math

from airlora.config import EnvConfig


def round_reward(
    accuracy: float,
    previous_accuracy: float,
    payload_params: int,
    max_payload_params: int,
    config: EnvConfig,
) -> float:
    """R_t = a_t - lambda C_t / C_max, or (a_t - a_{t-1}) - lambda C_t / C_max.

    Parameters
    ----------
    accuracy: a_t, the edge accuracy after the round (0..1).
    previous_accuracy: a_{t-1} (a_0: the unadapted model's accuracy); used by the gain form.
    payload_params: C_t, parameters sent this round (adapter and head).
    max_payload_params: C_max, the payload with every projection at r_max.
    config: lambda (``cost_weight``) and the form.
    """
    if max_payload_params <= 0:
        raise ValueError("max_payload_params must be positive")
    cost = config.cost_weight * payload_params / max_payload_params
    if config.reward_form == "gain":
        if not math.isfinite(previous_accuracy):
            raise ValueError("the gain reward needs a finite previous accuracy")
        return accuracy - previous_accuracy - cost
    return accuracy - cost
