"""A fresh machine runs the main job (issue 11): packaged data, errors that cross process
boundaries, one error mapping for every command, headerless files."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from airlora.cli import app
from airlora.config import DataConfig
from airlora.data import load_task
from airlora.datasets import packaged_dataset, packaged_datasets
from airlora.errors import (
    AirLoraError,
    CellError,
    ConfigError,
    DataError,
    DeviceError,
    LinkError,
    ModelError,
    PolicyError,
)
from conftest import make_rows, tiny_task_sections, write_csv

runner = CliRunner()
REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- packaged data


def test_ag_news_ships_inside_the_package_and_is_the_default():
    assert "ag_news" in packaged_datasets()
    folder = packaged_dataset("ag_news")
    assert folder is not None and (folder / "README.md").is_file()
    assert "non-commercial" in (folder / "README.md").read_text()  # the licence note travels
    task = load_task(DataConfig(), seed=0)  # no data dir: conftest unsets AIRLORA_DATA_DIR
    assert Path(task.source).parent == folder
    assert (len(task.train), len(task.validation), len(task.test)) == (4500, 500, 1000)
    assert task.num_labels == 4
    assert sorted(np.unique(task.test.labels).tolist()) == [0, 1, 2, 3]


def test_a_data_dir_copy_wins_over_the_packaged_one(tmp_path):
    (tmp_path / "ag_news").mkdir()
    write_csv(tmp_path / "ag_news" / "train.csv", make_rows(700, seed=3))
    task = load_task(DataConfig(data_dir=tmp_path, validation_size=50), seed=0)
    assert task.source == str(tmp_path / "ag_news" / "train.csv")
    assert len(task.train) + len(task.validation) + len(task.test) == 700


def test_packaged_lookup_refuses_paths():
    assert packaged_dataset("../presets") is None
    assert packaged_dataset("no-such-set") is None


def test_a_fresh_clone_runs_the_main_command_on_packaged_data(tmp_path):
    """Clone the committed repository into an empty folder (no ../shared beside it), unset
    AIRLORA_DATA_DIR, keep the hub offline, and run a short `airlora run --method lora` from
    the clone's own source tree."""
    if not (REPO / ".git").exists():
        pytest.fail("this test needs the repository's git checkout")
    clone = tmp_path / "empty" / "airlora"
    clone.parent.mkdir()
    subprocess.run(
        ["git", "clone", "--quiet", str(REPO), str(clone)], check=True, capture_output=True
    )
    assert sorted(p.name for p in clone.parent.iterdir()) == ["airlora"]
    config = {
        "method": "lora",
        "data": {"validation_size": 64, "edge_eval_size": 32, "max_train_samples": 256},
        "train": {"rounds": 1, "steps_per_round": 2, "threads": 1},
        "run_name": "fresh",
        "out_dir": str(tmp_path / "runs"),
    }
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    env = {k: v for k, v in os.environ.items() if k != "AIRLORA_DATA_DIR"}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONPATH=str(clone / "src"))
    proc = subprocess.run(
        [sys.executable, "-m", "airlora", "run", "--config", str(tmp_path / "run.yaml"), "--quiet"],
        cwd=tmp_path / "empty",
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = json.loads((tmp_path / "runs" / "fresh" / "manifest.json").read_text())
    # The clone's own code ran, on the data inside its own package: nothing beside it.
    head = subprocess.run(
        ["git", "-C", str(clone), "rev-parse", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    assert manifest["code_revision"] == {"commit": head, "dirty": False}
    packaged = clone / "src" / "airlora" / "datasets" / "ag_news" / "train.csv"
    assert manifest["data_source"] == str(packaged)


# ----------------------------------------------------------------------------- errors


ERRORS = [
    DataError("data/train.csv", "label 'x' is not an integer", 7),
    DataError("data/train.csv", "the file is empty"),
    ConfigError("train.rounds: Input should be greater than 0 (got 0)"),
    ModelError("model folder /nowhere does not exist"),
    DeviceError("device 'cuda' was asked for but this torch build sees no CUDA GPU"),
    LinkError("unknown modulation '8psk'; choose one of ['16qam', ...]"),
    PolicyError("runs/x/policy.json is not a valid saved policy"),
    CellError("eval-lora-r4-snr10-s0", "data/train.csv, row 3: empty text", detail="tb"),
]


def _all_subclasses(cls: type) -> set[type]:
    out = set()
    for sub in cls.__subclasses__():
        out |= {sub, *_all_subclasses(sub)}
    return out


def test_every_project_error_survives_pickling_with_its_message():
    assert {type(e) for e in ERRORS} == _all_subclasses(AirLoraError)  # none forgotten
    for err in ERRORS:
        back = pickle.loads(pickle.dumps(err))
        assert type(back) is type(err)
        assert str(back) == str(err)
        assert back.__dict__ == err.__dict__
        assert isinstance(back, ValueError)
    back = pickle.loads(pickle.dumps(ERRORS[0]))
    assert (back.path, back.row, back.problem) == (
        "data/train.csv",
        7,
        "label 'x' is not an integer",
    )


def _sweep(tmp_path: Path, model_dir: Path, data_dir: Path, **overrides) -> Path:
    body = {
        **tiny_task_sections(model_dir, data_dir),
        "train": {"rounds": 1, "steps_per_round": 1, "warmup_steps": 0, "threads": 1},
        "link": {"scheme": "analog"},
        "name": "failing",
        "methods": [{"name": "lora", "method": "lora"}],
        "r_max": [2],
        "snr_db": [10.0],
        "seeds": [0],
        "workers": 2,
        "threads_per_worker": 1,
        **overrides,
    }
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(body))
    return path


def test_a_sweep_cell_with_a_data_error_exits_2_naming_the_cell(
    tiny_model_dir, tiny_data_dir, tmp_path
):
    """Two worker processes; the cell's DataError crosses back with its message."""
    bad = tmp_path / "bad"
    bad.mkdir()
    rows = make_rows(200, seed=1)
    write_csv(bad / "train.csv", [*rows[:150], ("", 2), *rows[150:]])  # row 151: empty text
    sweep = _sweep(tmp_path, tiny_model_dir, tiny_data_dir, seeds=[0, 1])
    body = yaml.safe_load(sweep.read_text())
    body["data"]["source"] = str(bad / "train.csv")
    sweep.write_text(yaml.safe_dump(body))
    result = runner.invoke(app, ["sweep", str(sweep), "--out", str(tmp_path / "s"), "--quiet"])
    assert result.exit_code == 2, result.output
    err = result.stderr
    assert "error: cell eval-lora-r2-snr10-s" in err
    assert f"{bad / 'train.csv'}, row 151: empty text" in " ".join(err.split())
    assert "Traceback" not in err and "BrokenProcessPool" not in err
    assert not list((tmp_path / "s" / "cells").glob(".tmp-*"))  # nothing half-made is left


def test_finished_cells_stay_sealed_when_a_later_cell_fails(
    tiny_model_dir, tiny_data_dir, tmp_path
):
    from airlora.sweep import check_cell

    methods = [
        {"name": "lora", "method": "lora"},
        {"name": "broken", "method": "lora", "model": {"name_or_path": str(tmp_path / "nowhere")}},
    ]
    sweep = _sweep(tmp_path, tiny_model_dir, tiny_data_dir, methods=methods, workers=1)
    out = tmp_path / "s"
    result = runner.invoke(app, ["sweep", str(sweep), "--out", str(out), "--quiet"])
    assert result.exit_code == 2
    assert "error: cell eval-broken-r2-snr10-s0: model folder" in result.stderr
    good = out / "cells" / "eval-lora-r2-snr10-s0"
    assert good.is_dir() and check_cell(good) is None
    assert not (out / "cells" / "eval-broken-r2-snr10-s0").exists()


def test_a_failed_cell_lets_cells_in_flight_finish_sealed_and_starts_no_queued_cell(
    tiny_model_dir, tiny_data_dir, tmp_path
):
    """2 workers; cells alternate lora / broken over 6 seeds. The first broken cell fails at
    once while lora-s0 is in flight: lora-s0 finishes and is sealed; beyond the few cells the
    worker pool has already taken, the queued ones (seeds 4 and 5) never start."""
    from airlora.sweep import check_cell

    methods = [
        {"name": "lora", "method": "lora"},
        {"name": "broken", "method": "lora", "model": {"name_or_path": str(tmp_path / "nowhere")}},
    ]
    body = {"methods": methods, "snr_db": [10.0], "seeds": list(range(6)), "workers": 2}
    sweep = _sweep(tmp_path, tiny_model_dir, tiny_data_dir, **body)
    out = tmp_path / "s"
    result = runner.invoke(app, ["sweep", str(sweep), "--out", str(out), "--quiet"])
    assert result.exit_code == 2 and "error: cell eval-broken-r2-snr10-s" in result.stderr
    cells = out / "cells"
    finished = sorted(p.name for p in cells.iterdir())
    assert "eval-lora-r2-snr10-s0" in finished  # in flight at the failure: finished
    assert all(check_cell(cells / name) is None for name in finished)
    assert not [n for n in finished if n.endswith(("-s4", "-s5"))]  # queued: never started
    assert not list(cells.glob(".tmp-*"))


def test_an_empty_yaml_section_is_a_config_like_any_other(tiny_model_dir, tiny_data_dir, tmp_path):
    import yaml as _yaml

    from airlora.config import RunConfig, apply_overrides

    mapping = apply_overrides(_yaml.safe_load("link:\ntrain:\n"), {"link.snr_db": 5.0})
    assert RunConfig.model_validate(mapping).link.snr_db == 5.0
    config = tmp_path / "run.yaml"
    config.write_text("link:\n")
    result = runner.invoke(app, ["run", "--config", str(config), "--rounds", "0"])
    assert result.exit_code == 2 and result.stderr.startswith("error: train.rounds")


def test_an_internal_error_in_a_cell_is_one_line_with_its_traceback_on_disk(
    tiny_model_dir, tiny_data_dir, tmp_path, monkeypatch
):
    import airlora.sweep.cells as sweep_mod

    def boom(*_a, **_k):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(sweep_mod, "run_cell", boom)
    sweep = _sweep(tmp_path, tiny_model_dir, tiny_data_dir, workers=1)
    out = tmp_path / "s"
    result = runner.invoke(app, ["sweep", str(sweep), "--out", str(out), "--quiet"])
    assert result.exit_code == 2
    assert "error: cell eval-lora-r2-snr10-s0: internal error ZeroDivisionError: a bug" in (
        " ".join(result.stderr.split())
    )
    log = out / "failed-cells" / "eval-lora-r2-snr10-s0.log"
    assert "ZeroDivisionError: a bug" in log.read_text()


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["bench", "train", "--model", "/no/such/model", "--steps", "1"], "does not exist"),
        (["link", "simulate", "--modulation", "8psk"], "unknown modulation '8psk'"),
        (["link", "simulate", "--n-bits", "0"], "n_bits must be positive"),
        (["report", "/no/such/sweep"], "/no/such/sweep"),
        (["evaluate-policy", "/no/such/run"], "/no/such/run"),
    ],
)
def test_every_command_maps_user_errors_to_exit_2(args, words):
    result = runner.invoke(app, args)
    assert result.exit_code == 2, (result.output, result.exception)
    assert result.stderr.startswith("error: ")
    assert words in " ".join(result.stderr.split())


