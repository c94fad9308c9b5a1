"""The Shannon-capacity cost of the online formulation (the authors' reference).

Sending ``n`` parameters of ``b`` bits each over a channel of bandwidth ``B`` Hz at SNR
``gamma`` (linear) takes ``n b / (B log2(1 + gamma))`` seconds at capacity. Relative to a
slot of ``T`` seconds that is the cost

    C = n b / (B log2(1 + gamma) T),

and ``C > 1`` means the update does not fit in its slot: the constraint is violated. This is
an idealised link (capacity-achieving codes, no erasures); the digital and coded schemes of
:mod:`airlora.link` are the realistic alternatives.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class ShannonCost:
    """Cost of a payload against one slot at capacity.

    Parameters
    ----------
    bandwidth_hz: B, the channel bandwidth in Hz (the reference: 100 MHz).
    slot_s: T, the time one step's update may take, in seconds (the reference: 1 s).
    bits_per_param: b, bits per sent parameter (the reference: 32, float32).
    """

    bandwidth_hz: float = 1e8
    slot_s: float = 1.0
    bits_per_param: int = 32

    def capacity_bps(self, snr_db: float) -> float:
        """B log2(1 + SNR), in bit/s."""
        return self.bandwidth_hz * math.log2(1.0 + 10.0 ** (snr_db / 10.0))

    def cost(self, payload_params: int, snr_db: float) -> float:
        """C = payload bits / (capacity x slot); above 1 the constraint is violated."""
        return payload_params * self.bits_per_param / (self.capacity_bps(snr_db) * self.slot_s)

    def max_params(self, snr_db: float) -> int:
        """The largest payload (parameters) that fits the slot: C <= 1."""
        return int(self.capacity_bps(snr_db) * self.slot_s // self.bits_per_param)
