"""The cloud trainer: one adapter at r_max, a rank vector and a payload per edge each round.

:func:`run_rounds` is the whole deployment loop, top to bottom, over any transport: Flower's
grid (:mod:`airlora.deploy.flower_app`) or direct calls into :class:`EdgeDevice` objects in
this process (:func:`in_process_transport`; ``airlora deploy --in-process``). Each round:

1. measure the round's batches (complexity);
2. train K steps on the server at r_max (one adapter for all edges); a diverged step ends
   the run (status ``diverged``), nothing non-finite is sent;
3. per edge, build the state from that edge's last reported SNR, accuracy and ranks; the
   policy picks that edge's rank vector;
4. per edge, truncate the adapter to its ranks and encode it as the link sends it
   (:mod:`airlora.deploy.payload`); hand every payload to the transport;
5. record each edge's reply (accuracy on its rows, bytes received, its next SNR) beside the
   cloud's own accounting of what it sent; an edge that did not answer misses the round;
   and the round's downlink airtime, unicast against rank-layered multicast
   (``multicast.jsonl``; :mod:`airlora.deploy.multicast`).

Training does not depend on the edges' replies (only the rank choice does, and it comes
after training), so the cloud trains round t+1 while the edges score round t, and collects
their replies before it picks round t+1's ranks: the same rows as one round after the
other, without the cloud idling while the edges work. A transport that answers at once (the
in-process one) runs the rounds one after the other.
"""

from __future__ import annotations

import copy
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from airlora.config import DeployConfig
from airlora.data import ComplexityFeatures
from airlora.deploy.edge import EdgeDevice, EdgeReport
from airlora.deploy.multicast import (
    LayerRates,
    MulticastCost,
    layer_snr_db,
    layered_multicast_cost,
)
from airlora.deploy.payload import EncodedAdapter, encode_adapter
from airlora.engine import RoundEngine
from airlora.env.observation import build_observation
from airlora.link import PerfectLink
from airlora.policies import ActionLayout, FixedRankPolicy, RankPolicy, load_policy, make_policy
from airlora.runs import CONFIG_FILE, METRICS_FILE, RunFolder, atomic_write


@dataclass
class EdgeState:
    """What the cloud knows of an edge: its last report (None before the first)."""

    snr_db: float
    accuracy: float
    rank_vector: list[int] | None = None
    rounds_missed: int = 0


@dataclass
class Outgoing:
    """One edge's payload of one round and the cloud's accounting of it."""

    edge: str
    round: int
    rank_vector: list[int]
    payload: EncodedAdapter
    payload_params: int
    link_payload_bits: int = field(default=0)
    # downlink multicast: the SNR each rank's modulation is picked for (None: unicast).
    rates: LayerRates | None = None


MULTICAST_FILE = "multicast.jsonl"
# The cloud's state after its last finished round, with every row so far: a restarted cloud
# takes up from here (``airlora deploy --resume RUN``).
CLOUD_STATE_FILE = "cloud_state.pt"

# A transport takes {edge name: Outgoing} and hands the payloads over; the function it returns
# waits for the replies: {edge name: report or None (missed)}.
Replies = dict[str, EdgeReport | None]
Transport = Callable[[dict[str, Outgoing], DeployConfig], Callable[[], Replies]]


def deploy_policy(config: DeployConfig, layout: ActionLayout) -> RankPolicy:
    """The cloud's rank rule (the same policy object serves every edge)."""
    if config.method in ("airllm", "ppo"):
        assert config.policy is not None
        policy = load_policy(config.policy)
        from airlora.driver import check_layout

        check_layout(policy, layout, config.policy)
        return policy
    if config.method == "lora":
        return FixedRankPolicy(layout, config.seed, config.rank)
    return make_policy(config.method, layout, config.seed)


