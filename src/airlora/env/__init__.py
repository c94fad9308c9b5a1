"""Gymnasium environments for rank selection: real rounds, a fitted surrogate, a synthetic
benchmark. All share the observation layout of :mod:`.observation`."""

from airlora.env.observation import (
    OBSERVATION_FIELDS,
    build_observation,
    observation_space,
    projection_groups,
    rank_space,
)
from airlora.env.synthetic import SyntheticRankEnv

__all__ = [
    "OBSERVATION_FIELDS",
    "SyntheticRankEnv",
    "build_observation",
    "observation_space",
    "projection_groups",
    "rank_space",
]
