"""The state the policies see, as one float32 vector with a fixed layout.

Layout (``OBSERVATION_FIELDS``): normalised SNR, the five complexity features, t/T, the last
edge accuracy, and a summary of the last rank vector (mean rank / r_max, share of adapted
projections). The same layout serves the real, surrogate and synthetic environments, so a
policy trained on one runs on the others.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import numpy as np
from gymnasium import spaces

from airlora.config import EnvConfig
from airlora.data import ComplexityFeatures

OBSERVATION_FIELDS: tuple[str, ...] = (
    "snr",
    *(f"complexity_{n}" for n in ComplexityFeatures.names()),
    "progress",
    "last_accuracy",
    "last_mean_rank",
    "last_active_share",
)
OBS_LIMIT = 3.0


def observation_space(size: int | None = None) -> spaces.Box:
    """The round formulation's layout (``OBSERVATION_FIELDS``), or ``size`` entries (the
    online formulation's state has one entry per projection)."""
    n = len(OBSERVATION_FIELDS) if size is None else size
    return spaces.Box(-OBS_LIMIT, OBS_LIMIT, shape=(n,), dtype=np.float32)


def rank_space(num_projections: int, r_max: int) -> spaces.MultiDiscrete:
    """One entry per adapted projection, each in 0..r_max."""
    return spaces.MultiDiscrete(np.full(num_projections, r_max + 1, dtype=np.int64))


def normalise_snr(snr_db: float, config: EnvConfig) -> float:
    mid = 0.5 * (config.snr_norm_high_db + config.snr_norm_low_db)
    half = 0.5 * (config.snr_norm_high_db - config.snr_norm_low_db)
    return (snr_db - mid) / half


def denormalise_snr(value: float, config: EnvConfig) -> float:
    mid = 0.5 * (config.snr_norm_high_db + config.snr_norm_low_db)
    half = 0.5 * (config.snr_norm_high_db - config.snr_norm_low_db)
    return float(value) * half + mid


def build_observation(
    snr_db: float,
    complexity: ComplexityFeatures,
    round_index: int,
    rounds: int,
    last_accuracy: float,
    last_ranks: Sequence[int] | None,
    r_max: int,
    config: EnvConfig,
) -> np.ndarray:
    """The observation before round ``round_index`` (0-based) of ``rounds``.

    The model-loss feature is 0 unless ``config.model_loss_in_state``, then divided by 4 (a
    4-class chance-level loss is ln 4 = 1.39); a missing value (NaN) becomes 0.
    """
    feats = complexity.as_array().astype(np.float64)
    feats[-1] = feats[-1] / 4.0 if config.model_loss_in_state else 0.0
    feats = np.where(np.isfinite(feats), feats, 0.0)
    if not config.use_complexity:
        feats = np.zeros_like(feats)
    if last_ranks is None or len(last_ranks) == 0:
        mean_rank, active = 0.0, 0.0
    else:
        arr = np.asarray(last_ranks, dtype=np.float64)
        mean_rank, active = float(arr.mean() / r_max), float((arr > 0).mean())
    acc = last_accuracy if math.isfinite(last_accuracy) else 0.0
    obs = np.concatenate(
        [[normalise_snr(snr_db, config)], feats, [round_index / rounds, acc, mean_rank, active]]
    )
    return np.clip(obs, -OBS_LIMIT, OBS_LIMIT).astype(np.float32)


def projection_groups(names: Sequence[str], depth_bands: int = 1) -> tuple[list[str], list[int]]:
    """Group adapted projections by type and depth band.

    The type is the name with its layer index removed (``bert.encoder.layer.3.attention.self.query``
    is of type ``bert.encoder.layer.attention.self.query``); the layer index (the first integer in
    the name) puts it in one of ``depth_bands`` contiguous bands of layers. Names without an index
    are in band 0. Returns the group names (first-seen order) and each projection's group index.
    """
    if depth_bands < 1:
        raise ValueError(f"depth_bands must be >= 1, got {depth_bands}")
    layers = []
    for n in names:
        m = re.search(r"\.(\d+)(?=\.|$)", n)
        layers.append(int(m.group(1)) if m else 0)
    n_layers = max(layers) + 1 if layers else 1
    keys = []
    for n, layer in zip(names, layers, strict=True):
        kind = re.sub(r"\.\d+(?=\.|$)", "", n)
        band = min(depth_bands - 1, layer * depth_bands // n_layers)
        keys.append(f"{kind}@band{band}" if depth_bands > 1 else kind)
    groups: list[str] = []
    index: list[int] = []
    for k in keys:
        if k not in groups:
            groups.append(k)
        index.append(groups.index(k))
    return groups, index
