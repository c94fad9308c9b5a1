"""Gymnasium environments for rank selection: real rounds (``real.RankSelectionEnv``), a
fitted surrogate (``surrogate.SurrogateEnv``), a synthetic benchmark (``SyntheticRankEnv``).
All share the observation layout of :mod:`.observation`. The real and surrogate ones load
torch and the model stack: they are imported on first use."""

from typing import Any

from airlora.env.observation import (
    OBSERVATION_FIELDS,
    build_observation,
    observation_space,
    projection_groups,
    rank_space,
)
from airlora.env.synthetic import SyntheticRankEnv


def __getattr__(name: str) -> Any:
    if name == "RankSelectionEnv":
        from airlora.env.real import RankSelectionEnv

        return RankSelectionEnv
    if name == "OnlineRankEnv":
        from airlora.env.online import OnlineRankEnv

        return OnlineRankEnv
    if name in ("SurrogateEnv", "fit_surrogate"):
        from airlora.env import surrogate

        return getattr(surrogate, name)
    raise AttributeError(f"module 'airlora.env' has no attribute '{name}'")


__all__ = [
    "OBSERVATION_FIELDS",
    "OnlineRankEnv",
    "RankSelectionEnv",
    "SurrogateEnv",
    "SyntheticRankEnv",
    "build_observation",
    "fit_surrogate",
    "observation_space",
    "projection_groups",
    "rank_space",
]
