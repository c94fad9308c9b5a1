"""Link model: what the air does to the adapter, and what it costs.

Blocks compose as in a link-level simulator: quantiser (:mod:`.quantization`) -> packets with
CRC (:mod:`.crc`, :mod:`.digital`) -> Gray QAM mapper (:mod:`.modulation`) -> channel
(:mod:`.channel`) -> hard demapper -> CRC check -> de-quantiser. :class:`WirelessLink` is the one
entry point the round engine uses.
"""

from airlora.config import LinkConfig
from airlora.errors import LinkError
from airlora.link.base import Link, LinkReport, PerfectLink, shannon_airtime
from airlora.link.channel import ChannelModel, SNRProcess
from airlora.link.modulation import MODULATIONS, Modulation, pick_modulation
from airlora.link.shannon import ShannonCost
from airlora.link.wireless import WirelessLink, build_snr_process


def build_link(config: LinkConfig, seed: int = 0) -> Link:
    """The link described by a :class:`~airlora.config.LinkConfig`."""
    if config.scheme == "shannon":
        raise LinkError(
            "the shannon scheme is the online formulation's cost (capacity against a slot), "
            "not a link for rounds: use it with --formulation online"
        )
    if config.scheme == "perfect":
        return PerfectLink(config.bandwidth_hz, config.bits_per_param, config.tx_power_w)
    if config.scheme == "coded":
        from airlora.link.coded import CodedLink

        return CodedLink(config, seed)
    return WirelessLink(config, seed)


__all__ = [
    "MODULATIONS",
    "ChannelModel",
    "Link",
    "LinkConfig",
    "LinkReport",
    "Modulation",
    "PerfectLink",
    "SNRProcess",
    "ShannonCost",
    "WirelessLink",
    "build_link",
    "build_snr_process",
    "pick_modulation",
    "shannon_airtime",
]
