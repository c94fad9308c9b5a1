"""The base of every configuration: strict pydantic models, read from and written to YAML."""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, model_validator

DATA_DIR_ENV = "AIRLORA_DATA_DIR"


class ConfigBase(BaseModel):
    # Unknown keys are a typo in a YAML file far more often than a feature request.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    @model_validator(mode="before")
    @classmethod
    def _merge_nested_defaults(cls, data: object) -> object:
        """A partial mapping for a nested section overrides the section's own default (say
        ``train: {threads: 1}`` keeps a policy run's 5-round episodes) instead of replacing
        it with the section class's defaults."""
        if not isinstance(data, dict):
            return data
        out = dict(data)
        for name, field in cls.model_fields.items():
            default = field.default
            if isinstance(default, ConfigBase) and name in out and out[name] is None:
                out[name] = {}  # an empty section in YAML (`train:`) means its defaults
            if isinstance(default, ConfigBase) and isinstance(out.get(name), dict):
                given = type(default).implied(out[name])
                out[name] = {**default.model_dump(exclude_unset=True), **given}
        return out

    @classmethod
    def implied(cls, given: dict) -> dict:
        """What a partial mapping of this section implies beyond what it says (a domain rule
        that the CLI and the API share); applied before the section's defaults fill in."""
        return given


def merge_section(section: ConfigBase, overrides: dict) -> ConfigBase:
    """A config section with overrides merged in, nested mappings included (a sweep entry's
    ``airllm: {...}`` over the sweep's ``airllm``), validated."""
    merged = section.model_dump(mode="json")
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = {**merged[key], **value}
        else:
            merged[key] = value
    return type(section).model_validate(merged)


def load_config(path: Path, cls: type[ConfigBase]) -> ConfigBase:
    """Read a YAML file into a config model (safe loader; unknown keys are an error)."""
    return cls.model_validate(read_yaml_mapping(path))


def read_yaml_mapping(path: Path) -> dict:
    """The mapping in a YAML file, read with the safe loader."""
    try:
        raw = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except FileNotFoundError as err:
        raise FileNotFoundError(f"config file {path} does not exist") from err
    except yaml.YAMLError as err:
        raise ValueError(f"config file {path} is not valid YAML: {err}") from err
    if not isinstance(raw, dict):
        raise ValueError(f"config file {path} must hold a mapping at top level")
    return raw


def dump_config(config: BaseModel) -> str:
    """YAML text of a config, paths as strings, in field order."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)


def apply_overrides(mapping: dict, overrides: dict[str, object]) -> dict:
    """Set dotted paths (``"link.snr_db"``) in a nested config mapping; returns it."""
    for path, value in overrides.items():
        *parents, leaf = path.split(".")
        node = mapping
        for key in parents:
            if not isinstance(node.get(key), dict):  # absent, or empty in YAML (`link:`)
                node[key] = {}
            node = node[key]
        node[leaf] = value
    return mapping
