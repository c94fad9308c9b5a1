"""Link model: what the air does to the adapter, and what it costs."""

from airlora.config import LinkConfig
from airlora.link.base import Link, LinkReport, PerfectLink, shannon_airtime


def build_link(config: LinkConfig) -> Link:
    """The link described by a :class:`~airlora.config.LinkConfig`."""
    if config.scheme == "perfect":
        return PerfectLink(config.bandwidth_hz, config.bits_per_param)
    raise ValueError(f"unknown link scheme '{config.scheme}'")  # pragma: no cover


__all__ = ["Link", "LinkReport", "PerfectLink", "build_link", "shannon_airtime"]
