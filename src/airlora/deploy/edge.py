"""An edge device: the frozen base model, its own evaluation rows, its own emulated channel.

Flower runs each message in a ClientApp process of its own (a fresh one, or a fork of the
warm launcher that built the model, :mod:`airlora.deploy.warm`; on the simulation engine, a
long-lived Ray worker), so an edge keeps no round-to-round state in memory: what must last
(the receiver's copy of each tensor, for erasure filling) travels in Flower's per-node
state, and every random draw is seeded by (edge seed, round). :class:`EdgeDevice` is plain
Python; :mod:`airlora.deploy.flower_app` wires it to Flower.
"""

from __future__ import annotations

import itertools
import math
import time
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch

from airlora.config import DeployConfig, EdgeSpec
from airlora.data import EncodedSplit, encode, load_task
from airlora.deploy.multicast import LayerRates
from airlora.deploy.payload import PayloadError, decode_adapter, ranks_of
from airlora.engine import build_adapter, evaluate_adapter
from airlora.link import build_link, build_snr_process
from airlora.link.wireless import WirelessLink
from airlora.model import RankAdapter, load_model, resolve_model_source


@dataclass(frozen=True)
class EdgeReport:
    """What an edge replies after a round.

    accuracy, loss: of the rebuilt adapter on the edge's evaluation rows.
    received_bytes: bytes of the payload's arrays as they arrived (framing aside).
    rank_vector: the ranks the payload carried.
    snr_db: the SNR this round's payload was received at; next_snr_db: the next round's.
    airtime_s, erased_params, payload_bits: the emulated link's figures.
    eval_time_s: seconds to rebuild and score.
    wire_array_bytes, meta_values: what Flower carried besides the payload (framing).
    """

    round: int
    accuracy: float
    loss: float
    received_bytes: int
    rank_vector: list[int]
    snr_db: float
    next_snr_db: float
    airtime_s: float
    erased_params: int
    payload_bits: int
    eval_time_s: float
    # Over Flower: the payload arrays' serialised bytes and the metadata values that came
    # with them (None in process).
    wire_array_bytes: int | None = None
    meta_values: int | None = None

    def as_dict(self) -> dict:
        return asdict(self)


def edge_snr_db(config: DeployConfig, edge: EdgeSpec, round_index: int) -> float:
    """The SNR (dB) of ``edge``'s channel in round ``round_index`` (0-based): its own SNR
    process, seeded by the run's and its own seed, replayed from the start (no state to
    keep)."""
    link = config.link.model_copy(update={"snr_db": edge.snr_db})
    process = build_snr_process(link, _mix(config.seed, edge.seed or 0))
    return float(process.take(round_index + 1)[-1])


def find_edge(config: DeployConfig, name: str) -> tuple[EdgeSpec, int]:
    """The edge called ``name`` and its position; a clear error for a name not configured."""
    for i, edge in enumerate(config.edges):
        if edge.name == name:
            return edge, i
    names = [e.name for e in config.edges]
    raise ValueError(f"this node is edge '{name}', which the deployment does not list: {names}")


def _mix(*keys: int) -> int:
    return int(np.random.SeedSequence(list(keys)).generate_state(1)[0])


def edge_round_seed(run_seed: int, edge_seed: int, round_index: int) -> int:
    """The seed of an edge's channel draws in one round, from the run's seed, the edge's and
    the round: the same whatever process runs it."""
    return _mix(run_seed, edge_seed, round_index)


