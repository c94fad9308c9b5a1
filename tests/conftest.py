"""Shared fixtures: a tiny randomly initialised BERT and tiny data files."""

from __future__ import annotations

import contextlib
import csv
import hashlib
import os
import random
import signal
import subprocess
import time
from pathlib import Path

# The test configuration itself, not the Makefile, says what every test runs under, so that
# plain `pytest` runs exactly what `make test` runs: no hub (HF reads these at import, hence
# before anything imports transformers), and the packaged data rather than a local copy that
# a developer's AIRLORA_DATA_DIR may point at.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ.pop("AIRLORA_DATA_DIR", None)
# On pytest-xdist workers (pyproject's addopts) every worker, and every process a test
# starts, computes on one thread: two workers with torch's default of a thread per core
# would oversubscribe the cores (a 2-core machine's suite ran 30 % longer that way).
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ["MKL_NUM_THREADS"] = "1"

import pytest
import torch

# The suite runs on pytest-xdist workers (pyproject's addopts). These tests take tens of
# seconds to minutes each (processes killed and restarted, Flower and Ray clusters, the real
# model): start them first, so that none of them is the last to start. Work stealing hands
# the first worker the first half of this list, so they run one after another there while
# the other worker takes the short tests; dealing them to both workers ran two of these
# multi-process tests at once on 2 cores and was slower. A scheduling hint: any order passes.
LONG_TESTS = (
    "test_sweep_survives_twenty_kills_inside_cells",
    "test_flower_deployment_with_tls_auth_and_a_killed_edge",
    "test_ray_sweep_killed_inside_cells_resumes_without_recomputing",
    "test_short_finetune_on_the_packaged_ag_news_sample",
    "test_ray_engine_gives_the_local_engine_numbers",
    "test_the_readme_notebook_example_runs",
    "test_flowers_simulation_engine_runs_the_same_app_on_virtual_edges",
    "test_sweep_resumes_after_a_kill_without_redoing_or_losing_cells",
    "test_a_full_disk_mid_sweep_stops_clearly_and_loses_nothing",
    "test_cli_link_plot_writes_png",
)


def pytest_collection_modifyitems(config, items) -> None:
    rank = {name: i for i, name in enumerate(LONG_TESTS)}
    items.sort(key=lambda item: rank.get(item.originalname, len(rank)))


WORDS = {
    0: "war election minister government troops peace treaty president parliament vote",
    1: "goal match team season coach league player win score cup",
    2: "stocks market profit shares bank oil prices earnings economy trade",
    3: "software computer internet chip space nasa research google phone data",
}
FILLER = "the a of in on and to for with at by from is was"


def make_rows(n: int, seed: int = 0) -> list[tuple[str, int]]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = i % 4
        words = WORDS[label].split()
        filler = FILLER.split()
        text = " ".join(rng.choice(words if rng.random() < 0.6 else filler) for _ in range(12))
        rows.append((text, label))
    return rows


def write_csv(path: Path, rows: list[tuple[str, int]], header=("text", "label")) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        if header:
            w.writerow(header)
        w.writerows(rows)
    return path


def build_tiny_model(folder: Path) -> Path:
    """A 2-layer BERT (hidden 32) with a word-level vocabulary, saved as a model folder."""
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab += sorted({w for ws in WORDS.values() for w in ws.split()} | set(FILLER.split()))
    vocab += [f"##{c}" for c in "abcdefghijklmnopqrstuvwxyz"] + list("abcdefghijklmnopqrstuvwxyz")
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tokenizer = BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)})
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
        num_labels=4,
    )
    BertForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def build_tiny_data(root: Path) -> Path:
    """A data directory holding `tiny/train.csv` (400 rows) and `tiny/test.csv` (80 rows)."""
    (root / "tiny").mkdir(parents=True, exist_ok=True)
    write_csv(root / "tiny" / "train.csv", make_rows(400, seed=1))
    write_csv(root / "tiny" / "test.csv", make_rows(80, seed=2))
    return root


