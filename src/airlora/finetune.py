"""`airlora finetune`: one episode of remote fine-tuning with fixed ranks, top to bottom.

Check every input, then create the run folder, then run T rounds (set ranks, train K steps,
transmit, rebuild at the edge, evaluate), then score the edge's final model on the test split
and export its adapter as a PEFT folder.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from airlora.config import FinetuneConfig
from airlora.engine import RoundEngine, RoundMetrics
from airlora.link import build_link, build_snr_process
from airlora.runs import RunFolder


@dataclass
class FinetuneResult:
    run_dir: Path
    rounds: list[RoundMetrics]
    test_accuracy: float | None
    test_loss: float | None
    train_samples_per_s: float
    diverged_round: int | None = None


def run_finetune(
    config: FinetuneConfig,
    on_round: Callable[[RoundMetrics], None] | None = None,
    on_step: Callable[[int], None] | None = None,
) -> FinetuneResult:
    """Run one fixed-rank episode and write its run folder. Returns the round metrics."""
    started = time.perf_counter()
    link = build_link(config.link, seed=config.seed)
    snr_process = build_snr_process(config.link, seed=config.seed)
    engine = RoundEngine.build(
        config.data,
        config.model,
        config.train,
        link,
        config.seed,
        protect_head=config.link.protect_head,
    )
    ranks = config.rank_vector_for(engine.server.num_projections)
    engine.server.check_rank_vector(ranks)  # a wrong length fails before any folder exists

    name = config.run_name or f"finetune-{datetime.now():%Y%m%d-%H%M%S}-seed{config.seed}"
    run = RunFolder.create(
        config.out_dir, name, config, config.seed, kind="finetune", data_source=engine.task.source
    )
    rounds: list[RoundMetrics] = []
    try:
        for _ in range(config.train.rounds):
            metrics = engine.run_round(ranks, snr_process.next())
            rounds.append(metrics)
            run.append_metrics(metrics.as_dict())
            if on_step:
                on_step(config.train.steps_per_round)
            if on_round:
                on_round(metrics)
            if metrics.diverged:
                break  # rounds after a divergence would only train on NaN
        diverged_round = rounds[-1].round if rounds[-1].diverged else None
        test_acc = test_loss = None
        if config.final_test and diverged_round is None:
            test_acc, test_loss = engine.evaluate(engine.edge, engine.task.test)
        if diverged_round is None:
            engine.edge.export_peft(run.path / "adapter")
        train_time = sum(r.train_time_s for r in rounds)
        samples = engine.steps_done * config.data.batch_size
        result = FinetuneResult(
            run.path,
            rounds,
            test_acc,
            test_loss,
            samples / train_time if train_time else 0.0,
            diverged_round,
        )
        run.finish(
            {
                "diverged_round": diverged_round,
                "final_edge_accuracy": rounds[-1].as_dict()["accuracy"],
                "test_accuracy": test_acc,
                "test_loss": test_loss,
                "training_steps": engine.steps_done,
                "train_samples_per_s": result.train_samples_per_s,
                "total_payload_params": sum(r.payload_params for r in rounds),
                "total_airtime_s": sum(r.airtime_s for r in rounds),
            },
            started,
            status="completed" if diverged_round is None else "diverged",
        )
    except BaseException as err:
        run.fail(err)
        raise
    return result
