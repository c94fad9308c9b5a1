"""Breaking the toolkit on purpose: kills, damaged files, full disks, bad input, numerical
faults, determinism and safe loading (issue 7).

``python tests/test_robustness.py`` prints the table of bad inputs of docs/robustness.md: every
case of ``BAD_INPUTS`` run through the command line, with its message and exit code.
"""

from __future__ import annotations

import io
import json
import math
import os
import random
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from airlora.cli import app
from airlora.sweep import check_cell
from conftest import cell_digest, finished_cells, kill_sweep_inside_cells, tiny_task_sections

runner = CliRunner()
FIXTURE_SETTINGS = settings(
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    derandomize=True,  # the same examples on every run and in CI
)


def _strict_json(text: str):
    """Parse JSON refusing NaN and Infinity, which Python's json module accepts by default."""

    def refuse(constant: str):
        raise AssertionError(f"non-standard JSON constant {constant} in a result file")

    return json.loads(text, parse_constant=refuse)


def _tiny_base(tiny_model_dir: Path, tiny_data_dir: Path, out: Path) -> dict:
    return {
        **tiny_task_sections(tiny_model_dir, tiny_data_dir),
        "train": {"rounds": 2, "steps_per_round": 2, "warmup_steps": 0, "threads": 1},
        "link": {"scheme": "analog", "snr_process": "fixed", "snr_db": 10.0},
        "out_dir": str(out),
    }


def _sweep_yaml(base: dict, path: Path, **overrides) -> Path:
    body = {
        **{k: v for k, v in base.items() if k != "out_dir"},
        "name": "faults",
        "methods": [
            {"name": "lora", "method": "lora"},
            {"name": "lora-r1", "method": "lora", "rank": 1},
            {"name": "heuristic", "method": "heuristic"},
        ],
        "r_max": [4],
        "snr_db": [0.0, 10.0, 20.0],
        "seeds": [0, 1],
        "workers": 1,
        "threads_per_worker": 1,
        **overrides,
    }
    path.write_text(yaml.safe_dump(body))
    return path


# Measured wall times and identities; airtime is a computed result and stays compared.
WALL_TIME_COLUMNS = ("_time_s", "latency", "wall", "samples_per_s")


def _deterministic(table: pd.DataFrame) -> pd.DataFrame:
    drop = [c for c in table.columns if c == "run_id" or any(k in c for k in WALL_TIME_COLUMNS)]
    assert not any("airtime" in c for c in drop)
    return table.drop(columns=drop).sort_values("cell").reset_index(drop=True)


# ----------------------------------------------------------------------------- faults


def test_sweep_survives_twenty_kills_inside_cells(tiny_model_dir, tiny_data_dir, tmp_path):
    """SIGKILL a 2-worker sweep (driver and workers) 20 times, each time while a cell is
    being built, then let it finish: every cell once, no finished cell touched, and the table
    equal to that of an uninterrupted run."""
    from airlora.config import SweepConfig, load_config
    from airlora.sweep import plan, run_sweep

    base = _tiny_base(tiny_model_dir, tiny_data_dir, tmp_path)
    path = _sweep_yaml(base, tmp_path / "sweep.yaml", workers=2, seeds=[0, 1, 2, 3])
    config = load_config(path, SweepConfig)
    planned = sorted(c["id"] for stage in plan(config) for c in stage)
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "airlora", "sweep", str(path), "--out", str(out), "--quiet"]
    records, seen = kill_sweep_inside_cells(cmd, out / "cells", 20, random.Random(7))

    landed = sum(r["in_flight"] > 0 for r in records)
    after_finished = sum(r["sealed"] > 0 for r in records)
    checked = sum(r["checked"] for r in records)
    print(
        f"\nkill test: {len(records)} kills, {landed} landed with a cell in flight, "
        f"{after_finished} after at least one cell was sealed; {checked} sealed-cell checks; "
        f"{len(planned)} cells planned"
    )
    assert len(records) == 20, "the sweep finished before 20 kills: make it longer"
    assert landed >= 15
    assert after_finished >= 10 and records[-1]["sealed"] > records[0]["sealed"]

    final = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert final.returncode == 0, final.stderr[-2000:]
    assert sorted(p.name for p in (out / "cells").iterdir()) == planned  # once each
    for name, digest in seen.items():
        assert cell_digest(out / "cells" / name) == digest, f"finished cell {name} was recomputed"
    run_sweep(config, tmp_path / "reference")
    reference = _deterministic(pd.read_csv(tmp_path / "reference" / "results.csv"))
    killed = pd.read_csv(out / "results.csv")
    assert killed["cell"].is_unique and len(killed) == len(planned)
    pd.testing.assert_frame_equal(_deterministic(killed), reference)


