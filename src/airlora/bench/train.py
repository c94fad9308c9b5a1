"""`airlora bench train`: the round engine's training step against a plain PEFT loop.

Both sides train the same model at the same ``r_max`` on the same target projections, on the
same pre-drawn batches (same batch size and sequence lengths), with the same thread count, in
interleaved repeats, on the engine's device (a GPU when ``train.device`` is ``auto`` and there
is one; both sides then under the same bf16 autocast). The project side is
:meth:`RoundEngine.train_steps` with every projection at ``r_max`` (rank masks, restoring
inactive components, gradient clipping, schedule); the peer is the loop the PEFT documentation
shows (forward, backward, ``optimizer.step()``, ``lr_scheduler.step()``,
``optimizer.zero_grad()``).
"""

from __future__ import annotations

import statistics
import time

import torch
from peft import LoraConfig, TaskType, get_peft_model

from airlora.config import DataConfig, ModelConfig, TrainConfig
from airlora.data import collate
from airlora.devices import autocast
from airlora.engine import RoundEngine
from airlora.link import PerfectLink
from airlora.model import load_model


def bench_train(
    model: ModelConfig | None = None,
    data: DataConfig | None = None,
    steps: int = 8,
    repeats: int = 5,
    threads: int = 0,
    seed: int = 0,
) -> dict:
    """Training samples per second, project and peer; ratio = project / peer."""
    model = model or ModelConfig()
    data = data or DataConfig()
    if threads:
        torch.set_num_threads(threads)
    train_cfg = TrainConfig(rounds=repeats + 1, steps_per_round=steps, warmup_steps=0)
    engine = RoundEngine.build(data, model, train_cfg, PerfectLink(), seed)
    engine.server.set_rank_vector([model.r_max] * engine.server.num_projections)

    # The peer: a fresh copy of the same base model, LoRA placed by PEFT directly.
    peer_base = load_model(model.name_or_path, engine.task.num_labels, seed).model.to(engine.device)
    peer = get_peft_model(
        peer_base,
        LoraConfig(
            task_type=TaskType.SEQ_CLS,
            r=model.r_max,
            lora_alpha=model.alpha,
            lora_dropout=model.lora_dropout,
            target_modules=list(engine.server.lora_config.target_modules),
        ),
    )
    peer.train()
    optimizer = torch.optim.AdamW(
        (p for p in peer.parameters() if p.requires_grad), lr=train_cfg.learning_rate
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)

    batches = [engine.stream.take(steps) for _ in range(repeats + 1)]
    pad = engine.pad_token_id

    def run_peer(indices) -> None:
        for index in indices:
            batch = collate(engine.task.train, index, pad)
            if engine.device.type != "cpu":
                batch = {k: v.to(engine.device, non_blocking=True) for k, v in batch.items()}
            with autocast(engine.device, engine.amp_dtype):
                loss = peer(**batch).loss
            loss.backward()
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()

    def timed(fn, indices) -> float:
        start = time.perf_counter()
        fn(indices)
        if engine.device.type == "cuda":
            torch.cuda.synchronize(engine.device)  # the peer queues kernels without waiting
        return len(indices) * data.batch_size / (time.perf_counter() - start)

    # One untimed warm-up each, then interleaved repeats (alternating who goes first).
    engine.train_steps(batches[0])
    run_peer(batches[0])
    project, peer_rates = [], []
    for rep in range(repeats):
        order = [("p", engine.train_steps), ("q", run_peer)]
        if rep % 2:
            order.reverse()
        for tag, fn in order:
            (project if tag == "p" else peer_rates).append(timed(fn, batches[rep + 1]))
    project_median = statistics.median(project)
    peer_median = statistics.median(peer_rates)
    return {
        "name": "train",
        "unit": "samples/s",
        "project": project_median,
        "peer": peer_median,
        "ratio": project_median / peer_median,
        "details": {
            "model": engine.server.lora_config.base_model_name_or_path or model.name_or_path,
            "r_max": model.r_max,
            "projections": engine.server.num_projections,
            "batch_size": data.batch_size,
            "max_length": data.max_length,
            "steps_per_repeat": steps,
            "repeats": repeats,
            "threads": torch.get_num_threads(),
            "device": str(engine.device),
            "autocast": str(engine.amp_dtype) if engine.amp_dtype else None,
            "project_runs": project,
            "peer_runs": peer_rates,
            "peer_description": "plain PEFT LoRA loop as in the PEFT docs, same batches",
        },
    }
