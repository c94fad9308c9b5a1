"""LoRA at ``r_max`` with a per-projection rank vector that can change every round.

PEFT allocates every adapted projection's factors at ``r_max``: ``A`` is (r_max, d_in) and
``B`` is (d_out, r_max). A rank vector ``r`` keeps the first ``r_i`` rank components of
projection ``i`` active by multiplying the output of ``A`` with a 0/1 mask (a forward hook;
nothing is re-allocated). The inactive rows of ``A`` and columns of ``B`` get no gradient,
but an optimiser's momentum and weight decay would still move them, so
:meth:`RankedLoRAModel.restore_inactive` writes their saved values back after every optimiser
step: lower a rank and raise it again, and the values come back.

The scaling stays ``lora_alpha / r_max`` whatever the active rank, so what remains of an
adapter means the same after a rank is lowered; the PEFT export reproduces it exactly with a
per-module ``alpha_pattern``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, TaskType, get_peft_model
from peft.tuners.lora import LoraLayer
from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from safetensors.torch import save_file
from torch import nn

from airlora.model.base import ADAPTER, HEAD_PREFIX, plain_head_name

# Attention projections per model family: the M projections a rank vector addresses.
ATTENTION_TARGETS: dict[str, list[str]] = {
    "bert": ["query", "key", "value", "attention.output.dense"],
    "roberta": ["query", "key", "value", "attention.output.dense"],
    "xlm-roberta": ["query", "key", "value", "attention.output.dense"],
    "electra": ["query", "key", "value", "attention.output.dense"],
    "distilbert": ["q_lin", "k_lin", "v_lin", "out_lin"],
    "gpt2": ["attn.c_attn", "attn.c_proj"],
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "mistral": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj"],
}


def default_target_modules(model_type: str) -> list[str]:
    """Attention projections of a model family, else PEFT's own default, else an error."""
    if model_type in ATTENTION_TARGETS:
        return list(ATTENTION_TARGETS[model_type])
    if model_type in TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING:
        return list(TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING[model_type])
    raise ValueError(
        f"no default LoRA target projections for model type '{model_type}'; "
        "name them with target_modules (for example ['q_proj', 'v_proj'])"
    )


@dataclass(frozen=True)
class Projection:
    """One adapted projection: its module name in the base model and its shape."""

    name: str
    d_in: int
    d_out: int

    def params_at(self, rank: int) -> int:
        """Parameters of the truncated factors at ``rank``: r (d_in + d_out)."""
        return rank * (self.d_in + self.d_out)


@dataclass(frozen=True)
class Payload:
    """Exact parameter count of one transmission."""

    per_projection: tuple[int, ...]
    head_params: int
    max_adapter_params: int

    @property
    def adapter_params(self) -> int:
        return sum(self.per_projection)

    @property
    def total_params(self) -> int:
        return self.adapter_params + self.head_params

    @property
    def max_total_params(self) -> int:
        """C_max: the payload with every projection at r_max (plus the head)."""
        return self.max_adapter_params + self.head_params


