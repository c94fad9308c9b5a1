"""The Flower app: the cloud trainer as a ServerApp, each edge as a ClientApp.

Run config (``flwr run --run-config``): ``config`` (path of the deployment's YAML on the
server machine) and ``out`` (the run folder to write). Node config of each SuperNode
(``flower-supernode --node-config``): ``edge`` (its name in the deployment's ``edges``).

Messages:

- ``query.hello`` (cloud -> every node): the deployment's YAML, kept in the node's Flower
  state; the reply names the edge and its first SNR. The cloud waits until every configured
  edge has answered, and asks any new node (an edge back after a crash) before each round.
- ``train`` (cloud -> one edge per round): ``adapter`` (ArrayRecord: the payload's arrays
  packed into one, :func:`~airlora.deploy.payload.pack_arrays`, since Flower moves every
  array as an object of its own), ``meta`` (ConfigRecord: per tensor its quantiser bits,
  minimum, maximum and shape, and the tensors' order in the packed array),
  ``round`` (ConfigRecord: the round), and with ``downlink: multicast`` ``rates``
  (ConfigRecord: per projection the SNR each rank's modulation is picked for, and the
  head's). The reply's ``report`` record is the
  :class:`~airlora.deploy.edge.EdgeReport` (``framing``: what the wire carried besides the
  payload); the edge keeps its receiver memory in the node's Flower state between rounds.

A reply that is an error, late, malformed or oversized costs that edge the round: the reason
is logged, the cloud goes on.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import yaml
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from airlora.config import DeployConfig
from airlora.deploy.cloud import (
    CloudTrainer,
    Outgoing,
    Replies,
    Transport,
    run_rounds,
    run_status,
)
from airlora.deploy.edge import EdgeDevice, EdgeReport, edge_snr_db, find_edge
from airlora.deploy.multicast import LayerRates
from airlora.deploy.payload import MAX_PAYLOAD_BYTES, PayloadError, pack_arrays, unpack_arrays
from airlora.runs import RunFolder, config_hash

log = logging.getLogger("airlora.deploy")

HELLO = "query.hello"
# How long a round waits for a node that has just appeared to say which edge it is: a node
# still loading its model joins the round after it answers, and holds up nobody.
HELLO_WAIT_S = 5.0
# In the error reply of an edge that restarted since its hello (Flower puts the exception's
# text in the reason, on SuperNodes and on the simulation engine alike).
NOT_REGISTERED = "airlora: this node is not registered"
# In a train message's ``meta`` record: the tensors' order in the packed payload.
ORDER_KEY = "_order"
# In a train message's ``rates`` record (downlink multicast): the head's SNR.
HEAD_RATE_KEY = "_head"
REPORT_FIELDS = tuple(
    f for f in EdgeReport.__dataclass_fields__ if f not in ("wire_array_bytes", "meta_values")
)


def config_from_text(text: str) -> DeployConfig:
    return DeployConfig.model_validate(yaml.safe_load(text))


# ----------------------------------------------------------------------------- the cloud

server_app = ServerApp()


@server_app.main()
def cloud_main(grid: Grid, context: Context) -> None:
    """Register the edges, then run the deployment loop (:func:`~airlora.deploy.cloud.
    run_rounds`) over Flower messages; the run folder goes to ``run_config['out']``."""
    config_path = Path(str(context.run_config["config"]))
    out = Path(str(context.run_config["out"]))
    # Run config values arrive typed from the app's TOML, or as text from a command line.
    resume = str(context.run_config.get("resume", False)).lower() == "true"
    run_cloud(grid, config_path.read_text(encoding="utf-8"), out, resume)


def run_cloud(grid: Grid, text: str, out: Path, resume: bool = False) -> None:
    """The cloud's whole run for the deployment ``text`` (its YAML), writing ``out``;
    ``resume``: take ``out`` up from its last finished round."""
    config = config_from_text(text)
    started = time.perf_counter()
    registry = register_edges(grid, config, text)
    trainer = CloudTrainer(config, registry.first_snr)
    if resume:
        run = RunFolder.reopen(out, config)
    else:
        run = RunFolder.create(out.parent, out.name, config, config.seed, "deploy")
    try:
        summary = run_rounds(trainer, flower_transport(grid, registry, text), run, None, resume)
        summary["nodes"] = {name: str(node) for name, node in registry.nodes.items()}
        run.finish(summary, started, run_status(summary))
    except BaseException as err:
        run.fail(err)
        raise


def push(
    grid: Grid, messages: list[Message], timeout_s: float, poll_s: float = 0.2
) -> Callable[[], list[Message]]:
    """Push ``messages`` now; the function returned collects the replies until all are in or
    ``timeout_s`` has passed since the push. Flower's ``send_and_receive`` polls every 3 s;
    here a round waits ``poll_s`` at most past its last reply."""
    ids = list(grid.push_messages(messages))
    if len(ids) < len(messages) or not all(ids):
        # Flower returns no id for a message it could not take (payload too large, a node
        # it does not know): those edges miss the round.
        log.warning("the SuperLink took %d of %d messages", sum(map(bool, ids)), len(messages))
    deadline = time.monotonic() + timeout_s

    def collect() -> list[Message]:
        waiting = {i for i in ids if i}
        replies: list[Message] = []
        while waiting:
            got = list(grid.pull_messages(waiting))
            replies.extend(got)
            waiting.difference_update(m.metadata.reply_to_message_id for m in got)
            if not waiting or time.monotonic() >= deadline:
                break
            time.sleep(poll_s)
        return replies

    return collect


class EdgeRegistry:
    """Which node is which edge. A node that connects later, or an edge that comes back on a
    new node after a crash, is asked who it is before the next round (``query.hello``).
    Nothing waits on a node that never answers (one that died before it could: Flower
    answers for it with an error once its heartbeat has lapsed)."""

    def __init__(self, config: DeployConfig, text: str) -> None:
        self.config = config
        self.text = text
        self.nodes: dict[str, int] = {}
        self.first_snr: dict[str, float] = {}
        self.asked: set[int] = set()
        self.pending: dict[str, int] = {}  # hello message id -> node, not answered yet

    def refresh(self, grid: Grid, wait_s: float = 0.0) -> None:
        """Ask every node not asked yet, and take in the answers that have come; wait up to
        ``wait_s`` for the nodes asked now (not for those asked before)."""
        listed = list(grid.get_node_ids())
        # A node the SuperLink stopped listing (its heartbeat lapsed) may come back under the
        # same id (an edge restarted with its old key) without the state its hello gave it.
        self.asked.intersection_update(listed)
        new = [n for n in listed if n not in self.asked]
        asked_now: set[str] = set()
        if new:
            hello = RecordDict({"deploy": ConfigRecord({"config": self.text})})
            ids = list(grid.push_messages([Message(hello, n, HELLO) for n in new]))
            self.asked.update(new)  # a node that does not answer is not asked every round
            asked_now = {i for i in ids if i}
            self.pending.update((i, n) for i, n in zip(ids, new, strict=False) if i)
        deadline = time.monotonic() + wait_s
        while self.pending:
            for reply in grid.pull_messages(set(self.pending)):
                self.pending.pop(reply.metadata.reply_to_message_id, None)
                self._take(reply)
            if not asked_now & set(self.pending) or time.monotonic() >= deadline:
                return
            time.sleep(0.2)

    def _take(self, reply: Message) -> None:
        """A node's answer to ``query.hello``: a known edge (moved there if it was on another
        node), or refused with a logged reason."""
        node = reply.metadata.src_node_id
        if reply.has_error():
            log.warning("node %s did not register: %s", node, reply.error.reason)
            return
        wanted = {e.name for e in self.config.edges}
        try:
            name = str(reply.content["hello"]["edge"])
            snr = float(reply.content["snr"]["snr_db"])
            if name not in wanted or not math.isfinite(snr):
                raise ValueError(f"edge {name!r} at {snr} dB is not one of {sorted(wanted)}")
        except (KeyError, TypeError, ValueError) as err:
            log.warning("node %s sent a malformed hello (%s): refused", node, err)
            return
        if name in self.nodes and self.nodes[name] != node:
            log.warning("edge %s rejoined as node %s (was %s)", name, node, self.nodes[name])
        self.nodes[name] = node
        self.first_snr.setdefault(name, snr)

    def forget(self, node: int) -> None:
        """Ask ``node`` who it is again before the next round (it lost its state)."""
        self.asked.discard(node)

    def wait_for_all(self, grid: Grid, timeout_s: float) -> None:
        """Refresh until every configured edge has answered, or raise naming the missing."""
        wanted = {e.name for e in self.config.edges}
        deadline = time.monotonic() + timeout_s
        while True:
            self.refresh(grid, wait_s=1.0)
            missing = sorted(wanted - set(self.nodes))
            if not missing:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"edges {missing} did not register in {timeout_s:.0f} s")
            time.sleep(0.2)


def register_edges(
    grid: Grid, config: DeployConfig, text: str, timeout_s: float | None = None
) -> EdgeRegistry:
    """Wait until every configured edge's node has answered (``timeout_s``, default the
    config's ``register_timeout_s``)."""
    registry = EdgeRegistry(config, text)
    registry.wait_for_all(grid, timeout_s or config.register_timeout_s)
    return registry


