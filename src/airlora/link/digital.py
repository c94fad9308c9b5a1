"""Uncoded digital transmission: quantiser -> packets + CRC -> mapper -> channel -> demapper.

Every stage works on whole arrays (float32 symbols, uint8 bits and bytes); the only loops are
over tensors and ARQ attempts, never over symbols or packets.

Packet layout: ``packet_bits`` data bits, a 32-bit CRC, then filler bits up to a whole number
of symbols. A packet whose CRC fails is an erasure: ARQ may send it again (each attempt sees
a fresh channel), and parameters whose bits lie in a packet that is finally lost are filled
by the receiver (zeros, or the last value it received for that tensor).

Fast path: for Gray BPSK and QPSK on AWGN every bit errs independently with the BPSK error
probability, so the chain can draw the error positions directly (geometric gaps) instead of
modulating symbols. This is exact in distribution, not an approximation; tests compare it to
the symbol-level chain. Other cases (16/64-QAM, where errors depend on the levels sent, and
fading) run symbol by symbol, vectorised. The CRC field's values do not affect detection (the
check is linear, see :mod:`airlora.link.crc`); for the symbol-level chain it is filled with
random bits, which is what a CRC of random-looking data looks like to the modulator.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from airlora.errors import LinkError
from airlora.link.channel import ChannelModel
from airlora.link.crc import CRC_BITS, detect_corrupted
from airlora.link.modulation import Modulation


@dataclass(frozen=True)
class PacketResult:
    """Outcome of sending a batch of packets once or more (ARQ)."""

    rx_bytes: np.ndarray  # (n_packets, packet_bytes) as received (valid where not lost)
    lost: np.ndarray  # (n_packets,) bool: still corrupted or never sent after the last attempt
    unsent: np.ndarray  # (n_packets,) bool: never sent (past the airtime budget)
    bit_errors: int  # on the first attempt, data + CRC bits
    bits_exposed: int  # bits sent on the first attempt (data + CRC)
    packets_sent: int  # first attempt plus retransmissions
    retransmissions: int


def _error_positions_iid(n_bits: int, p: float, rng: np.random.Generator) -> np.ndarray:
    """Sorted positions of independent Bernoulli(p) errors among n_bits (geometric gaps)."""
    if p <= 0.0 or n_bits == 0:
        return np.zeros(0, dtype=np.int64)
    if p >= 1.0:
        return np.arange(n_bits, dtype=np.int64)
    expected = n_bits * p
    if expected < 64:
        # Few errors: draw their number, then their places (geometric gaps could overflow).
        count = int(rng.binomial(n_bits, p))
        if count == 0:
            return np.zeros(0, dtype=np.int64)
        return np.sort(rng.choice(n_bits, size=count, replace=False)).astype(np.int64)
    chunks, position, draw = [], -1, int(expected + 6.0 * math.sqrt(expected) + 16)
    while True:
        gaps = rng.geometric(p, size=draw)
        positions = position + np.cumsum(gaps, dtype=np.int64)
        chunks.append(positions)
        position = int(positions[-1])
        if position >= n_bits:
            break
        draw = max(16, int((n_bits - position) * p * 1.5) + 16)
    out = np.concatenate(chunks)
    return out[: np.searchsorted(out, n_bits)]


class PacketChannel:
    """Sends packets of bytes over one modulation and channel at one SNR.

    Parameters
    ----------
    modulation: the Gray QAM scheme.
    channel: AWGN or block fading, with its CSI.
    packet_bits: data bits per packet (a multiple of 8).
    fast_path: draw bit errors directly where that is exact (Gray BPSK/QPSK on AWGN).
    """

    def __init__(
        self,
        modulation: Modulation,
        channel: ChannelModel,
        packet_bits: int,
        fast_path: bool = True,
    ) -> None:
        if packet_bits <= 0 or packet_bits % 8:
            raise LinkError(f"packet_bits must be a positive multiple of 8, got {packet_bits}")
        self.modulation = modulation
        self.channel = channel
        self.packet_bits = packet_bits
        self.fast_path = fast_path
        k = modulation.bits_per_symbol
        self.frame_bits = packet_bits + CRC_BITS
        self.symbols_per_packet = -(-self.frame_bits // k)
        self.padded_bits = self.symbols_per_packet * k

    @property
    def uses_fast_path(self) -> bool:
        return (
            self.fast_path and not self.channel.fading and self.modulation.name in ("bpsk", "qpsk")
        )

    def _errors(self, tx_bytes: np.ndarray, snr_db: float, rng: np.random.Generator) -> np.ndarray:
        """Sorted error positions in the (n_packets, data + CRC) bit layout."""
        n = tx_bytes.shape[0]
        if self.uses_fast_path:
            p = float(self.modulation.ber_awgn(snr_db))
            return _error_positions_iid(n * self.frame_bits, p, rng)
        mod = self.modulation
        tx = np.empty((n, self.padded_bits), dtype=np.uint8)
        tx[:, : self.packet_bits] = np.unpackbits(tx_bytes, axis=1)
        tx[:, self.packet_bits :] = rng.integers(
            0, 2, (n, self.padded_bits - self.packet_bits), dtype=np.uint8
        )
        n0 = 10.0 ** (-snr_db / 10.0)
        if not self.channel.fading:
            axes = mod.modulate_axes(tx.reshape(-1))
            axes += rng.standard_normal(axes.size, dtype=np.float32) * np.float32(
                math.sqrt(n0 / 2.0)
            )
            rx = mod.demodulate_axes(axes)
        else:
            symbols = mod.modulate(tx.reshape(-1)).reshape(n, self.symbols_per_packet)
            shape = {"packet": (n, 1), "round": (1, 1), "symbol": symbols.shape}
            blocks = shape[self.channel.block]
            h = self.channel.gains(int(np.prod(blocks)), rng).reshape(blocks)
            h_hat = self.channel.estimate(h.reshape(-1), snr_db, rng).reshape(blocks)
            noise = np.empty(symbols.shape, dtype=np.complex64)
            noise.real = rng.standard_normal(symbols.shape, dtype=np.float32)
            noise.imag = rng.standard_normal(symbols.shape, dtype=np.float32)
            noise *= np.float32(math.sqrt(n0 / 2.0))
            y = h * symbols + noise
            rx = mod.demodulate((y / h_hat).reshape(-1))
        errors = (rx.reshape(n, self.padded_bits) != tx)[:, : self.frame_bits]
        return np.flatnonzero(errors)

    def send(
        self,
        tx_bytes: np.ndarray,
        snr_db: float,
        rng: np.random.Generator,
        arq_retries: int = 0,
        max_packets: int | None = None,
    ) -> PacketResult:
        """Send every packet once, then resend lost ones up to ``arq_retries`` times.

        ``max_packets`` caps the packets that fit in the airtime budget, retransmissions
        included; packets beyond it are lost.
        """
        n = tx_bytes.shape[0]
        budget = n * (arq_retries + 1) if max_packets is None else max_packets
        first = min(n, budget)
        rx = tx_bytes.copy()
        lost = np.ones(n, dtype=bool)
        errors = self._errors(tx_bytes[:first], snr_db, rng)
        self._apply(rx[:first], errors)
        lost[:first] = detect_corrupted(errors, first, self.packet_bits)
        sent, retransmissions = first, 0
        for _ in range(arq_retries):
            again = np.flatnonzero(lost[:first])[: max(0, budget - sent)]
            if again.size == 0:
                break
            retry_errors = self._errors(tx_bytes[again], snr_db, rng)
            retry_rx = tx_bytes[again].copy()
            self._apply(retry_rx, retry_errors)
            ok = ~detect_corrupted(retry_errors, again.size, self.packet_bits)
            rx[again[ok]] = retry_rx[ok]
            lost[again[ok]] = False
            sent += again.size
            retransmissions += again.size
        unsent = np.zeros(n, dtype=bool)
        unsent[first:] = True
        return PacketResult(
            rx, lost, unsent, int(errors.size), first * self.frame_bits, sent, retransmissions
        )

    def _apply(self, rx_bytes: np.ndarray, errors: np.ndarray) -> None:
        """Flip the data bits that erred (CRC-field errors only matter to the CRC check)."""
        if errors.size == 0:
            return
        packet, within = np.divmod(errors, self.frame_bits)
        data = within < self.packet_bits
        packet, within = packet[data], within[data]
        flat = rx_bytes.reshape(-1)
        byte_index = packet * (self.packet_bits // 8) + (within >> 3)
        masks = (0x80 >> (within & 7)).astype(np.uint8)
        np.bitwise_xor.at(flat, byte_index, masks)


def bytes_to_packets(stream: np.ndarray, packet_bits: int) -> np.ndarray:
    """Cut a byte stream into packets (the last one zero-padded)."""
    size = packet_bits // 8
    n = max(1, -(-stream.size // size))
    out = np.zeros(n * size, dtype=np.uint8)
    out[: stream.size] = stream
    return out.reshape(n, size)


def erased_items(lost: np.ndarray, n_items: int, bits_per_item: int, packet_bits: int):
    """Which items (parameters) have at least one bit in a lost packet."""
    start = np.arange(n_items, dtype=np.int64) * bits_per_item
    first = start // packet_bits
    last = (start + bits_per_item - 1) // packet_bits
    return lost[first] | lost[last]
