"""SVD-form adapters with a rank mask: the reference implementation's adapter.

Each adapted projection carries ``delta W = (alpha / r_max) P diag(E * mask) Q``: Q is the
r_max x d_in factor (PEFT's ``lora_A``), P the d_out x r_max factor (``lora_B``) and E one
singular value per component, as in AdaLoRA; the rank mask keeps the first r components. A
rank of r therefore sends ``r (d_in + d_out + 1)`` parameters. Training adds an
orthogonality penalty on the active parts of P and Q, the mean over projections of
``||Q Q^T - I||_F^2 + ||P^T P - I||_F^2`` times a weight (0.01 by default, the reference's
weight; PEFT's AdaLoRA uses the unsquared norm, averaged over the matrices), so that the
components stay distinct and a truncation drops whole directions. The penalty is trained but
not reported: a step's loss is the task's.

Unlike AdaLoRA, nothing here prunes: the caller (a policy) sets the ranks. Initialisation
follows PEFT's AdaLoRA (P, Q ~ N(0, 0.02^2), E = 0), so the adapted model starts equal to the
base model. Export folds E into P and writes a standard PEFT LoRA folder: the same function,
loadable with ``PeftModel.from_pretrained`` and no airlora.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from peft.tuners.lora import LoraLayer
from torch import nn

from airlora.model.adapters import Payload, RankedLoRAModel
from airlora.model.base import ADAPTER


def _apply_singular_values(module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
    return output * module.singular


class RankedSVDModel(RankedLoRAModel):
    """Rank-masked SVD-form adapters (P diag(E) Q) over a PEFT LoRA model.

    Parameters
    ----------
    peft_model:
        A ``PeftModel`` with one LoRA adapter at ``r_max``; build one with :meth:`from_base`.
    orth_reg_weight:
        Weight of the orthogonality penalty ``mean_i (||Q_i Q_i^T - I||_F^2 +
        ||P_i^T P_i - I||_F^2)`` over the projections with a non-zero rank, each on its active
        components. Default 0.01.
    """

    per_rank_extra = 1  # the singular value travels with each kept component

    def __init__(self, peft_model, orth_reg_weight: float = 0.01) -> None:
        super().__init__(peft_model)
        if orth_reg_weight < 0:
            raise ValueError(f"orth_reg_weight must be >= 0, got {orth_reg_weight}")
        self.orth_reg_weight = float(orth_reg_weight)
        for layer in self._layers:
            a, b = layer.lora_A[ADAPTER], layer.lora_B[ADAPTER]
            if hasattr(a, "singular"):
                continue
            with torch.no_grad():  # AdaLoRA's start: the update is zero, the factors are not
                nn.init.normal_(a.weight, std=0.02)
                nn.init.normal_(b.weight, std=0.02)
                a.saved_weight.copy_(a.weight)
                b.saved_weight.copy_(b.weight)
            a.singular = nn.Parameter(torch.zeros(self.r_max, dtype=a.weight.dtype))
            a.register_buffer("saved_singular", a.singular.detach().clone(), persistent=False)
            a.register_forward_hook(_apply_singular_values)

    @classmethod
    def from_base(  # type: ignore[override]
        cls,
        base_model: nn.Module,
        r_max: int,
        lora_alpha: float = 16.0,
        lora_dropout: float = 0.0,
        target_modules: Sequence[str] | None = None,
        orth_reg_weight: float = 0.01,
    ) -> RankedSVDModel:
        """Wrap a ``*ForSequenceClassification`` model with SVD-form adapters at ``r_max``."""
        lora = RankedLoRAModel.from_base(
            base_model, r_max, lora_alpha, lora_dropout, target_modules
        )
        return cls(lora.peft_model, orth_reg_weight)

    # ------------------------------------------------------------------ ranks and training

    @torch.no_grad()
    def set_rank_vector(self, ranks: Sequence[int]) -> None:
        ranks = self.check_rank_vector(ranks)
        for layer, old, r in zip(self._layers, self._ranks, ranks, strict=True):
            a = layer.lora_A[ADAPTER]
            if r < old:
                a.saved_singular[r:old].copy_(a.singular[r:old])
        super().set_rank_vector(ranks)

    @torch.no_grad()
    def restore_inactive(self) -> None:
        super().restore_inactive()
        for layer, r in zip(self._layers, self._ranks, strict=True):
            a = layer.lora_A[ADAPTER]
            a.singular[r:].copy_(a.saved_singular[r:])

    def regularization(self) -> torch.Tensor | None:
        if self.orth_reg_weight == 0:
            return None
        terms = []
        for layer, r in zip(self._layers, self._ranks, strict=True):
            if r == 0:
                continue
            q = layer.lora_A[ADAPTER].weight[:r].float()  # float32 under autocast too
            p = layer.lora_B[ADAPTER].weight[:, :r].float()
            eye = torch.eye(r, dtype=q.dtype, device=q.device)
            terms.append((q @ q.T - eye).square().sum() + (p.T @ p - eye).square().sum())
        if not terms:
            return None
        return self.orth_reg_weight * torch.stack(terms).mean()

    def lora_parameters(self) -> list[nn.Parameter]:
        return super().lora_parameters() + [
            layer.lora_A[ADAPTER].singular for layer in self._layers
        ]

    @torch.no_grad()
    def snapshot(self) -> dict[str, torch.Tensor]:
        out = super().snapshot()
        for i, layer in enumerate(self._layers):
            a = layer.lora_A[ADAPTER]
            out[f"{i}.E"] = a.singular.detach().clone()
            out[f"{i}.E_saved"] = a.saved_singular.clone()
        return out

    @torch.no_grad()
    def restore(self, snapshot: dict[str, torch.Tensor]) -> None:
        super().restore(snapshot)
        for i, layer in enumerate(self._layers):
            a = layer.lora_A[ADAPTER]
            a.singular.copy_(snapshot[f"{i}.E"])
            a.saved_singular.copy_(snapshot[f"{i}.E_saved"])

    # ------------------------------------------------------------------ payload and transmission

    def payload(self, ranks: Sequence[int] | None = None) -> Payload:
        ranks = self.check_rank_vector(ranks) if ranks is not None else self._ranks
        return Payload(
            per_projection=tuple(
                r * (p.d_in + p.d_out + 1) for p, r in zip(self.projections, ranks, strict=True)
            ),
            head_params=sum(p.numel() for p in self.head_parameters()),
            max_adapter_params=sum(self.r_max * (p.d_in + p.d_out + 1) for p in self.projections),
        )

    @torch.no_grad()
    def active_tensors(self) -> dict[str, torch.Tensor]:
        out = super().active_tensors()
        for proj, layer, r in zip(self.projections, self._layers, self._ranks, strict=True):
            if r > 0:
                out[f"{proj.name}.lora_E"] = layer.lora_A[ADAPTER].singular[:r].detach().clone()
        return out

    @torch.no_grad()
    def load_active_tensors(self, tensors: dict[str, torch.Tensor], ranks: Sequence[int]) -> None:
        ranks = self.check_rank_vector(ranks)
        for proj, layer, r in zip(self.projections, self._layers, ranks, strict=True):
            singular = layer.lora_A[ADAPTER].singular
            singular.zero_()
            if r > 0:
                singular[:r].copy_(tensors[f"{proj.name}.lora_E"])
        super().load_active_tensors(tensors, ranks)
        for layer in self._layers:
            layer.lora_A[ADAPTER].saved_singular.zero_()

    def _export_factors(self, layer: LoraLayer, r: int) -> tuple[torch.Tensor, torch.Tensor]:
        a = layer.lora_A[ADAPTER]
        return a.weight[:r], layer.lora_B[ADAPTER].weight[:, :r] * a.singular[:r]
