"""airlora: communication-aware remote fine-tuning of language models over wireless links.

The public API, as a notebook uses it::

    from airlora import FinetuneConfig, RunConfig, run_episode, run_finetune

    result = run_finetune(FinetuneConfig(rank=4, train={"rounds": 3}))
    result.summary["final_accuracy"], result.run_dir

Configs (typed, shared with the CLI and YAML files), the episode driver, policy training
and loading, sweeps, the report, the link builder and the environments are importable from
here. Names load on first use, so ``import airlora`` stays light.
"""

from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING

from airlora._lazy import lazy_exports

try:
    __version__ = version("airlora")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.0.0+unknown"

_EXPORTS = {
    "airlora.config": (
        "AirLLMConfig",
        "OnlineSettings",
        "DataConfig",
        "EnvConfig",
        "FinetuneConfig",
        "LinkConfig",
        "ModelConfig",
        "PPOConfig",
        "PolicyTrainConfig",
        "RunConfig",
        "SurrogateConfig",
        "SweepConfig",
        "TrainConfig",
        "load_config",
    ),
    "airlora.driver": (
        "EpisodeCallback",
        "EpisodeResult",
        "evaluate_policy",
        "run_episode",
        "run_finetune",
    ),
    "airlora.train_policy": ("PolicyTrainResult", "run_train_policy"),
    "airlora.policies": ("load_policy", "make_policy"),
    "airlora.sweep": ("plan", "run_sweep"),
    "airlora.report": ("summary_table", "write_report"),
    "airlora.presets": ("list_presets", "run_demo"),
    "airlora.link": ("build_link", "build_snr_process"),
    "airlora.env.real": ("RankSelectionEnv",),
    "airlora.env.surrogate": ("SurrogateEnv", "fit_surrogate"),
    "airlora.env.synthetic": ("SyntheticRankEnv",),
    "airlora.env.online": ("OnlineRankEnv",),
    "airlora.online": ("run_online",),
    "airlora.errors": (
        "AirLoraError",
        "CellError",
        "ConfigError",
        "DataError",
        "DeviceError",
        "LinkError",
        "ModelError",
        "PolicyError",
    ),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}


__getattr__, __dir__ = lazy_exports("airlora", globals(), _WHERE)


if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs
    from airlora.config import *  # noqa: F403
    from airlora.driver import *  # noqa: F403

__all__ = ["__version__", *sorted(_WHERE)]
