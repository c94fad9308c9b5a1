"""Scale-out and generality: the Ray sweep engine, devices, decoder families end to end."""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from typer.testing import CliRunner

from airlora.cli import app
from conftest import cell_digest, kill_sweep_inside_cells, tiny_decoder

runner = CliRunner()

# Columns that are measured wall times or identities, not results of the computation.
NONDETERMINISTIC = ("run_id", "_time_s", "latency", "_s_per_", "wall", "samples_per_s")


def _tiny_sweep(cfg, tmp_path: Path, name: str) -> Path:
    body = {
        "name": name,
        "data": cfg.data.model_dump(mode="json"),
        "model": cfg.model.model_dump(mode="json"),
        "train": {"rounds": 2, "steps_per_round": 2, "warmup_steps": 0, "device": "cpu"},
        "link": {"scheme": "analog", "snr_process": "fixed"},
        "ppo": {"n_steps": 8, "n_envs": 1, "batch_size": 8, "n_epochs": 1},
        "airllm": {"warm_start_updates": 5, "updates_per_phase": 5},
        "surrogate": {"real_episodes": 3, "min_r2": None},
        "total_steps": 16,
        "methods": [
            {"name": "airllm", "method": "airllm"},
            {"name": "lora", "method": "lora", "rank": 2},
        ],
        "r_max": [4],
        "snr_db": [0.0, 20.0],
        "seeds": [0],
        "workers": 1,
        "threads_per_worker": 1,
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(body))
    return path


def _sweep_cmd(path: Path, out: Path, *options: str) -> list[str]:
    """`airlora sweep` in a fresh interpreter (Ray's driver must be a process we can kill)."""
    return [sys.executable, "-m", "airlora", "sweep", str(path), "--out", str(out), *options]


def _comparable(table: pd.DataFrame) -> pd.DataFrame:
    keep = [c for c in table.columns if not any(k in c for k in NONDETERMINISTIC)]
    return table[keep].sort_values("cell").reset_index(drop=True)


@pytest.fixture
def ray_tmpdir():
    """A short private Ray temp dir (Unix socket paths are limited to ~107 bytes), and every
    Ray process that used it stopped afterwards, even when a test killed its driver."""
    path = tempfile.mkdtemp(prefix="rt", dir="/tmp")
    yield path
    for proc in Path("/proc").glob("[0-9]*"):
        with contextlib.suppress(OSError, ValueError):
            if path.encode() in (proc / "cmdline").read_bytes():
                os.kill(int(proc.name), signal.SIGKILL)
    shutil.rmtree(path, ignore_errors=True)


