"""The online formulation: the Shannon cost, violated steps, determinism, the command."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from airlora.cli import app
from airlora.config import RunConfig
from airlora.link import ShannonCost
from airlora.link.slot import SlotCost
from conftest import tiny_task_sections

runner = CliRunner()


def test_shannon_cost_is_the_formula():
    cost = ShannonCost(bandwidth_hz=1e8, slot_s=1.0, bits_per_param=32)
    for params, snr_db in [(1, -5.0), (71_168, 0.0), (884_880 * 8, 10.0), (10**9, 15.0)]:
        expected = params * 32 / (1e8 * math.log2(1 + 10 ** (snr_db / 10)) * 1.0)
        assert cost.cost(params, snr_db) == pytest.approx(expected, rel=1e-12, abs=1e-9)
    # OPT-1.3B, every adapter at rank 8 (r(d_in + d_out + 1) per projection) at 10 dB: C 0.655
    assert cost.cost(8 * 110_592 + 8 * 774_288, 10.0) == pytest.approx(0.6547, abs=1e-3)
    n = cost.max_params(5.0)
    assert cost.cost(n, 5.0) <= 1.0 < cost.cost(n + 1, 5.0)


def _config(model_dir, data_dir, tmp_path, **online) -> RunConfig:
    return RunConfig.model_validate(
        {
            **tiny_task_sections(model_dir, data_dir),
            "method": "lora",
            "formulation": "online",
            "link": {"scheme": "shannon"},
            "train": {"warmup_steps": 0, "learning_rate": 1e-2, "threads": 1},
            "online": {"steps": 12, "episode_steps": 4, "validate_every": 5, **online},
            "out_dir": str(tmp_path / "runs"),
        }
    )


def _sweep_body(model_dir, data_dir, name, online, methods, seeds, **extra) -> dict:
    """An online sweep over the tiny task at r_max 2, 50 kHz (one method entry per name)."""
    return {
        **tiny_task_sections(model_dir, data_dir),
        "name": name,
        "formulation": "online",
        "train": {"warmup_steps": 0, "learning_rate": 1e-2, "threads": 1},
        "link": {"scheme": "shannon"},
        "online": {**online, "bandwidth_hz": 5e4},
        "methods": [{"name": m, "method": m} for m in methods],
        "r_max": [2],
        "seeds": seeds,
        "workers": 1,
        "threads_per_worker": 1,
        **extra,
    }


def test_a_violated_step_trains_nothing_and_pays_the_penalty(
    tiny_model_dir, tiny_data_dir, tmp_path
):
    from airlora.online import build_online_env

    # 1 kHz: even rank 1 everywhere overflows the slot; 1 GHz: everything fits.
    env = build_online_env(_config(tiny_model_dir, tiny_data_dir, tmp_path, bandwidth_hz=1e3))
    obs, _ = env.reset(seed=0)
    assert obs.shape == (4 + len(env.projection_names),) and env.observation_space.contains(obs)
    before = {k: v.clone() for k, v in env.engine.server.snapshot().items()}
    batch = env._batch.copy()
    ranks = np.full(len(env.projection_names), 2)
    snr = env._snr_db
    _, reward, _, _, info = env.step(ranks)
    cost = env.cost_model.cost(env.payload_params([2] * len(ranks)), snr)
    assert info["violated"] and cost > 1 and info["train_loss"] is None
    assert reward == pytest.approx(-10 * cost - 0.1 * cost)
    after = env.engine.server.snapshot()
    assert all(torch.equal(before[k], after[k]) for k in before)  # every weight unchanged
    assert np.array_equal(env._batch, batch)  # the batch waits for a step that trains
    assert env.engine.steps_done == 0

    env.cost_model = ShannonCost(1e9, 1.0, 32)
    snr = env._snr_db
    _, reward, _, _, info = env.step(ranks)
    assert not info["violated"] and env.engine.steps_done == 1
    assert reward == pytest.approx(-info["train_loss"] - 0.1 * info["cost"])
    assert info["cost"] == pytest.approx(env.cost_model.cost(info["payload_params"], snr))
    after = env.engine.server.snapshot()
    assert not all(torch.equal(before[k], after[k]) for k in before)


def test_dropout_is_paired_whatever_a_policy_draws(tiny_model_dir, tiny_data_dir, tmp_path):
    from airlora.online import build_online_env

    losses = []
    for draws in (0, 1000):
        env = build_online_env(_config(tiny_model_dir, tiny_data_dir, tmp_path, bandwidth_hz=1e9))
        env.reset(seed=0)
        assert env.engine.server.peft_model.config.hidden_dropout_prob > 0
        torch.rand(draws)  # a policy sampling its actions from torch's global generator
        ranks = np.full(len(env.projection_names), 2)
        losses.append([env.step(ranks)[4]["train_loss"] for _ in range(3)])
    assert losses[0] == losses[1]


def test_the_heuristic_takes_the_largest_rank_that_fits(tiny_model_dir, tiny_data_dir, tmp_path):
    from airlora.online import build_online_env

    env = build_online_env(_config(tiny_model_dir, tiny_data_dir, tmp_path, bandwidth_hz=1e3))
    env.reset(seed=0)
    m = len(env.projection_names)
    for snr in (-5.0, 15.0):
        env._snr_db = snr
        r = env.largest_uniform_rank()
        fits = env.cost_model.cost(env.payload_params([r] * m), snr) <= 1
        above = r < env.r_max and env.cost_model.cost(env.payload_params([r + 1] * m), snr) <= 1
        assert (fits or r == env.min_rank) and not above


def test_the_oracle_fills_the_slot(tiny_model_dir, tiny_data_dir, tmp_path):
    from airlora.online import build_online_env

    env = build_online_env(_config(tiny_model_dir, tiny_data_dir, tmp_path, bandwidth_hz=5e4))
    env.reset(seed=0)
    m = len(env.projection_names)

    def fits(ranks, snr):
        return env.cost_model.cost(env.payload_params(ranks), snr) <= 1

    filled_beyond_uniform = False
    for snr in (-5.0, 0.0, 5.0, 10.0, 15.0, 40.0):
        ranks = env.slot_filling_ranks(snr)
        uniform = env.largest_uniform_rank(snr)
        assert min(ranks) == uniform and max(ranks) <= env.r_max
        if not fits([env.min_rank] * m, snr):
            continue
        assert fits(ranks, snr)
        for i in range(m):  # no single added rank fits
            more = list(ranks)
            more[i] += 1
            assert more[i] > env.r_max or not fits(more, snr)
        filled_beyond_uniform |= sum(ranks) > uniform * m
    assert filled_beyond_uniform  # somewhere the slot holds more than the uniform rank


def test_oracle_is_online_only(tiny_model_dir, tiny_data_dir):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=r"oracle .* online formulation only"):
        RunConfig.model_validate(
            {**tiny_task_sections(tiny_model_dir, tiny_data_dir), "method": "oracle"}
        )


@pytest.mark.parametrize("method", ["lora", "heuristic", "oracle", "airllm"])
def test_same_seed_same_online_run(method, tiny_model_dir, tiny_data_dir, tmp_path):
    from airlora.online import run_online

    base = _config(tiny_model_dir, tiny_data_dir, tmp_path, bandwidth_hz=5e4)
    base = base.model_copy(update={"method": method})
    a_dir, a_rows, a = run_online(base.model_copy(update={"run_name": "a"}))
    _, b_rows, b = run_online(base.model_copy(update={"run_name": "b"}))
    assert a_rows == b_rows and a == b
    shared = {"diverged", "final_accuracy", "mean_accuracy", "episode_return", "mean_rank"}
    shared |= {"total_payload_params", "total_airtime_s", "training_steps", "test_accuracy"}
    assert shared <= set(a)  # the keys of every episode summary
    if method in ("lora", "heuristic"):  # uniform ranks: nothing spread within a group
        assert a["group_rank_spread"] == 0.0
    assert a["training_steps"] == round(12 * (1 - a["violation_fraction"]))
    assert a["steps"] == 12 and 0.0 <= a["violation_fraction"] <= 1.0
    assert [v[0] for v in a["validations"]] == [5, 10, 12]
    assert (a_dir / "adapter" / "adapter_config.json").is_file()
    assert len((a_dir / "metrics.jsonl").read_text().splitlines()) == 12


def test_run_formulation_online_json(tiny_model_dir, tiny_data_dir, tmp_path):
    config = _config(tiny_model_dir, tiny_data_dir, tmp_path)
    path = tmp_path / "online.yaml"
    import yaml

    body = config.model_dump(mode="json")
    for key in ("formulation", "link", "online", "method"):
        body.pop(key)
    path.write_text(yaml.safe_dump(body))
    args = ["run", "--config", str(path), "--formulation", "online", "--method", "airllm"]
    args += ["--link", "shannon", "--steps", "8", "--seed", "0", "--json", "--quiet"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, (result.output, result.exception)
    summary = json.loads(result.stdout)
    assert {"test_accuracy", "mean_params_per_step", "violation_fraction", "steps"} <= set(summary)
    assert summary["steps"] == 8 and 0 <= summary["test_accuracy"] <= 1


def test_online_needs_a_link_that_prices_a_step():
    with pytest.raises(ValueError, match=r"shannon .*digital, coded or analog"):
        RunConfig(formulation="online", link={"scheme": "perfect"})
    result = runner.invoke(app, ["run", "--link", "shannon", "--quiet"])
    assert result.exit_code == 2 and "--formulation online" in result.stderr


def test_an_online_sweep_runs_resumes_and_reports_paired_comparisons(
    tiny_model_dir, tiny_data_dir, tmp_path
):
    import pandas as pd
    import yaml

    from airlora.config import SweepConfig
    from airlora.sweep import plan

    body = _sweep_body(
        tiny_model_dir,
        tiny_data_dir,
        "online",
        {"steps": 8, "episode_steps": 4, "validate_every": 4},
        ["airllm", "lora", "heuristic"],
        seeds=[0, 1, 2],
    )
    path = tmp_path / "online.yaml"
    path.write_text(yaml.safe_dump(body))
    config = SweepConfig.model_validate(body)
    assert [c["id"] for c in plan(config)[0]][:2] == ["online-airllm-r2-s0", "online-lora-r2-s0"]
    out = tmp_path / "sweep"
    result = runner.invoke(app, ["sweep", str(path), "--out", str(out), "--quiet"])
    assert result.exit_code == 0, (result.output, result.exception)
    table = pd.read_csv(out / "results.csv")
    assert len(table) == 9 and table["test_accuracy"].between(0, 1).all()
    result = runner.invoke(app, ["report", str(out)])
    assert result.exit_code == 0, (result.output, result.exception)
    report = (out / "report.md").read_text()
    assert "Paired comparisons against airllm" in report and "MDD" in report
    comparisons = pd.read_csv(out / "report" / "comparisons.csv")
    assert set(comparisons.method) == {"lora", "heuristic"} and (comparisons.n == 3).all()
    for figure in ("online_pareto", "online_returns", "online_rank_by_snr"):
        assert (out / "report" / f"{figure}.png").stat().st_size > 1000
    summary = pd.read_csv(out / "report" / "summary.csv")
    assert {"steps_to_95", "projected_fraction"} <= set(summary.columns)
    ranks = pd.read_csv(out / "report" / "rank_by_snr.csv")
    heuristic = ranks[ranks.name == "heuristic"].sort_values("snr_db")
    assert heuristic.mean_rank.is_monotonic_increasing  # the heuristic follows the channel
    assert "test accuracy" in result.output  # the printed headline of an online sweep


def test_adalora_runs_online_with_its_own_ranks_priced(tiny_model_dir, tiny_data_dir, tmp_path):
    from airlora.online import run_online

    config = _config(tiny_model_dir, tiny_data_dir, tmp_path, bandwidth_hz=5e4)
    config = RunConfig.model_validate(
        {
            **config.model_dump(mode="json"),
            "method": "adalora",
            "model": {**config.model.model_dump(mode="json"), "adalora": {"target_rank": 1}},
        }
    )
    _, rows, summary = run_online(config)
    assert summary["steps"] == 12 and 0 <= summary["test_accuracy"] <= 1
    sums = [sum(r["rank_vector"]) for r in rows]
    assert sums[-1] < sums[0]  # PEFT's schedule pruned, and the pruned ranks were priced
    for r in rows:
        assert r["cost"] == pytest.approx(
            ShannonCost(5e4, 1.0, 32).cost(r["payload_params"], r["snr_db"])
        )


def test_rank_levels():
    from airlora.env.online import rank_levels

    assert rank_levels(1, 64, "log2") == (1, 2, 4, 8, 16, 32, 64)
    assert rank_levels(1, 12, "log2") == (1, 2, 4, 8, 12)
    assert rank_levels(0, 8, "log2") == (0, 1, 2, 4, 8)
    assert rank_levels(3, 4, "log2") == (3, 4)
    assert rank_levels(1, 4, "linear") == (1, 2, 3, 4)
    with pytest.raises(ValueError, match="rank_levels"):
        rank_levels(1, 4, "cubic")


def test_learned_policies_choose_among_log2_levels(tiny_model_dir, tiny_data_dir, tmp_path):
    from airlora.online import build_online_env, run_online
    from airlora.policies import ActionLayout

    # r_max 8: levels 1, 2, 4, 8; the action is an index into them.
    config = _config(tiny_model_dir, tiny_data_dir, tmp_path, bandwidth_hz=1e9, rank_levels="log2")
    config = RunConfig.model_validate(
        {
            **config.model_dump(mode="json"),
            "method": "airllm",
            "model": {**config.model.model_dump(mode="json"), "r_max": 8},
        }
    )
    env = build_online_env(config)
    assert env.rank_levels == (1, 2, 4, 8) and set(env.action_space.nvec) == {4}
    assert ActionLayout.of_env(env).r_max == 3
    assert env.decode(np.array([0, 1, 2, 3, 7])) == [1, 2, 4, 8, 8]
    _, rows, _ = run_online(config)
    played = {r for row in rows for r in row["rank_vector"]}
    assert played <= {1, 2, 4, 8} and len(played) > 1


def test_adalora_link_budget_fits_where_r_max_never_does(tiny_model_dir, tiny_data_dir, tmp_path):
    from airlora.online import adalora_link_budget, build_online_env, run_online

    def adalora(budget: str, bandwidth_hz: float) -> RunConfig:
        config = _config(
            tiny_model_dir,
            tiny_data_dir,
            tmp_path,
            bandwidth_hz=bandwidth_hz,
            adalora_budget=budget,
            snr_levels_db=[0.0, 10.0],
        )
        return RunConfig.model_validate({**config.model_dump(mode="json"), "method": "adalora"})

    # A bandwidth at which rank 2 everywhere just fits at 10 dB, rank 4 (r_max) nowhere.
    probe = build_online_env(adalora("r_max", 1e9))
    m = len(probe.projection_names)
    per_rank = probe.payload_params([1] * m)  # the payload is linear in the rank
    bandwidth = 2 * per_rank * 32 / math.log2(1 + 10.0) * 1.0001
    env = build_online_env(adalora("r_max", bandwidth))
    assert [env.largest_uniform_rank(s) for s in (0.0, 10.0)] == [1, 2]
    # target: mean 1.5 -> 2; start 1.5 x 2 = 3 fits nowhere -> 2, so the target drops to 1
    assert adalora_link_budget(env) == (2, 1)
    _, _, at_r_max = run_online(adalora("r_max", bandwidth).model_copy(update={"run_name": "a"}))
    assert at_r_max["violation_fraction"] == 1.0  # rank 4 never fits: AdaLoRA never trains
    _, _, linked = run_online(adalora("link", bandwidth).model_copy(update={"run_name": "b"}))
    assert linked["adalora_start_rank"] == 2 and linked["adalora_target_rank"] == 1
    assert linked["violation_fraction"] < 1.0


def test_projection_scales_an_overflowing_rank_vector_into_the_slot(
    tiny_model_dir, tiny_data_dir, tmp_path
):
    from airlora.online import build_online_env, run_online

    config = _config(tiny_model_dir, tiny_data_dir, tmp_path, constraint="project")
    env = build_online_env(config)
    env.reset(seed=0)
    m = len(env.projection_names)
    per_rank = env.payload_params([1] * m)
    # Rank 3 everywhere just fits at this SNR (the tiny BERT's projections are all alike).
    env._snr_db = 10.0
    env.cost_model = ShannonCost(3 * per_rank * 32 / math.log2(11.0) * 1.0001, 1.0, 32)
    # Above min_rank (1) the proposal asks 3 and 2 (mean 2.5), the slot has room for 2:
    # scaled by 0.8 and floored, 1 + floor(2.4) and 1 + floor(1.6).
    proposed = [4] * (m // 2) + [3] * (m - m // 2)
    assert env.cost_model.cost(env.payload_params(proposed), 10.0) > 1
    ranks = env.project(proposed)
    assert env.cost_model.cost(env.payload_params(ranks), 10.0) <= 1
    assert ranks == [3] * (m // 2) + [2] * (m - m // 2)
    # A proposal with r_max on one projection and min_rank elsewhere still fits once projected.
    lopsided = [4] + [1] * (m - 1)
    env.cost_model = ShannonCost(1.5 * per_rank * 32 / math.log2(11.0), 1.0, 32)
    assert env.cost_model.cost(env.payload_params(env.project(lopsided)), 10.0) <= 1
    env.cost_model = ShannonCost(3 * per_rank * 32 / math.log2(11.0) * 1.0001, 1.0, 32)
    _, reward, _, _, info = env.step_ranks(proposed)
    assert info["projected"] and not info["violated"] and info["rank_vector"] == ranks
    assert env.engine.steps_done == 1 and reward == pytest.approx(
        -info["train_loss"] - 0.1 * info["cost"]
    )
    # A whole run at r_max: every overflowing step is projected and trains.
    lora = _config(tiny_model_dir, tiny_data_dir, tmp_path, constraint="project", bandwidth_hz=5e4)
    _, rows, summary = run_online(lora)
    assert summary["violation_fraction"] == 0.0 and summary["projected_fraction"] > 0
    assert all(r["cost"] <= 1 for r in rows)


def test_steps_to_95_percent_of_the_final_return():
    from airlora.online_report import steps_to_fraction

    # From -10 to a final -1 (mean of the last two): 95 % of the way is -1.45, first met by
    # the fourth episode of 15 steps.
    assert steps_to_fraction([-10.0, -5.0, -2.0, -1.4, -1.0, -1.0], 15) == 60.0
    assert steps_to_fraction([-10.0, -1.0, -1.0], 15) == 30.0
    assert math.isnan(steps_to_fraction([-1.0, -2.0, -3.0], 15))  # no improvement
    assert math.isnan(steps_to_fraction([-1.0], 15))


def test_an_online_sweep_tunes_every_method_on_the_same_grid(
    tiny_model_dir, tiny_data_dir, tmp_path
):
    import pandas as pd
    import yaml

    from airlora.config import SweepConfig
    from airlora.sweep import plan

    body = _sweep_body(
        tiny_model_dir,
        tiny_data_dir,
        "tuned",
        {"steps": 6, "episode_steps": 3, "validate_every": 3},
        ["lora", "heuristic"],
        seeds=[0],
        tuning={"learning_rates": [1e-4, 3e-2], "seeds": [7]},
    )
    with pytest.raises(ValueError, match="also evaluation seeds"):
        SweepConfig.model_validate({**body, "tuning": {"learning_rates": [1e-3], "seeds": [0]}})
    stages = plan(SweepConfig.model_validate(body))
    assert [len(s) for s in stages] == [4, 2]  # 2 methods x 2 rates, then 2 evaluation runs
    path = tmp_path / "tuned.yaml"
    path.write_text(yaml.safe_dump(body))
    out = tmp_path / "sweep"
    result = runner.invoke(app, ["sweep", str(path), "--out", str(out), "--quiet"])
    assert result.exit_code == 0, (result.output, result.exception)
    tunes = {
        p.parent.name: json.loads(p.read_text()) for p in (out / "cells").glob("tune-*/result.json")
    }
    assert len(tunes) == 4 and all(t["test_accuracy"] is None for t in tunes.values())
    for cell in (out / "cells").glob("tune-*"):  # the head's rate keeps its ratio (4e-3 / 1e-2)
        train = yaml.safe_load((cell / "config.yaml").read_text())["train"]
        assert train["head_learning_rate"] == pytest.approx(0.4 * train["learning_rate"])
    table = pd.read_csv(out / "results.csv")
    assert len(table) == 2  # tuning runs are not results
    for name in ("lora", "heuristic"):
        scores = {
            t["learning_rate"]: t["best_validation_accuracy"]
            for t in tunes.values()
            if t["name"] == name
        }
        best = max(scores, key=lambda lr: (scores[lr], -[1e-4, 3e-2].index(lr)))
        assert table[table.name == name].learning_rate.item() == best
    assert runner.invoke(app, ["report", str(out)]).exit_code == 0
    report = (out / "report.md").read_text()
    assert "Learning-rate tuning" in report
    tuning = pd.read_csv(out / "report" / "tuning.csv")
    assert len(tuning) == 4 and tuning.chosen.sum() == 2
    assert (out / "report" / "online_tuning.png").is_file() and "online_tuning" in report
    for row in tuning[tuning.chosen].itertuples():  # the rate marked is the rate used
        assert table[table.name == row.name].learning_rate.item() == row.learning_rate
    with pytest.raises(ValueError, match="6 significant digits"):
        SweepConfig.model_validate({**body, "tuning": {"learning_rates": [1e-4, 1.0000001e-4]}})


def test_run_takes_the_online_options_from_the_command_line(
    tiny_model_dir, tiny_data_dir, tmp_path
):
    import yaml

    body = _config(tiny_model_dir, tiny_data_dir, tmp_path).model_dump(mode="json")
    for key in ("formulation", "link", "online", "method"):
        body.pop(key)
    path = tmp_path / "base.yaml"
    path.write_text(yaml.safe_dump(body))
    body["online"] = {"bandwidth_hz": 5e4, "episode_steps": 4, "validate_every": 4}
    path.write_text(yaml.safe_dump(body))  # 50 kHz: rank 1 always fits, r_max below 15 dB not
    args = ["run", "--config", str(path), "--formulation", "online", "--link", "shannon"]
    args += ["--method", "lora", "--steps", "6", "--constraint", "project"]
    args += ["--rank-levels", "log2", "--adapter", "svd", "--json", "--quiet"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, (result.output, result.exception)
    summary = json.loads(result.stdout)
    assert summary["violation_fraction"] == 0.0 and summary["projected_fraction"] > 0
    run_dir = next((tmp_path / "runs").iterdir())
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["online"]["constraint"] == "project" and saved["model"]["adapter"] == "svd"
    assert saved["online"]["rank_levels"] == "log2"
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all(row["cost"] <= 1 for row in rows)
    assert all(max(row["rank_vector"]) < 4 for row in rows if row["projected"])
    bad = runner.invoke(app, [*args[:-4], "--constraint", "squeeze", "--quiet"])
    assert bad.exit_code == 2 and "online.constraint" in bad.stderr


@pytest.mark.parametrize(
    "cell_id, parts",
    [
        ("online-airllm-coarse-r64-s3", {"kind": "online", "name": "airllm-coarse", "r_max": 64}),
        ("tune-lora-r2-r8-lr0.003-s1000", {"kind": "tune", "name": "lora-r2", "r_max": 8}),
        ("eval-lora-r2-r8-snr-5-s1", {"kind": "eval", "name": "lora-r2", "snr_db": -5.0}),
        ("rounds-r8-s2", {"kind": "rounds", "r_max": 8, "seed": 2}),
    ],
)
def test_cell_ids_read_back(cell_id, parts):
    from airlora.sweep import parse_cell_id

    parsed = parse_cell_id(cell_id)
    assert parts.items() <= parsed.items()
    if parsed["kind"] == "tune":
        assert parsed["learning_rate"] == 0.003 and parsed["seed"] == 1000


def test_the_no_complexity_ablation_zeroes_entropy_and_oov(tiny_model_dir, tiny_data_dir, tmp_path):
    from airlora.online import build_online_env

    config = _config(tiny_model_dir, tiny_data_dir, tmp_path)
    with_features, _ = build_online_env(config).reset(seed=0)
    ablated = config.model_copy(
        update={"env": config.env.model_copy(update={"use_complexity": False})}
    )
    without, _ = build_online_env(ablated).reset(seed=0)
    assert with_features[2] > 0 and without[2] == 0 and without[3] == 0
    assert np.array_equal(np.delete(with_features, [2, 3]), np.delete(without, [2, 3]))


@pytest.mark.parametrize("scheme", ["digital", "coded", "analog"])
def test_link_airtime_is_the_first_transmission(scheme):
    from airlora.config import LinkConfig
    from airlora.link import build_link

    config = LinkConfig(scheme=scheme, modulation="16qam", packet_bits=1024, bandwidth_hz=1e6)
    link = build_link(config, seed=0)
    tensors = {"a": torch.randn(3000), "b": torch.randn(17, 5)}
    _, report = link.transmit(tensors, 12.0)
    control = report.extra.get("control_symbols", 0)
    data_s = (report.symbols - control) / 1e6
    assert link.airtime_s(3000 + 85, 12.0) == pytest.approx(data_s, rel=1e-12)
    if scheme == "digital":  # adaptive modulation: a better channel carries more bits/symbol
        adaptive = build_link(config.model_copy(update={"modulation": "adaptive"}))
        assert adaptive.airtime_s(10_000, 25.0) < adaptive.airtime_s(10_000, 5.0)


def test_online_on_a_digital_link_prices_airtime_and_feeds_the_edge(
    tiny_model_dir, tiny_data_dir, tmp_path
):
    from airlora.online import build_online_env, run_online

    def config(modulation, snr_levels, bandwidth):
        base = _config(
            tiny_model_dir,
            tiny_data_dir,
            tmp_path,
            bandwidth_hz=bandwidth,
            snr_levels_db=snr_levels,
            validate_every=100,
        )
        link = {"scheme": "digital", "modulation": modulation, "packet_bits": 256}
        return RunConfig.model_validate(
            {**base.model_dump(mode="json"), "method": "heuristic", "link": link}
        )

    # The cost is the airtime of the payload over the slot, on the link the run builds; a step
    # that overflows sends nothing, one that fits trains and sends its adapter to the edge.
    env = build_online_env(config("bpsk", [10.0], 2e5))
    assert env.engine.link.config.deadline_s is None and env.engine.link.config.bandwidth_hz == 2e5
    env.reset(seed=0)
    m = len(env.projection_names)
    full = env.payload_params([env.r_max] * m)
    env.cost_model = SlotCost(env.engine.link, env.engine.link.airtime_s(full, 10.0) / 2)
    _, _, _, _, info = env.step_ranks([env.r_max] * m)  # twice the (halved) slot
    assert info["violated"] and info["cost"] == pytest.approx(2.0) and "airtime_s" not in info
    _, _, _, _, info = env.step_ranks([1] * m)
    params = env.payload_params([1] * m)
    assert not info["violated"] and info["sent_params"] == params
    data_s = env.engine.link.airtime_s(params, 10.0)
    assert info["cost"] == pytest.approx(data_s / env.cost_model.slot_s)
    assert info["airtime_s"] > data_s  # the head and side information travel as control data
    server = env.engine.server.active_tensors()
    edge = env.engine.edge.active_tensors()
    assert info["erasures"] == 0  # BPSK at 10 dB: BER 4e-6
    for name in server:  # what arrived is the server's adapter, 8-bit quantised
        scale = float(server[name].abs().max()) or 1.0
        assert torch.allclose(edge[name], server[name], atol=scale / 100), name
    del env

    # A clean channel: everything arrives. 64-QAM at -5 dB: CRC drops nearly every packet.
    _, clean_rows, clean = run_online(
        config("bpsk", [30.0], 2e5).model_copy(update={"run_name": "c"})
    )
    _, lossy_rows, lossy = run_online(
        config("64qam", [-5.0], 2e7).model_copy(update={"run_name": "l"})
    )
    for rows, summary in ((clean_rows, clean), (lossy_rows, lossy)):
        sent = [r for r in rows if not r["violated"]]
        assert sent and all("airtime_s" in r for r in sent)
        assert not any("airtime_s" in r for r in rows if r["violated"])
        assert summary["total_airtime_s"] == pytest.approx(sum(r["airtime_s"] for r in sent))
        assert 0.0 <= summary["edge_test_accuracy"] <= 1.0
    assert clean["erasures"] == 0 and clean["erased_fraction"] == 0.0
    assert lossy["erasures"] > 0 and lossy["erased_fraction"] > 0.5
    # The edge's copy is the server's last state (quantised): it scores alike.
    assert clean["edge_test_accuracy"] == pytest.approx(clean["test_accuracy"], abs=0.1)


def test_an_online_sweep_on_a_digital_link_reports_the_edge(
    tiny_model_dir, tiny_data_dir, tmp_path
):
    import pandas as pd
    import yaml

    body = _sweep_body(
        tiny_model_dir,
        tiny_data_dir,
        "digital",
        {"steps": 4, "episode_steps": 2, "validate_every": 4, "snr_levels_db": [0.0, 20.0]},
        ["heuristic", "oracle"],
        seeds=[0, 1],
    )
    body["link"] = {"scheme": "digital", "modulation": "16qam", "packet_bits": 256}
    path = tmp_path / "digital.yaml"
    path.write_text(yaml.safe_dump(body))
    out = tmp_path / "sweep"
    result = runner.invoke(app, ["sweep", str(path), "--out", str(out), "--quiet"])
    assert result.exit_code == 0, (result.output, result.exception)
    table = pd.read_csv(out / "results.csv")
    assert (
        table.edge_test_accuracy.between(0, 1).all() and table.erased_fraction.between(0, 1).all()
    )
    assert runner.invoke(app, ["report", str(out)]).exit_code == 0
    report = (out / "report.md").read_text()
    assert "simulated digital link" in report and "edge test accuracy" in report