class CloudTrainer:
    """The server side of a deployment.

    Parameters
    ----------
    config: the deployment (:class:`~airlora.config.DeployConfig`).
    initial_snr_db: each edge's SNR before its first report (name -> dB).
    """

    def __init__(self, config: DeployConfig, initial_snr_db: Mapping[str, float]) -> None:
        self.config = config
        self.engine = RoundEngine.build(
            config.data,
            config.model,
            config.train,
            PerfectLink(),
            config.seed,
            protect_head=config.link.protect_head,
        )
        server = self.engine.server
        self.projection_names = [p.name for p in server.projections]
        self.layout = ActionLayout(tuple(self.projection_names), server.r_max, config.env)
        self.policy = deploy_policy(config, self.layout)
        self.full_ranks = [server.r_max] * len(self.projection_names)
        initial = self.engine.initial_accuracy()
        self.edges = {
            e.name: EdgeState(float(initial_snr_db[e.name]), initial) for e in config.edges
        }
        self.quant_bits = config.link.quant_bits if config.link.scheme == "digital" else None

    def observe(self) -> tuple[ComplexityFeatures, int]:
        """The next round's batches' complexity, and that round's index."""
        return self.engine.observe_round(), self.engine.round_index

    def plan_round(self, complexity: ComplexityFeatures, round_index: int) -> dict[str, list[int]]:
        """Each edge's rank vector for round ``round_index`` (whose batches measured
        ``complexity``), from that edge's own state."""
        plan = {}
        for name, state in self.edges.items():
            obs = build_observation(
                state.snr_db,
                complexity,
                round_index,
                self.config.train.rounds,
                state.accuracy,
                state.rank_vector,
                self.layout.r_max,
                self.config.env,
            )
            ranks = np.asarray(self.policy.act(obs, deterministic=True)).reshape(-1)
            plan[name] = [int(r) for r in ranks]
        return plan

    def train(self) -> tuple[float, bool]:
        """K steps at r_max; returns the mean loss and whether training diverged."""
        _ranks, _complexity, loss, diverged, _seconds = self.engine.train_round(self.full_ranks)
        self.engine.round_index += 1
        return loss, diverged

    def payload(self, name: str, ranks: list[int]) -> Outgoing:
        """The adapter truncated to ``ranks`` (and the head), encoded as the link sends it."""
        server = self.engine.server
        server.set_rank_vector(ranks)
        try:
            tensors = server.active_tensors()
            payload = server.payload(ranks)
        finally:
            server.set_rank_vector(self.full_ranks)
        protected = server.head_tensor_names() if self.config.link.protect_head else []
        encoded = encode_adapter(tensors, protected, self.quant_bits)
        bits = sum(
            (32 if k in protected or self.quant_bits is None else self.quant_bits) * t.numel()
            for k, t in tensors.items()
        )
        return Outgoing(
            name, self.engine.round_index - 1, ranks, encoded, payload.total_params, int(bits)
        )

    def multicast_cost(self, plan: Mapping[str, list[int]]) -> MulticastCost:
        """This round's downlink airtime, unicast and rank-layered multicast
        (:mod:`airlora.deploy.multicast`), at the SNRs the edges last reported."""
        server = self.engine.server
        n = len(self.projection_names)

        def params_at(p: int):
            def at(rank: int) -> int:
                ranks = [0] * n
                ranks[p] = rank
                return server.payload(ranks).per_projection[p]

            return at

        return layered_multicast_cost(
            plan,
            {name: state.snr_db for name, state in self.edges.items()},
            [params_at(p) for p in range(n)],
            server.payload(self.full_ranks).head_params,
            self.config.link,
        )

    def layer_rates(self, plan: Mapping[str, list[int]]) -> dict[str, LayerRates]:
        """Per edge, the SNR each rank it gets is multicast at (the edges' last reports;
        :func:`~airlora.deploy.multicast.layer_snr_db`)."""
        reported = {name: state.snr_db for name, state in self.edges.items()}
        return layer_snr_db(plan, reported, self.projection_names)

    def state_dict(self) -> dict:
        """Everything the next round depends on: the adapter, the optimiser and schedule,
        the batch stream's position, the policy's random state and each edge's last
        report (copies: training on does not change them). (Dropout is seeded by episode
        seed and round: nothing to keep.)"""
        engine = self.engine
        stream = engine.stream
        rng = getattr(self.policy, "rng", None)
        return {
            "server": engine.server.snapshot(),  # copies already
            # The optimiser's state_dict holds its live moment tensors.
            "optimizer": copy.deepcopy(engine.optimizer.state_dict()),
            "scheduler": copy.deepcopy(engine.scheduler.state_dict()),
            "stream": copy.deepcopy(stream.state_dict()),
            "round_index": engine.round_index,
            "steps_done": engine.steps_done,
            "policy_rng": rng.bit_generator.state if isinstance(rng, np.random.Generator) else None,
            "edges": self.edge_states(),
        }

    def edge_states(self) -> dict[str, dict]:
        """What the cloud knows of each edge, as plain values."""
        return {name: asdict(state) for name, state in self.edges.items()}

    def load_state_dict(self, state: dict) -> None:
        """Continue from :meth:`state_dict`'s moment."""
        engine = self.engine
        if engine.server.chooses_ranks:
            raise ValueError("resuming an adapter that allocates its own ranks is not supported")
        engine.server.restore(state["server"])
        engine.optimizer.load_state_dict(state["optimizer"])
        engine.scheduler.load_state_dict(state["scheduler"])
        engine.stream.load_state_dict(state["stream"])
        engine.round_index = state["round_index"]
        engine.steps_done = state["steps_done"]
        engine._pending = None
        rng = getattr(self.policy, "rng", None)
        if state["policy_rng"] is not None and isinstance(rng, np.random.Generator):
            rng.bit_generator.state = state["policy_rng"]
        self.edges = {name: EdgeState(**values) for name, values in state["edges"].items()}

    def record(self, name: str, report: EdgeReport | None) -> None:
        state = self.edges[name]
        if report is None:
            state.rounds_missed += 1
            return
        state.snr_db = report.next_snr_db
        state.accuracy = report.accuracy if np.isfinite(report.accuracy) else 0.0
        state.rank_vector = report.rank_vector


