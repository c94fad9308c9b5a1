"""Where the model runs: device choice and mixed precision.

The policies (small MLPs) always run on the CPU, as Stable-Baselines3 recommends for MLP
policies; only the language model moves. On the CPU every run is fp32 and bit-reproducible
from its seed; on a GPU, bf16 autocast speeds training at the cost of exact repeatability.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from airlora.errors import DeviceError


def resolve_device(name: str) -> torch.device:
    """``auto`` (CUDA when available, else CPU), ``cpu``, ``cuda`` or ``cuda:N``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise DeviceError(
                f"device '{name}' was asked for but this torch build sees no CUDA GPU "
                f"(torch {torch.__version__}); use --device cpu or auto"
            )
        device = torch.device(name)
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise DeviceError(
                f"device '{name}' does not exist: {torch.cuda.device_count()} CUDA GPU(s)"
            )
        return device
    raise DeviceError(f"unknown device '{name}': expected auto, cpu, cuda or cuda:N")


def autocast_dtype(device: torch.device, precision: str) -> torch.dtype | None:
    """The autocast dtype for ``precision`` (auto, fp32, bf16) on ``device``; None = fp32."""
    if precision == "fp32":
        return None
    if precision == "bf16":
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise DeviceError(f"precision bf16 was asked for but {device} does not support it")
        return torch.bfloat16
    if precision == "auto":
        # CPU runs stay fp32: reproducibility there matters more than speed.
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return None
    raise DeviceError(f"unknown precision '{precision}': expected auto, fp32 or bf16")


@contextlib.contextmanager
def autocast(device: torch.device, dtype: torch.dtype | None) -> Iterator[None]:
    """Mixed-precision forward passes when ``dtype`` is set; plain fp32 otherwise."""
    if dtype is None:
        yield
        return
    with torch.autocast(device_type=device.type, dtype=dtype):
        yield
