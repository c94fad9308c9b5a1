"""CRC-32 error detection for packets, computed from error patterns.

A CRC is linear over GF(2): a received packet passes the check exactly when the syndrome of
its error pattern is zero, whatever the data. So the simulator needs no CRC of the data: it
XORs, per packet, the syndromes of the bit positions that erred (a table lookup each), which
is exact and costs time in proportion to the number of errors, not of bits. `crc32_bits` is
the plain bit-serial CRC the tests compare against.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

CRC32_POLY = 0x04C11DB7  # IEEE 802.3 generator, non-reflected, init 0, no final XOR
CRC_BITS = 32


def crc32_bits(bits: np.ndarray) -> int:
    """Reference bit-serial CRC-32 of a bit array (MSB first). Slow; for tests."""
    reg = 0
    for b in bits.astype(np.uint8):
        top = ((reg >> 31) & 1) ^ int(b)
        reg = (reg << 1) & 0xFFFFFFFF
        if top:
            reg ^= CRC32_POLY
    return reg


@lru_cache(maxsize=16)
def syndrome_table(data_bits: int) -> np.ndarray:
    """Syndrome of a single error at each position of a packet of data + 32 CRC bits.

    For a data error at position i the CRC changes by x^(data_bits - 1 - i + 32) mod g; for an
    error in CRC bit j (MSB first) the received CRC changes by bit 31 - j.
    """
    table = np.empty(data_bits + CRC_BITS, dtype=np.uint32)
    reg = CRC32_POLY  # x^32 mod g: the last data bit
    for i in range(data_bits - 1, -1, -1):
        table[i] = reg
        top = reg >> 31
        reg = (reg << 1) & 0xFFFFFFFF
        if top:
            reg ^= CRC32_POLY
    table[data_bits:] = (1 << np.arange(CRC_BITS - 1, -1, -1, dtype=np.uint64)).astype(np.uint32)
    return table


def detect_corrupted(error_positions: np.ndarray, n_packets: int, data_bits: int) -> np.ndarray:
    """Which packets fail their CRC, from the sorted flat positions of bit errors.

    Positions index a stream of ``n_packets`` packets of ``data_bits + 32`` bits each.
    """
    failed = np.zeros(n_packets, dtype=bool)
    if error_positions.size == 0:
        return failed
    length = data_bits + CRC_BITS
    packet = error_positions // length
    syndromes = syndrome_table(data_bits)[error_positions % length]
    starts = np.flatnonzero(np.r_[True, packet[1:] != packet[:-1]])
    per_packet = np.bitwise_xor.reduceat(syndromes, starts)
    failed[packet[starts]] = per_packet != 0
    return failed
