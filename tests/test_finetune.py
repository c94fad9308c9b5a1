from __future__ import annotations

import json

import pytest
import yaml
from peft import PeftConfig
from typer.testing import CliRunner

from airlora import run_finetune
from airlora.cli import app
from airlora.config import FinetuneConfig
from conftest import make_rows, write_csv

runner = CliRunner()


def test_finetune_writes_a_complete_run_folder(tiny_finetune_config):
    result = run_finetune(tiny_finetune_config)
    run = result.run_dir
    assert sorted(p.name for p in run.iterdir()) == [
        "adapter",
        "config.yaml",
        "manifest.json",
        "metrics.jsonl",
    ]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2, 3]
    for r in rows:
        assert 0.0 <= r["accuracy"] <= 1.0
        assert r["payload_params"] == r["adapter_params"] + r["head_params"]
        assert r["payload_bits"] == 32 * r["payload_params"]
        assert set(r["complexity"]) >= {"length", "rarity", "model_loss"}
        assert r["train_time_s"] > 0 and r["eval_time_s"] > 0
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["status"] == "completed" and manifest["seed"] == 0
    assert {"torch", "transformers", "peft", "airlora"} <= set(manifest["versions"])
    assert "commit" in manifest["code_revision"]
    # config.yaml is a complete, re-loadable config
    again = FinetuneConfig.model_validate(yaml.safe_load((run / "config.yaml").read_text()))
    assert again == tiny_finetune_config
    assert PeftConfig.from_pretrained(str(run / "adapter")).r == 4


def test_finetune_learns_the_tiny_task(tiny_finetune_config):
    config = tiny_finetune_config.model_copy(update={"run_name": "learn"})
    config.data.batch_size = 16
    config.train = config.train.model_copy(
        update={
            "rounds": 10,
            "steps_per_round": 15,
            "learning_rate": 3e-3,
            "head_learning_rate": 3e-3,
            "schedule": "constant",
        }
    )
    result = run_finetune(config)
    losses = [r["train_loss"] for r in result.rounds]
    assert losses[-1] < losses[0] - 0.3
    # four keyword-separable classes, a random tiny BERT: well above chance (0.25)
    assert result.summary["test_accuracy"] is not None
    assert result.summary["test_accuracy"] > 0.5


def test_same_seed_same_metrics(tiny_finetune_config):
    a = run_finetune(tiny_finetune_config.model_copy(update={"run_name": "a"}))
    b = run_finetune(tiny_finetune_config.model_copy(update={"run_name": "b"}))
    keys = ("accuracy", "eval_loss", "train_loss", "complexity", "payload_params")
    for ra, rb in zip(a.rounds, b.rounds, strict=True):
        assert {k: ra[k] for k in keys} == {k: rb[k] for k in keys}
    assert a.summary["test_accuracy"] == b.summary["test_accuracy"]


def _cli_args(config: FinetuneConfig, data: str | None = None) -> list[str]:
    return [
        "finetune",
        "--model",
        config.model.name_or_path,
        "--data",
        data or config.data.source,
        "--data-dir",
        str(config.data.data_dir),
        "--rmax",
        "4",
        "--rounds",
        "1",
        "--steps-per-round",
        "2",
        "--batch-size",
        "8",
        "--max-length",
        "24",
        "--out",
        str(config.out_dir),
        "--run-name",
        "cli",
        "--quiet",
    ]


def test_cli_finetune_prints_table_and_writes_folder(tiny_finetune_config, tmp_path):
    args = _cli_args(tiny_finetune_config)
    # the tiny data set has 400 rows: keep the default 500-row validation split out of it
    config_file = tmp_path / "c.yaml"
    config_file.write_text("data:\n  validation_size: 40\n  edge_eval_size: 16\n")
    result = runner.invoke(app, [*args, "--config", str(config_file)])
    assert result.exit_code == 0, result.output
    assert "accuracy" in result.output and "test accuracy" in result.output
    assert (tiny_finetune_config.out_dir / "cli" / "adapter").is_dir()


