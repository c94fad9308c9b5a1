"""`airlora run` for every method, and sweeps (atomic cells, resume after a kill)."""

from __future__ import annotations

import json

import pytest
import yaml
from typer.testing import CliRunner

from airlora.cli import app
from airlora.config import AirLLMConfig, EnvConfig, LinkConfig, PPOConfig
from airlora.env.real import RankSelectionEnv
from airlora.policies import ActionLayout, make_policy

runner = CliRunner()


def _base(cfg, tmp_path) -> dict:
    return {
        "data": cfg.data.model_dump(mode="json"),
        "model": cfg.model.model_dump(mode="json"),
        "train": {"rounds": 2, "steps_per_round": 2, "warmup_steps": 0},
        "link": {"scheme": "analog", "snr_process": "fixed", "snr_db": 10.0},
        "out_dir": str(tmp_path / "runs"),
    }


@pytest.fixture
def saved_airllm(tiny_finetune_config, tmp_path):
    cfg = tiny_finetune_config
    env = RankSelectionEnv.build(cfg.data, cfg.model, cfg.train, LinkConfig(), EnvConfig())
    policy = make_policy(
        "airllm",
        ActionLayout.of_env(env),
        0,
        PPOConfig(n_steps=8, n_envs=1, batch_size=8),
        AirLLMConfig(warm_start_updates=10),
    )
    return policy.save(tmp_path / "policy")


@pytest.mark.parametrize("method", ["lora", "adalora", "random", "heuristic", "airllm"])
def test_run_every_method_writes_its_folder(method, tiny_finetune_config, tmp_path, saved_airllm):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(_base(tiny_finetune_config, tmp_path)))
    args = ["run", "--config", str(config), "--method", method, "--run-name", method, "--quiet"]
    if method == "airllm":
        args += ["--policy", str(saved_airllm)]
    if method == "lora":
        args += ["--rank", "2"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    run = tmp_path / "runs" / method
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2
    for row in rows:
        assert row["method"] == method and row["snr_db"] == 10.0
        assert row["latency_s"] >= row["train_time_s"] + row["airtime_s"]
        assert row["link"]["scheme"] == "analog"
    if method == "lora":
        assert all(set(r["rank_vector"]) == {2} for r in rows)
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["status"] == "completed"
    assert (run / "adapter").is_dir()


def test_run_rejects_bad_input_before_writing(tiny_finetune_config, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(_base(tiny_finetune_config, tmp_path)))
    cases = [
        (["--method", "airllm"], "policy"),
        (["--method", "lora", "--rank", "9"], "exceeds"),
        (["--method", "bogus"], "method"),
        (["--method", "ppo", "--policy", str(tmp_path / "none")], "policy.json"),
    ]
    for extra, message in cases:
        result = runner.invoke(app, ["run", "--config", str(config), *extra, "--run-name", "x"])
        assert result.exit_code == 2, result.output
        assert message in result.output
    assert not (tmp_path / "runs" / "x").exists()


# ----------------------------------------------------------------------------- sweeps


def _sweep_file(cfg, tmp_path, workers=2, **extra) -> tuple:
    body = {
        **_base(cfg, tmp_path),
        "name": "tiny",
        "link": {"scheme": "analog", "snr_process": "fixed"},
        "ppo": {"n_steps": 8, "n_envs": 1, "batch_size": 8, "n_epochs": 1},
        "airllm": {"warm_start_updates": 5, "updates_per_phase": 5},
        "surrogate": {"real_episodes": 3, "min_r2": None},
        "total_steps": 16,
        "methods": [
            {"name": "airllm", "method": "airllm"},
            {"name": "lora", "method": "lora"},
            {"name": "heuristic", "method": "heuristic"},
        ],
        "r_max": [4],
        "snr_db": [0.0, 20.0],
        "seeds": [0, 1],
        "workers": workers,
        "threads_per_worker": 1,
        **extra,
    }
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(body))
    return path, tmp_path / "sweep-out"