def flower_transport(grid: Grid, registry: EdgeRegistry, text: str) -> Transport:
    """The deployment's transport over Flower: one ``train`` message per edge and round, to
    the node each edge is on now. The messages go out at once; the replies are collected
    when the cloud asks (it trains the next round meanwhile)."""

    def send(outgoing: dict[str, Outgoing], config: DeployConfig) -> Callable[[], Replies]:
        registry.refresh(grid, wait_s=min(HELLO_WAIT_S, config.round_timeout_s))
        nodes = registry.nodes
        messages, names = [], {}
        for name, out in outgoing.items():
            packed, order = pack_arrays(out.payload.arrays)
            content = RecordDict(
                {
                    "adapter": ArrayRecord({"payload": Array(packed)}),
                    "meta": ConfigRecord({**out.payload.meta, ORDER_KEY: order}),
                    "round": ConfigRecord({"round": out.round}),
                }
            )
            if out.rates is not None:
                content["rates"] = rates_record(out.rates)
            messages.append(Message(content, nodes[name], MessageType.TRAIN))
            names[nodes[name]] = name
        pending = push(grid, messages, config.round_timeout_s)

        def collect() -> Replies:
            replies: Replies = {name: None for name in outgoing}
            for reply in pending():
                node = reply.metadata.src_node_id
                name = names.get(node)
                if name is None:
                    log.warning("a reply from unknown node %s was dropped", node)
                    continue
                if reply.has_error() and NOT_REGISTERED in reply.error.reason:
                    registry.forget(node)
                report = parse_report(reply, name)
                sent = outgoing[name]
                if report is not None and (
                    report.round != sent.round or report.rank_vector != sent.rank_vector
                ):
                    log.warning("edge %s reported another round or ranks than sent: refused", name)
                    report = None
                replies[name] = report
            round_index = next(iter(outgoing.values())).round
            for name, report in replies.items():
                if report is None:
                    log.warning("edge %s missed round %d", name, round_index)
            return replies

        return collect

    return send


