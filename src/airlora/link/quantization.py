"""Per-tensor uniform quantisation to b bits, and the bit stream it becomes.

A tensor's minimum and maximum travel as control data (two float32 values); the receiver
maps a code k in 0..2^b-1 back to ``lo + k * (hi - lo) / (2^b - 1)``, so a reconstructed
value never leaves [lo, hi], whatever the channel did to the bits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from airlora.errors import LinkError

CONTROL_BITS_PER_TENSOR = 64  # lo and hi as float32


@dataclass(frozen=True)
class QuantizedTensor:
    codes: np.ndarray  # uint8 for b <= 8 else uint16, one per value
    lo: float
    hi: float
    bits: int


def check_bits(bits: int) -> int:
    if not 2 <= int(bits) <= 16:
        raise LinkError(f"quantisation bits must lie in 2..16, got {bits}")
    return int(bits)


def quantize(
    values: np.ndarray, bits: int, value_range: tuple[float, float] | None = None
) -> QuantizedTensor:
    """Round to the nearest of 2^b evenly spaced levels between the tensor's min and max
    (``value_range``: between these instead, values outside clipped to them)."""
    bits = check_bits(bits)
    flat = np.asarray(values, dtype=np.float32).reshape(-1)
    if flat.size == 0:
        return QuantizedTensor(np.zeros(0, np.uint8 if bits <= 8 else np.uint16), 0.0, 0.0, bits)
    if value_range is None:
        lo, hi = float(flat.min()), float(flat.max())
    else:
        lo, hi = float(value_range[0]), float(value_range[1])
        if not (math.isfinite(lo) and math.isfinite(hi) and hi >= lo):
            raise ValueError(f"a quantiser range must be finite with min <= max, got {lo}, {hi}")
    top = (1 << bits) - 1
    if hi > lo:
        step = np.float32((hi - lo) / top)
        codes = np.rint((flat - np.float32(lo)) / step)
        np.clip(codes, 0, top, out=codes)
    else:
        codes = np.zeros_like(flat)
    dtype = np.uint8 if bits <= 8 else np.uint16
    return QuantizedTensor(codes.astype(dtype), lo, hi, bits)


def dequantize(codes: np.ndarray, lo: float, hi: float, bits: int) -> np.ndarray:
    top = (1 << bits) - 1
    codes = np.minimum(codes, top)  # stray high bits of a corrupted code stay in range
    step = np.float32((hi - lo) / top) if hi > lo else np.float32(0.0)
    return np.float32(lo) + codes.astype(np.float32) * step


def codes_to_bits(codes: np.ndarray, bits: int) -> np.ndarray:
    """Codes -> unpacked bits (uint8 0/1), most significant bit first."""
    if bits == 8:
        return np.unpackbits(codes.astype(np.uint8))
    if bits == 16:
        return np.unpackbits(codes.astype(">u2").view(np.uint8))
    wide = codes.astype(">u2").view(np.uint8)
    return np.unpackbits(wide).reshape(-1, 16)[:, 16 - bits :].reshape(-1)


def bits_to_codes(stream: np.ndarray, bits: int) -> np.ndarray:
    if bits == 8:
        return np.packbits(stream)
    if bits == 16:
        return np.packbits(stream).view(">u2").astype(np.uint16)
    padded = np.zeros((stream.size // bits, 16), dtype=np.uint8)
    padded[:, 16 - bits :] = stream.reshape(-1, bits)
    return np.packbits(padded.reshape(-1)).view(">u2").astype(np.uint16)