def test_damaged_cells_are_reported_and_redone(tiny_model_dir, tiny_data_dir, tmp_path):
    base = _tiny_base(tiny_model_dir, tiny_data_dir, tmp_path)
    path = _sweep_yaml(base, tmp_path / "sweep.yaml", seeds=[0])
    out = tmp_path / "sweep"
    args = ["sweep", str(path), "--out", str(out), "--quiet"]
    assert runner.invoke(app, args).exit_code == 0
    cells = out / "cells"
    before = {p.name: (p / "result.json").read_text() for p in cells.iterdir()}

    cut = cells / "eval-lora-r4-snr0-s0" / "result.json"
    cut.write_text(cut.read_text()[:40])  # cut short
    adapter = cells / "eval-lora-r4-snr10-s0" / "adapter" / "adapter_model.safetensors"
    data = bytearray(adapter.read_bytes())
    data[-5] ^= 0xFF  # one flipped byte deep in the weights
    adapter.write_bytes(bytes(data))
    (cells / "eval-heuristic-r4-snr20-s0" / "cell.json").write_text("{not json")

    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "eval-lora-r4-snr0-s0 was damaged (result.json does not match its checksum" in (
        result.output
    )
    assert "eval-lora-r4-snr10-s0 was damaged (adapter/adapter_model.safetensors" in result.output
    assert "eval-heuristic-r4-snr20-s0 was damaged (cell.json is unreadable" in result.output
    after = {p.name: (p / "result.json").read_text() for p in cells.iterdir()}
    assert set(after) == set(before)
    untouched = set(before) - {
        "eval-lora-r4-snr0-s0",
        "eval-lora-r4-snr10-s0",
        "eval-heuristic-r4-snr20-s0",
    }
    assert all(after[c] == before[c] for c in untouched)
    table = pd.read_csv(out / "results.csv")
    assert len(table) == 9 and table["cell"].is_unique and table["final_accuracy"].notna().all()


FULL_DISK = """
# Loaded by every interpreter of the sweep (driver and spawned workers) through PYTHONPATH:
# the disk is 'full' for the writes whose path contains AIRLORA_TEST_ENOSPC.
import errno, os
target = os.environ.get("AIRLORA_TEST_ENOSPC")
if target:
    import safetensors.torch
    import airlora.runs

    def _full(real):
        def write(*args, **kwargs):
            path = str(args[1] if real.__name__ == "save_file" else args[0])
            if target in path:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
            return real(*args, **kwargs)
        return write

    # Before anything binds them (PEFT imports save_file by name).
    safetensors.torch.save_file = _full(safetensors.torch.save_file)
    airlora.runs.atomic_write_text = _full(airlora.runs.atomic_write_text)
"""