def rates_record(rates: LayerRates) -> ConfigRecord:
    """A multicast's rates as a config record (projections with no ranks left out)."""
    per_rank = {name: [float(x) for x in v] for name, v in rates.per_rank.items() if v}
    return ConfigRecord({**per_rank, HEAD_RATE_KEY: float(rates.head_snr_db)})


def _numbers(value, kind: type[int] | type[float]) -> list:
    """A record's list of numbers of ``kind`` (ints also where floats belong); anything else
    (a string, which would read as a list of its characters, strings, booleans, a float
    where an int belongs) is a ValueError."""
    allowed = (int,) if kind is int else (int, float)
    if not isinstance(value, list) or not all(
        isinstance(x, allowed) and not isinstance(x, bool) for x in value
    ):
        raise ValueError(f"expected a list of {kind.__name__}s, got {value!r:.60}")
    return [kind(x) for x in value]


def rates_from_record(record: ConfigRecord) -> LayerRates:
    """:func:`rates_record` back; a malformed record is a :class:`PayloadError`."""
    try:
        head = float(record[HEAD_RATE_KEY])
        per_rank = {str(k): _numbers(v, float) for k, v in record.items() if k != HEAD_RATE_KEY}
    except (KeyError, TypeError, ValueError) as err:
        raise PayloadError(f"the multicast's rates are malformed ({err})") from err
    if not all(math.isfinite(x) for v in [*per_rank.values(), [head]] for x in v):
        raise PayloadError("the multicast's rates are not finite")
    return LayerRates(per_rank, head)


def parse_report(reply: Message, name: str) -> EdgeReport | None:
    """An edge's report, or None (logged) when the reply is an error or malformed."""
    if reply.has_error():
        log.warning("edge %s replied with error %s: %s", name, reply.error.code, reply.error.reason)
        return None
    try:
        record = reply.content["report"]
        values = {k: record[k] for k in REPORT_FIELDS}
        values["rank_vector"] = _numbers(values["rank_vector"], int)
        for key in ("round", "received_bytes", "erased_params", "payload_bits"):
            values[key] = int(values[key])
        for key in ("accuracy", "loss", "snr_db", "next_snr_db", "airtime_s", "eval_time_s"):
            values[key] = float(values[key])
        if not 0 <= values["received_bytes"] <= MAX_PAYLOAD_BYTES:
            raise ValueError(f"received_bytes {values['received_bytes']} out of range")
        if not np.isfinite(values["next_snr_db"]):
            raise ValueError("next_snr_db is not finite")
        if not (0.0 <= values["accuracy"] <= 1.0 or math.isnan(values["accuracy"])):
            raise ValueError(f"accuracy {values['accuracy']} out of range")
        if "framing" in reply.content:
            framing = reply.content["framing"]
            values["wire_array_bytes"] = int(framing["wire_array_bytes"])
            values["meta_values"] = int(framing["meta_values"])
        return EdgeReport(**values)
    except (KeyError, TypeError, ValueError) as err:
        log.warning("edge %s sent a malformed report (%s): refused", name, err)
        return None


