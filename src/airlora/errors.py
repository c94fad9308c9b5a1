"""The errors a user can fix, in one place.

Every one of them is a ``ValueError`` (so ``except ValueError`` keeps working), carries a
message that names the input and the problem, and survives a process boundary: a sweep cell
that fails in a worker process or a Ray task reaches the driver with its message intact.
Python's default pickling calls ``cls(*args)``, which breaks for any ``__init__`` that takes
more than the message (``DataError(path, problem, row)`` did); ``__reduce__`` below rebuilds
an error from its message and attributes instead, whatever its constructor looks like.

The command line prints ``error: <message>`` and exits with status 2 for all of them, and
with status 1 for a :class:`DeployError` (a run that failed, not bad input).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _rebuild(cls: type[AirLoraError], message: str, state: dict[str, Any]) -> AirLoraError:
    err = cls.__new__(cls)
    Exception.__init__(err, message)
    err.__dict__.update(state)
    return err


class AirLoraError(ValueError):
    """Base of every error that bad input causes (a file, a setting, a saved object)."""

    def __reduce__(self) -> tuple:
        return (_rebuild, (type(self), str(self), dict(self.__dict__)))


class DeployError(RuntimeError):
    """A deployment that did not finish or could not start; the message names the process
    and quotes its log's tail."""


class ConfigError(AirLoraError):
    """A configuration that does not validate; the message lists each field and problem."""


class DataError(AirLoraError):
    """Malformed input data; the message names the file, the row (1-based) and the problem."""

    def __init__(self, path: Path | str, problem: str, row: int | None = None) -> None:
        where = f"{path}" if row is None else f"{path}, row {row}"
        super().__init__(f"{where}: {problem}")
        self.path = str(path)
        self.row = row
        self.problem = problem


class ModelError(AirLoraError):
    """A model that cannot be loaded; the message names the model and the problem."""


class DeviceError(AirLoraError):
    """A device setting this machine cannot honour."""


class LinkError(AirLoraError):
    """A link setting or input the link model cannot use (a modulation, an SNR trace...)."""


class PolicyError(AirLoraError):
    """A policy that cannot be built or loaded (an unknown method, a damaged saved policy)."""


class CellError(AirLoraError):
    """A sweep cell that failed; the message is ``cell <id>: <what went wrong>``.

    ``detail`` holds the worker's traceback when the failure was not a user error (a bug),
    so that it can be reported without losing the clean one-line message.
    """

    def __init__(self, cell_id: str, message: str, detail: str | None = None) -> None:
        super().__init__(f"cell {cell_id}: {message}")
        self.cell_id = cell_id
        self.detail = detail


def os_error_message(err: OSError) -> str:
    """A file-system failure in words: what, where; finished work stays where it is."""
    if err.errno is None:  # raised by airlora with its own message
        return str(err)
    what = err.strerror or str(err)
    where = f" ({err.filename})" if err.filename else ""
    return f"{what}{where}; what was finished is kept: fix this and run the same command again"


def config_error(err: Exception) -> ConfigError:
    """A pydantic ``ValidationError`` in words: ``field.path: problem (got value)``, joined."""
    errors = getattr(err, "errors", None)
    if not callable(errors):
        return ConfigError(str(err))
    parts = []
    for e in errors():
        loc = ".".join(str(x) for x in e["loc"]) or "config"
        given = e.get("input")
        shown = f" (got {given!r})" if isinstance(given, str | int | float | bool) else ""
        parts.append(f"{loc}: {e['msg']}{shown}")
    return ConfigError("; ".join(parts))


__all__ = [
    "AirLoraError",
    "CellError",
    "ConfigError",
    "DataError",
    "DeviceError",
    "LinkError",
    "ModelError",
    "PolicyError",
    "config_error",
    "os_error_message",
]
