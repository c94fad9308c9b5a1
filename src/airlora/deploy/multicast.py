"""Rank-layered multicast: what the downlink costs when ranks several edges need go out once.

Rank truncation nests: the first r ranks of a projection are the same tensors for every edge
that gets at least r. So per projection, sort the ranks the edges get; layer j carries ranks
r_(j-1)+1 .. r_(j) to every edge whose rank is at least r_(j), once, at the rate the weakest
of them can decode (its SNR picks the modulation). Parameters bound for the same set of edges
go out together; the head goes once to all. Unicast sends each edge its whole truncation at
its own rate.

Both are priced as first transmissions on the deployment's link (packets with their CRC, no
retransmissions; the head priced as the link sends it, :func:`head_weight`),
so the two figures compare like with like. With ``downlink: multicast`` the edges also
receive that way (:func:`layer_snr_db`): each layer of ranks, and the head, at the modulation
its weakest receiver's SNR picks, decoded by each edge at its own SNR.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from airlora.config import LinkConfig
from airlora.link import build_link
from airlora.link.base import shannon_airtime


@dataclass(frozen=True)
class MulticastCost:
    """Airtime (s) of one round's downlink to every edge, unicast and layered multicast."""

    unicast_airtime_s: float
    multicast_airtime_s: float
    layers: int

    @property
    def saving(self) -> float:
        """Share of the unicast airtime multicast saves (0 with nothing sent)."""
        if self.unicast_airtime_s <= 0:
            return 0.0
        return 1.0 - self.multicast_airtime_s / self.unicast_airtime_s


def first_airtime(link_config: LinkConfig, n_params: float, snr_db: float) -> float:
    """Seconds of a first transmission of ``n_params`` parameters at ``snr_db``."""
    return _airtimes(link_config)(n_params, snr_db)


def _airtimes(link_config: LinkConfig):
    """``(n_params, snr_db) -> seconds`` on one link (built once: it caches per SNR)."""
    link = None if link_config.scheme == "perfect" else build_link(link_config)

    def airtime(n_params: float, snr_db: float) -> float:
        if n_params <= 0:
            return 0.0
        if link is None:
            bits = n_params * link_config.bits_per_param
            return shannon_airtime(int(bits), snr_db, link_config.bandwidth_hz)
        return float(link.airtime_s(round(n_params), snr_db))

    return airtime


def head_weight(link_config: LinkConfig) -> float:
    """What one head parameter costs, in the link's parameters: a protected head travels as
    float32 control data (32 bits: 32 / quant_bits parameters on a digital link, 16 symbols
    = 32 parameters on an analog one); an unprotected one like any parameter; a perfect link
    prices every parameter alike."""
    if link_config.scheme == "perfect" or not link_config.protect_head:
        return 1.0
    if link_config.scheme == "analog":
        return 32.0
    return 32.0 / link_config.quant_bits


def layered_multicast_cost(
    rank_vectors: Mapping[str, Sequence[int]],
    snr_db: Mapping[str, float],
    params_at: Sequence,
    head_params: int,
    link_config: LinkConfig,
) -> MulticastCost:
    """The round's downlink cost both ways.

    Parameters
    ----------
    rank_vectors: edge -> its rank vector this round.
    snr_db: edge -> the SNR (dB) the cloud sends at (its last report).
    params_at: per projection, a function rank -> parameters sent at that rank.
    head_params: parameters of the head (sent to every edge).
    link_config: the deployment's link.
    """
    edges = list(rank_vectors)
    head_equiv = head_params * head_weight(link_config)
    by_receivers: dict[frozenset[str], float] = defaultdict(float)
    for p, params in enumerate(params_at):
        previous = 0
        for r in sorted({int(v[p]) for v in rank_vectors.values()} - {0}):
            receivers = frozenset(e for e in edges if rank_vectors[e][p] >= r)
            by_receivers[receivers] += params(r) - params(previous)
            previous = r
    by_receivers[frozenset(edges)] += head_equiv
    airtime = _airtimes(link_config)
    multicast = sum(
        airtime(n, min(snr_db[e] for e in receivers)) for receivers, n in by_receivers.items()
    )
    unicast = sum(
        airtime(
            sum(params(int(r)) for params, r in zip(params_at, rank_vectors[e], strict=True))
            + head_equiv,
            snr_db[e],
        )
        for e in edges
    )
    return MulticastCost(float(unicast), float(multicast), len(by_receivers))


@dataclass(frozen=True)
class LayerRates:
    """At which SNR (dB) the transmitter picks the modulation for what one edge receives.

    ``per_rank``: projection name -> one SNR per rank the edge gets (rank 1 first);
    ``head_snr_db``: the head's (it goes to every edge).
    """

    per_rank: dict[str, list[float]]
    head_snr_db: float


def layer_snr_db(
    rank_vectors: Mapping[str, Sequence[int]],
    snr_db: Mapping[str, float],
    projection_names: Sequence[str],
) -> dict[str, LayerRates]:
    """Per edge, the SNR each of its ranks is multicast at: rank k of projection p is in the
    layer up to the smallest rank any edge gets at p that is >= k; that layer goes to every
    edge whose rank at p reaches it, at the lowest of their SNRs (their last reports). The
    head goes to all, at the lowest SNR of all. The layering of
    :func:`layered_multicast_cost`."""
    edges = list(rank_vectors)
    head = min(snr_db[e] for e in edges)
    out = {e: LayerRates({}, head) for e in edges}
    for p, name in enumerate(projection_names):
        levels = sorted({int(rank_vectors[e][p]) for e in edges} - {0})
        layer_snr = {
            level: min(snr_db[e] for e in edges if rank_vectors[e][p] >= level) for level in levels
        }
        for e in edges:
            rank = int(rank_vectors[e][p])
            out[e].per_rank[name] = [
                layer_snr[next(level for level in levels if level >= k)] for k in range(1, rank + 1)
            ]
    return out
