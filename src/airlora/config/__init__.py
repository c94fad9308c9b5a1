"""Typed configuration shared by the Python API, the CLI and YAML files.

Every run folder holds the ``config.yaml`` that produced it; loading that file with
:func:`load_config` and running it again reproduces the run on the CPU. One module per
concern: ``task`` (data, model, training), ``link``, ``policy`` (environment, PPO, AirLLM,
surrogate) and ``run`` (what each command runs: finetune, run, train-policy, sweep).
"""

from airlora.config.base import (
    DATA_DIR_ENV,
    ConfigBase,
    apply_overrides,
    dump_config,
    load_config,
    read_yaml_mapping,
)
from airlora.config.link import LinkConfig
from airlora.config.policy import AirLLMConfig, EnvConfig, PPOConfig, SurrogateConfig
from airlora.config.run import (
    METHODS,
    DeployConfig,
    EdgeSpec,
    FinetuneConfig,
    MethodSpec,
    OnlineSettings,
    PolicyTrainConfig,
    RunConfig,
    SweepConfig,
    TuningConfig,
    surrogate_section,
)
from airlora.config.task import AdaLoRASettings, DataConfig, ModelConfig, TrainConfig

__all__ = [
    "DATA_DIR_ENV",
    "METHODS",
    "AdaLoRASettings",
    "AirLLMConfig",
    "ConfigBase",
    "DataConfig",
    "DeployConfig",
    "EdgeSpec",
    "EnvConfig",
    "FinetuneConfig",
    "LinkConfig",
    "MethodSpec",
    "ModelConfig",
    "OnlineSettings",
    "PPOConfig",
    "PolicyTrainConfig",
    "RunConfig",
    "SurrogateConfig",
    "SweepConfig",
    "TrainConfig",
    "TuningConfig",
    "apply_overrides",
    "dump_config",
    "load_config",
    "read_yaml_mapping",
    "surrogate_section",
]