def run_rounds(
    trainer: CloudTrainer,
    transport: Transport,
    run: RunFolder,
    on_round: Callable[[int, Replies], None] | None = None,
    resume: bool = False,
) -> dict:
    """The deployment loop (module docstring); one metrics row per (round, edge). Returns
    the summary: per edge its final and mean accuracy, bytes and rounds missed.

    When a round's replies are in, the cloud's state as it was when that round was sent,
    with every row so far, is saved atomically (``cloud_state.pt``) before the rows are
    appended to ``metrics.jsonl``. ``resume``: take up from that file: the logs are
    rewritten from it (a round cut short leaves nothing) and the loop goes on from the
    round after the last one saved; no finished round is trained again (a round trained
    while the edges still scored the one before, and not finished, is trained again). An
    edge's receiver memory (erasure filling) lives on the edge and is not part of the
    cloud's state."""
    config = trainer.config
    rows: list[dict] = []
    costs: list[dict] = []
    first = 0
    if resume:
        state = load_cloud_state(run.path)
        trainer.load_state_dict(state["trainer"])
        rows, costs, first = state["rows"], state["multicast"], state["round"] + 1
        run.rewrite_records(METRICS_FILE, [_finite_row(r) for r in rows])
        run.rewrite_records(MULTICAST_FILE, costs)

    def finish(sent: _SentRound, saved: dict) -> None:
        """Collect ``sent``'s replies, record them, save ``saved`` (the trainer's state when
        the round was sent) with what the edges reported, write the round's rows."""
        waited = time.perf_counter()
        replies = sent.collect()
        waited = time.perf_counter() - waited
        round_rows = []
        for name, out in sent.outgoing.items():
            report = replies.get(name)
            trainer.record(name, report)
            round_rows.append(
                {
                    "round": sent.round,
                    "edge": name,
                    "rank_vector": out.rank_vector,
                    "mean_rank": float(np.mean(out.rank_vector)),
                    "payload_params": out.payload_params,
                    "sent_bytes": out.payload.nbytes,
                    "link_payload_bits": out.link_payload_bits,
                    "train_loss": sent.train_loss,
                    "train_time_s": sent.train_time_s,
                    # The cloud's time on the transport: handing the payloads over (in
                    # process: the edges' whole work), then waiting for the replies it did
                    # not have yet once it had trained the next round (or the timeout).
                    "transport_time_s": sent.handover_s + waited,
                    "diverged": False,
                    "missed": report is None,
                    **(
                        {}
                        if report is None
                        else {f"edge_{k}": v for k, v in report.as_dict().items()}
                    ),
                }
            )
        rows.extend(round_rows)
        costs.append(sent.cost_row)
        saved["edges"] = trainer.edge_states()
        save_cloud_state(run.path, saved, sent.round, rows, costs)
        run.append_record(MULTICAST_FILE, sent.cost_row)
        for row in round_rows:
            run.append_metrics(_finite_row(row))
        if on_round:
            on_round(sent.round, replies)

    diverged_round: int | None = None
    trained = 0
    in_flight: _SentRound | None = None
    started = time.perf_counter()
    for t in range(first, config.train.rounds):
        # The state to save with the round in flight: the trainer's before this round.
        saved = trainer.state_dict() if in_flight else None
        complexity, round_index = trainer.observe()
        round_start = time.perf_counter()
        train_loss, diverged = trainer.train()
        trained += 1
        train_time = time.perf_counter() - round_start
        if in_flight:
            assert saved is not None
            finish(in_flight, saved)
            in_flight = None
        if diverged:  # non-finite numbers are not sent: the run ends here, marked
            diverged_round = t
            break
        plan = trainer.plan_round(complexity, round_index)
        outgoing = {name: trainer.payload(name, ranks) for name, ranks in plan.items()}
        if config.downlink == "multicast":
            for name, rates in trainer.layer_rates(plan).items():
                outgoing[name].rates = rates
        cost = trainer.multicast_cost(plan)
        cost_row = {
            "round": t,
            "unicast_airtime_s": cost.unicast_airtime_s,
            "multicast_airtime_s": cost.multicast_airtime_s,
            "layers": cost.layers,
            "saving": cost.saving,
        }
        sent_at = time.perf_counter()
        collect = transport(outgoing, config)
        handover = time.perf_counter() - sent_at
        in_flight = _SentRound(t, outgoing, cost_row, collect, handover, train_loss, train_time)
    if in_flight:
        finish(in_flight, trainer.state_dict())
    wall = time.perf_counter() - started
    summary = summarize_edges(rows, config, wall, trained)
    summary["diverged_round"] = diverged_round
    summary["rounds_trained_by_this_process"] = trained
    summary["resumed_from_round"] = first if resume else None
    unicast = sum(c["unicast_airtime_s"] for c in costs)
    multicast = sum(c["multicast_airtime_s"] for c in costs)
    summary["downlink"] = {
        "unicast_airtime_s": unicast,
        "multicast_airtime_s": multicast,
        "multicast_saving": 1.0 - multicast / unicast if unicast > 0 else 0.0,
    }
    return summary


