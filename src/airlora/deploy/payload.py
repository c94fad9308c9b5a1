"""The adapter on the wire: what the cloud puts in a Flower message for one edge, and back.

The transport (Flower over gRPC/HTTP) is reliable, so the PHY is emulated at the receiver:
the cloud sends what its transmitter would put on the air, the link's quantised codes, and the
edge passes them through its own emulated channel (:mod:`airlora.deploy.edge`).

- Factors (``<projection>.lora_A`` / ``.lora_B``) travel as the link's quantiser makes them:
  ``link.quant_bits`` per value, bit-packed, with the tensor's minimum and maximum beside
  them (:mod:`airlora.link.quantization`); an analog link sends float32 values.
- The head's tensors (the link's protected control data) travel as float32.

So the bytes of a message's arrays are the link's payload bits / 8, up to each tensor's last
partial byte. Each tensor's quantiser bits, minimum, maximum and shape travel in the
message's config record (the link counts the minimum and maximum as 64 bits of control data;
Flower sends the record as float64 values).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from airlora.link.quantization import bits_to_codes, codes_to_bits, dequantize, quantize

# Anything larger than this per edge and round is refused before it is decoded.
MAX_PAYLOAD_BYTES = 512 * 1024 * 1024


class PayloadError(ValueError):
    """A message whose adapter cannot be what the cloud sent (wrong names, sizes, types)."""


@dataclass(frozen=True)
class EncodedAdapter:
    """One edge's payload: arrays by tensor name, and per tensor its shape and (for quantised
    factors) its minimum and maximum.

    ``arrays``: uint8 bit-packed codes, or float32 values (head, analog link).
    ``meta``: name -> [kind, lo, hi, *shape] with kind 0 float32, b > 0 codes of b bits.
    """

    arrays: dict[str, np.ndarray]
    meta: dict[str, list[float]]

    @property
    def nbytes(self) -> int:
        """Bytes of the arrays: what the transport carries besides framing and metadata."""
        return int(sum(a.nbytes for a in self.arrays.values()))


def encode_adapter(
    tensors: Mapping[str, torch.Tensor], protected: Sequence[str], quant_bits: int | None
) -> EncodedAdapter:
    """The payload of ``tensors``: protected tensors as float32, the rest as ``quant_bits``
    codes (None: float32, an analog link)."""
    arrays: dict[str, np.ndarray] = {}
    meta: dict[str, list[float]] = {}
    for name, tensor in tensors.items():
        values = tensor.detach().cpu().float().numpy()
        shape = [float(s) for s in values.shape]
        if name in protected or quant_bits is None:
            arrays[name] = np.ascontiguousarray(values.reshape(-1), dtype=np.float32)
            meta[name] = [0.0, 0.0, 0.0, *shape]
            continue
        q = quantize(values, quant_bits)
        arrays[name] = np.packbits(codes_to_bits(q.codes, quant_bits))
        meta[name] = [float(quant_bits), q.lo, q.hi, *shape]
    return EncodedAdapter(arrays, meta)


def decode_adapter(
    arrays: Mapping[str, np.ndarray],
    meta: Mapping[str, Sequence[float]],
    expected: Mapping[str, tuple[int, ...]] | None = None,
) -> dict[str, torch.Tensor]:
    """The tensors of a payload (float32), checked against what it claims and, given
    ``expected`` (name -> full shape at r_max), against the model: raises
    :class:`PayloadError` naming the first problem."""
    if set(arrays) != set(meta):
        raise PayloadError(f"arrays and metadata name different tensors: {sorted(arrays)[:3]}")
    total = sum(int(np.asarray(a).nbytes) for a in arrays.values())
    if total > MAX_PAYLOAD_BYTES:
        raise PayloadError(f"payload of {total} bytes exceeds {MAX_PAYLOAD_BYTES}")
    out: dict[str, torch.Tensor] = {}
    for name, array in arrays.items():
        entry = [float(v) for v in meta[name]]
        if len(entry) < 4 or not all(math.isfinite(v) for v in entry):
            raise PayloadError(f"{name}: malformed metadata {entry}")
        kind, lo, hi, shape = int(entry[0]), entry[1], entry[2], [int(s) for s in entry[3:]]
        if any(s < 0 for s in shape):
            raise PayloadError(f"{name}: negative shape {shape}")
        n = int(np.prod(shape))
        if expected is not None:
            _check_shape(name, shape, expected)
        array = np.asarray(array)
        if kind == 0:
            if array.dtype != np.float32 or array.size != n:
                raise PayloadError(f"{name}: expected {n} float32 values, got {array.size}")
            values = array.astype(np.float32)
        else:
            if not 2 <= kind <= 16:
                raise PayloadError(f"{name}: {kind} quantisation bits")
            if array.dtype != np.uint8 or array.size != math.ceil(n * kind / 8):
                raise PayloadError(f"{name}: {array.size} bytes cannot hold {n} {kind}-bit codes")
            codes = bits_to_codes(np.unpackbits(array)[: n * kind], kind)
            values = dequantize(codes, lo, hi, kind)
        out[name] = torch.from_numpy(values.reshape(shape).copy())
    return out


def pack_arrays(arrays: Mapping[str, np.ndarray]) -> tuple[np.ndarray, list[str]]:
    """A payload's arrays as one byte buffer (in the order of the returned names): a message
    of one array instead of one per tensor (Flower moves each array as its own object, with
    a request per object). The bytes are the arrays' bytes, nothing added."""
    names = list(arrays)
    parts = [np.ascontiguousarray(arrays[n]).view(np.uint8).reshape(-1) for n in names]
    return (np.concatenate(parts) if parts else np.zeros(0, np.uint8)), names


