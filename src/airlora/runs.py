"""Run folders, in one place: their file names, one atomic-write helper, the manifest.

A run folder holds ``config.yaml`` (re-runnable), ``metrics.jsonl`` (one JSON object per
round, appended and flushed as rounds finish), ``manifest.json`` (seed, versions, code
revision, status, data source) and whatever the run exports (``adapter/``, ``policy/``).
Every module names these files through the constants below, never by literal.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from pydantic import BaseModel

from airlora.config import dump_config

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
MANIFEST_FILE = "manifest.json"
ADAPTER_DIR = "adapter"
POLICY_DIR = "policy"
EPISODES_FILE = "episodes.jsonl"
ROUNDS_FILE = "rounds.jsonl"
SURROGATE_FILE = "surrogate.json"
POLICY_FILE = "policy.json"
SURROGATE_DIR = "surrogate"
EVAL_DIR = "eval"
RESULT_FILE = "result.json"
SWEEP_FILE = "sweep.yaml"
TENSORBOARD_DIR = "tensorboard"
REPORT_DIR = "report"
REPORT_FILE = "report.md"

TRACKED_PACKAGES = (
    "airlora",
    "torch",
    "transformers",
    "peft",
    "numpy",
    "safetensors",
    "datasets",
    "tokenizers",
    "pydantic",
    "gymnasium",
    "stable-baselines3",
    "diffusers",
    "scikit-learn",
)


def atomic_write(path: Path, write: Callable[[Path], object]) -> None:
    """Have ``write(tmp)`` write a temporary file beside ``path``, then rename it into
    place: readers see the old file or the new one, never half of one."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` (UTF-8, flushed to disk) atomically; see :func:`atomic_write`."""

    def write(tmp: Path) -> None:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())

    atomic_write(path, write)


def read_jsonl(path: Path) -> list[dict]:
    """Every JSON object of a JSON-lines file (blank lines skipped); [] when it is absent."""
    path = Path(path)
    if not path.exists():
        return []
    return [
        json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()
    ]


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in TRACKED_PACKAGES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


def code_revision() -> dict[str, object]:
    """Git commit of the airlora source tree, and whether it had uncommitted changes."""
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "-C", str(here), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()
        dirty = subprocess.run(
            # No index lock: a run killed mid-call must not leave .git/index.lock behind.
            ["git", "--no-optional-locks", "-C", str(here), "status", "--porcelain", "--", "."],
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()
        return {"commit": commit, "dirty": bool(dirty)}
    except (OSError, subprocess.SubprocessError):
        return {"commit": "unknown", "dirty": None}


# Where results are written says nothing about what produced them.
LOCATION_FIELDS = frozenset({"out_dir", "run_name"})


def config_hash(config: BaseModel) -> str:
    """A short hash of what determines a result: the config less its output location."""
    text = json.dumps(config.model_dump(mode="json", exclude=LOCATION_FIELDS), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class RunFolder:
    """A run's folder. Create it only once the inputs have been checked."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    @classmethod
    def create(
        cls,
        out_dir: Path,
        name: str,
        config: BaseModel,
        seed: int,
        kind: str,
        data_source: str | None = None,
    ) -> RunFolder:
        """``data_source``: the file (or hub id) the task was read from, recorded beside the
        config, which names only what was asked for (``ag_news`` may resolve to a copy
        under the data directory or to the one shipped with the package)."""
        path = Path(out_dir) / name
        if path.exists():
            raise FileExistsError(f"run folder {path} already exists; choose another run name")
        path.mkdir(parents=True)
        run = cls(path)
        atomic_write_text(path / CONFIG_FILE, dump_config(config))
        run._manifest = {
            "kind": kind,
            "status": "running",
            "seed": seed,
            "data_source": data_source,
            "config_hash": config_hash(config),
            "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "command": sys.argv,
            "versions": package_versions(),
            "code_revision": code_revision(),
            "platform": platform.platform(),
        }
        run._write_manifest()
        return run

    @classmethod
    def reopen(cls, path: Path, config: BaseModel | None = None) -> RunFolder:
        """An existing run folder, to resume: its manifest says ``running`` again and lists,
        under ``resumed``, when and by which code revision it was taken up, and how it had
        ended. Refused when the run completed, or when ``config`` is not the one the run
        was started with (output location aside)."""
        path = Path(path)
        manifest_path = path / MANIFEST_FILE
        if not manifest_path.is_file():
            raise FileNotFoundError(f"{path} is not a run folder (no {MANIFEST_FILE})")
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        if manifest.get("status") == "completed":
            raise ValueError(f"{path} completed: there is nothing to resume")
        if config is not None and config_hash(config) != manifest.get("config_hash"):
            raise ValueError(f"{path} was started with another config: resume it with its own")
        manifest.setdefault("resumed", []).append(
            {
                "at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "previous_status": manifest.get("status"),
                "code_revision": code_revision(),
            }
        )
        manifest["status"] = "running"
        manifest.pop("error", None)
        run = cls(path)
        run._manifest = manifest
        run._write_manifest()
        return run

    def rewrite_records(self, filename: str, records: list[dict]) -> None:
        """Replace a log file of the run with ``records`` (atomically)."""
        text = "".join(json.dumps(r, allow_nan=False) + "\n" for r in records)
        atomic_write_text(self.path / filename, text)

    def _write_manifest(self) -> None:
        atomic_write_text(self.path / MANIFEST_FILE, json.dumps(self._manifest, indent=2) + "\n")

    def append_metrics(self, record: dict) -> None:
        self.append_record(METRICS_FILE, record)

    def append_record(self, filename: str, record: dict) -> None:
        """Append one JSON line to a log file of the run, flushed to disk."""
        with open(self.path / filename, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record, allow_nan=False) + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def finish(self, summary: dict, started: float, status: str = "completed") -> None:
        """Record the summary; ``status`` is ``completed`` or ``diverged`` (a run that ended
        on non-finite numbers: its summary says where, and it is kept out of averages)."""
        self._manifest.update(
            status=status,
            finished=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            wall_time_s=round(time.perf_counter() - started, 3),
            summary=summary,
        )
        self._write_manifest()

    def fail(self, error: BaseException) -> None:
        self._manifest.update(status="failed", error=f"{type(error).__name__}: {error}")
        self._write_manifest()

    def read_metrics(self) -> list[dict]:
        return read_jsonl(self.path / METRICS_FILE)
