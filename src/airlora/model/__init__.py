"""Model and adapters: loading a base model, rank-masked LoRA, payload accounting, export."""

from airlora.model.adapters import (
    Payload,
    Projection,
    RankedLoRAModel,
    default_target_modules,
)
from airlora.model.base import RankAdapter
from airlora.model.loading import LoadedModel, ModelError, load_model, resolve_model_source
from airlora.model.svd import RankedSVDModel

__all__ = [
    "LoadedModel",
    "ModelError",
    "Payload",
    "Projection",
    "RankAdapter",
    "RankedLoRAModel",
    "RankedSVDModel",
    "default_target_modules",
    "load_model",
    "resolve_model_source",
]