class EdgeDevice:
    """One edge of a deployment.

    Parameters
    ----------
    config: the deployment (data, model, link and training settings the cloud uses).
    edge: this edge's channel (:class:`~airlora.config.EdgeSpec`).
    index: its position among the edges: it scores the ``index``-th block of
        ``edge_eval_rows`` validation rows (wrapping around the split).
    """

    def __init__(self, config: DeployConfig, edge: EdgeSpec, index: int) -> None:
        self.config = config
        self.edge = edge
        self.index = index
        self.link_config = config.link.model_copy(update={"snr_db": edge.snr_db})
        resolve_model_source(config.model.name_or_path)
        # The cloud's seed cuts the splits: every edge and the cloud agree on them.
        task = load_task(config.data, config.seed)
        loaded = load_model(config.model.name_or_path, task.num_labels, config.seed)
        self.tokenizer = loaded.tokenizer
        self.adapter: RankAdapter = build_adapter(loaded.model, config.model, config.train, 0.0)
        n_val = len(task.validation)
        rows = config.edge_eval_rows or config.data.edge_eval_size
        index_rows = (np.arange(rows) + index * rows) % n_val
        self.split: EncodedSplit = encode(
            self.tokenizer, task.validation.subset(index_rows), config.data.max_length
        )
        self.expected_shapes = _full_shapes(self.adapter)

    def snr_at(self, round_index: int) -> float:
        """The SNR (dB) of this edge's channel in round ``round_index`` (0-based)."""
        return edge_snr_db(self.config, self.edge, round_index)

    def receive(
        self,
        arrays: Mapping[str, np.ndarray],
        meta: Mapping[str, list[float]],
        round_index: int,
        memory: dict[str, np.ndarray],
        rates: LayerRates | None = None,
    ) -> tuple[EdgeReport, dict[str, np.ndarray]]:
        """Pass one round's payload through this edge's emulated channel, rebuild the adapter,
        score it. ``memory``: the receiver's copy from the last round (erasure filling);
        ``rates``: a multicast's modulation per rank (None: unicast, at this edge's SNR);
        returns the report and the memory to keep."""
        start = time.perf_counter()
        received_bytes = int(sum(np.asarray(a).nbytes for a in arrays.values()))
        tensors = decode_adapter(arrays, meta, self.expected_shapes)
        names = [p.name for p in self.adapter.projections]
        ranks = ranks_of(tensors, names)
        missing = [n for n in self.adapter.head_tensor_names() if n not in tensors]
        if missing:
            raise PayloadError(f"the payload lacks the head's {missing[0]}")
        snr_db = self.snr_at(round_index)
        seed = edge_round_seed(self.config.seed, self.edge.seed or 0, round_index)
        link = build_link(self.link_config, seed)
        protected = self.adapter.head_tensor_names()
        if rates is not None and self.link_config.scheme == "digital":
            assert isinstance(link, WirelessLink)
            arrived, report, kept = receive_layered(link, tensors, snr_db, protected, rates, memory)
        else:  # unicast; or a link with no modulation to pick, where multicast is the same
            if hasattr(link, "restore_erasure_memory"):
                link.restore_erasure_memory(memory)
            arrived, report = link.transmit(tensors, snr_db, protected)
            kept = getattr(link, "erasure_memory", {})
        self.adapter.load_active_tensors(arrived, ranks)
        accuracy, loss = evaluate_adapter(
            self.adapter, self.split, self.tokenizer.pad_token_id, self.config.data.eval_batch_size
        )
        return (
            EdgeReport(
                round=round_index,
                accuracy=float(accuracy) if math.isfinite(loss) else float("nan"),
                loss=float(loss),
                received_bytes=received_bytes,
                rank_vector=ranks,
                snr_db=snr_db,
                next_snr_db=self.snr_at(round_index + 1),
                airtime_s=float(report.airtime_s),
                erased_params=int(report.erased_params),
                payload_bits=int(report.payload_bits),
                eval_time_s=time.perf_counter() - start,
            ),
            kept,
        )


@dataclass(frozen=True)
class _Received:
    """What the emulated link reports of a multicast's layers together."""

    airtime_s: float
    erased_params: int
    payload_bits: int


