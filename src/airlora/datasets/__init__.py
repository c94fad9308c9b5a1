"""Data sets shipped inside the package, so that a machine with no data directory and no
network runs the main job.

``ag_news``: a 5,000 / 1,000-row sample of AG News (see ``ag_news/README.md`` for its origin
and licence note). A name given as ``--data`` is looked up here after the data directory and
before the Hugging Face hub.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path


def packaged_datasets() -> list[str]:
    """Names of the data sets that ship with airlora."""
    root = resources.files(__name__)
    return sorted(p.name for p in root.iterdir() if p.is_dir() and (p / "train.csv").is_file())


def packaged_dataset(name: str) -> Path | None:
    """The folder of a shipped data set, or None when no data set of that name ships."""
    if not name or "/" in name or "\\" in name or name.startswith("."):
        return None
    folder = resources.files(__name__) / name
    if not folder.is_dir() or not (folder / "train.csv").is_file():
        return None
    return Path(str(folder))
