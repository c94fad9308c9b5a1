"""The cloud/edge round engine (design section 1).

One round: draw the round's batches and measure their complexity, set the rank vector, train
K server steps, send the active adapter and the head through the link, rebuild the edge's
copy from what arrived, evaluate it on the edge's fixed evaluation subset.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch

from airlora.config import DataConfig, ModelConfig, TrainConfig
from airlora.data import (
    ComplexityFeatures,
    ComplexityMeter,
    EncodedSplit,
    TaskData,
    TrainStream,
    collate,
    encode,
    eval_batches,
    load_task,
)
from airlora.devices import autocast, autocast_dtype, resolve_device
from airlora.link import Link, LinkReport
from airlora.model import RankAdapter, RankedLoRAModel, load_model, resolve_model_source


@dataclass(frozen=True)
class EncodedTask:
    """Tokenised splits; ``edge_eval`` is the fixed subset the edge scores every round."""

    train: EncodedSplit
    validation: EncodedSplit
    test: EncodedSplit
    edge_eval: EncodedSplit
    num_labels: int
    source: str


def encode_task(task: TaskData, tokenizer, config: DataConfig) -> EncodedTask:
    validation = encode(tokenizer, task.validation, config.max_length)
    n_edge = min(config.edge_eval_size, len(task.validation))
    edge = encode(tokenizer, task.validation.subset(np.arange(n_edge)), config.max_length)
    return EncodedTask(
        train=encode(tokenizer, task.train, config.max_length),
        validation=validation,
        test=encode(tokenizer, task.test, config.max_length),
        edge_eval=edge,
        num_labels=task.num_labels,
        source=task.source,
    )


@dataclass(frozen=True)
class RoundMetrics:
    """What one round measured. Times in seconds, payload in parameters and bits.

    ``diverged`` marks a round whose training produced a non-finite loss or parameters, or
    whose edge model scored a non-finite loss: its accuracy and losses are NaN here and
    ``None`` in :meth:`as_dict` (and so in every result file), never a made-up number.
    """

    round: int
    snr_db: float
    rank_vector: list[int]
    accuracy: float
    eval_loss: float
    train_loss: float
    complexity: dict[str, float]
    adapter_params: int
    head_params: int
    payload_params: int
    payload_bits: int
    max_payload_params: int
    airtime_s: float
    train_time_s: float
    transmit_time_s: float
    eval_time_s: float
    link: dict
    diverged: bool = False

    def as_dict(self) -> dict:
        d = asdict(self)
        for key in ("accuracy", "eval_loss", "train_loss"):
            d[key] = _finite(d[key])
        return d


def _lr_lambda(config: TrainConfig):
    total = config.rounds * config.steps_per_round

    def factor(step: int) -> float:
        if step < config.warmup_steps:
            return (step + 1) / (config.warmup_steps + 1)
        if config.schedule == "constant":
            return 1.0
        return max(0.0, (total - step) / max(1, total - config.warmup_steps))

    return factor


class RoundEngine:
    """Runs rounds of remote fine-tuning between a server model and an edge copy.

    Parameters
    ----------
    server:
        The cloud's rank-masked LoRA model (trained).
    edge:
        The edge's copy (same frozen base; rebuilt from received tensors every round).
    task:
        Tokenised splits.
    link:
        Carries the adapter to the edge (:class:`~airlora.link.PerfectLink` by default).
    train_config:
        Optimiser, schedule and the number of local steps K per round.
    pad_token_id, vocab_size, special_ids:
        From the tokenizer; for batching and the complexity features.
    unk_token_id:
        The tokenizer's unknown token, for the online state's OOV rate (None: no such token).
    seed:
        Seeds the batch order and torch.
    eval_batch_size:
        Batch size of edge evaluation. Default 64.
    measure_model_loss:
        Include the server model's loss on the round's first batch in the complexity
        features (one extra forward pass per round). Default true.
    protect_head:
        Name the task head's tensors as protected control data to the link. Default true.
    device:
        Where server and edge models live (they are moved there); batches follow. Default CPU.
    amp_dtype:
        Autocast dtype of forward passes (``torch.bfloat16`` on a GPU), None for fp32.
    """

    def __init__(
        self,
        server: RankAdapter,
        edge: RankAdapter,
        task: EncodedTask,
        link: Link,
        train_config: TrainConfig,
        pad_token_id: int,
        vocab_size: int,
        special_ids: set[int],
        max_length: int,
        batch_size: int,
        seed: int = 0,
        eval_batch_size: int = 64,
        measure_model_loss: bool = True,
        protect_head: bool = True,
        device: torch.device | str = "cpu",
        amp_dtype: torch.dtype | None = None,
        unk_token_id: int | None = None,
    ) -> None:
        self.device = torch.device(device)
        self.amp_dtype = amp_dtype
        server.peft_model.to(self.device)
        edge.peft_model.to(self.device)
        self.server = server
        self.edge = edge
        self.task = task
        self.link = link
        self.config = train_config
        self.pad_token_id = pad_token_id
        self.eval_batch_size = eval_batch_size
        self.measure_model_loss = measure_model_loss
        self.protect_head = protect_head
        self.batch_size = batch_size
        self.meter = ComplexityMeter(task.train, vocab_size, max_length, special_ids)
        self.special_ids, self.unk_token_id = special_ids, unk_token_id
        self._initial = (server.snapshot(), edge.snapshot())
        self._initial_accuracy: float | None = None
        self.reset(seed)

    def reset(self, seed: int) -> None:
        """Start a new episode: the fresh adapter and head of construction time, a new
        optimiser and schedule, and a batch order drawn from ``seed``."""
        self.server.restore(self._initial[0])
        self.edge.restore(self._initial[1])
        self.stream = TrainStream(self.task.train, self.batch_size, seed, self.pad_token_id)
        self.optimizer = torch.optim.AdamW(
            [
                {"params": self.server.lora_parameters(), "lr": self.config.learning_rate},
                {"params": self.server.head_parameters(), "lr": self.config.head_learning_rate},
            ],
            weight_decay=self.config.weight_decay,
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, _lr_lambda(self.config))
        self.episode_seed = seed
        self.round_index = 0
        self.steps_done = 0
        self._pending: list[np.ndarray] | None = None
        self._pending_complexity: ComplexityFeatures | None = None
        self.last_accuracy = float("nan")

    def initial_accuracy(self) -> float:
        """Edge accuracy of the unadapted model (a_0), measured once."""
        if self._initial_accuracy is None:
            current = self.edge.snapshot()
            self.edge.restore(self._initial[1])
            self._initial_accuracy = self.evaluate(self.edge, self.task.edge_eval)[0]
            self.edge.restore(current)
        return self._initial_accuracy

    # ------------------------------------------------------------------ set-up helper

    @classmethod
    def build(
        cls,
        data: DataConfig,
        model: ModelConfig,
        train: TrainConfig,
        link: Link,
        seed: int,
        measure_model_loss: bool = True,
        protect_head: bool = True,
    ) -> RoundEngine:
        """Load the task and the model, wrap them, and make the edge's copy.

        Raises :class:`~airlora.data.DataError` or :class:`~airlora.model.ModelError` on bad
        input, before anything is written anywhere.
        """
        if train.threads:
            torch.set_num_threads(train.threads)
        device = resolve_device(train.device)  # before any loading: a bad device fails fast
        amp_dtype = autocast_dtype(device, train.precision)
        resolve_model_source(model.name_or_path)  # a missing model folder fails before data work
        torch.manual_seed(seed)
        task = load_task(data, seed)
        loaded = load_model(model.name_or_path, task.num_labels, seed)
        encoded = encode_task(task, loaded.tokenizer, data)
        edge_base = copy.deepcopy(loaded.model)
        server = build_adapter(loaded.model, model, train, model.lora_dropout)
        edge = build_adapter(edge_base, model, train, 0.0)
        tok = loaded.tokenizer
        return cls(
            server,
            edge,
            encoded,
            link,
            train,
            pad_token_id=tok.pad_token_id,
            vocab_size=len(tok),
            special_ids=set(tok.all_special_ids) - {tok.unk_token_id},
            max_length=data.max_length,
            batch_size=data.batch_size,
            seed=seed,
            eval_batch_size=data.eval_batch_size,
            measure_model_loss=measure_model_loss,
            protect_head=protect_head,
            device=device,
            amp_dtype=amp_dtype,
            unk_token_id=tok.unk_token_id,
        )

    # ------------------------------------------------------------------ one round

    def batch(self, split: EncodedSplit, index: np.ndarray) -> dict[str, torch.Tensor]:
        """A padded batch of ``split`` on the engine's device."""
        batch = collate(split, index, self.pad_token_id)
        if self.device.type == "cpu":
            return batch
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    def observe_round(self) -> ComplexityFeatures:
        """Draw the next round's batches and measure their complexity (before acting)."""
        if self._pending is None:
            self._pending = self.stream.take(self.config.steps_per_round)
            loss = float("nan")
            if self.measure_model_loss:
                loss = self._loss_on(self._pending[0])
            per_batch = [self.meter.measure(self.task.train, idx) for idx in self._pending]
            mean = ComplexityFeatures.mean(per_batch)
            self._pending_complexity = ComplexityFeatures(
                mean.length, mean.type_token_ratio, mean.rarity, mean.tokens_per_word, loss
            )
        assert self._pending_complexity is not None
        return self._pending_complexity

    @torch.no_grad()
    def _loss_on(self, index: np.ndarray) -> float:
        model = self.server.peft_model
        model.eval()
        with autocast(self.device, self.amp_dtype):
            return float(model(**self.batch(self.task.train, index)).loss)

    def train_steps(self, batches: Sequence[np.ndarray]) -> float:
        """K optimiser steps on the server; returns the mean training loss."""
        model = self.server.peft_model
        model.train()
        params = self.server.lora_parameters() + self.server.head_parameters()
        losses = []
        for index in batches:
            with autocast(self.device, self.amp_dtype):
                loss = model(**self.batch(self.task.train, index)).loss
            # SVD-form adapters: the orthogonality of P and Q is trained, not reported (the
            # loss a step reports, and the online reward, are the task's).
            penalty = self.server.regularization()
            (loss if penalty is None else loss + penalty).backward()
            if self.config.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, self.config.max_grad_norm)
            self.optimizer.step()
            self.scheduler.step()
            # Before zero_grad: AdaLoRA scores importance from the gradients.
            self.server.after_optimizer_step(self.steps_done)
            self.optimizer.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
            self.steps_done += 1
        return float(np.mean(losses))

    def evaluate(self, model: RankAdapter, split: EncodedSplit) -> tuple[float, float]:
        """Accuracy and mean cross-entropy of ``model`` on ``split``."""
        return evaluate_adapter(
            model,
            split,
            self.pad_token_id,
            self.eval_batch_size,
            self.device,
            self.amp_dtype,
        )

    def deliver(self, ranks: Sequence[int], snr_db: float) -> LinkReport:
        """Send the server's active factors at ``ranks`` (and the head) over the link at
        ``snr_db``; the edge's copy becomes what arrived."""
        # The link model works on host memory; .cpu() is free for tensors already there.
        sent = {k: v.cpu() for k, v in self.server.active_tensors().items()}
        # A diverged update is still sent (the airtime is spent), but as finite numbers; a
        # finite tensor is passed as it is (no copy on every round).
        sent = {
            k: v if bool(torch.isfinite(v).all()) else torch.nan_to_num(v, 0.0, 0.0, 0.0)
            for k, v in sent.items()
        }
        protected = self.server.head_tensor_names() if self.protect_head else []
        received, report = self.link.transmit(sent, snr_db, protected)
        self.edge.load_active_tensors(received, ranks)
        return report

    def train_round(
        self, rank_vector: Sequence[int] | None
    ) -> tuple[list[int], ComplexityFeatures, float, bool, float]:
        """The server's half of a round: K steps on the round's batches at ``rank_vector``
        (None: an adapter that allocates its own). Returns the ranks trained, the batches'
        complexity, the mean training loss, whether training diverged, and the seconds the
        training took (setting the ranks and the K steps)."""
        if self.server.chooses_ranks:
            ranks = self.server.rank_vector
        else:
            if rank_vector is None:
                raise ValueError("this adapter needs a rank vector")
            ranks = self.server.check_rank_vector(rank_vector)
        complexity = self.observe_round()
        batches, self._pending = self._pending, None
        assert batches is not None
        start = time.perf_counter()
        self.server.set_rank_vector(ranks)
        # Dropout draws from a private stream: a round depends on (episode seed, round) only,
        # and the caller's global RNG (a policy sampling actions, say) is left untouched.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.episode_seed * 100_003 + self.round_index)
            train_loss = self.train_steps(batches)
        train_time = time.perf_counter() - start
        if self.server.chooses_ranks:
            ranks = self.server.rank_vector
        diverged = not math.isfinite(train_loss) or not _all_finite(
            self.server.lora_parameters() + self.server.head_parameters()
        )
        return list(ranks), complexity, train_loss, diverged, train_time

    def run_round(self, rank_vector: Sequence[int] | None, snr_db: float) -> RoundMetrics:
        """One full round with the given ranks at the given SNR (Es/N0, dB).

        An adapter that allocates its own ranks (AdaLoRA) takes ``None``; the ranks it keeps
        after the round's training are the ones sent and reported.
        """
        ranks, complexity, train_loss, diverged, train_time = self.train_round(rank_vector)

        start = time.perf_counter()
        report = self.deliver(ranks, snr_db)
        transmit_time = time.perf_counter() - start

        start = time.perf_counter()
        accuracy, eval_loss = self.evaluate(self.edge, self.task.edge_eval)
        eval_time = time.perf_counter() - start
        if diverged or not math.isfinite(eval_loss):
            # NaN logits argmax to class 0: that "accuracy" would be a made-up number.
            diverged, accuracy, eval_loss = True, float("nan"), float("nan")

        self.round_index += 1
        self.last_accuracy = accuracy
        payload = self.server.payload(ranks)
        return RoundMetrics(
            round=self.round_index,
            snr_db=float(snr_db),
            rank_vector=ranks,
            accuracy=accuracy,
            eval_loss=eval_loss,
            train_loss=train_loss,
            complexity={k: _finite(v) for k, v in complexity.as_dict().items()},
            adapter_params=payload.adapter_params,
            head_params=payload.head_params,
            payload_params=payload.total_params,
            payload_bits=report.payload_bits,
            max_payload_params=payload.max_total_params,
            airtime_s=report.airtime_s,
            train_time_s=train_time,
            transmit_time_s=transmit_time,
            eval_time_s=eval_time,
            link=_link_dict(report),
            diverged=diverged,
        )


