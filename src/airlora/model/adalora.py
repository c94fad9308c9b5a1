"""AdaLoRA in the same harness: PEFT's ``AdaLoraModel`` behind the interface the round engine
uses for :class:`~airlora.model.adapters.RankedLoRAModel`.

AdaLoRA keeps every adapter in SVD form, P diag(lambda) Q (PEFT's ``lora_A`` = Q, ``lora_E`` =
lambda, ``lora_B`` = P), scores each component's importance during training and prunes the
least important by zeroing its lambda, moving the total budget from ``r_max`` per projection
to the target average rank on PEFT's cubic schedule (``tinit``, ``tfinal``, ``deltaT``). The
rank of a projection is the number of its components with a non-zero lambda; those are what
is sent: ``r_i (d_in + d_out + 1)`` parameters per projection, round by round. The policy does
not choose ranks here: AdaLoRA does.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cached_property
from pathlib import Path

import torch
from peft import AdaLoraConfig, PeftModel, TaskType, get_peft_model
from peft.tuners.adalora import AdaLoraLayer
from torch import nn

from airlora.model.adapters import (
    Payload,
    Projection,
    default_target_modules,
)
from airlora.model.base import ADAPTER, HEAD_PREFIX, plain_head_name


class AdaLoRAModel:
    """A PEFT AdaLoRA model with the round engine's adapter interface.

    Parameters
    ----------
    peft_model: a ``PeftModel`` with one AdaLoRA adapter; build one with :meth:`from_base`.
    """

    per_rank_extra = 1  # the singular value lambda travels with each kept component
    chooses_ranks = True

    def __init__(self, peft_model: PeftModel) -> None:
        self.peft_model = peft_model
        config = peft_model.peft_config[ADAPTER]
        self.lora_config = config
        self.r_max = int(config.init_r)
        self.lora_alpha = float(config.lora_alpha)
        self._layers: list[AdaLoraLayer] = []
        projections: list[Projection] = []
        for name, module in peft_model.get_base_model().named_modules():
            if isinstance(module, AdaLoraLayer) and ADAPTER in module.lora_A:
                a, b = module.lora_A[ADAPTER], module.lora_B[ADAPTER]
                projections.append(Projection(name, a.shape[1], b.shape[0]))
                self._layers.append(module)
        if not projections:
            raise ValueError("the PEFT model has no AdaLoRA layers")
        self.projections: tuple[Projection, ...] = tuple(projections)
        self._head_names = [
            n
            for n, p in peft_model.named_parameters()
            if p.requires_grad and ".modules_to_save." in n
        ]

    @classmethod
    def from_base(
        cls,
        base_model: nn.Module,
        r_max: int,
        target_rank: int,
        total_steps: int,
        lora_alpha: float = 16.0,
        target_modules: Sequence[str] | None = None,
        tinit: int = 0,
        tfinal: int = 0,
        delta_t: int = 1,
        orth_reg_weight: float = 0.5,
    ) -> AdaLoRAModel:
        """Wrap a sequence classifier with AdaLoRA: init_r = r_max, target_r = target_rank."""
        if r_max <= 0:
            raise ValueError(f"r_max must be positive, got {r_max}")
        if not 0 < target_rank < r_max:  # PEFT fails mid-run when there is nothing to prune
            raise ValueError(
                f"AdaLoRA target rank {target_rank} must lie in 1..{r_max - 1}: AdaLoRA prunes "
                f"from r_max={r_max} down to it"
            )
        if total_steps <= tinit + tfinal:
            raise ValueError(
                f"AdaLoRA needs total_steps ({total_steps}) > tinit + tfinal ({tinit + tfinal})"
            )
        targets = list(target_modules or default_target_modules(base_model.config.model_type))
        config = AdaLoraConfig(
            task_type=TaskType.SEQ_CLS,
            init_r=r_max,
            target_r=target_rank,
            lora_alpha=lora_alpha,
            target_modules=targets,
            total_step=total_steps,
            tinit=tinit,
            tfinal=tfinal,
            deltaT=delta_t,
            orth_reg_weight=orth_reg_weight,
        )
        return cls(get_peft_model(base_model, config))

    # ------------------------------------------------------------------ ranks

    @property
    def num_projections(self) -> int:
        return len(self.projections)

    def _kept(self, layer: AdaLoraLayer) -> torch.Tensor:
        return (layer.lora_E[ADAPTER].detach().reshape(-1) != 0).nonzero().reshape(-1)

    @property
    def rank_vector(self) -> list[int]:
        """Kept components per projection (non-zero singular values)."""
        return [int(self._kept(layer).numel()) for layer in self._layers]

    def check_rank_vector(self, ranks: Sequence[int]) -> list[int]:
        ranks = [int(r) for r in ranks]
        if len(ranks) != self.num_projections or any(r < 0 or r > self.r_max for r in ranks):
            raise ValueError(
                f"rank vector must hold {self.num_projections} ranks in 0..{self.r_max}"
            )
        return ranks

    def set_rank_vector(self, ranks: Sequence[int]) -> None:
        """AdaLoRA allocates its own ranks; a requested vector is checked and ignored."""
        self.check_rank_vector(ranks)

    def after_optimizer_step(self, global_step: int) -> None:
        """Score importance and prune to the scheduled budget (PEFT's update_and_allocate)."""
        self.peft_model.base_model.update_and_allocate(global_step)

    def regularization(self) -> torch.Tensor | None:
        """None: PEFT adds AdaLoRA's orthogonality penalty to the model's loss itself."""
        return None

    # ------------------------------------------------------------------ parameters

    def lora_parameters(self) -> list[nn.Parameter]:
        out: list[nn.Parameter] = []
        for layer in self._layers:
            out += [layer.lora_A[ADAPTER], layer.lora_E[ADAPTER], layer.lora_B[ADAPTER]]
        return out

    @cached_property
    def head_numel(self) -> int:
        """Elements of the head (fixed at construction). Cached: the online environment prices
        several rank vectors per step, and listing the parameters costs ~2 ms each time."""
        return sum(p.numel() for p in self.head_parameters())

    def head_parameters(self) -> list[nn.Parameter]:
        params = dict(self.peft_model.named_parameters())
        return [params[n] for n in self._head_names]

    def head_tensor_names(self) -> list[str]:
        return [HEAD_PREFIX + plain_head_name(n) for n in self._head_names]

    def payload(self, ranks: Sequence[int] | None = None) -> Payload:
        ranks = self.rank_vector if ranks is None else self.check_rank_vector(ranks)
        extra = self.per_rank_extra
        return Payload(
            per_projection=tuple(
                r * (p.d_in + p.d_out + extra) for p, r in zip(self.projections, ranks, strict=True)
            ),
            head_params=self.head_numel,
            max_adapter_params=sum(
                self.r_max * (p.d_in + p.d_out + extra) for p in self.projections
            ),
        )

    # ------------------------------------------------------------------ transmission

    @torch.no_grad()
    def active_tensors(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for proj, layer in zip(self.projections, self._layers, strict=True):
            keep = self._kept(layer)
            if keep.numel() == 0:
                continue
            out[f"{proj.name}.lora_A"] = layer.lora_A[ADAPTER][keep].detach().clone()
            out[f"{proj.name}.lora_E"] = layer.lora_E[ADAPTER][keep].detach().clone()
            out[f"{proj.name}.lora_B"] = layer.lora_B[ADAPTER][:, keep].detach().clone()
        for name, param in zip(self.head_tensor_names(), self.head_parameters(), strict=True):
            out[name] = param.detach().clone()
        return out

    @torch.no_grad()
    def load_active_tensors(self, tensors: dict[str, torch.Tensor], ranks: Sequence[int]) -> None:
        """Rebuild this (edge) copy: the received components first, the rest zero."""
        ranks = self.check_rank_vector(ranks)
        for proj, layer, r in zip(self.projections, self._layers, ranks, strict=True):
            a, e, b = layer.lora_A[ADAPTER], layer.lora_E[ADAPTER], layer.lora_B[ADAPTER]
            a.zero_()
            e.zero_()
            b.zero_()
            if r > 0:
                a[:r].copy_(tensors[f"{proj.name}.lora_A"])
                e[:r].copy_(tensors[f"{proj.name}.lora_E"])
                b[:, :r].copy_(tensors[f"{proj.name}.lora_B"])
        for name, param in zip(self.head_tensor_names(), self.head_parameters(), strict=True):
            param.copy_(tensors[name])

    # ------------------------------------------------------------------ episodes

    @torch.no_grad()
    def snapshot(self) -> dict[str, torch.Tensor]:
        out = {f"p{i}": p.detach().clone() for i, p in enumerate(self.lora_parameters())}
        out.update({f"h{j}": p.detach().clone() for j, p in enumerate(self.head_parameters())})
        return out

    @torch.no_grad()
    def restore(self, snapshot: dict[str, torch.Tensor]) -> None:
        for i, p in enumerate(self.lora_parameters()):
            p.copy_(snapshot[f"p{i}"])
        for j, p in enumerate(self.head_parameters()):
            p.copy_(snapshot[f"h{j}"])
        model = self.peft_model.base_model
        if hasattr(model, "rankallocator"):
            model.rankallocator.reset_ipt()
            model.rankallocator.set_total_step(self.lora_config.total_step)
        self.lora_config.rank_pattern = None

    def export_peft(self, folder: Path) -> Path:
        """PEFT's own AdaLoRA folder (``rank_pattern`` records the kept components)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.peft_model.save_pretrained(str(folder))
        return folder