@dataclass
class _SentRound:
    """A round handed to the transport whose replies are not collected yet."""

    round: int
    outgoing: dict[str, Outgoing]
    cost_row: dict
    collect: Callable[[], Replies]
    handover_s: float
    train_loss: float
    train_time_s: float


def save_cloud_state(
    run_dir: Path, trainer_state: dict, finished_round: int, rows: list[dict], costs: list[dict]
) -> None:
    """The cloud's state after ``finished_round`` (``trainer_state``: the trainer's
    :meth:`CloudTrainer.state_dict` of that moment), with every row so far (atomically)."""
    state = {
        "round": finished_round,
        "trainer": trainer_state,
        "rows": rows,
        "multicast": costs,
    }

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            torch.save(state, fh)
            fh.flush()
            os.fsync(fh.fileno())

    atomic_write(Path(run_dir) / CLOUD_STATE_FILE, write)


def require_cloud_state(run_dir: Path) -> Path:
    """The run folder's saved cloud state; a clear error when there is nothing to resume
    (checked before anything is loaded or started, without reading the file)."""
    path = Path(run_dir) / CLOUD_STATE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} has no finished round to resume from ({path.name})")
    return path


def load_cloud_state(run_dir: Path) -> dict:
    """What :func:`save_cloud_state` wrote (:func:`require_cloud_state` when absent)."""
    path = require_cloud_state(run_dir)
    # Tensors, numbers, strings and lists only: a foreign file cannot run code here.
    return torch.load(path, weights_only=True)


