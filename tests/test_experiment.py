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
