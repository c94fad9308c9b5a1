"""Names a package exports without importing their modules until first use.

``import airlora`` (and a Flower SuperNode's ``import airlora.deploy``) must not pay for
torch, transformers and PEFT; a package lists where each of its names lives and gets the
module-level ``__getattr__`` and ``__dir__`` (PEP 562) from :func:`lazy_exports`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from importlib import import_module
from typing import Any


def lazy_exports(
    package: str, namespace: dict[str, Any], where: Mapping[str, str]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``__getattr__`` and ``__dir__`` for ``package`` (its ``globals()`` as ``namespace``):
    ``where`` maps each exported name to the module that defines it. A name is imported on
    first access and then kept in the namespace; any other name is an AttributeError."""

    def __getattr__(name: str) -> Any:
        if name in where:
            value = getattr(import_module(where[name]), name)
            namespace[name] = value
            return value
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__() -> list[str]:
        return sorted({*namespace, *where})

    return __getattr__, __dir__
