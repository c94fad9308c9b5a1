"""airlora: communication-aware remote fine-tuning of language models over wireless links."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("airlora")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