# ----------------------------------------------------------------------------- an edge

client_app = ClientApp()


def node_edge(config: DeployConfig, context: Context) -> str:
    """This node's edge: its node config's ``edge``, or, on a virtual node of Flower's
    simulation engine (which numbers its nodes ``partition-id``), the edge at that index."""
    if "edge" in context.node_config:
        return str(context.node_config["edge"])
    if "partition-id" in context.node_config:
        index = int(context.node_config["partition-id"])
        if not 0 <= index < len(config.edges):
            raise ValueError(f"virtual node {index} has no edge: {len(config.edges)} configured")
        return config.edges[index].name
    raise ValueError("this SuperNode has no edge name: start it with --node-config 'edge=\"...\"'")


_DEVICES: dict[tuple[str, str], EdgeDevice] = {}


def edge_device(config: DeployConfig, name: str) -> EdgeDevice:
    """Edge ``name``'s model and rows, built once per process and deployment (the config
    less its output location). Under the warm launcher (:mod:`airlora.deploy.warm`) each
    message's process is a fork of one that built them already; a simulation worker keeps
    those of every virtual edge it served."""
    key = (config_hash(config), name)
    if key not in _DEVICES:
        edge, index = find_edge(config, name)
        if any(k[0] != key[0] for k in _DEVICES):
            _DEVICES.clear()  # one deployment at a time: do not keep an old model alive
        # A simulation worker serves many virtual edges; each keeps its own model and rows.
        _DEVICES[key] = EdgeDevice(config, edge, index)
    return _DEVICES[key]


@client_app.query("hello")
def edge_hello(msg: Message, context: Context) -> Message:
    """Name this node's edge and its first SNR; keep the deployment's YAML in the node's
    state for the rounds (it travels once, not with every round)."""
    text = str(msg.content["deploy"]["config"])
    config = config_from_text(text)
    name = node_edge(config, context)
    edge, _index = find_edge(config, name)
    context.state["deploy"] = ConfigRecord({"config": text})
    content = RecordDict(
        {
            "hello": ConfigRecord({"edge": name}),
            "snr": MetricRecord({"snr_db": edge_snr_db(config, edge, 0)}),
        }
    )
    return Message(content, reply_to=msg)


class NotRegistered(RuntimeError):
    """A round reached a node that has not been told its deployment (it restarted since its
    hello); the cloud, finding :data:`NOT_REGISTERED` in the error reply, asks it again."""


@client_app.train()
def edge_round(msg: Message, context: Context) -> Message:
    """Receive one round's payload through the emulated channel, rebuild, score, report."""
    head = msg.content["round"]
    if "deploy" not in context.state:
        raise NotRegistered(f"{NOT_REGISTERED}: it has not been told its deployment")
    config = config_from_text(str(context.state["deploy"]["config"]))
    device = edge_device(config, node_edge(config, context))
    memory: dict[str, np.ndarray] = {}
    if "memory" in context.state:
        memory = {k: a.numpy() for k, a in context.state["memory"].items()}
    received = msg.content["adapter"]["payload"]
    meta = {k: list(v) for k, v in msg.content["meta"].items()}
    meta_values = int(sum(len(v) for v in meta.values()))  # the order list travels too
    order = [str(n) for n in meta.pop(ORDER_KEY, [])]
    arrays = unpack_arrays(received.numpy(), order, meta)
    rates = rates_from_record(msg.content["rates"]) if "rates" in msg.content else None
    report, kept = device.receive(arrays, meta, int(head["round"]), memory, rates)
    context.state["memory"] = ArrayRecord({k: Array(v) for k, v in kept.items()})
    # What arrived on the wire besides the payload: each array's serialised form (.npy
    # header) and the per-tensor metadata record, as Flower carries them.
    framing = {
        "wire_array_bytes": len(received.data),
        "meta_values": meta_values,
    }
    fields = {k: v for k, v in report.as_dict().items() if k in REPORT_FIELDS}
    content = RecordDict({"report": ConfigRecord(fields), "framing": MetricRecord(framing)})
    return Message(content, reply_to=msg)
