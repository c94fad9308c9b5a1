"""Rank policies behind one interface: act from an observation, learn, save, load.

``airllm`` (PPO + DDIM denoiser), ``ppo`` (vanilla), ``random``, ``heuristic`` and ``lora``
(fixed rank). :func:`make_policy` builds one by name, :func:`load_policy` reads a saved folder.
"""

from __future__ import annotations

import json
import pickle  # for its exception type only: nothing here unpickles
from pathlib import Path

from airlora.config import AirLLMConfig, PPOConfig
from airlora.errors import PolicyError
from airlora.policies.airllm import AirLLMPolicy
from airlora.policies.base import POLICY_FILE, ActionLayout, RankPolicy, TrainingLog
from airlora.policies.baselines import FixedRankPolicy, HeuristicPolicy, RandomPolicy
from airlora.policies.diffusion import DDIMSampler, Denoiser
from airlora.policies.ppo import PPOPolicy

POLICIES: dict[str, type[RankPolicy]] = {
    "airllm": AirLLMPolicy,
    "ppo": PPOPolicy,
    "random": RandomPolicy,
    "heuristic": HeuristicPolicy,
    "lora": FixedRankPolicy,
}


def make_policy(
    method: str,
    layout: ActionLayout,
    seed: int = 0,
    ppo: PPOConfig | None = None,
    airllm: AirLLMConfig | None = None,
) -> RankPolicy:
    """A fresh policy by method name."""
    if method == "airllm":
        return AirLLMPolicy(layout, seed, ppo, airllm)
    if method == "ppo":
        return PPOPolicy(layout, seed, ppo)
    if method in POLICIES:
        return POLICIES[method](layout, seed)
    raise PolicyError(f"unknown policy method '{method}'; choose one of {sorted(POLICIES)}")


def load_policy(folder: Path | str) -> RankPolicy:
    """Read a policy saved by :meth:`RankPolicy.save` (JSON, safetensors, tensors only)."""
    folder = Path(folder)
    meta_path = folder / POLICY_FILE
    if not meta_path.is_file():
        raise FileNotFoundError(f"{folder} holds no saved policy ({POLICY_FILE} is missing)")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        method = meta["method"]
        layout = ActionLayout.from_dict(meta["layout"])
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise PolicyError(f"{meta_path} is not a valid saved policy: {err}") from err
    if method not in POLICIES:
        raise PolicyError(f"{meta_path} names unknown method '{method}'")
    try:
        return POLICIES[method]._from_saved(
            layout, int(meta.get("seed", 0)), meta["config"], folder
        )
    except FileNotFoundError:
        raise
    except pickle.UnpicklingError as err:
        raise PolicyError(
            f"{folder} is not a valid saved policy: its archive holds pickled objects, and "
            "airlora reads tensors only (nothing is unpickled)"
        ) from err
    except Exception as err:  # a damaged or foreign file: refused, never executed
        raise PolicyError(
            f"{folder} is not a valid saved policy ({type(err).__name__}: {err})"
        ) from err


__all__ = [
    "POLICIES",
    "ActionLayout",
    "AirLLMPolicy",
    "DDIMSampler",
    "Denoiser",
    "FixedRankPolicy",
    "HeuristicPolicy",
    "PPOPolicy",
    "RandomPolicy",
    "RankPolicy",
    "TrainingLog",
    "load_policy",
    "make_policy",
]
