"""The transmit interface between the round engine and a link model.

A link takes the server's named tensors and the round's SNR and returns what the edge
received plus a :class:`LinkReport` of what it cost. Tensors named in ``protected`` travel as
control data: delivered intact, their airtime counted (design section 1, step 5).
"""

from __future__ import annotations

import math
from collections.abc import Collection
from dataclasses import asdict, dataclass, field
from typing import Protocol

import torch


@dataclass(frozen=True)
class LinkReport:
    """Cost and damage of one transmission.

    Parameters
    ----------
    scheme: name of the link scheme.
    snr_db: Es/N0 of the transmission in dB.
    params: parameters sent (adapter and head).
    payload_bits: information bits of the parameters (after quantisation), once.
    airtime_s: seconds on air at the configured bandwidth, retransmissions and control data
        included.
    shannon_airtime_s: seconds the payload bits would need at the AWGN capacity
        B log2(1 + SNR).
    energy_j: transmit energy, transmit power times airtime.
    symbols: channel symbols sent, retransmissions and control data included.
    packets: packets in the first transmission.
    erasures: packets still lost after the last retransmission.
    retransmissions: packets sent again by ARQ.
    erased_params: parameters the receiver had to fill in.
    measured_ber: bit errors over bits sent on the noisy channel (first transmission), or
        None where no bits were exposed to noise.
    extra: scheme-specific figures (modulation, quantisation bits, control bits, ...).
    """

    scheme: str
    snr_db: float
    params: int
    payload_bits: int
    airtime_s: float
    shannon_airtime_s: float
    energy_j: float = 0.0
    symbols: int = 0
    packets: int = 0
    erasures: int = 0
    retransmissions: int = 0
    erased_params: int = 0
    measured_ber: float | None = None
    extra: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)


class Link(Protocol):
    """Anything that can carry the adapter from cloud to edge."""

    def transmit(
        self, tensors: dict[str, torch.Tensor], snr_db: float, protected: Collection[str] = ()
    ) -> tuple[dict[str, torch.Tensor], LinkReport]: ...


def shannon_airtime(bits: int, snr_db: float, bandwidth_hz: float) -> float:
    """Seconds to send ``bits`` at the AWGN capacity B log2(1 + SNR)."""
    capacity = bandwidth_hz * math.log2(1.0 + 10.0 ** (snr_db / 10.0))
    return bits / capacity if capacity > 0 else math.inf


class PerfectLink:
    """Delivers every tensor bit-exactly; airtime is the Shannon-bound airtime.

    Parameters
    ----------
    bandwidth_hz: channel bandwidth in Hz. Default 1 MHz.
    bits_per_param: bits per parameter (32 for float32). Default 32.
    tx_power_w: transmit power in W, for the energy figure. Default 0.1.
    """

    name = "perfect"

    def __init__(
        self, bandwidth_hz: float = 1e6, bits_per_param: int = 32, tx_power_w: float = 0.1
    ) -> None:
        self.bandwidth_hz = bandwidth_hz
        self.bits_per_param = bits_per_param
        self.tx_power_w = tx_power_w

    def transmit(
        self, tensors: dict[str, torch.Tensor], snr_db: float, protected: Collection[str] = ()
    ) -> tuple[dict[str, torch.Tensor], LinkReport]:
        params = sum(t.numel() for t in tensors.values())
        bits = params * self.bits_per_param
        airtime = shannon_airtime(bits, snr_db, self.bandwidth_hz)
        report = LinkReport(
            self.name, snr_db, params, bits, airtime, airtime, energy_j=airtime * self.tx_power_w
        )
        return {k: v.clone() for k, v in tensors.items()}, report