def test_sweep_resumes_after_a_kill_without_redoing_or_losing_cells(tiny_finetune_config, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    from airlora.config import SweepConfig, load_config
    from airlora.sweep import plan

    path, out = _sweep_file(tiny_finetune_config, tmp_path)
    cmd = [
        sys.executable,
        "-c",
        "from airlora.cli import app; app()",
        "sweep",
        str(path),
        "--out",
        str(out),
        "--quiet",
    ]
    proc = subprocess.Popen(
        cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    cells = out / "cells"
    deadline = time.time() + 240
    try:
        while time.time() < deadline:
            finished = [p for p in cells.glob("eval-*")] if cells.exists() else []
            if len(finished) >= 2 or proc.poll() is not None:
                break
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    before = {p.name: (p / "result.json").read_text() for p in cells.glob("eval-*")}
    assert before, "the sweep was killed before any evaluation cell finished"

    result = runner.invoke(app, ["sweep", str(path), "--out", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    config = load_config(out / "sweep.yaml", SweepConfig)
    planned = {c["id"] for stage in plan(config) for c in stage}
    present = {p.name for p in cells.iterdir()}
    assert present == planned  # nothing missing, no temporary folder left
    for name, text in before.items():  # finished cells were not recomputed
        assert (cells / name / "result.json").read_text() == text
    import pandas as pd

    table = pd.read_csv(out / "results.csv")
    assert len(table) == 3 * 2 * 2 and table["cell"].is_unique
    assert pd.read_parquet(out / "results.parquet")["cell"].tolist() == table["cell"].tolist()
    assert set(table["name"]) == {"airllm", "lora", "heuristic"}
    assert table["config_hash"].notna().all()

    # The report of the finished sweep: figures in both formats, tables with CIs and p-values.
    result = runner.invoke(app, ["report", str(out)])
    assert result.exit_code == 0, result.output
    assert "Per method" in result.output
    report = (out / "report.md").read_text()
    for stem in ("accuracy_vs_snr", "payload_vs_snr", "pareto", "convergence", "rank_heatmap"):
        assert (out / "report" / f"{stem}.png").stat().st_size > 1000
        assert (out / "report" / f"{stem}.pdf").is_file()
        assert f"report/{stem}.png" in report
    assert "p vs airllm" in report and "±" in report and "Code revision" in report
    assert "Paired comparisons against airllm" in report and "MDD" in report
    comparisons = pd.read_csv(out / "report" / "comparisons.csv")
    assert set(comparisons.method) == {"lora", "heuristic"}
    assert (comparisons.n == 4).all()  # paired on 2 SNRs x 2 seeds
    summary = pd.read_csv(out / "report" / "summary.csv")
    p = summary[summary.method != "airllm"].p_vs_airllm
    assert ((p >= 0) & (p <= 1) | p.isna()).all()  # the numbers: see the test below
    assert summary[summary.method == "airllm"].p_vs_airllm.isna().all()


def test_a_round_sweep_tunes_every_method_on_validation_and_scores_the_test_split(
    tiny_finetune_config, tmp_path
):
    import pandas as pd

    from airlora.config import SweepConfig, load_config
    from airlora.sweep import plan

    rates = [1e-4, 5e-2]
    path, out = _sweep_file(
        tiny_finetune_config,
        tmp_path,
        workers=1,
        snr_db=[20.0, 0.0, 10.0],
        seeds=[0],
        tuning={"learning_rates": rates, "seeds": [7]},
    )
    config = load_config(path, SweepConfig)
    stages = plan(config)
    # rounds, policy, then 3 methods x 2 rates at the median SNR, then 3 x 3 evaluations.
    assert [len(s) for s in stages] == [1, 1, 6, 9]
    assert {c["snr_db"] for c in stages[2]} == {10.0}
    assert {c.get("policy") for c in stages[2] if c["name"] == "airllm"} == {"policy-airllm-r4-s0"}
    result = runner.invoke(app, ["sweep", str(path), "--out", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    tunes = [json.loads(p.read_text()) for p in (out / "cells").glob("tune-*/result.json")]
    assert len(tunes) == 6
    for t in tunes:  # scored on validation, never on the test split
        assert t["test_accuracy"] is None and 0 <= t["validation_accuracy"] <= 1
    table = pd.read_csv(out / "results.csv")
    assert len(table) == 9 and table.test_accuracy.between(0, 1).all()
    for name in ("airllm", "lora", "heuristic"):
        scores = {t["learning_rate"]: t["validation_accuracy"] for t in tunes if t["name"] == name}
        best = max(scores, key=lambda lr: (scores[lr], -rates.index(lr)))
        assert set(table[table.name == name].learning_rate) == {best}, name
    assert runner.invoke(app, ["report", str(out)]).exit_code == 0
    report = (out / "report.md").read_text()
    assert "Learning-rate tuning" in report and "10 dB, the median SNR" in report
    assert "test accuracy" in report and (out / "report" / "tuning.png").is_file()
    comparisons = pd.read_csv(out / "report" / "comparisons.csv")
    airllm = table[table.name == "airllm"].set_index(["snr_db", "seed"]).test_accuracy
    lora = table[table.name == "lora"].set_index(["snr_db", "seed"]).test_accuracy
    row = comparisons[comparisons.method == "lora"].iloc[0]
    assert row.mean_diff == pytest.approx((lora - airllm).mean())  # on the test split


def test_sweep_refuses_a_folder_of_another_configuration(tiny_finetune_config, tmp_path):
    path, out = _sweep_file(tiny_finetune_config, tmp_path, workers=1)
    out.mkdir()
    (out / "sweep.yaml").write_text(yaml.safe_dump({"methods": [{"name": "x", "method": "lora"}]}))
    result = runner.invoke(app, ["sweep", str(path), "--out", str(out), "--quiet"])
    assert result.exit_code == 2 and "another configuration" in result.output
    result = runner.invoke(app, ["sweep", "--preset", "nope"])
    assert result.exit_code == 2 and "unknown preset" in result.output


def test_confidence_interval_against_scipy():
    import numpy as np
    from scipy import stats

    from airlora.report import mean_ci

    x = np.array([0.80, 0.82, 0.85, 0.79])
    mean, half = mean_ci(x)
    lo, hi = stats.t.interval(0.95, len(x) - 1, loc=x.mean(), scale=stats.sem(x))
    assert mean == pytest.approx(x.mean()) and half == pytest.approx((hi - lo) / 2)
    assert np.isnan(mean_ci([0.8])[1])


def test_summary_table_tests_each_method_against_airllm_on_its_seeds():
    """Hand-made results with spread: every non-airllm row carries scipy's paired t-test
    p-value on exactly its own cell's seeds (paired by seed), and diverged episodes are left
    out."""
    import numpy as np
    import pandas as pd
    from scipy import stats

    from airlora.report import summary_table

    rng = np.random.default_rng(0)
    rows = []
    for name, shift in (("airllm", 0.0), ("lora", 0.05), ("heuristic", -0.1)):
        for snr in (0.0, 20.0):
            for seed in range(4):
                rows.append(
                    {
                        "name": name,
                        "method": name,
                        "r_max": 8,
                        "snr_db": snr,
                        "seed": seed,
                        "final_accuracy": 0.7 + shift + snr / 1000 + rng.normal(0, 0.02),
                        "mean_accuracy": 0.6,
                        "mean_payload_params": 1000.0,
                        "total_airtime_s": 0.1,
                        "mean_rank": 4.0,
                        "episode_return": 1.0,
                        "diverged": False,
                    }
                )
    rows.append({**rows[-1], "seed": 9, "final_accuracy": None, "diverged": True})
    table = pd.DataFrame(rows)
    summary = summary_table(table)
    for _, row in summary.iterrows():
        if row.method == "airllm":
            assert np.isnan(row.p_vs_airllm)
            continue
        mine = table[(table.name == row.method) & (table.snr_db == row.snr_db) & ~table.diverged]
        ref = table[(table.name == "airllm") & (table.snr_db == row.snr_db)]
        mine, ref = mine.sort_values("seed"), ref.sort_values("seed")
        assert mine.seed.tolist() == ref.seed.tolist()
        expected = stats.ttest_rel(mine.final_accuracy, ref.final_accuracy).pvalue
        assert row.p_vs_airllm == pytest.approx(expected) and row.seeds == 4
    assert summary[summary.method != "airllm"].p_vs_airllm.notna().all()
    assert summary.diverged.sum() == 1


def test_method_overrides_merge_into_nested_sections():
    from airlora.config import ModelConfig, TrainConfig
    from airlora.sweep.planning import merge_section as _merge

    model = _merge(ModelConfig(), {"adalora": {"orth_reg_weight": 0.0}, "r_max": 16})
    assert model.adalora.orth_reg_weight == 0.0 and model.adalora.tinit_fraction == 0.1
    assert model.r_max == 16
    train = _merge(TrainConfig(rounds=4), {"learning_rate": 0.01})
    assert train.rounds == 4 and train.learning_rate == 0.01


def test_every_shipped_preset_validates_and_plans():
    from airlora.config import SweepConfig
    from airlora.presets import list_presets, preset_mapping
    from airlora.sweep import plan

    names = [name for name, _ in list_presets()]
    presets = {"demo", "paper-cpu", "reference", "reference-cpu", "reference-cpu-ablations"}
    assert presets | {"reference-cpu-headline"} <= set(names)
    for name in names:
        config = SweepConfig.model_validate(preset_mapping(name))
        cells = [c for stage in plan(config) for c in stage]
        assert cells and len({c["id"] for c in cells}) == len(cells), name
    main = SweepConfig.model_validate(preset_mapping("reference-cpu"))
    # The ablations and the headline pair with reference-cpu: the same settings but the
    # methods, r_max and seeds (the headline's extend reference-cpu's); the headline's
    # tuning adds seeds to reference-cpu's on the same grid.
    strip = {"name", "methods", "r_max", "seeds", "tuning"}
    for name in ("reference-cpu-ablations", "reference-cpu-headline"):
        paired = SweepConfig.model_validate(preset_mapping(name))
        assert paired.model_dump(exclude=strip) == main.model_dump(exclude=strip), name
        assert set(main.seeds) <= set(paired.seeds), name
        assert paired.tuning.learning_rates == main.tuning.learning_rates, name
        assert set(main.tuning.seeds) <= set(paired.tuning.seeds), name


def test_a_sweep_entry_whose_merged_section_is_invalid_fails_at_load():
    from airlora.config import SweepConfig

    # The sweep's airllm is the latent design; an entry that switches its denoiser off would
    # only fail when its cells ran, possibly hours into a sweep: refuse it up front.
    body = {
        "formulation": "online",
        "link": {"scheme": "shannon"},
        "airllm": {"action": "latent", "denoiser_objective": "reward_weighted"},
        "methods": [
            {"name": "airllm", "method": "airllm"},
            {"name": "broken", "method": "airllm", "airllm": {"use_denoiser": False}},
        ],
    }
    with pytest.raises(ValueError, match="method broken: its airllm section"):
        SweepConfig.model_validate(body)
    body["methods"][1]["airllm"] = {"action": "grouped", "use_denoiser": False}
    assert SweepConfig.model_validate(body).methods[1].name == "broken"


def test_sweep_workers_fork_preloaded_and_run_cells_with_the_drivers_environment_of_now(
    monkeypatch,
):
    """Workers come from Python's forkserver with what cells import already imported, and a
    cell sees the driver's environment at submission, not the server's from its start.
    (Only builtins are sent to the workers: a test function would import this module, and
    with it PEFT, in the worker.)"""
    import os
    from concurrent.futures import ProcessPoolExecutor

    from airlora.sweep.executors import WORKER_PRELOAD, with_environment, worker_context

    def imported(name: str) -> str:
        return f"{name!r} in __import__('sys').modules"

    mark = "__import__('os').environ.get('AIRLORA_TEST_MARK')"
    monkeypatch.setenv("AIRLORA_TEST_MARK", "before")
    with ProcessPoolExecutor(1, mp_context=worker_context()) as pool:
        assert pool.submit(eval, "__import__('os').getppid()").result() != os.getpid()
        assert all(pool.submit(eval, imported(m)).result() for m in WORKER_PRELOAD)
        assert pool.submit(eval, imported("peft")).result()  # imported once, in the server
    monkeypatch.setenv("AIRLORA_TEST_MARK", "after")
    with ProcessPoolExecutor(1, mp_context=worker_context()) as pool:
        assert pool.submit(eval, mark).result() != "after"
        got = pool.submit(with_environment, dict(os.environ), eval, mark).result()
        assert got == "after"
