"""One cell of a sweep: built in ``cells/.tmp-<id>``, sealed, renamed into place.

A cell runs in a worker process or a Ray task. :func:`run_cell_reporting` never raises: a
failure crosses the process boundary as data and the driver raises
:class:`~airlora.errors.CellError` with the cell's id and message.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import uuid
from pathlib import Path

from airlora.config import (
    PolicyTrainConfig,
    RunConfig,
    SurrogateConfig,
    SweepConfig,
    TrainConfig,
    load_config,
)
from airlora.config.base import merge_section
from airlora.errors import CellError, os_error_message
from airlora.runs import (
    POLICY_DIR,
    RESULT_FILE,
    ROUNDS_FILE,
    SWEEP_FILE,
    atomic_write_text,
    config_hash,
)
from airlora.sweep.planning import cell_model
from airlora.sweep.store import CELLS, seal_cell


def _spec(config: SweepConfig, name: str):
    return next(m for m in config.methods if m.name == name)


def run_cell(sweep_dir: str, cell: dict, threads: int) -> str:
    """Do one cell in a temporary folder, then rename it into place. Runs in a worker."""
    import warnings

    import torch

    # A worker is not the CLI (an in-process pool, a Ray task): repeat its silencing of
    # library deprecations.
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    if threads:
        torch.set_num_threads(threads)
    sweep_dir_p = Path(sweep_dir)
    config = load_config(sweep_dir_p / SWEEP_FILE, SweepConfig)
    cells = sweep_dir_p / CELLS
    final = cells / cell["id"]
    if final.exists():
        return cell["id"]
    tmp = cells / f".tmp-{cell['id']}"
    if tmp.exists():
        shutil.rmtree(tmp)
    spec = _spec(config, cell["name"]) if "name" in cell else None
    model = cell_model(config, cell["r_max"], spec.model if spec else None)
    train = merge_section(config.train, spec.train) if spec else config.train
    if cell["kind"] == "rounds":
        from airlora.env.real import RankSelectionEnv
        from airlora.env.surrogate import collect_rounds, write_rounds

        env = RankSelectionEnv.build(
            config.data, model, config.train, config.link, config.env, cell["seed"]
        )
        rows = collect_rounds(env, config.surrogate.real_episodes, seed=cell["seed"])
        tmp.mkdir(parents=True)
        write_rounds(rows, tmp / ROUNDS_FILE)
    elif cell["kind"] == "policy":
        from airlora.train_policy import run_train_policy

        assert spec is not None
        rounds_file = (
            cells / cell["rounds"] / ROUNDS_FILE
            if "rounds" in cell
            else config.surrogate.rounds_file  # the sweep's given log, resolved per r_max
        )
        policy_config = PolicyTrainConfig(
            method=spec.method,
            data=config.data,
            model=model,
            train=train,
            link=config.link,
            env=merge_section(config.env, spec.env),
            ppo=merge_section(config.ppo, spec.ppo),
            airllm=merge_section(config.airllm, spec.airllm),
            surrogate=SurrogateConfig(
                **{**config.surrogate.model_dump(), "rounds_file": rounds_file}
            ),
            total_steps=config.total_steps,
            seed=cell["seed"],
            out_dir=cells,
            run_name=tmp.name,
        )
        run_train_policy(policy_config)
    else:
        from airlora.driver import run_episode

        assert spec is not None
        if cell["kind"] == "tune":
            train = at_learning_rate(train, cell["learning_rate"])
        elif "tuning" in cell:
            train = at_learning_rate(train, chosen_learning_rate(cells, cell))
        online = config.formulation == "online"
        link = config.link
        if not online:
            link = merge_section(link, {"snr_process": "fixed", "snr_db": cell["snr_db"]})
        policy = cells / cell["policy"] / POLICY_DIR if "policy" in cell else None
        run_config = RunConfig(
            method=spec.method,
            formulation=config.formulation,
            online=config.online,
            ppo=merge_section(config.ppo, spec.ppo),
            airllm=merge_section(config.airllm, spec.airllm),
            data=config.data,
            model=model,
            train=train,
            link=link,
            env=merge_section(config.env, spec.env),
            rank=spec.rank,
            policy=policy,
            seed=cell["seed"],
            # Methods are compared on the test split: an online run scores its best state
            # there, a round episode its edge's final model. A tuning run never scores it.
            final_test=cell["kind"] != "tune",
            out_dir=cells,
        )
        if cell["kind"] == "tune" and online:
            from airlora.driver import EpisodeResult
            from airlora.online import run_online

            result = EpisodeResult(*run_online(run_config, out=tmp, score_test=False))
        else:
            result = run_episode(run_config, out=tmp, score_validation=cell["kind"] == "tune")
        record = {
            "cell": cell["id"],
            "name": spec.name,
            "method": spec.method,
            "r_max": cell["r_max"],
            "snr_db": cell.get("snr_db"),
            "seed": cell["seed"],
            # The policy by its cell id, not its path: the same sweep anywhere hashes the same.
            "config_hash": config_hash(
                run_config.model_copy(update={"policy": cell.get("policy")})
            ),
            "run_id": uuid.uuid4().hex,
            "learning_rate": train.learning_rate,
            **result.summary,
        }
        atomic_write_text(tmp / RESULT_FILE, json.dumps(record, indent=2) + "\n")
    seal_cell(tmp, cell["id"])
    os.replace(tmp, final)
    return cell["id"]


def at_learning_rate(train: TrainConfig, learning_rate: float) -> TrainConfig:
    """``train`` at the adapter learning rate ``learning_rate``; the head's rate keeps its
    ratio to it (one knob per method: the head is trained from scratch beside the adapter)."""
    ratio = train.head_learning_rate / train.learning_rate
    return train.model_copy(
        update={"learning_rate": learning_rate, "head_learning_rate": learning_rate * ratio}
    )


def tuning_score(record: dict) -> float:
    """What a tuning run is judged by: the validation accuracy of an online run's best state,
    or of a round episode's final edge model; a diverged run scores -inf (never chosen)."""
    score = record.get("best_validation_accuracy", record.get("validation_accuracy"))
    return -math.inf if score is None else float(score)