def run_status(summary: dict) -> str:
    """``diverged`` when the cloud's training produced non-finite numbers, else
    ``completed``."""
    return "completed" if summary.get("diverged_round") is None else "diverged"


def summarize_edges(
    rows: list[dict], config: DeployConfig, wall_s: float, rounds_timed: int | None = None
) -> dict:
    """Per edge its figures over ``rows``; ``rounds_per_s``: the rounds this process ran
    (``rounds_timed``, default all) over ``wall_s``."""
    edges = {}
    for spec in config.edges:
        mine = [r for r in rows if r["edge"] == spec.name]
        got = [r for r in mine if not r["missed"]]
        edges[spec.name] = {
            "snr_db": spec.snr_db,
            "rounds_received": len(got),
            "rounds_missed": len(mine) - len(got),
            "final_accuracy": got[-1]["edge_accuracy"] if got else None,
            "mean_accuracy": float(np.mean([r["edge_accuracy"] for r in got])) if got else None,
            "mean_rank": float(np.mean([r["mean_rank"] for r in mine])) if mine else None,
            "sent_bytes": int(sum(r["sent_bytes"] for r in mine)),
            "received_bytes": int(sum(r.get("edge_received_bytes", 0) for r in got)),
            "airtime_s": float(sum(r.get("edge_airtime_s", 0.0) for r in got)),
        }
    return {
        "rounds": config.train.rounds,
        "edges": edges,
        "wall_time_s": wall_s,
        "rounds_per_s": (
            (config.train.rounds if rounds_timed is None else rounds_timed) / wall_s
            if wall_s > 0
            else None
        ),
    }


def _finite_row(row: dict) -> dict:
    """JSON without NaN: a non-finite figure becomes None."""
    return {k: (None if isinstance(v, float) and not np.isfinite(v) else v) for k, v in row.items()}


def in_process_transport(devices: Mapping[str, EdgeDevice]) -> Transport:
    """Hand payloads straight to edge objects in this process (no network): the peer of the
    Flower deployment, with the same payloads, channels and scoring."""
    memories: dict[str, dict[str, np.ndarray]] = {name: {} for name in devices}

    def send(outgoing: dict[str, Outgoing], config: DeployConfig) -> Callable[[], Replies]:
        replies: Replies = {}
        for name, out in outgoing.items():
            report, memories[name] = devices[name].receive(
                out.payload.arrays, out.payload.meta, out.round, memories[name], out.rates
            )
            replies[name] = report
        return lambda: replies

    return send


def run_in_process(
    config: DeployConfig,
    out: Path | None = None,
    on_round: Callable[[int, Replies], None] | None = None,
    resume: bool = False,
) -> tuple[Path, dict]:
    """The deployment with every edge in this process (no Flower): a run folder like
    `airlora deploy`'s, for comparison and tests. ``on_round(t, replies)`` follows it.
    ``resume``: take up the run folder ``out`` from its last finished round
    (:func:`run_rounds`)."""
    out = out or Path(config.out_dir) / (config.run_name or "deploy-in-process")
    if resume:
        require_cloud_state(out)  # nothing to resume: fail before any model is loaded
    devices = {e.name: EdgeDevice(config, e, i) for i, e in enumerate(config.edges)}
    trainer = CloudTrainer(config, {n: d.snr_at(0) for n, d in devices.items()})
    if resume:
        run = RunFolder.reopen(out, config)
    else:
        run = RunFolder.create(out.parent, out.name, config, config.seed, "deploy")
    started = time.perf_counter()
    try:
        summary = run_rounds(trainer, in_process_transport(devices), run, on_round, resume)
        run.finish(summary, started, run_status(summary))
    except BaseException as err:
        run.fail(err)
        raise
    return run.path, summary


def resume_config(run_dir: Path) -> DeployConfig:
    """The deployment a run folder was started with (its ``config.yaml``)."""
    from airlora.config.base import read_yaml_mapping

    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a deployment's run folder (no {CONFIG_FILE})")
    return DeployConfig.model_validate(read_yaml_mapping(path))