def test_ray_engine_gives_the_local_engine_numbers(tiny_finetune_config, tmp_path, ray_tmpdir):
    pytest.importorskip("ray")
    path = _tiny_sweep(tiny_finetune_config, tmp_path, "same")
    local = runner.invoke(app, ["sweep", str(path), "--out", str(tmp_path / "local"), "--quiet"])
    assert local.exit_code == 0, local.output
    env = {**os.environ, "RAY_TMPDIR": ray_tmpdir}
    ray_run = subprocess.run(
        _sweep_cmd(path, tmp_path / "ray", "--engine", "ray", "--cpus-per-cell", "1", "--quiet"),
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert ray_run.returncode == 0, ray_run.stderr[-3000:]
    a = pd.read_csv(tmp_path / "local" / "results.csv")
    b = pd.read_csv(tmp_path / "ray" / "results.csv")
    assert len(a) == 4 and set(a["cell"]) == set(b["cell"])
    pd.testing.assert_frame_equal(_comparable(a), _comparable(b))
    # The policy itself came out the same: identical denoiser weights from both engines.
    name = "policy-airllm-r4-s0/policy/denoiser.safetensors"
    assert (tmp_path / "local" / "cells" / name).read_bytes() == (
        tmp_path / "ray" / "cells" / name
    ).read_bytes()


def test_ray_sweep_killed_inside_cells_resumes_without_recomputing(
    tiny_finetune_config, tmp_path, ray_tmpdir
):
    """SIGKILL the Ray driver (and with it the cluster it started) while cells are being
    built, three times; every finished cell checked against its seal after each kill; then
    the sweep finishes with every cell once and no finished cell rewritten."""
    pytest.importorskip("ray")
    path = _tiny_sweep(tiny_finetune_config, tmp_path, "kill")
    body = yaml.safe_load(path.read_text())
    body["snr_db"] = [0.0, 10.0, 20.0]
    path.write_text(yaml.safe_dump(body))
    out = tmp_path / "out"
    cmd = _sweep_cmd(path, out, "--engine", "ray", "--cpus-per-cell", "1", "--quiet")
    env = {**os.environ, "RAY_TMPDIR": ray_tmpdir}
    records, seen = kill_sweep_inside_cells(
        cmd, out / "cells", 3, random.Random(3), env=env, targets=(1, 2, 2)
    )
    print(f"\nray kill test: {records}")
    assert len(records) == 3
    assert sum(r["in_flight"] > 0 for r in records) >= 2
    assert records[-1]["sealed"] > 0  # killed after cells were finished

    rerun = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    present = sorted(p.name for p in (out / "cells").iterdir())
    assert present == sorted(
        ["rounds-r4-s0", "policy-airllm-r4-s0"]
        + [f"eval-{m}-r4-snr{s}-s0" for m in ("airllm", "lora") for s in ("0", "10", "20")]
    )
    for name, digest in seen.items():  # finished cells were not rewritten
        assert cell_digest(out / "cells" / name) == digest, name
    assert pd.read_csv(out / "results.csv")["cell"].is_unique


def test_ray_engine_names_an_unreachable_cluster(tiny_finetune_config, tmp_path, ray_tmpdir):
    pytest.importorskip("ray")
    path = _tiny_sweep(tiny_finetune_config, tmp_path, "nowhere")
    env = {**os.environ, "RAY_TMPDIR": ray_tmpdir}
    result = subprocess.run(
        _sweep_cmd(path, tmp_path / "o", "--engine", "ray", "--address", "127.0.0.1:9", "--quiet"),
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert "cannot reach the Ray cluster at 127.0.0.1:9" in result.stderr
    assert not list((tmp_path / "o" / "cells").glob("*"))


def test_unknown_engine_and_device_are_refused(tiny_finetune_config, tmp_path):
    path = _tiny_sweep(tiny_finetune_config, tmp_path, "bad")
    result = runner.invoke(app, ["sweep", str(path), "--engine", "spark", "--quiet"])
    assert result.exit_code == 2 and "unknown sweep engine 'spark'" in result.output
    result = runner.invoke(app, ["sweep", str(path), "--device", "tpu", "--quiet"])
    assert result.exit_code == 2 and "unknown device 'tpu'" in result.output


# ----------------------------------------------------------------------------- devices


def test_device_resolution_and_precision():
    from airlora.devices import DeviceError, autocast_dtype, resolve_device

    assert resolve_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    assert autocast_dtype(torch.device("cpu"), "auto") is None  # CPU runs stay fp32
    assert autocast_dtype(torch.device("cpu"), "bf16") == torch.bfloat16
    assert autocast_dtype(torch.device("cpu"), "fp32") is None
    if not torch.cuda.is_available():
        with pytest.raises(DeviceError, match="no CUDA GPU"):
            resolve_device("cuda")
    with pytest.raises(DeviceError, match="unknown device"):
        resolve_device("tpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error of a CPU-only machine")
def test_asking_for_a_missing_gpu_fails_before_any_folder(tiny_finetune_config, tmp_path):
    config = tmp_path / "ft.yaml"
    config.write_text(yaml.safe_dump(tiny_finetune_config.model_dump(mode="json")))
    result = runner.invoke(app, ["finetune", "--config", str(config), "--device", "cuda"])
    assert result.exit_code == 2, result.output
    assert "no CUDA GPU" in result.output
    assert not (tmp_path / "runs" / "tiny").exists()


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_precision_sets_the_dtype_of_activations(precision, tiny_finetune_config):
    """bf16 autocast really runs the linear layers in bf16 (training and the edge's
    evaluation), and fp32 does not: a precision setting that is ignored fails here."""
    from airlora.engine import RoundEngine
    from airlora.link import build_link

    cfg = tiny_finetune_config
    train = cfg.train.model_copy(update={"precision": precision, "device": "cpu"})
    engine = RoundEngine.build(cfg.data, cfg.model, train, build_link(cfg.link), seed=0)
    seen: dict[str, set] = {"server": set(), "edge": set()}
    for side, model in (("server", engine.server), ("edge", engine.edge)):
        for name, module in model.peft_model.named_modules():
            # lora_A's output is multiplied by the fp32 rank mask after its bf16 matmul.
            if isinstance(module, torch.nn.Linear) and "lora_A" not in name:
                module.register_forward_hook(
                    lambda _m, _i, out, side=side: seen[side].add(out.dtype)
                )
    metrics = engine.run_round([4] * engine.server.num_projections, 10.0)
    expected = {torch.bfloat16} if precision == "bf16" else {torch.float32}
    assert seen["server"] == expected and seen["edge"] == expected, seen
    assert 0.0 <= metrics.accuracy <= 1.0 and math.isfinite(metrics.train_loss)
    # The trained parameters themselves stay fp32 (autocast, not a cast of the model).
    assert all(p.dtype == torch.float32 for p in engine.server.peft_model.parameters())


# ----------------------------------------------------------------------------- model families


def _decoder_folder(family: str, tiny_model_dir: Path, folder: Path) -> Path:
    """A tiny decoder with the tiny BERT's word-level tokenizer and, as decoder checkpoints
    usually ship, no padding token."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tiny_decoder(family, len(tokenizer), num_labels=4, pad_token_id=None).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("family, projections", [("gpt2", 4), ("llama", 8)])
def test_run_end_to_end_for_decoder_families(
    family, projections, tiny_finetune_config, tiny_model_dir, tmp_path
):
    """Train an airllm policy on the decoder's rounds, then play it through a noisy link."""
    folder = _decoder_folder(family, tiny_model_dir, tmp_path / family)
    base = {
        "data": tiny_finetune_config.data.model_dump(mode="json"),
        "model": {"name_or_path": str(folder), "r_max": 4},
        "train": {"rounds": 2, "steps_per_round": 2, "warmup_steps": 0},
        "link": {"scheme": "digital", "snr_process": "fixed", "snr_db": 12.0},
        "ppo": {"n_steps": 8, "n_envs": 1, "batch_size": 8, "n_epochs": 1},
        "airllm": {"warm_start_updates": 5, "updates_per_phase": 5},
        "surrogate": {"real_episodes": 3, "min_r2": None},
        "total_steps": 16,
        "out_dir": str(tmp_path / "runs"),
    }
    config = tmp_path / "policy.yaml"
    config.write_text(yaml.safe_dump({**base, "method": "airllm", "run_name": "policy"}))
    result = runner.invoke(app, ["train-policy", "--config", str(config), "--quiet"])
    assert result.exit_code == 0, result.output

    run_config = tmp_path / "run.yaml"
    run_base = {k: v for k, v in base.items() if k not in ("ppo", "airllm", "surrogate")}
    run_base.pop("total_steps")
    run_config.write_text(yaml.safe_dump(run_base))
    policy = tmp_path / "runs" / "policy" / "policy"
    args = ["run", "--config", str(run_config), "--method", "airllm", "--policy", str(policy)]
    result = runner.invoke(app, [*args, "--run-name", "episode", "--quiet"])
    assert result.exit_code == 0, result.output
    run = tmp_path / "runs" / "episode"
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2
    for row in rows:
        assert len(row["rank_vector"]) == projections
        assert row["link"]["scheme"] == "digital" and row["payload_bits"] > 0
    assert json.loads((run / "manifest.json").read_text())["status"] == "completed"
    adapter = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert adapter["peft_type"] == "LORA"


# ----------------------------------------------------------------------------- other data sets


def test_a_new_three_class_data_set_runs_end_to_end(tiny_model_dir, tmp_path):
    """A JSONL folder with other column names and 3 classes: the head gets 3 outputs."""
    import random

    from safetensors.torch import load_file

    rng = random.Random(0)
    words = {0: "awful bad poor", 1: "fine okay average", 2: "great superb good"}
    folder = tmp_path / "data" / "reviews"
    folder.mkdir(parents=True)
    for split, n in (("train", 150), ("test", 30)):
        with open(folder / f"{split}.jsonl", "w") as fh:
            for i in range(n):
                label = i % 3
                body = " ".join(rng.choice(words[label].split()) for _ in range(8))
                fh.write(json.dumps({"body": body, "stars": label, "id": i}) + "\n")
    config = tmp_path / "run.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "data": {
                    "source": "reviews",
                    "data_dir": str(tmp_path / "data"),
                    "text_column": "body",
                    "label_column": "stars",
                    "validation_size": 30,
                    "edge_eval_size": 30,
                    "batch_size": 8,
                    "max_length": 16,
                },
                "model": {"name_or_path": str(tiny_model_dir), "r_max": 2},
                "train": {"rounds": 2, "steps_per_round": 3, "warmup_steps": 0},
                "link": {"scheme": "analog", "snr_process": "fixed", "snr_db": 10.0},
                "out_dir": str(tmp_path / "runs"),
            }
        )
    )
    args = ["run", "--config", str(config), "--method", "lora", "--run-name", "r", "--test"]
    result = runner.invoke(app, [*args, "--quiet"])
    assert result.exit_code == 0, result.output
    run = tmp_path / "runs" / "r"
    weights = load_file(run / "adapter" / "adapter_model.safetensors")
    head = [v for k, v in weights.items() if k.endswith("classifier.weight")]
    assert len(head) == 1 and head[0].shape[0] == 3
    manifest = json.loads((run / "manifest.json").read_text())
    assert 0.0 <= manifest["summary"]["test_accuracy"] <= 1.0


def test_target_projections_are_overridable(tiny_finetune_config, tiny_model_dir, tmp_path):
    folder = _decoder_folder("llama", tiny_model_dir, tmp_path / "llama")
    config = tmp_path / "ft.yaml"
    body = tiny_finetune_config.model_dump(mode="json")
    body["model"] = {"name_or_path": str(folder), "r_max": 2}
    body["rank"] = 2
    body["train"].update(rounds=1, steps_per_round=2)
    config.write_text(yaml.safe_dump(body))
    args = ["finetune", "--config", str(config), "--no-test", "--quiet"]
    result = runner.invoke(app, [*args, "--target-modules", "q_proj,v_proj"])
    assert result.exit_code == 0, result.output
    row = json.loads((tmp_path / "runs" / "tiny" / "metrics.jsonl").read_text().splitlines()[0])
    assert len(row["rank_vector"]) == 4  # 2 layers x (q, v)
    bad = runner.invoke(app, [*args, "--target-modules", "nope_proj", "--run-name", "bad"])
    assert bad.exit_code == 2 and "nope_proj" in bad.output
    assert not (tmp_path / "runs" / "bad").exists()