def unpack_arrays(
    buffer: np.ndarray, names: Sequence[str], meta: Mapping[str, Sequence[float]]
) -> dict[str, np.ndarray]:
    """The arrays of a packed payload (:func:`pack_arrays`); each one's length follows from
    its metadata (float32 values, or bit-packed codes). Raises :class:`PayloadError` when the
    buffer and the metadata disagree."""
    buffer = np.asarray(buffer)
    if buffer.dtype != np.uint8 or buffer.ndim != 1:
        raise PayloadError(f"a packed payload is a flat uint8 array, got {buffer.dtype}")
    if len(set(names)) != len(names) or set(names) != set(meta):
        raise PayloadError("the packed payload's names and its metadata differ")
    arrays: dict[str, np.ndarray] = {}
    offset = 0
    for name in names:
        entry = [float(v) for v in meta[name]]
        if len(entry) < 4 or not all(math.isfinite(v) for v in entry) or min(entry[3:]) < 0:
            raise PayloadError(f"{name}: malformed metadata {entry}")
        kind = int(entry[0])
        if entry[0] != kind or not (kind == 0 or 2 <= kind <= 16):
            raise PayloadError(f"{name}: {entry[0]} quantisation bits")
        if any(s != int(s) for s in entry[3:]):
            raise PayloadError(f"{name}: shape {entry[3:]} is not integral")
        n = math.prod(int(s) for s in entry[3:])  # Python ints: no overflow
        size = 4 * n if kind == 0 else math.ceil(n * kind / 8)
        if offset + size > buffer.size:
            raise PayloadError(
                f"{name}: the packed payload ends {offset + size - buffer.size} bytes short"
            )
        chunk = buffer[offset : offset + size]
        arrays[name] = chunk.copy().view(np.float32) if kind == 0 else chunk
        offset += size
    if offset != buffer.size:
        raise PayloadError(f"{buffer.size - offset} bytes past the last tensor")
    return arrays


def _check_shape(name: str, shape: list[int], expected: Mapping[str, tuple[int, ...]]) -> None:
    full = expected.get(name)
    if full is None:
        raise PayloadError(f"unknown tensor {name}")
    if len(shape) != len(full):
        raise PayloadError(f"{name}: shape {shape} does not fit {list(full)}")
    if name.endswith(".lora_A"):  # r x d_in, r <= r_max
        ok = shape[1] == full[1] and 0 < shape[0] <= full[0]
    elif name.endswith(".lora_B"):  # d_out x r
        ok = shape[0] == full[0] and 0 < shape[1] <= full[1]
    elif name.endswith(".lora_E"):  # the SVD form's r singular values
        ok = 0 < shape[0] <= full[0]
    else:
        ok = tuple(shape) == tuple(full)
    if not ok:
        raise PayloadError(f"{name}: shape {shape} does not fit {list(full)}")


def ranks_of(tensors: Mapping[str, torch.Tensor], projection_names: Sequence[str]) -> list[int]:
    """The rank vector a payload carries (0 where a projection's factors are absent)."""
    ranks = []
    for name in projection_names:
        a, b = tensors.get(f"{name}.lora_A"), tensors.get(f"{name}.lora_B")
        e = tensors.get(f"{name}.lora_E")
        if (a is None) != (b is None) or (a is not None and a.shape[0] != b.shape[1]):
            raise PayloadError(f"{name}: factors A and B do not match")
        if e is not None and (a is None or e.shape[0] != a.shape[0]):
            raise PayloadError(f"{name}: singular values E do not match A and B")
        ranks.append(0 if a is None else int(a.shape[0]))
    return ranks