BAD_FILES = {
    "missing_column": ("words,label\nhi,1\n", "missing column(s) ['text']"),
    "label_not_int": ("text,label\nhi,1\nbye,sports\n", "row 2: label 'sports' is not an integer"),
    "label_out_of_range": ("text,label\nhi,1\nbye,-3\n", "label -3 out of range"),
    "empty": ("", "the file is empty"),
    "bad_encoding": (b"text,label\nhi,1\ncaf\xe9,2\n", "unreadable encoding"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_malformed_input_fails_with_message_and_no_run_folder(tiny_finetune_config, tmp_path, case):
    content, message = BAD_FILES[case]
    folder = tmp_path / "bad"
    folder.mkdir()
    good = make_rows(100)
    if case == "label_out_of_range":
        write_csv(folder / "train.csv", good)
        (folder / "test.csv").write_text(content)
    else:
        path = folder / "train.csv"
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    args = _cli_args(tiny_finetune_config, data=str(folder))
    result = runner.invoke(app, args)
    assert result.exit_code == 2
    assert message in result.output
    assert "csv" in result.output  # the file is named
    assert not (tiny_finetune_config.out_dir / "cli").exists()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--rank-vector", "1,2,3"], "rank vector has 3 entries"),
        (["--rank", "9"], "exceeds model.r_max 4"),
        (["--rmax", "0"], "model.r_max: Input should be greater than 0"),
        (["--rank-vector", "1,x"], "comma-separated integers"),
    ],
)
def test_bad_settings_fail_before_any_folder(tiny_finetune_config, tmp_path, extra, message):
    config_file = tmp_path / "c.yaml"
    config_file.write_text("data:\n  validation_size: 40\n")
    args = [*_cli_args(tiny_finetune_config), "--config", str(config_file), *extra]
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert not (tiny_finetune_config.out_dir / "cli").exists()


def test_missing_model_folder(tiny_finetune_config, tmp_path):
    args = _cli_args(tiny_finetune_config)
    args[args.index("--model") + 1] = str(tmp_path / "no-model")
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and "does not exist" in result.output
    assert not (tiny_finetune_config.out_dir / "cli").exists()


def test_the_public_api_loads_each_name_on_first_use():
    """``import airlora`` stays light (no torch); every exported name resolves to its
    module's object, is listed by ``dir``, and a misspelt one is an AttributeError."""
    import subprocess
    import sys

    import airlora
    import airlora.deploy
    import airlora.env

    probe = "import sys, airlora, airlora.deploy; print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert done.stdout.strip() == "False", done.stderr[-2000:]
    for package in (airlora, airlora.deploy, airlora.env):
        for name in package.__all__:
            assert getattr(package, name) is not None and name in dir(package), name
        with pytest.raises(AttributeError, match=f"{package.__name__}.*'RunConfg'"):
            package.RunConfg  # noqa: B018
    from airlora.env.surrogate import fit_surrogate

    assert airlora.env.fit_surrogate is fit_surrogate


def test_help_and_version():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0 and "finetune" in result.output and "bench" in result.output
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.startswith("airlora ")
    result = runner.invoke(app, ["finetune", "--help"])
    assert "--rank-vector" in result.output and "--snr-db" in result.output


def test_cli_link_options_reach_the_run(tiny_finetune_config, tmp_path):
    config_file = tmp_path / "c.yaml"
    config_file.write_text("data:\n  validation_size: 40\n  edge_eval_size: 16\n")
    args = [
        *_cli_args(tiny_finetune_config),
        "--config",
        str(config_file),
        "--no-test",
        "--link",
        "digital",
        "--modulation",
        "16qam",
        "--snr-db",
        "-5",
        "--quant-bits",
        "6",
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    run = tiny_finetune_config.out_dir / "cli"
    saved = yaml.safe_load((run / "config.yaml").read_text())["link"]
    assert (saved["scheme"], saved["modulation"], saved["quant_bits"]) == ("digital", "16qam", 6)
    row = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert row["link"]["scheme"] == "digital" and row["link"]["measured_ber"] > 0.1
    # at -5 dB every uncoded packet fails its CRC: the edge received no adapter at all
    assert row["link"]["erased_params"] == row["adapter_params"]


def test_help_shows_the_defaults_in_brackets():
    """Help texts are plain text: '[runs]' is a default to show, not markup to swallow."""
    from typer.testing import CliRunner

    from airlora.cli import app

    result = CliRunner().invoke(app, ["finetune", "--help"], terminal_width=200)
    assert result.exit_code == 0
    text = " ".join(result.output.split())
    assert "[runs]" in text and "[env: AIRLORA_DATA_DIR]" in text and "[r_max]" in text