@torch.no_grad()
def evaluate_adapter(
    model: RankAdapter,
    split: EncodedSplit,
    pad_token_id: int,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
    amp_dtype: torch.dtype | None = None,
) -> tuple[float, float]:
    """Accuracy and mean cross-entropy of ``model`` on ``split`` (the edge's scoring)."""
    device = torch.device(device)
    net = model.peft_model
    net.eval()
    correct, loss_sum = 0, 0.0
    for index in eval_batches(split, batch_size):
        batch = collate(split, index, pad_token_id)
        if device.type != "cpu":
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        with autocast(device, amp_dtype):
            logits = net(**batch).logits.float()
        correct += int((logits.argmax(-1) == batch["labels"]).sum())
        # From the logits, not out.loss: AdaLoRA adds its orthogonality penalty to out.loss.
        loss = torch.nn.functional.cross_entropy(logits, batch["labels"])
        loss_sum += float(loss) * len(index)
    return correct / len(split), loss_sum / len(split)


def build_adapter(base, model: ModelConfig, train: TrainConfig, dropout: float):
    """The adapter a model config asks for: rank-masked LoRA, rank-masked SVD form, or
    PEFT AdaLoRA."""
    if model.adapter == "adalora":
        from airlora.model.adalora import AdaLoRAModel

        total = train.rounds * train.steps_per_round
        ada = model.adalora
        return AdaLoRAModel.from_base(
            base,
            model.r_max,
            ada.target_rank or max(1, model.r_max // 2),
            total,
            model.alpha,
            model.target_modules,
            tinit=int(ada.tinit_fraction * total),
            tfinal=int(ada.tfinal_fraction * total),
            delta_t=ada.delta_t,
            orth_reg_weight=ada.orth_reg_weight,
        )
    if model.adapter == "svd":
        from airlora.model.svd import RankedSVDModel

        return RankedSVDModel.from_base(
            base,
            model.r_max,
            model.alpha,
            dropout,
            model.target_modules,
            model.svd_orth_reg_weight,
        )
    return RankedLoRAModel.from_base(base, model.r_max, model.alpha, dropout, model.target_modules)


def _all_finite(params: Sequence[torch.Tensor]) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in params)


def _finite(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


def _link_dict(report: LinkReport) -> dict:
    d = report.as_dict()
    return {k: (_finite(v) if isinstance(v, float) else v) for k, v in d.items()}
