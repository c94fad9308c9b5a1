"""Gymnasium environments for rank selection: real rounds (``real.RankSelectionEnv``), a
fitted surrogate (``surrogate.SurrogateEnv``), a synthetic benchmark (``SyntheticRankEnv``).
All share the observation layout of :mod:`.observation`. The real and surrogate ones load
torch and the model stack: they are imported on first use."""

from typing import TYPE_CHECKING

from airlora._lazy import lazy_exports
from airlora.env.observation import (
    OBSERVATION_FIELDS,
    build_observation,
    observation_space,
    projection_groups,
    rank_space,
)
from airlora.env.synthetic import SyntheticRankEnv

# These load torch and the model stack.
__getattr__, __dir__ = lazy_exports(
    "airlora.env",
    globals(),
    {
        "RankSelectionEnv": "airlora.env.real",
        "OnlineRankEnv": "airlora.env.online",
        "SurrogateEnv": "airlora.env.surrogate",
        "fit_surrogate": "airlora.env.surrogate",
    },
)

if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs
    from airlora.env.online import OnlineRankEnv
    from airlora.env.real import RankSelectionEnv
    from airlora.env.surrogate import SurrogateEnv, fit_surrogate


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