def _apply_rank_mask(module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
    # Stateless on purpose: the mask is a buffer of the module, so deep copies stay separate.
    return output * module.rank_mask


class RankedLoRAModel:
    """A PEFT LoRA model whose per-projection ranks are set by a rank vector.

    Parameters
    ----------
    peft_model:
        A ``PeftModel`` with one LoRA adapter named ``"default"`` allocated at ``r_max``;
        build one with :meth:`from_base`.
    """

    def __init__(self, peft_model: PeftModel) -> None:
        self.peft_model = peft_model
        config = peft_model.peft_config[ADAPTER]
        self.r_max = int(config.r)
        self.lora_alpha = float(config.lora_alpha)
        self.lora_config = config
        self._layers: list[LoraLayer] = []
        projections: list[Projection] = []
        base = peft_model.get_base_model()
        for name, module in base.named_modules():
            if isinstance(module, LoraLayer) and ADAPTER in module.lora_A:
                a = module.lora_A[ADAPTER]
                b = module.lora_B[ADAPTER]
                projections.append(Projection(name, a.weight.shape[1], b.weight.shape[0]))
                self._layers.append(module)
                if not hasattr(a, "rank_mask"):
                    a.register_buffer(
                        "rank_mask", torch.ones(self.r_max, dtype=a.weight.dtype), persistent=False
                    )
                    a.register_forward_hook(_apply_rank_mask)
                    # Saved copies of the factors, filled when a rank is lowered.
                    a.register_buffer("saved_weight", a.weight.detach().clone(), persistent=False)
                    b.register_buffer("saved_weight", b.weight.detach().clone(), persistent=False)
        if not projections:
            raise ValueError("the PEFT model has no LoRA layers")
        self.projections: tuple[Projection, ...] = tuple(projections)
        self._ranks = [int(a.rank_mask.sum().item()) for a in self._lora_As()]
        self._head_names = [
            n
            for n, p in peft_model.named_parameters()
            if p.requires_grad and ".modules_to_save." in n
        ]

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_base(
        cls,
        base_model: nn.Module,
        r_max: int,
        lora_alpha: float = 16.0,
        lora_dropout: float = 0.0,
        target_modules: Sequence[str] | None = None,
    ) -> RankedLoRAModel:
        """Wrap a ``*ForSequenceClassification`` model with LoRA at ``r_max``.

        The task head (``classifier`` / ``score``) is trained and transmitted in full, as PEFT's
        ``modules_to_save`` does for sequence classification.
        """
        if r_max <= 0:
            raise ValueError(f"r_max must be positive, got {r_max}")
        targets = list(target_modules or default_target_modules(base_model.config.model_type))
        config = LoraConfig(
            task_type=TaskType.SEQ_CLS,
            r=r_max,
            lora_alpha=lora_alpha,
            lora_dropout=lora_dropout,
            target_modules=targets,
        )
        try:
            peft_model = get_peft_model(base_model, config)
        except ValueError as err:
            raise ValueError(f"cannot place LoRA on target modules {targets}: {err}") from err
        return cls(peft_model)

    # ------------------------------------------------------------------ ranks

    @property
    def num_projections(self) -> int:
        return len(self.projections)

    @property
    def rank_vector(self) -> list[int]:
        return list(self._ranks)

    def _lora_As(self) -> Iterator[nn.Linear]:
        return (layer.lora_A[ADAPTER] for layer in self._layers)

    def check_rank_vector(self, ranks: Sequence[int]) -> list[int]:
        ranks = [int(r) for r in ranks]
        if len(ranks) != self.num_projections:
            raise ValueError(
                f"rank vector has {len(ranks)} entries; the model has "
                f"{self.num_projections} adapted projections"
            )
        bad = [r for r in ranks if r < 0 or r > self.r_max]
        if bad:
            raise ValueError(f"rank vector entries {bad} lie outside 0..r_max={self.r_max}")
        return ranks

    @torch.no_grad()
    def set_rank_vector(self, ranks: Sequence[int]) -> None:
        """Activate the first ``ranks[i]`` components of projection ``i``; keep the rest."""
        ranks = self.check_rank_vector(ranks)
        for layer, r in zip(self._layers, ranks, strict=True):
            a, b = layer.lora_A[ADAPTER], layer.lora_B[ADAPTER]
            old = int(a.rank_mask.sum().item())
            # Components leaving the active set: remember their current values.
            if r < old:
                a.saved_weight[r:old].copy_(a.weight[r:old])
                b.saved_weight[:, r:old].copy_(b.weight[:, r:old])
            a.rank_mask.zero_()
            a.rank_mask[:r] = 1.0
        self._ranks = ranks

    chooses_ranks = False  # the caller sets the rank vector (AdaLoRA sets its own)

    def after_optimizer_step(self, global_step: int) -> None:
        """Called by the engine after every optimiser step, before gradients are cleared."""
        self.restore_inactive()

    @torch.no_grad()
    def restore_inactive(self) -> None:
        """Undo whatever an optimiser step did to inactive components."""
        for layer, r in zip(self._layers, self._ranks, strict=True):
            if r < self.r_max:
                a, b = layer.lora_A[ADAPTER], layer.lora_B[ADAPTER]
                a.weight[r:].copy_(a.saved_weight[r:])
                b.weight[:, r:].copy_(b.saved_weight[:, r:])

    @torch.no_grad()
    def snapshot(self) -> dict[str, torch.Tensor]:
        """Copies of everything training and rank changes touch (factors, saved values, masks,
        head), for :meth:`restore`."""
        out: dict[str, torch.Tensor] = {}
        for i, layer in enumerate(self._layers):
            a, b = layer.lora_A[ADAPTER], layer.lora_B[ADAPTER]
            out[f"{i}.A"] = a.weight.detach().clone()
            out[f"{i}.B"] = b.weight.detach().clone()
            out[f"{i}.A_saved"] = a.saved_weight.clone()
            out[f"{i}.B_saved"] = b.saved_weight.clone()
            out[f"{i}.mask"] = a.rank_mask.clone()
        for j, param in enumerate(self.head_parameters()):
            out[f"head.{j}"] = param.detach().clone()
        return out

    @torch.no_grad()
    def restore(self, snapshot: dict[str, torch.Tensor]) -> None:
        """Return to a :meth:`snapshot` in place (no re-allocation: optimisers keep their
        parameter references)."""
        for i, layer in enumerate(self._layers):
            a, b = layer.lora_A[ADAPTER], layer.lora_B[ADAPTER]
            a.weight.copy_(snapshot[f"{i}.A"])
            b.weight.copy_(snapshot[f"{i}.B"])
            a.saved_weight.copy_(snapshot[f"{i}.A_saved"])
            b.saved_weight.copy_(snapshot[f"{i}.B_saved"])
            a.rank_mask.copy_(snapshot[f"{i}.mask"])
        for j, param in enumerate(self.head_parameters()):
            param.copy_(snapshot[f"head.{j}"])
        self._ranks = [int(a.rank_mask.sum().item()) for a in self._lora_As()]

    # ------------------------------------------------------------------ parameters

    def lora_parameters(self) -> list[nn.Parameter]:
        out: list[nn.Parameter] = []
        for layer in self._layers:
            out += [layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight]
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
        """Transmission names of the head's tensors (``head.classifier.weight``, ...)."""
        return [HEAD_PREFIX + plain_head_name(n) for n in self._head_names]

    def payload(self, ranks: Sequence[int] | None = None) -> Payload:
        """Parameters sent for a rank vector (default: the current one)."""
        ranks = self.check_rank_vector(ranks) if ranks is not None else self._ranks
        return Payload(
            per_projection=tuple(
                p.params_at(r) for p, r in zip(self.projections, ranks, strict=True)
            ),
            head_params=self.head_numel,
            max_adapter_params=sum(p.params_at(self.r_max) for p in self.projections),
        )

    # ------------------------------------------------------------------ transmission

    @torch.no_grad()
    def active_tensors(self) -> dict[str, torch.Tensor]:
        """What the server sends: truncated factors of active projections, and the head."""
        out: dict[str, torch.Tensor] = {}
        for proj, layer, r in zip(self.projections, self._layers, self._ranks, strict=True):
            if r == 0:
                continue
            out[f"{proj.name}.lora_A"] = layer.lora_A[ADAPTER].weight[:r].detach().clone()
            out[f"{proj.name}.lora_B"] = layer.lora_B[ADAPTER].weight[:, :r].detach().clone()
        for name, param in zip(self.head_tensor_names(), self.head_parameters(), strict=True):
            out[name] = param.detach().clone()
        return out

    @torch.no_grad()
    def load_active_tensors(self, tensors: dict[str, torch.Tensor], ranks: Sequence[int]) -> None:
        """Rebuild this (edge) copy from received tensors; components beyond r_i are zeroed."""
        ranks = self.check_rank_vector(ranks)
        for proj, layer, r in zip(self.projections, self._layers, ranks, strict=True):
            a, b = layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight
            a.zero_()
            b.zero_()
            if r > 0:
                a[:r].copy_(tensors[f"{proj.name}.lora_A"])
                b[:, :r].copy_(tensors[f"{proj.name}.lora_B"])
        for name, param in zip(self.head_tensor_names(), self.head_parameters(), strict=True):
            param.copy_(tensors[name])
        self.set_rank_vector(ranks)
        for layer in self._layers:  # the edge has no "lowered" values to keep
            layer.lora_A[ADAPTER].saved_weight.zero_()
            layer.lora_B[ADAPTER].saved_weight.zero_()

    def regularization(self) -> torch.Tensor | None:
        """A penalty the engine adds to the training loss (None: plain LoRA has none)."""
        return None

    # ------------------------------------------------------------------ export

    def _export_factors(self, layer: LoraLayer, r: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The LoRA factors A (r x d_in) and B (d_out x r) one projection exports."""
        return layer.lora_A[ADAPTER].weight[:r], layer.lora_B[ADAPTER].weight[:, :r]

    def export_peft(self, folder: Path) -> Path:
        """Write the current adapter as a standard PEFT folder.

        Factors are truncated to their active ranks (``rank_pattern``), ``alpha_pattern`` keeps
        the training scale ``lora_alpha / r_max``, and projections at rank 0 are left out.
        ``PeftModel.from_pretrained(base, folder)`` loads it without airlora.
        """
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        scale = self.lora_alpha / self.r_max
        active = [(p, r) for p, r in zip(self.projections, self._ranks, strict=True) if r > 0]
        tensors: dict[str, torch.Tensor] = {}
        for proj, layer, r in zip(self.projections, self._layers, self._ranks, strict=True):
            if r == 0:
                continue
            key = f"base_model.model.{proj.name}"
            a, b = self._export_factors(layer, r)
            tensors[f"{key}.lora_A.weight"] = a.detach().cpu().contiguous()
            tensors[f"{key}.lora_B.weight"] = b.detach().cpu().contiguous()
        head = list(zip(self.head_tensor_names(), self.head_parameters(), strict=True))
        for name, param in head:
            plain = name.removeprefix(HEAD_PREFIX)
            tensors[f"base_model.model.{plain}"] = param.detach().cpu().contiguous()
        modules_to_save = sorted({n.removeprefix(HEAD_PREFIX).split(".")[0] for n, _ in head})
        if not active:
            # PEFT cannot describe a LoRA adapter without projections: keep the head only.
            save_file(tensors, str(folder / "head.safetensors"), metadata={"format": "pt"})
            (folder / "README.md").write_text("All ranks were 0: only the task head was sent.\n")
            return folder
        base_cfg = self.lora_config
        config = LoraConfig(
            task_type=TaskType.SEQ_CLS,
            r=max(r for _, r in active),
            lora_alpha=scale * max(r for _, r in active),
            lora_dropout=base_cfg.lora_dropout,
            target_modules=[p.name for p, _ in active],
            rank_pattern={p.name: r for p, r in active},
            alpha_pattern={p.name: scale * r for p, r in active},
            modules_to_save=list(base_cfg.modules_to_save or modules_to_save),
            fan_in_fan_out=base_cfg.fan_in_fan_out,
            base_model_name_or_path=base_cfg.base_model_name_or_path,
        )
        config.save_pretrained(str(folder))
        save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
        (folder / "airlora_ranks.json").write_text(
            json.dumps(
                {
                    "r_max": self.r_max,
                    "rank_vector": self._ranks,
                    "projections": [p.name for p in self.projections],
                },
                indent=2,
            )
        )
        return folder
