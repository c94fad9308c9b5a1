"""What a sweep does, as cells with stable ids, and how an id reads back.

- ``rounds-r{R}-s{seed}``: real episodes logged for the surrogate (once per r_max and seed);
- ``policy-{name}-r{R}-s{seed}``: a policy trained on that surrogate (a train-policy folder);
- ``eval-{name}-r{R}-snr{S}-s{seed}``: one real episode at a fixed SNR (a run folder);
- ``online-{name}-r{R}-s{seed}``: one whole run of the online formulation (a run folder);
- ``tune-{name}-r{R}-lr{LR}-s{seed}``: a run at one learning rate of the tuning grid, scored
  on the validation split only (an online run, or a real episode at the median SNR).
"""

from __future__ import annotations

from collections.abc import Callable

from airlora.config import MethodSpec, SweepConfig
from airlora.config.base import merge_section

TRAINED = ("airllm", "ppo")


def rounds_id(r_max: int, seed: int) -> str:
    return f"rounds-r{r_max}-s{seed}"


def policy_id(name: str, r_max: int, seed: int) -> str:
    return f"policy-{name}-r{r_max}-s{seed}"


def eval_id(name: str, r_max: int, snr_db: float, seed: int) -> str:
    return f"eval-{name}-r{r_max}-snr{snr_db:g}-s{seed}"


def online_id(name: str, r_max: int, seed: int) -> str:
    return f"online-{name}-r{r_max}-s{seed}"


def tune_id(name: str, r_max: int, learning_rate: float, seed: int) -> str:
    return f"tune-{name}-r{r_max}-lr{learning_rate:g}-s{seed}"


def parse_cell_id(cell_id: str) -> dict:
    """The parts of a cell id: ``kind``, ``r_max``, ``seed``, and ``name`` / ``snr_db``
    where the kind has them (method names may hold '-'; the numbers are read from the end)."""
    kind, _, body = cell_id.partition("-")
    body, _, seed = body.rpartition("-s")
    out: dict = {"kind": kind, "seed": int(seed)}
    if kind == "eval":
        body, _, snr = body.rpartition("-snr")
        out["snr_db"] = float(snr)
    if kind == "tune":
        body, _, lr = body.rpartition("-lr")
        out["learning_rate"] = float(lr)
    if kind in ("policy", "eval", "online", "tune"):
        body, _, r_max = body.rpartition("-r")
        out["name"] = body
    else:
        r_max = body.removeprefix("r")
    out["r_max"] = int(r_max)
    return out


def cell_model(config: SweepConfig, r_max: int, overrides: dict | None = None):
    return merge_section(config.model, {**(overrides or {}), "r_max": r_max})


def tuning_snr_db(config: SweepConfig) -> float:
    """The SNR of a round sweep's tuning episodes: the median of ``snr_db`` (the lower
    middle one of an even count), one channel for every method."""
    ordered = sorted(config.snr_db)
    return ordered[(len(ordered) - 1) // 2]


def plan(config: SweepConfig) -> list[list[dict]]:
    """The cells of each stage, in order: rounds, policies, tuning episodes (when the sweep
    tunes), evaluations; an online sweep: tuning runs (when it tunes), then online runs."""
    if config.formulation == "online":
        return _plan_online(config)
    rounds, policies, evals = [], [], []
    tunes, grids = _round_tuning(config)
    trained = [m for m in config.methods if m.method in TRAINED]
    # A given log (surrogate.rounds_file) replaces the per-(r_max, seed) logging.
    log_here = config.surrogate.rounds_file is None
    for r_max in config.r_max:
        for seed in config.seeds:
            if trained and log_here:
                rounds.append(
                    {
                        "kind": "rounds",
                        "id": rounds_id(r_max, seed),
                        "r_max": r_max,
                        "seed": seed,
                    }
                )
            for m in trained:
                cell = {
                    "kind": "policy",
                    "id": policy_id(m.name, r_max, seed),
                    "name": m.name,
                    "r_max": r_max,
                    "seed": seed,
                }
                if log_here:
                    cell["rounds"] = rounds_id(r_max, seed)
                policies.append(cell)
            for m in config.methods:
                for snr in config.snr_db:
                    cell = {
                        "kind": "eval",
                        "id": eval_id(m.name, r_max, snr, seed),
                        "name": m.name,
                        "r_max": r_max,
                        "snr_db": snr,
                        "seed": seed,
                    }
                    if m.method in TRAINED:
                        cell["policy"] = policy_id(m.name, r_max, seed)
                    if (m.name, r_max) in grids:
                        cell["tuning"] = grids[m.name, r_max]
                    evals.append(cell)
    return [rounds, policies, tunes, evals] if tunes else [rounds, policies, evals]


def _tuning_cells(
    config: SweepConfig, extra: Callable[[MethodSpec, int], dict]
) -> tuple[list[dict], dict[tuple[str, int], list[str]]]:
    """The tuning cells of a sweep (none without ``tuning``), each with ``extra(entry,
    r_max)`` added, and each (entry, r_max)'s tuning cell ids."""
    tunes: list[dict] = []
    grids: dict[tuple[str, int], list[str]] = {}
    if config.tuning is None:
        return tunes, grids
    for r_max in config.r_max:
        for m in config.methods:
            for lr in config.tuning.learning_rates:
                for seed in config.tuning.seeds:
                    cell = {
                        "kind": "tune",
                        "id": tune_id(m.name, r_max, lr, seed),
                        "name": m.name,
                        "r_max": r_max,
                        "seed": seed,
                        "learning_rate": lr,
                        **extra(m, r_max),
                    }
                    grids.setdefault((m.name, r_max), []).append(cell["id"])
                    tunes.append(cell)
    return tunes, grids


def _round_tuning(config: SweepConfig) -> tuple[list[dict], dict[tuple[str, int], list[str]]]:
    """A round sweep's tuning episodes, at the median SNR. A trained method plays the policy
    of the first evaluation seed (trained on the surrogate, never on a scored split) at every
    rate of the grid."""
    snr = tuning_snr_db(config) if config.tuning is not None else None

    def extra(m: MethodSpec, r_max: int) -> dict:
        cell: dict = {"snr_db": snr}
        if m.method in TRAINED:
            cell["policy"] = policy_id(m.name, r_max, config.seeds[0])
        return cell

    return _tuning_cells(config, extra)


def _plan_online(config: SweepConfig) -> list[list[dict]]:
    """Online runs, after the tuning runs of their (method, r_max) when the sweep tunes."""
    tunes, grids = _tuning_cells(config, lambda m, r_max: {})
    runs = []
    for r_max in config.r_max:
        for m in config.methods:
            grid = grids.get((m.name, r_max), [])
            for seed in config.seeds:
                cell = {
                    "kind": "online",
                    "id": online_id(m.name, r_max, seed),
                    "name": m.name,
                    "r_max": r_max,
                    "seed": seed,
                }
                if grid:
                    cell["tuning"] = grid
                runs.append(cell)
    # Evaluation runs in the order the report reads them: r_max, seed, method.
    runs.sort(key=lambda c: (config.r_max.index(c["r_max"]), config.seeds.index(c["seed"])))
    return [tunes, runs] if tunes else [runs]