def chosen_learning_rate(cells: Path, cell: dict) -> float:
    """The learning rate of the tuning grid with the best mean validation accuracy over the
    tuning seeds (ties: the earlier rate of the grid), read from the finished tuning cells."""
    scores: dict[float, list[float]] = {}
    for cell_id in cell["tuning"]:
        record = json.loads((cells / cell_id / RESULT_FILE).read_text(encoding="utf-8"))
        scores.setdefault(record["learning_rate"], []).append(tuning_score(record))
    means = {lr: sum(v) / len(v) for lr, v in scores.items()}
    if all(m == -math.inf for m in means.values()):
        raise ValueError(
            f"every learning rate of the tuning grid diverged for {cell['name']} at r_max "
            f"{cell['r_max']} ({sorted(means)}): lower tuning.learning_rates"
        )
    return max(means, key=lambda lr: (means[lr], -list(means).index(lr)))


FAILED_CELLS = "failed-cells"


def run_cell_reporting(sweep_dir: str, cell: dict, threads: int) -> dict:
    """Run one cell; never raise. Returns ``{"id": ...}``, or with ``"error"`` the message of
    what went wrong, so that the failure crosses any process boundary (a worker process, a
    Ray task) as plain data and the driver raises :class:`~airlora.errors.CellError`.

    A user error (bad data, a bad setting, a full disk) keeps its message. Anything else is a
    bug: its traceback goes to ``failed-cells/<id>.log`` in the sweep folder and the message
    says so. The cell's temporary folder is removed either way: nothing half-made is left.
    """
    try:
        return {"id": run_cell(sweep_dir, cell, threads)}
    except Exception as err:  # every failure becomes a message; see the docstring
        import traceback

        shutil.rmtree(Path(sweep_dir) / CELLS / f".tmp-{cell['id']}", ignore_errors=True)
        if isinstance(err, OSError):
            return {"id": cell["id"], "error": os_error_message(err)}
        if isinstance(err, ValueError):  # AirLoraError and the validation errors
            return {"id": cell["id"], "error": str(err)}
        log = Path(sweep_dir) / FAILED_CELLS / f"{cell['id']}.log"
        try:
            log.parent.mkdir(exist_ok=True)
            atomic_write_text(log, traceback.format_exc())
            where = f"; the traceback is in {log}"
        except OSError:
            where = ""
        return {
            "id": cell["id"],
            "error": f"internal error {type(err).__name__}: {err}{where}",
        }


def outcome(result: dict) -> str:
    if "error" in result:
        raise CellError(result["id"], result["error"])
    return result["id"]
