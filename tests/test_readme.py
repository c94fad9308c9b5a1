"""The README's Python API example runs as written (issue 15)."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
README = Path(__file__).resolve().parents[1] / "README.md"


def _api_example() -> str:
    section = README.read_text().split("## Python API", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_readme_notebook_example_runs(tmp_path, monkeypatch):
    code = _api_example()
    assert len(code.strip().splitlines()) <= 12  # a notebook cell, not a program
    monkeypatch.chdir(tmp_path)
    printed = io.StringIO()
    namespace: dict = {}
    with contextlib.redirect_stdout(printed):
        exec(compile(code, str(README), "exec"), namespace)
    lora, noisy = namespace["lora"], namespace["noisy"]
    assert 0.0 <= lora.summary["final_accuracy"] <= 1.0
    assert lora.run_dir.resolve().is_relative_to(tmp_path)
    assert (lora.run_dir / "adapter" / "adapter_config.json").is_file()
    assert set(lora.summary) == set(noisy.summary)  # one summary, one set of keys
    assert [r["snr_db"] for r in noisy.rounds] == [8.0, 8.0]  # snr_db alone: a fixed SNR
    assert noisy.summary["total_airtime_s"] > 0
    lines = printed.getvalue().splitlines()
    assert len(lines) == 4 and lines[1].startswith("1 [")  # the callback saw each round
