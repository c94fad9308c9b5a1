"""The online formulation's cost on a simulated link: a payload's airtime against a slot.

:class:`~airlora.link.shannon.ShannonCost` prices a payload at capacity (the authors'
reference); :class:`SlotCost` prices it on one of the package's links (uncoded digital with
its modulation and packets, the LDPC-coded scheme, analog), so that ``C = airtime / T`` counts
the modulation this SNR allows, CRC and code overhead, and whole packets. The link then also
carries the update, so that erasures reach the edge's copy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


class TimedLink(Protocol):
    def airtime_s(self, n_params: int, snr_db: float) -> float: ...


@dataclass(frozen=True)
class SlotCost:
    """Cost of a payload against one slot on a link.

    Parameters
    ----------
    link: a link with ``airtime_s(n_params, snr_db)`` (:class:`~airlora.link.WirelessLink`,
        :class:`~airlora.link.coded.CodedLink`): the first transmission's airtime, in seconds.
    slot_s: T, the time one step's update may take, in seconds.
    """

    link: TimedLink
    slot_s: float = 1.0

    def cost(self, payload_params: int, snr_db: float) -> float:
        """C = airtime / slot; above 1 the constraint is violated."""
        return self.link.airtime_s(payload_params, snr_db) / self.slot_s

    def max_params(self, snr_db: float) -> int:
        """The largest payload (parameters) that fits the slot: C <= 1 (airtime grows with
        the payload, so a bisection finds it)."""
        if self.cost(1, snr_db) > 1:
            return 0
        low, high = 1, 2
        while self.cost(high, snr_db) <= 1:
            if high > 2**62:  # an unbounded slot: no payload overflows it
                return high
            low, high = high, high * 2
        while high - low > 1:  # cost(low) <= 1 < cost(high)
            mid = (low + high) // 2
            low, high = (mid, high) if self.cost(mid, snr_db) <= 1 else (low, mid)
        return low