@pytest.mark.parametrize(
    ("write", "cell"),
    [
        ("adapter/adapter_model.safetensors", "eval-lora-r1-r4-snr10-s0"),
        ("result.json", "eval-lora-r1-r4-snr20-s0"),
    ],
)
def test_a_full_disk_mid_sweep_stops_clearly_and_loses_nothing(
    write, cell, tiny_model_dir, tiny_data_dir, tmp_path
):
    """ENOSPC at the write itself (the adapter, or the result file) of one cell in the middle
    of a 2-worker sweep: exit 2 naming the cell and the disk, finished cells sealed and kept;
    the re-run completes without touching them."""
    base = _tiny_base(tiny_model_dir, tiny_data_dir, tmp_path)
    path = _sweep_yaml(base, tmp_path / "sweep.yaml", seeds=[0], workers=2)
    out = tmp_path / "sweep"
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(FULL_DISK)
    env = {**os.environ, "PYTHONPATH": f"{hook}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    cmd = [sys.executable, "-m", "airlora", "sweep", str(path), "--out", str(out), "--quiet"]
    full = subprocess.run(
        cmd,
        env={**env, "AIRLORA_TEST_ENOSPC": f".tmp-{cell}/{write}"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    message = " ".join(full.stderr.split())
    assert full.returncode == 2, full.stderr[-2000:]
    assert f"error: cell {cell}: No space left on device" in message
    assert "what was finished is kept: fix this and run the same command again" in message
    assert "Traceback" not in full.stderr
    cells = out / "cells"
    assert not list(cells.glob(".tmp-*"))  # the failed cell left nothing half-made
    finished = {p.name: cell_digest(p) for p in finished_cells(cells)}
    assert finished and cell not in finished
    assert all(check_cell(cells / name) is None for name in finished)

    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    for name, digest in finished.items():
        assert cell_digest(cells / name) == digest
    assert len(pd.read_csv(out / "results.csv")) == 9


def test_no_room_or_no_folder_fails_before_any_work(
    tiny_model_dir, tiny_data_dir, tmp_path, monkeypatch
):
    import shutil
    from collections import namedtuple

    base = _tiny_base(tiny_model_dir, tiny_data_dir, tmp_path)
    path = _sweep_yaml(base, tmp_path / "sweep.yaml", seeds=[0])
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    result = runner.invoke(app, ["sweep", str(path), "--out", str(blocker / "sweep"), "--quiet"])
    assert result.exit_code == 2 and "cannot create the sweep folder" in result.output

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda _p: usage(10 * 2**30, 10 * 2**30, 2**20))
    out = tmp_path / "full"
    result = runner.invoke(app, ["sweep", str(path), "--out", str(out), "--quiet"])
    assert result.exit_code == 2 and "1 MiB free" in result.output
    assert not (out / "cells").exists()

    config = tmp_path / "ft.yaml"
    config.write_text(yaml.safe_dump({**base, "out_dir": str(blocker / "runs")}))
    result = runner.invoke(app, ["finetune", "--config", str(config), "--quiet"])
    assert result.exit_code == 2 and str(blocker) in result.output


# ----------------------------------------------------------------------------- bad input

# (what, extra CLI arguments or a file to write, the words the message must contain)
BAD_INPUTS: list[tuple[str, list[str], str]] = [
    ("unknown method", ["run", "--method", "bogus"], "method"),
    ("unknown modulation", ["finetune", "--link", "digital", "--modulation", "8psk"], "8psk"),
    ("r_max = 0", ["finetune", "--rmax", "0"], "r_max"),
    ("r_max < 0", ["finetune", "--rmax", "-4"], "r_max"),
    ("rank above r_max", ["finetune", "--rank", "9"], "exceeds"),
    ("rank vector too short", ["finetune", "--rank-vector", "1,2,3"], "rank vector"),
    ("negative rank entry", ["finetune", "--rank-vector", "4,4,4,4,4,4,4,-1"], "-1"),
    ("SNR given as text", ["finetune", "--snr-db", "loud"], "snr-db"),
    ("unknown link scheme", ["finetune", "--link", "pigeon"], "pigeon"),
    ("unknown device", ["finetune", "--device", "tpu"], "tpu"),
    ("CUDA on a CPU-only machine", ["finetune", "--device", "cuda"], "CUDA"),
    ("SNR trace with a missing value", ["finetune", "--snr-process", "trace"], "row 2"),
    ("CSV without the label column", ["finetune"], "label"),
    ("CSV with an extra field in a row", ["finetune"], "row 2"),
    ("label that is not an integer", ["finetune"], "not an integer"),
    ("label out of range", ["finetune"], "out of range"),
    ("empty CSV", ["finetune"], "empty"),
    ("model folder without weights", ["finetune"], "holds no weights"),
    ("missing model folder", ["finetune"], "does not exist"),
    ("policy trained for another r_max", ["run", "--method", "airllm"], "r_max"),
    ("pickle in place of a policy checkpoint", ["run", "--method", "ppo"], "not a valid"),
]


def _write_case(what: str, root: Path, model_dir: Path, data_dir: Path) -> list[str]:
    """Files a case needs; returns the extra CLI arguments that point at them."""
    bad = root / "bad"
    bad.mkdir(exist_ok=True)
    csv_cases = {
        "CSV without the label column": "text,stars\nhello world,1\nbye now,0\n",
        "CSV with an extra field in a row": "text,label\nhello world,1\nbye,0,7\n",
        "label that is not an integer": "text,label\nhello world,1\nbye now,zero\n",
        "label out of range": "text,label\nhello world,1\nbye now,-3\n",
        "empty CSV": "",
    }
    if what in csv_cases:
        (bad / "train.csv").write_text(csv_cases[what])
        return ["--data", str(bad / "train.csv")]
    if what == "SNR trace with a missing value":
        (bad / "trace.csv").write_text("snr_db\n3.0\n,\n5.0\n")
        return ["--snr-trace", str(bad / "trace.csv")]
    if what == "model folder without weights":
        folder = bad / "model"
        folder.mkdir(exist_ok=True)
        (folder / "config.json").write_text((model_dir / "config.json").read_text())
        return ["--model", str(folder)]
    if what == "missing model folder":
        return ["--model", str(bad / "no-such-model")]
    if what == "policy trained for another r_max":
        return ["--policy", str(_saved_policy(root, model_dir, data_dir, r_max=2))]
    if what == "pickle in place of a policy checkpoint":
        return ["--policy", str(_pickled_policy(root, model_dir, data_dir))]
    return []


def _saved_policy(root: Path, model_dir: Path, data_dir: Path, r_max: int) -> Path:
    from airlora.config import (
        AirLLMConfig,
        DataConfig,
        EnvConfig,
        LinkConfig,
        ModelConfig,
        PPOConfig,
        TrainConfig,
    )
    from airlora.env.real import RankSelectionEnv
    from airlora.policies import ActionLayout, make_policy

    folder = root / f"policy-r{r_max}"
    if (folder / "policy.json").is_file():
        return folder
    base = _tiny_base(model_dir, data_dir, root)
    env = RankSelectionEnv.build(
        DataConfig(**base["data"]),
        ModelConfig(**{**base["model"], "r_max": r_max}),
        TrainConfig(**base["train"]),
        LinkConfig(),
        EnvConfig(),
    )
    policy = make_policy(
        "airllm",
        ActionLayout.of_env(env),
        0,
        PPOConfig(n_steps=8, n_envs=1, batch_size=8),
        AirLLMConfig(warm_start_updates=5),
    )
    return policy.save(folder)


def _pickled_policy(root: Path, model_dir: Path, data_dir: Path) -> Path:
    """A PPO policy folder whose archive holds a pickle instead of tensors."""
    import pickle

    folder = root / "pickled"
    folder.mkdir(exist_ok=True)
    layout = json.loads((_saved_policy(root, model_dir, data_dir, 4) / "policy.json").read_text())
    layout["method"] = "ppo"
    (folder / "policy.json").write_text(json.dumps(layout))
    with zipfile.ZipFile(folder / "ppo.zip", "w") as zf:
        zf.writestr("data", json.dumps({}))
        zf.writestr("policy.pth", pickle.dumps(_Trap(root / "unpickled")))
    return folder


def _run_case(what: str, args: list[str], root: Path, model_dir: Path, data_dir: Path):
    base = _tiny_base(model_dir, data_dir, root / "runs")
    base["link"] = {"scheme": "analog", "snr_process": "fixed", "snr_db": 10.0}
    config = root / "base.yaml"
    config.write_text(yaml.safe_dump(base))
    extra = _write_case(what, root, model_dir, data_dir)
    cli = [*args, "--config", str(config), *extra, "--run-name", "x", "--quiet"]
    return runner.invoke(app, cli)


@pytest.mark.parametrize("what, args, words", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_fails_fast_naming_the_problem(
    what, args, words, tiny_model_dir, tiny_data_dir, tmp_path
):
    if what == "CUDA on a CPU-only machine" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    result = _run_case(what, args, tmp_path, tiny_model_dir, tiny_data_dir)
    assert result.exit_code == 2, result.output
    assert words in result.output, result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "runs" / "x").exists()  # no partial run folder
    assert not (tmp_path / "unpickled").exists()  # nothing was unpickled
    # docs/robustness.md shows this very message: the doc cannot drift from the code.
    shown = _doc_messages()[what]
    assert _table_message(result.output, tmp_path) == shown


def _table_message(output: str, root: Path) -> str:
    """The message as the doc's table shows it: one line, the temporary folder as '…'."""
    message = " ".join(output.split()).replace("|", "\\|")
    return message.replace(str(root), "…")


def _doc_messages() -> dict[str, str]:
    """what -> message, from the bad-input table of docs/robustness.md."""
    doc = (Path(__file__).resolve().parents[1] / "docs" / "robustness.md").read_text()
    out = {}
    for line in doc.splitlines():
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]
        if len(cells) == 4 and cells[2] == "2":
            out[cells[0]] = cells[3]
    return out


DEFECTS = [
    "no label column",
    "extra field",
    "label not an integer",
    "label a float",
    "negative label",
    "empty text",
    "one class only",
    "no data rows",
]
TEXT = st.text(st.characters(blacklist_categories=("Cs", "Cc")), min_size=1, max_size=12)


@st.composite
def csv_cases(draw, defect: str | None) -> tuple[str, list[tuple[str, int]]]:
    """A small CSV file, valid (``defect`` None) or with that defect in a drawn row;
    returns (file text, the rows it was made from)."""
    n = draw(st.integers(5, 9))
    texts = draw(st.lists(TEXT.filter(lambda t: t.strip()), min_size=n, max_size=n))
    labels = draw(st.lists(st.integers(0, 3), min_size=n, max_size=n))
    labels[0], labels[1] = 0, 1  # two classes at least
    rows = list(zip(texts, labels, strict=True))
    bad = draw(st.integers(0, n - 1))
    header = "text,label"
    lines = []
    for i, (text, label) in enumerate(rows):
        cell = '"' + text.replace('"', '""') + '"'
        value = str(label)
        if i == bad:
            if defect == "extra field":
                value += ",x"
            elif defect == "label not an integer":
                value = draw(st.sampled_from(["x", "one", "", "1e", "[1]"]))
            elif defect == "label a float":
                value = draw(st.sampled_from(["1.5", "nan", "inf", "-0.5"]))
            elif defect == "negative label":
                value = str(draw(st.integers(-9, -1)))
            elif defect == "empty text":
                cell = draw(st.sampled_from(['""', '"   "']))
        lines.append(f"{cell},{value}")
    if defect == "no label column":
        header = draw(st.sampled_from(["text,stars", "text,lable", "body,label"]))
    if defect == "one class only":
        lines = [f"{line.rsplit(',', 1)[0]},2" for line in lines]
    if defect == "no data rows":
        lines = []
    return "\n".join([header, *lines]) + "\n", rows


@pytest.mark.parametrize("defect", [None, *DEFECTS], ids=["valid", *DEFECTS])
def test_random_csvs_load_exactly_when_valid_and_are_refused_naming_the_file(
    defect, tmp_path_factory
):
    """Hypothesis draws valid files and files with each defect: every valid file loads with
    exactly its rows (text and label intact), every defective one fails with a DataError
    that names the file. Valid files are drawn on purpose: a strategy that only ever makes
    bad files would let a loader that refuses everything pass."""
    from airlora.config import DataConfig
    from airlora.data import DataError, load_task

    outcomes: list[bool] = []

    @settings(FIXTURE_SETTINGS, max_examples=25 if defect is None else 8)
    @given(case=csv_cases(defect))
    def check(case):
        text, rows = case
        path = tmp_path_factory.mktemp("csv") / "train.csv"
        path.write_text(text, encoding="utf-8")
        config = DataConfig(source=str(path), validation_size=1, edge_eval_size=1)
        if defect is not None:
            with pytest.raises(DataError) as err:
                load_task(config, 0)
            assert str(path) in str(err.value), str(err.value)
            outcomes.append(False)
            return
        task = load_task(config, 0)
        loaded = [
            (t, int(label))
            for split in (task.train, task.validation, task.test)
            for t, label in zip(split.texts, split.labels, strict=True)
        ]
        assert sorted(loaded) == sorted(rows)  # every row, once, text and label intact
        assert task.num_labels == max(label for _, label in rows) + 1
        outcomes.append(True)

    check()
    assert len(outcomes) >= 8 and all(outcomes) == (defect is None)


@settings(FIXTURE_SETTINGS, max_examples=30)
@given(
    r_max=st.integers(-100, 0),
    snr=st.text(min_size=1, max_size=6).filter(lambda t: _not_a_number(t)),
    modulation=st.text(min_size=1, max_size=8).filter(
        lambda m: (
            m.strip().lower().replace("-", "")
            not in {"bpsk", "qpsk", "16qam", "64qam", "adaptive", "qam16", "qam64"}
            and not m.startswith("-")
        )
    ),
)
def test_any_bad_setting_is_refused_before_a_folder_exists(
    r_max, snr, modulation, tiny_model_dir, tiny_data_dir, tmp_path
):
    out = tmp_path / "runs"
    base = ["finetune", "--model", str(tiny_model_dir), "--data", "tiny"]
    base += ["--data-dir", str(tiny_data_dir), "--out", str(out), "--quiet"]
    for extra, word in (
        (["--rmax", str(r_max)], "r_max"),
        (["--snr-db", snr], "snr-db"),
        (["--link", "digital", "--modulation", modulation], "modulation"),
    ):
        result = runner.invoke(app, [*base, *extra])
        assert result.exit_code == 2, (extra, result.output)
        assert word in result.output.lower(), (extra, result.output)
        assert not out.exists() or not any(out.iterdir())


def _not_a_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return not text.startswith("-")  # a leading dash reads as an option, not a value
    return False


# ----------------------------------------------------------------------------- numerical faults


@settings(max_examples=60, deadline=None, derandomize=True)
@given(
    snr_db=st.floats(-30.0, 60.0),
    scheme=st.sampled_from(["analog", "digital", "perfect"]),
    modulation=st.sampled_from(["bpsk", "qpsk", "16qam", "64qam", "adaptive"]),
    channel=st.sampled_from(["awgn", "rayleigh", "rician"]),
    scale=st.sampled_from([0.0, 1e-30, 1.0, 1e6]),
)
def test_the_link_stays_finite_and_in_range_from_minus_30_to_60_db(
    snr_db, scheme, modulation, channel, scale
):
    from airlora.config import LinkConfig
    from airlora.link import build_link

    link = build_link(
        LinkConfig(scheme=scheme, modulation=modulation, channel=channel, snr_db=snr_db), seed=0
    )
    gen = torch.Generator().manual_seed(0)
    sent = {
        "layer.lora_A": torch.randn(4, 48, generator=gen) * scale,  # scale 0: all-zero adapter
        "layer.lora_B": torch.randn(48, 4, generator=gen) * scale,
        "classifier.weight": torch.randn(4, 48, generator=gen),
    }
    received, report = link.transmit(sent, snr_db, ["classifier.weight"])
    for name, tensor in received.items():
        assert torch.isfinite(tensor).all(), name
        if scheme == "digital":  # a quantiser never leaves the tensor's range
            lo, hi = float(sent[name].min()), float(sent[name].max())
            assert tensor.min() >= lo - 1e-6 * max(1.0, abs(lo))
            assert tensor.max() <= hi + 1e-6 * max(1.0, abs(hi))
    for key, value in report.as_dict().items():
        if isinstance(value, float):
            assert math.isfinite(value), key


def test_zero_ranks_and_extreme_snr_give_finite_result_files(tiny_finetune_config, tmp_path):
    config = tmp_path / "ft.yaml"
    config.write_text(yaml.safe_dump(tiny_finetune_config.model_dump(mode="json")))
    for snr, ranks, name in ((-30.0, "0,0,0,0,0,0,0,0", "zeros"), (60.0, None, "high")):
        args = ["finetune", "--config", str(config), "--link", "analog", "--snr-db", str(snr)]
        args += ["--run-name", name, "--quiet"]
        if ranks:
            args += ["--rank-vector", ranks]
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.output
        run = tmp_path / "runs" / name
        for line in (run / "metrics.jsonl").read_text().splitlines():
            row = _strict_json(line)
            assert 0.0 <= row["accuracy"] <= 1.0 and math.isfinite(row["eval_loss"])
        assert _strict_json((run / "manifest.json").read_text())["status"] == "completed"


def test_a_huge_learning_rate_is_marked_diverged_not_averaged(tiny_finetune_config, tmp_path):
    body = tiny_finetune_config.model_dump(mode="json")
    body["train"].update(learning_rate=1e6, head_learning_rate=1e6, max_grad_norm=0.0)
    config = tmp_path / "ft.yaml"
    config.write_text(yaml.safe_dump(body))
    result = runner.invoke(app, ["finetune", "--config", str(config), "--quiet"])
    assert result.exit_code == 3, result.output
    assert "diverged in round 1" in result.output
    run = tmp_path / "runs" / "tiny"
    rows = [_strict_json(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["diverged"] is True and rows[-1]["accuracy"] is None
    manifest = _strict_json((run / "manifest.json").read_text())
    assert manifest["status"] == "diverged" and manifest["summary"]["diverged_round"] == 1
    assert not (run / "adapter").exists()  # no adapter made of NaN

    # In a sweep, a diverged cell is a row marked diverged, left out of the report's means.
    from airlora.report import summary_table

    table = pd.DataFrame(
        [
            {
                "name": "lora",
                "r_max": 4,
                "snr_db": 0.0,
                "seed": s,
                "diverged": d,
                "final_accuracy": a,
            }
            for s, d, a in ((0, False, 0.8), (1, False, 0.6), (2, True, None))
        ]
    ).assign(mean_accuracy=0.5, mean_payload_params=1.0, total_airtime_s=1.0)
    table = table.assign(mean_rank=1.0, episode_return=1.0)
    row = summary_table(table).iloc[0]
    assert row.seeds == 2 and row.diverged == 1 and row.final_accuracy == pytest.approx(0.7)


# ----------------------------------------------------------------------------- determinism


def test_same_config_and_seed_give_identical_metrics_and_a_complete_manifest(
    tiny_finetune_config, tmp_path
):
    from airlora import run_finetune
    from airlora.config import FinetuneConfig, load_config

    a = run_finetune(tiny_finetune_config.model_copy(update={"run_name": "a"}))
    b = run_finetune(tiny_finetune_config.model_copy(update={"run_name": "b"}))

    def measured(run_dir: Path) -> list[dict]:
        rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
        wall = ("_time_s", "latency_s")
        return [{k: v for k, v in r.items() if not k.endswith(wall)} for r in rows]

    assert measured(a.run_dir) == measured(b.run_dir)
    manifest = json.loads((a.run_dir / "manifest.json").read_text())
    for key in ("seed", "config_hash", "versions", "code_revision", "command", "platform"):
        assert key in manifest, key
    assert {"torch", "transformers", "peft", "airlora"} <= set(manifest["versions"])
    assert (
        manifest["config_hash"]
        == json.loads((b.run_dir / "manifest.json").read_text())["config_hash"]
    )
    again = load_config(a.run_dir / "config.yaml", FinetuneConfig)  # re-runnable as written
    assert again.seed == tiny_finetune_config.seed and again.train == tiny_finetune_config.train


# ----------------------------------------------------------------------------- safe loading


class _Trap:
    """Unpickling this creates ``marker``: proof that something was unpickled. It cannot be
    bypassed by patching the pickle module: any unpickler (pickle, cloudpickle, torch.load
    with weights_only=False) runs the ``__reduce__`` callable."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _trap_policy(folder: Path, target: str, marker: Path) -> None:
    import base64
    import pickle

    import cloudpickle
    import torch

    payload = pickle.dumps(_Trap(marker))
    if target == "ppo.zip: policy.pth":  # SB3's layout with a pickle for the weights
        buffer = io.BytesIO()
        torch.save({"trap": _Trap(marker)}, buffer)
        with zipfile.ZipFile(folder / "ppo.zip") as zf:
            entries = {n: zf.read(n) for n in zf.namelist()}
        entries["policy.pth"] = buffer.getvalue()
        with zipfile.ZipFile(folder / "ppo.zip", "w") as zf:
            for name, body in entries.items():
                zf.writestr(name, body)
    elif target == "ppo.zip: data":  # SB3 keeps cloudpickled objects in its JSON
        serialized = base64.b64encode(cloudpickle.dumps(_Trap(marker))).decode()
        with zipfile.ZipFile(folder / "ppo.zip") as zf:
            entries = {n: zf.read(n) for n in zf.namelist()}
        data = json.loads(entries["data"])
        data["policy_kwargs"] = {":type:": "<class 'dict'>", ":serialized:": serialized}
        entries["data"] = json.dumps(data).encode()
        with zipfile.ZipFile(folder / "ppo.zip", "w") as zf:
            for name, body in entries.items():
                zf.writestr(name, body)
    else:
        (folder / "denoiser.safetensors").write_bytes(payload)


@pytest.mark.parametrize(
    ("target", "words"),
    [
        ("ppo.zip: policy.pth", "its archive holds pickled objects"),
        ("ppo.zip: data", None),
        ("denoiser.safetensors", "SafetensorError"),
    ],
)
def test_a_pickle_where_a_checkpoint_belongs_is_never_unpickled(
    target, words, tiny_model_dir, tiny_data_dir, tmp_path, monkeypatch
):
    import torch

    from airlora.policies import load_policy

    folder = _saved_policy(tmp_path, tiny_model_dir, tiny_data_dir, 4)
    marker = tmp_path / "unpickled"
    calls: list[dict] = []
    real_load = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    assert load_policy(folder) is not None  # the genuine policy loads, through the spy
    assert calls and all(c.get("weights_only") is True for c in calls), calls
    _trap_policy(folder, target, marker)
    if words is None:  # data that SB3 would unpickle is not read at all: the load succeeds
        load_policy(folder)
    else:
        with pytest.raises(ValueError, match="not a valid saved policy") as err:
            load_policy(folder)
        assert words in str(err.value)
    assert not marker.exists(), "something was unpickled"
    assert all(c.get("weights_only") is True for c in calls), calls


# ----------------------------------------------------------------------------- the doc table


def _doc_table() -> str:  # pragma: no cover - run by hand for docs/robustness.md
    import tempfile

    from conftest import build_tiny_data, build_tiny_model

    root = Path(tempfile.mkdtemp())
    model_dir = build_tiny_model(root / "model")
    data_dir = build_tiny_data(root / "data")
    lines = ["| bad input | command | exit code | message |", "| --- | --- | --- | --- |"]
    for i, (what, args, _words) in enumerate(BAD_INPUTS):
        case = root / f"case{i}"
        case.mkdir()
        result = _run_case(what, args, case, model_dir, data_dir)
        message = _table_message(result.output, case)
        lines.append(f"| {what} | `airlora {' '.join(args)}` | {result.exit_code} | {message} |")
    return "\n".join(lines)


if __name__ == "__main__":  # pragma: no cover
    sys.path.insert(0, str(Path(__file__).parent))
    print(_doc_table())