def tiny_decoder(family: str, vocab_size: int, num_labels: int, pad_token_id: int | None):
    """A randomly initialised 2-layer GPT-2 or LLaMA-style classifier (hidden 32)."""
    from transformers import (
        GPT2Config,
        GPT2ForSequenceClassification,
        LlamaConfig,
        LlamaForSequenceClassification,
    )

    torch.manual_seed(0)
    if family == "gpt2":
        config = GPT2Config(
            vocab_size=vocab_size,
            n_embd=32,
            n_layer=2,
            n_head=2,
            n_positions=64,
            num_labels=num_labels,
            pad_token_id=pad_token_id,
        )
        return GPT2ForSequenceClassification(config)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        num_labels=num_labels,
        pad_token_id=pad_token_id,
    )
    return LlamaForSequenceClassification(config)


def tiny_task_sections(model_dir: Path, data_dir: Path) -> dict:
    """The data and model sections of a config for the tiny BERT on the tiny data."""
    return {
        "data": {
            "source": "tiny",
            "data_dir": str(data_dir),
            "validation_size": 40,
            "edge_eval_size": 32,
            "batch_size": 8,
            "max_length": 24,
        },
        "model": {"name_or_path": str(model_dir), "r_max": 4, "lora_alpha": 8},
    }


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="session")
def tiny_data_dir(tmp_path_factory) -> Path:
    return build_tiny_data(tmp_path_factory.mktemp("data"))


@pytest.fixture
def tiny_finetune_config(tiny_model_dir, tiny_data_dir, tmp_path):
    from airlora.config import FinetuneConfig

    return FinetuneConfig.model_validate(
        {
            **tiny_task_sections(tiny_model_dir, tiny_data_dir),
            "train": {
                "rounds": 3,
                "steps_per_round": 4,
                "warmup_steps": 0,
                "learning_rate": 1e-2,
                "head_learning_rate": 1e-2,
            },
            "rank": 4,
            "out_dir": str(tmp_path / "runs"),
            "run_name": "tiny",
        }
    )


# ----------------------------------------------------------------------------- killing sweeps


def cell_digest(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h.update(p.relative_to(folder).as_posix().encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def cells_in_flight(cells: Path, since_ns: int) -> list[str]:
    """Cells being built by the current run: temporary folders made after it started (a
    killed run's leftovers are older, and the next run removes them)."""
    if not cells.exists():
        return []
    out = []
    for p in cells.glob(".tmp-*"):
        with contextlib.suppress(FileNotFoundError):  # renamed into place meanwhile
            if p.stat().st_mtime_ns >= since_ns:
                out.append(p.name)
    return out


def finished_cells(cells: Path) -> list[Path]:
    return [p for p in cells.iterdir() if not p.name.startswith(".")] if cells.exists() else []


def kill_sweep_inside_cells(
    cmd: list[str],
    cells: Path,
    kills: int,
    rng: random.Random,
    env: dict | None = None,
    targets: tuple[int, ...] = (0, 0, 1, 2),
):
    """Start ``cmd`` (a sweep) again and again; SIGKILL it (driver and workers) each time
    while a cell is being built, after a random number of further cells has been sealed.
    After every kill, check every finished cell against its seal and its earlier digest.
    ``targets``: how many more cells must be sealed before a kill, drawn from these.
    Returns one record per kill and the digests seen. Stops early when the sweep finishes."""
    records: list[dict] = []
    seen: dict[str, str] = {}
    while len(records) < kills:
        sealed_before = len(finished_cells(cells))
        target = sealed_before + rng.choice(targets)
        started = time.time_ns()
        proc = subprocess.Popen(
            cmd,
            env=env,
            start_new_session=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.time() + 300
        while proc.poll() is None and time.time() < deadline:
            if len(finished_cells(cells)) >= target and cells_in_flight(cells, started):
                time.sleep(rng.uniform(0.0, 0.01))  # short: a cell may finish within 50 ms
                break
            time.sleep(0.005)
        if proc.poll() is not None:  # the sweep finished before the kill: nothing to kill
            assert proc.returncode == 0
            return records, seen
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        # A temporary folder still there after the kill was a cell in flight at the kill.
        in_flight = cells_in_flight(cells, started)
        finished = finished_cells(cells)
        for folder in finished:
            from airlora.sweep import check_cell

            assert check_cell(folder) is None, folder.name
            digest = cell_digest(folder)
            assert seen.setdefault(folder.name, digest) == digest, f"{folder} changed"
        records.append(
            {"in_flight": len(in_flight), "sealed": len(finished), "checked": len(finished)}
        )
    return records, seen