def receive_layered(
    link: WirelessLink,
    tensors: Mapping[str, torch.Tensor],
    snr_db: float,
    head_names: Sequence[str],
    rates: LayerRates,
    memory: Mapping[str, np.ndarray],
) -> tuple[dict[str, torch.Tensor], _Received, dict[str, np.ndarray]]:
    """A multicast's payload through this edge's channel at ``snr_db``: the blocks of ranks
    sent at one modulation (``rates``: the SNR each rank's modulation is picked for) are one
    transmission at that modulation, the head goes with the modulation of its own rate; the
    blocks are put back together. Every block is quantised on its whole tensor's range (the
    payload's grid), so only the channel differs from unicast. Returns the tensors, the
    link's figures summed over the transmissions, and the receiver memory to keep (whole
    tensors, as unicast keeps them)."""
    # What the link sends as protected control data (kept out of the receiver's memory).
    control = set(head_names) if link.config.protect_head else set()
    groups: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    tx_snr: dict[str, float] = {}  # modulation -> an SNR that picks it
    blocks: dict[str, tuple[str, slice]] = {}  # block name -> (tensor, its ranks)
    ranges: dict[str, tuple[float, float]] = {}
    previous: dict[str, np.ndarray] = {}

    def modulation(snr: float) -> str:
        name = link.modulation_at(float(snr)).name
        tx_snr.setdefault(name, float(snr))
        return name

    for name, tensor in tensors.items():
        old = memory.get(name)
        old = old.reshape(tensor.shape) if old is not None and old.size == tensor.numel() else None
        if name in head_names:
            groups[modulation(rates.head_snr_db)][name] = tensor
            if old is not None and name not in control:
                previous[name] = np.ascontiguousarray(old).reshape(-1)
            continue
        projection, _factor = name.rsplit(".", 1)
        per_rank = rates.per_rank.get(projection)
        rank = tensor.shape[1] if name.endswith(".lora_B") else tensor.shape[0]
        if per_rank is None or len(per_rank) != rank:
            raise PayloadError(f"{name}: the multicast's rates do not cover its {rank} ranks")
        values = tensor.detach().float()
        parent_range = (float(values.min()), float(values.max())) if values.numel() else (0, 0)
        start = 0
        for mod, run in itertools.groupby(modulation(snr) for snr in per_rank):
            ranks = slice(start, start + len(list(run)))
            start = ranks.stop
            key = f"{name}[{ranks.start}:{ranks.stop}]"
            groups[mod][key] = _rank_block(tensor, name, ranks)
            blocks[key] = (name, ranks)
            ranges[key] = parent_range
            if old is not None:
                previous[key] = np.ascontiguousarray(_rank_block(old, name, ranks)).reshape(-1)
    link.restore_erasure_memory(previous)
    out = {name: tensor.detach().clone() for name, tensor in tensors.items()}
    airtime, erased, bits = 0.0, 0, 0
    # A fixed order (the link's draws follow it): the lowest-order modulation first.
    for mod in sorted(groups, key=lambda m: tx_snr[m]):
        arrived, report = link.transmit(
            groups[mod], snr_db, head_names, modulation_snr_db=tx_snr[mod], value_ranges=ranges
        )
        airtime += report.airtime_s
        erased += report.erased_params
        bits += report.payload_bits
        for key, value in arrived.items():
            if key not in blocks:
                out[key] = value
                continue
            name, ranks = blocks[key]
            _rank_block(out[name], name, ranks).copy_(value)
    kept = {
        name: out[name].float().numpy().reshape(-1).copy()
        for name in tensors
        if name not in control
    }
    return out, _Received(airtime, erased, bits), kept


def _rank_block(factor, name: str, ranks: slice):
    """The view of ``factor`` (tensor ``name``, torch or numpy) holding ``ranks``: B is
    out x r, its ranks are columns; A (and an SVD adapter's E) hold them in rows."""
    return factor[:, ranks] if name.endswith(".lora_B") else factor[ranks]


def _full_shapes(adapter: RankAdapter) -> dict[str, tuple[int, ...]]:
    """Every tensor a payload may name, at r_max."""
    saved = list(adapter.rank_vector)
    adapter.set_rank_vector([adapter.r_max] * len(adapter.projections))
    shapes = {k: tuple(v.shape) for k, v in adapter.active_tensors().items()}
    adapter.set_rank_vector(saved)
    return shapes