def test_bench_train_runs_without_a_data_dir(tiny_model_dir):
    result = runner.invoke(
        app,
        [
            *["bench", "train", "--model", str(tiny_model_dir), "--rmax", "2", "--steps", "1"],
            *["--repeats", "1", "--batch-size", "4", "--max-length", "16", "--json"],
        ],
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["ratio"] > 0


# ----------------------------------------------------------------------------- headerless


def _dbpedia_like(path: Path, n: int) -> Path:
    """DBpedia's release: no header; class 1..C, title, content."""
    rows = make_rows(n, seed=5)
    with open(path, "w", encoding="utf-8", newline="") as fh:
        import csv

        w = csv.writer(fh)
        for i, (text, label) in enumerate(rows):
            w.writerow([label + 1, f"Title{i}", text])
    return path


def test_a_headerless_csv_loads_by_position_with_labels_shifted(tmp_path):
    path = _dbpedia_like(tmp_path / "train.csv", 300)
    config = DataConfig(
        source=str(path),
        header=False,
        text_column="1+2",
        label_column="0",
        label_offset=1,
        validation_size=40,
    )
    task = load_task(config, seed=0)
    assert task.num_labels == 4  # class 0 is not wasted
    everything = [*task.train.texts, *task.validation.texts, *task.test.texts]
    assert len(everything) == 300  # the first line is a data row, not a header
    assert "Title0 " + make_rows(300, seed=5)[0][0] in everything
    expected = {f"Title{i} {t}": lab for i, (t, lab) in enumerate(make_rows(300, seed=5))}
    pairs = zip(task.train.texts, task.train.labels, strict=True)
    assert all(expected[t] == lab for t, lab in pairs)


def test_headerless_columns_must_be_positions(tmp_path):
    path = _dbpedia_like(tmp_path / "train.csv", 50)
    with pytest.raises(DataError, match=r"0-based positions; got \['text'\].*3 columns"):
        load_task(DataConfig(source=str(path), header=False, label_column="0"), seed=0)
    with pytest.raises(DataError, match=r"missing column\(s\) \['7'\]"):
        load_task(
            DataConfig(source=str(path), header=False, text_column="7", label_column="0"), seed=0
        )


def test_labels_from_one_without_the_offset_get_a_hint(tmp_path):
    path = _dbpedia_like(tmp_path / "train.csv", 100)
    (tmp_path / "test.csv").write_text(path.read_text())
    config = DataConfig(
        source=str(tmp_path), header=False, text_column="2", label_column="0", num_labels=4
    )
    with pytest.raises(DataError, match=r"label 4 out of range 0\.\.3; labels numbered from 1"):
        load_task(config, seed=0)


def test_the_cli_reads_a_headerless_file(tiny_model_dir, tmp_path):
    path = _dbpedia_like(tmp_path / "train.csv", 200)
    body = {
        **tiny_task_sections(tiny_model_dir, tmp_path),
        "train": {"rounds": 1, "steps_per_round": 1, "warmup_steps": 0, "threads": 1},
        "out_dir": str(tmp_path / "runs"),
        "run_name": "headerless",
    }
    body["data"]["validation_size"] = 40
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump(body))
    args = ["run", "--config", str(cfg), "--data", str(path), "--no-header", "--quiet"]
    args += ["--text-column", "2", "--label-column", "0", "--label-offset", "1"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, (result.output, result.exception)
    saved = yaml.safe_load((tmp_path / "runs" / "headerless" / "config.yaml").read_text())
    assert saved["data"]["header"] is False and saved["data"]["label_offset"] == 1
    shutil.rmtree(tmp_path / "runs")


def test_bench_online_times_the_configured_model_and_pairs_runs(tiny_model_dir, tmp_path):
    # A run config file gives the set-up to time; the model and rmax options override it.
    config = tmp_path / "run.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "link": {"scheme": "shannon"},
                "data": {"validation_size": 16, "max_length": 16, "max_train_samples": 200},
            }
        )
    )
    args = [
        "bench",
        "online",
        "--config",
        str(config),
        "--model",
        str(tiny_model_dir),
        "--rmax",
        "2",
    ]
    result = runner.invoke(app, [*args, "--steps", "20", "--repeats", "2", "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    details = out["details"]
    assert details["model"] == str(tiny_model_dir) and details["r_max"] == 2
    assert details["max_length"] == 16 and details["device"] == "cpu"
    pairs = zip(details["airllm_steps_per_s"], details["fixed_rank_steps_per_s"], strict=True)
    assert details["paired_ratios"] == pytest.approx([p / q for p, q in pairs])
    assert out["ratio"] == pytest.approx(statistics.median(details["paired_ratios"]))
    assert len(details["violated_steps"]) == 2 and details["denoiser_updates_per_episode"] == 6


def test_bench_online_refuses_a_link_the_online_formulation_lacks(tiny_model_dir, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"link": {"scheme": "ideal"}}))
    result = runner.invoke(
        app, ["bench", "online", "--config", str(config), "--model", str(tiny_model_dir)]
    )
    assert result.exit_code == 2, result.output
    assert "shannon" in " ".join(result.stderr.split())
