"""The adapter protocol: what the round engine needs of an adapted model.

Like :class:`airlora.link.base.Link` for the link, this is the one seam between the engine
and the adapter families: the rank-masked LoRA (:class:`~airlora.model.RankedLoRAModel`)
and PEFT's AdaLoRA (:class:`~airlora.model.adalora.AdaLoRAModel`) implement it, and the
engine is typed against it, not against either class. A new family (an SVD-form adapter,
say) implements these members and the engine, link and policies work with it unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import torch
from torch import nn

if TYPE_CHECKING:
    from airlora.model.adapters import Payload, Projection

HEAD_PREFIX = "head."
ADAPTER = "default"


def plain_head_name(peft_name: str) -> str:
    """A head tensor's name in the base model (``classifier.weight``) from PEFT's name."""
    name = peft_name.removeprefix("base_model.model.")
    return name.replace(f".modules_to_save.{ADAPTER}.", ".")


@runtime_checkable
class RankAdapter(Protocol):
    """An adapted model whose per-projection ranks can be set, sent and rebuilt.

    Attributes: ``peft_model`` (the torch module to train and evaluate), ``r_max`` (the
    allocated rank), ``projections`` (the adapted projections, in order), and
    ``chooses_ranks`` (True when the adapter picks its own ranks, as AdaLoRA does: the
    policy's rank vector is then ignored)."""

    peft_model: nn.Module
    r_max: int
    projections: list[Projection]
    chooses_ranks: bool

    @property
    def num_projections(self) -> int: ...

    @property
    def rank_vector(self) -> list[int]: ...

    def check_rank_vector(self, ranks: Sequence[int]) -> list[int]:
        """The ranks as a list, or an error naming what is wrong with them."""
        ...

    def set_rank_vector(self, ranks: Sequence[int]) -> None: ...

    def after_optimizer_step(self, global_step: int) -> None:
        """Called after every optimiser step (AdaLoRA prunes here)."""
        ...

    def regularization(self) -> torch.Tensor | None:
        """A penalty trained with the loss but not reported in it (None: none)."""
        ...

    def lora_parameters(self) -> list[nn.Parameter]: ...

    def head_parameters(self) -> list[nn.Parameter]: ...

    def head_tensor_names(self) -> list[str]: ...

    def payload(self, ranks: Sequence[int] | None = None) -> Payload:
        """Parameters sent for a rank vector (default: the current one)."""
        ...

    def active_tensors(self) -> dict[str, torch.Tensor]:
        """The tensors to send: active factor slices and the head, by transmission name."""
        ...

    def load_active_tensors(self, tensors: dict[str, torch.Tensor], ranks: Sequence[int]) -> None:
        """Rebuild from what arrived (the edge side)."""
        ...

    def snapshot(self) -> dict[str, torch.Tensor]: ...

    def restore(self, snapshot: dict[str, torch.Tensor]) -> None: ...

    def export_peft(self, folder: Path) -> Path:
        """Write a standard PEFT adapter folder that reproduces this model's outputs."""
        ...
