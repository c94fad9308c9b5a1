"""The deployment (issue 14): payloads on the wire, edges, the cloud loop, and real Flower
processes on loopback."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from typer.testing import CliRunner

from airlora.cli import app
from airlora.config import DeployConfig
from airlora.deploy.payload import PayloadError, decode_adapter, encode_adapter
from airlora.errors import LinkError
from airlora.link.quantization import dequantize, quantize

runner = CliRunner()


def _tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "enc.q.lora_A": torch.randn(3, 10, generator=g),
        "enc.q.lora_B": torch.randn(12, 3, generator=g),
        "head.classifier.weight": torch.randn(4, 12, generator=g),
    }


@pytest.mark.parametrize("bits", [8, 5, 12])
def test_payload_carries_the_link_quantisers_codes_and_the_head_exactly(bits):
    tensors = _tensors()
    encoded = encode_adapter(tensors, ["head.classifier.weight"], bits)
    decoded = decode_adapter(encoded.arrays, encoded.meta)
    for name in ("enc.q.lora_A", "enc.q.lora_B"):
        q = quantize(tensors[name].numpy(), bits)
        expected = dequantize(q.codes, q.lo, q.hi, bits).reshape(tensors[name].shape)
        assert np.array_equal(decoded[name].numpy(), expected)
        # What the link counts (n * b bits), up to the tensor's last partial byte.
        assert encoded.arrays[name].nbytes == math.ceil(tensors[name].numel() * bits / 8)
    assert torch.equal(decoded["head.classifier.weight"], tensors["head.classifier.weight"])
    analog = encode_adapter(tensors, [], None)
    assert all(
        torch.equal(decode_adapter(analog.arrays, analog.meta)[k], v) for k, v in tensors.items()
    )


def test_a_malformed_payload_is_refused_with_its_reason():
    tensors = _tensors()
    encoded = encode_adapter(tensors, ["head.classifier.weight"], 8)
    expected = {"enc.q.lora_A": (4, 10), "enc.q.lora_B": (12, 4), "head.classifier.weight": (4, 12)}
    decode_adapter(encoded.arrays, encoded.meta, expected)  # well-formed: accepted
    cases = [
        (
            {**encoded.arrays, "enc.q.lora_A": encoded.arrays["enc.q.lora_A"][:-1]},
            encoded.meta,
            "bytes",
        ),
        (encoded.arrays, {**encoded.meta, "enc.q.lora_A": [8, 0, 1, 3, -10]}, "negative"),
        ({"x": np.zeros(3, np.float32)}, {"x": [0, 0, 0, 3]}, "unknown tensor"),
        (encoded.arrays, {k: v for k, v in encoded.meta.items() if "head" not in k}, "different"),
        (encoded.arrays, {**encoded.meta, "enc.q.lora_A": [8, 0, 1, 9, 10]}, "does not fit"),
        (encoded.arrays, {**encoded.meta, "enc.q.lora_A": [8, 0, math.nan, 3, 10]}, "malformed"),
    ]
    for arrays, meta, message in cases:
        with pytest.raises(PayloadError, match=message):
            decode_adapter(arrays, meta, expected)


def _deploy_config(tiny_model_dir, tiny_data_dir, tmp_path, **extra) -> DeployConfig:
    from conftest import tiny_task_sections

    return DeployConfig.model_validate(
        {
            **tiny_task_sections(tiny_model_dir, tiny_data_dir),
            "train": {"rounds": 3, "steps_per_round": 2, "warmup_steps": 0},
            "link": {"scheme": "digital", "modulation": "adaptive", "snr_process": "fixed"},
            "edges": [{"snr_db": 5.0}, {"snr_db": 15.0}, {"snr_db": 25.0}],
            "out_dir": str(tmp_path / "runs"),
            "round_timeout_s": 120,
            **extra,
        }
    )


def _rows(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _check_deployment(
    run_dir, rounds: int = 3, missed: frozenset = frozenset(), may_miss: frozenset = frozenset()
) -> list[dict]:
    """What every deployment must show: per (round, edge) a row; every edge received the
    bytes the cloud accounted for it; the 25 dB edge gets at least the 5 dB edge's ranks.
    ``missed``: the (round, edge) pairs that must have missed their round; ``may_miss``:
    those that may have."""
    rows = _rows(run_dir)
    assert len(rows) == rounds * 3
    got = {(r["round"], r["edge"]) for r in rows if r["missed"]}
    assert set(missed) <= got <= set(missed) | set(may_miss), got
    for r in rows:
        if r["missed"]:
            continue
        assert r["edge_received_bytes"] == r["sent_bytes"] > 0
        assert r["edge_payload_bits"] == r["link_payload_bits"]  # the edge's link agrees
        if r["edge_wire_array_bytes"] is not None:  # over Flower: the framing is on top
            assert r["sent_bytes"] < r["edge_wire_array_bytes"] < r["sent_bytes"] + 4096
        assert 0 <= r["edge_accuracy"] <= 1
    for t in range(rounds):
        ranks = {r["edge"]: r["rank_vector"] for r in rows if r["round"] == t}
        assert all(a >= b for a, b in zip(ranks["edge2"], ranks["edge0"], strict=True))
        assert sum(ranks["edge2"]) > sum(ranks["edge0"])
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["status"] == "completed" and set(manifest["summary"]["edges"]) == {
        "edge0",
        "edge1",
        "edge2",
    }
    return rows


def test_in_process_deployment_sends_each_edge_its_own_truncation(
    tiny_model_dir, tiny_data_dir, tmp_path
):
    from airlora.deploy import run_in_process

    config = _deploy_config(tiny_model_dir, tiny_data_dir, tmp_path, run_name="local")
    run_dir, summary = run_in_process(config)
    _check_deployment(run_dir)
    assert summary["edges"]["edge0"]["snr_db"] == 5.0


def test_deploy_refuses_bad_input_before_any_folder(tiny_model_dir, tiny_data_dir, tmp_path):
    config = _deploy_config(tiny_model_dir, tiny_data_dir, tmp_path, run_name="bad")
    body = config.model_dump(mode="json")
    path = tmp_path / "deploy.yaml"
    for change, message in (
        ({"link": {**body["link"], "scheme": "coded"}}, "not emulated"),
        ({"edges": [{"snr_db": 5, "name": "a"}, {"snr_db": 9, "name": "a"}]}, "unique"),
        ({"method": "airllm"}, "saved policy"),
    ):
        path.write_text(yaml.safe_dump({**body, **change}))
        result = runner.invoke(app, ["deploy", "--config", str(path), "--in-process"])
        assert result.exit_code == 2 and message in result.output, result.output
    assert not (tmp_path / "runs").exists()


def kill_cloud(federation, run_dir) -> None:
    """SIGKILL the ServerApp (a process that the SuperLink's SuperExec, its child, started)
    and stop the `flwr run` that follows it: Flower would mark the run failed only after two
    missed heartbeats (about a minute); an operator who saw the cloud die stops it."""
    import os
    import signal
    import subprocess

    table = subprocess.run(["ps", "-ww", "-eo", "pid=,ppid=,args="], capture_output=True)
    procs = [line.split(None, 2) for line in table.stdout.decode().splitlines()]
    link = federation.processes["superlink"].pid
    superexec = {pid for pid, ppid, _ in procs if int(ppid) == link}
    cloud = [
        int(pid) for pid, ppid, args in procs if ppid in superexec and "flwr-serverapp" in args
    ]
    assert cloud, "no ServerApp process found"
    for pid in cloud:
        os.kill(pid, signal.SIGKILL)
    for pid, _ppid, args in procs:
        if " run " in args and str(run_dir) in args and "flwr" in args:
            os.kill(int(pid), signal.SIGTERM)


def test_flower_deployment_with_tls_auth_and_a_killed_edge(tiny_model_dir, tiny_data_dir, tmp_path):
    """A SuperLink and 3 SuperNodes on loopback (free ports), 4 rounds at 5, 15 and 25 dB,
    every connection on TLS (a CA and a server certificate made here), only registered
    SuperNodes let in (an EC key per edge), and edge1's SuperNode SIGKILLed in round 2:
    - the run folder holds each edge's metrics; received bytes match the cloud's accounting;
    - round 2 ends for the others within the timeout; edge1, restarted, rejoins on a new node
      and receives the current adapter;
    - every round an edge received equals the in-process run's (the transport changes
      nothing);
    - the cloud (the ServerApp process) SIGKILLed in round 4 of 5: the run fails, and
      ``resume`` (a new ``flwr run`` on the same federation) takes the run folder up from its
      last finished round, training only the rounds after it; the logs are kept. One
      scenario for all of it: each Flower federation costs most of a minute of the suite."""
    pytest.importorskip("flwr")
    import http.client
    import ssl
    import threading
    import time

    from airlora.deploy import run_in_process
    from airlora.deploy.launch import DeployError, LoopbackDeployment

    seen: dict[str, object] = {}
    events: list[str] = []

    def start(federation, run_dir) -> None:
        # The SuperLink speaks TLS with the certificate made for 127.0.0.1 ...
        context = ssl.create_default_context(cafile=str(federation.certificates.ca_cert))
        secure = http.client.HTTPSConnection("127.0.0.1", federation.port, context=context)
        secure.request("GET", "/")
        seen["https_status"] = secure.getresponse().status
        secure.close()
        # ... and nothing else: a plain HTTP request gets no HTTP answer.
        plain = http.client.HTTPConnection("127.0.0.1", federation.port, timeout=10)
        try:
            plain.request("GET", "/")
            seen["plain_status"] = plain.getresponse().status
        except (http.client.HTTPException, ConnectionError, OSError) as err:
            seen["plain_error"] = type(err).__name__
        seen["keys"] = sorted(federation.node_keys)

        def chaos() -> None:
            metrics = run_dir / "metrics.jsonl"
            deadline = time.monotonic() + 400
            while time.monotonic() < deadline:  # round 1 recorded: round 2 is under way
                if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
                    break
                time.sleep(0.2)
            federation.kill_edge("edge1")
            events.append("killed")
            while time.monotonic() < deadline:  # back once round 2 has ended without it
                if len(metrics.read_text().splitlines()) >= 6:
                    break
                time.sleep(0.2)
            # With a new key, as a replaced device would come back. (With its old key, Flower
            # lets a node back in only once it is marked offline, 60 s after its last
            # heartbeat: too long for the suite; test_the_registry_asks_again_... covers
            # what the cloud does then.)
            federation.start_edge("edge1", new_identity=True)
            events.append("restarted")
            while time.monotonic() < deadline:  # round 3 recorded: round 4 is under way
                if len(metrics.read_text().splitlines()) >= 9:
                    break
                time.sleep(0.1)
            kill_cloud(federation, run_dir)
            events.append("cloud killed")

        threading.Thread(target=chaos, daemon=True).start()

    config = _deploy_config(
        tiny_model_dir,
        tiny_data_dir,
        tmp_path,
        run_name="flower",
        train={"rounds": 5, "steps_per_round": 1, "warmup_steps": 0},
        round_timeout_s=15,
    )
    run_dir = tmp_path / "runs" / "flower"
    with LoopbackDeployment(config, tls=True, authenticate=True) as deployment:
        start(deployment.federation, run_dir)
        with pytest.raises(DeployError, match=r"ended failed|flwr run exited"):
            deployment.run(run_dir, timeout_s=500)
        assert events == ["killed", "restarted", "cloud killed"]
        assert deployment.run(run_dir, timeout_s=500, resume=True) == run_dir
    summary = json.loads((run_dir / "manifest.json").read_text())["summary"]
    assert summary["resumed_from_round"] in (3, 4)  # the kill lands in round 4 (or 5)
    assert summary["rounds_trained_by_this_process"] == 5 - summary["resumed_from_round"]
    # Round 2 (index 1) is lost to the kill; round 3 too when the new node registers late.
    rows = _check_deployment(
        run_dir, rounds=5, missed=frozenset({(1, "edge1")}), may_miss=frozenset({(2, "edge1")})
    )
    assert isinstance(seen["https_status"], int) and "plain_error" in seen, seen
    assert seen["keys"] == ["edge0", "edge1", "edge2"]  # every node registered its own key
    assert len(set(summary["nodes"].values())) == 3
    # Every edge's warm launcher reported its model ready (the start-up watch saw it).
    assert deployment.federation.ready == {"edge0", "edge1", "edge2"}
    assert (run_dir / "logs" / "supernode-edge1.log").is_file()
    local, _ = run_in_process(config.model_copy(update={"run_name": "local"}))
    same = ("edge", "round", "rank_vector", "sent_bytes", "edge_accuracy", "edge_erased_params")
    received = [{k: r[k] for k in same} for r in rows if not r["missed"]]
    lost = {(r["round"], r["edge"]) for r in rows if r["missed"]}
    expected = [r for r in _rows(local) if (r["round"], r["edge"]) not in lost]
    assert received == [{k: r[k] for k in same} for r in expected]
    assert not rows[-2]["missed"] and rows[-2]["edge"] == "edge1"  # rejoined by round 5


def test_the_registry_asks_again_a_node_that_left_or_lost_its_state(monkeypatch):
    """An edge restarted with its old key comes back under the same node id once the
    SuperLink has marked it offline, without the state its hello gave it: asked again when
    it reappears, or when a round finds it unregistered. A node that never answers holds up
    neither the registration nor a round."""
    pytest.importorskip("flwr")
    from flwr.app import ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from airlora.config import DeployConfig
    from airlora.deploy.flower_app import NOT_REGISTERED, EdgeRegistry, NotRegistered, edge_round

    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 1)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)
    config = DeployConfig.model_validate(
        {"edges": [{"name": "a", "snr_db": 5}, {"name": "b", "snr_db": 9}]}
    )

    class Grid:
        """Nodes 1 ('a') and 2 ('b') answer a hello at once; node 3 never does."""

        def __init__(self) -> None:
            self.listed = [1, 2, 3]
            self.hellos: list[int] = []
            self.replies: dict[str, Message] = {}

        def get_node_ids(self):
            return list(self.listed)

        def push_messages(self, messages):
            ids = []
            for m in messages:
                node = m.metadata.dst_node_id
                self.hellos.append(node)
                ids.append(f"m{len(self.hellos)}")
                if node in (1, 2):
                    content = RecordDict(
                        {
                            "hello": ConfigRecord({"edge": "ab"[node - 1]}),
                            "snr": MetricRecord({"snr_db": 10.0}),
                        }
                    )
                    reply = Message(content, reply_to=m)
                    reply.metadata.__dict__["_src_node_id"] = node
                    reply.metadata.__dict__["_reply_to_message_id"] = ids[-1]
                    self.replies[ids[-1]] = reply
            return ids

        def pull_messages(self, ids):
            return [self.replies.pop(i) for i in list(ids) if i in self.replies]

    # The registry's clock, advanced only by its own waits: what it waited for, not how
    # fast this machine is.
    from types import SimpleNamespace

    from airlora.deploy import flower_app

    clock = SimpleNamespace(now=0.0)

    def sleep(seconds: float) -> None:
        clock.now += seconds

    monkeypatch.setattr(
        flower_app, "time", SimpleNamespace(monotonic=lambda: clock.now, sleep=sleep)
    )
    grid = Grid()
    registry = EdgeRegistry(config, "yaml")
    registry.wait_for_all(grid, timeout_s=30)  # a and b answered: node 3 is not waited for
    assert registry.nodes == {"a": 1, "b": 2} and sorted(grid.hellos) == [1, 2, 3]
    assert clock.now == pytest.approx(1.0)  # the first refresh's 1 s for an answer from node 3
    registered_at = clock.now
    registry.refresh(grid, wait_s=5)
    assert clock.now == registered_at  # node 3, asked before, is not waited for again
    assert sorted(grid.hellos) == [1, 2, 3]  # nobody asked twice
    grid.listed = [2, 3]  # node 1's heartbeat lapsed ...
    registry.refresh(grid)
    grid.listed = [1, 2, 3]  # ... and it is back with its old key
    registry.refresh(grid)
    assert grid.hellos.count(1) == 2 and registry.nodes["a"] == 1
    registry.forget(2)  # a round found node 2 unregistered (below)
    registry.refresh(grid)
    assert grid.hellos.count(2) == 2 and grid.hellos.count(3) == 1

    # A restarted node's ClientApp has no deployment in its state: it says so, in words the
    # transport recognises in Flower's error reason.
    train = Message(RecordDict({"round": ConfigRecord({"round": 3})}), 1, MessageType.TRAIN)
    with pytest.raises(NotRegistered, match=NOT_REGISTERED):
        edge_round(train, Context(1, 1, {"edge": "a"}, RecordDict(), {}))


def test_bench_deploy_times_flower_against_the_same_loop_in_process(
    tiny_model_dir, tiny_data_dir, tmp_path
):
    """`airlora bench deploy --json` in the bench format: rounds/s of the 3-edge loopback
    deployment (warm SuperNodes, no TLS: `airlora deploy`'s defaults) against the same loop
    in process, both from one config, with the same rows (here with multicast delivery: its
    rates travel in the Flower messages)."""
    pytest.importorskip("flwr")
    from airlora.config import dump_config

    config = _deploy_config(
        tiny_model_dir,
        tiny_data_dir,
        tmp_path,
        train={"rounds": 2, "steps_per_round": 1},
        link={"scheme": "digital", "snr_process": "fixed", "deadline_s": None},
        downlink="multicast",
    )
    path = tmp_path / "deploy.yaml"
    path.write_text(dump_config(config))
    args = ["bench", "deploy", "--config", str(path), "--json", "--repeats", "1"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    bench = json.loads(result.stdout)
    assert (bench["name"], bench["unit"]) == ("deploy", "rounds/s")
    assert bench["project"] > 0 and bench["peer"] > 0
    assert bench["ratio"] == pytest.approx(bench["project"] / bench["peer"])
    details = bench["details"]
    assert details["rows_compared"] == 2 * 3 and details["rounds"] == 2  # rounds x edges
    assert [e["snr_db"] for e in details["edges"]] == [5.0, 15.0, 25.0]
    assert details["project_loop_s"] == pytest.approx(2 / bench["project"])
    assert details["project_wall_with_startup_s"] > details["project_loop_s"]
    assert not (tmp_path / "runs").exists()  # both runs went to a temporary folder


def test_bench_deploy_alternates_the_order_of_repeated_pairs_and_takes_medians(monkeypatch):
    import airlora.deploy.cloud
    import airlora.deploy.launch
    from airlora.bench.deploy import bench_deploy

    order: list[str] = []
    loops = {"peer": iter([10.0, 14.0, 12.0]), "project": iter([20.0, 11.0, 13.0])}
    row = {"round": 0, "edge": "e", "train_time_s": 1.0, "transport_time_s": 1.0}

    def write(config, side: str) -> tuple[Path, float]:
        order.append(side)
        folder = Path(config.out_dir) / str(config.run_name)
        folder.mkdir(parents=True)
        (folder / "metrics.jsonl").write_text(json.dumps(row) + "\n")
        return folder, next(loops[side])

    def peer(config):
        folder, loop = write(config, "peer")
        return folder, {"wall_time_s": loop}

    def project(config, warm):
        folder, loop = write(config, "project")
        (folder / "manifest.json").write_text(json.dumps({"summary": {"wall_time_s": loop}}))
        return folder

    monkeypatch.setattr(airlora.deploy.cloud, "run_in_process", peer)
    monkeypatch.setattr(airlora.deploy.launch, "deploy_loopback", project)
    config = DeployConfig(train={"rounds": 2})
    bench = bench_deploy(config, repeats=3)
    # A drifting machine favours neither side: peer first, then project first, ...
    assert order == ["peer", "project", "project", "peer", "peer", "project"]
    details = bench["details"]
    assert details["order"] == order and details["repeats"] == 3
    assert details["peer_loops_s"] == [10.0, 14.0, 12.0]
    assert details["pair_ratios"] == pytest.approx([0.5, 14 / 11, 12 / 13])
    assert bench["peer"] == pytest.approx(2 / 12.0) and bench["project"] == pytest.approx(2 / 13.0)
    assert bench["ratio"] == pytest.approx(12 / 13)
    with pytest.raises(ValueError, match="repeats"):
        bench_deploy(config, repeats=0)

    def other_rows(config, warm):  # a project run whose rows differ is not the same work
        folder = project(config, warm)
        (folder / "metrics.jsonl").write_text(json.dumps({**row, "edge": "other"}) + "\n")
        return folder

    loops = {"peer": iter([10.0]), "project": iter([10.0])}
    monkeypatch.setattr(airlora.deploy.launch, "deploy_loopback", other_rows)
    with pytest.raises(RuntimeError, match="other rows"):
        bench_deploy(config)


def test_a_malformed_or_failed_edge_reply_is_refused_with_a_logged_reason(caplog, monkeypatch):
    pytest.importorskip("flwr")
    from flwr.app import ConfigRecord, Error, Message, MessageType, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from airlora.deploy.edge import EdgeReport
    from airlora.deploy.flower_app import parse_report

    # Messages outside a running app need an identity (Flower sets it inside one).
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 1)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)
    sent = Message(RecordDict({"x": ConfigRecord({"a": 1})}), 7, MessageType.TRAIN)
    good = EdgeReport(2, 0.5, 1.2, 1040, [1, 2], 5.0, 5.0, 0.01, 0, 8320, 0.1)

    def reply(**changes) -> Message:
        record = {**good.as_dict(), **changes}
        record = {k: v for k, v in record.items() if v is not None}
        return Message(RecordDict({"report": ConfigRecord(record)}), reply_to=sent)

    assert parse_report(reply(), "edge0") == good
    cases = {
        "error 2": Message(Error(2, "boom"), reply_to=sent),
        "malformed": reply(accuracy=None),  # a field missing
        "out of range": reply(received_bytes=2**40),  # oversized
        "not finite": reply(next_snr_db=float("nan")),
        "list of ints": reply(rank_vector="12"),  # not the ranks [1, 2]
        "ints, got [1.7, 2.0]": reply(rank_vector=[1.7, 2.0]),
    }
    for reason, message in cases.items():
        caplog.clear()
        with caplog.at_level("WARNING", logger="airlora.deploy"):
            assert parse_report(message, "edge0") is None
        assert reason in caplog.text and "edge0" in caplog.text


def test_layered_multicast_sends_shared_ranks_once_at_the_weakest_receivers_rate():
    from airlora.config import LinkConfig
    from airlora.deploy.multicast import first_airtime, head_weight, layered_multicast_cost
    from airlora.link.base import shannon_airtime

    perfect = LinkConfig(scheme="perfect", bits_per_param=32)
    per_rank = [lambda r: 10 * r]  # one projection, 10 parameters per rank
    cost = layered_multicast_cost({"a": [2], "b": [4]}, {"a": 5.0, "b": 25.0}, per_rank, 6, perfect)

    def air(params: float, snr: float) -> float:
        return shannon_airtime(int(params * 32), snr, perfect.bandwidth_hz)

    head = 6  # a perfect link prices every parameter alike
    # Ranks 1-2 and the head once to both at a's rate; ranks 3-4 to b alone at b's rate.
    assert cost.multicast_airtime_s == pytest.approx(air(20 + head, 5.0) + air(20, 25.0))
    assert cost.unicast_airtime_s == pytest.approx(air(20 + head, 5.0) + air(40 + head, 25.0))
    assert cost.layers == 2 and 0 < cost.saving < 1
    # On a packet link each layer is its own transmission, in whole packets.
    digital = LinkConfig(scheme="digital", modulation="adaptive")
    three = {"a": [1], "b": [3], "c": [3]}
    same = layered_multicast_cost(three, dict.fromkeys("abc", 12.0), per_rank, 0, digital)
    assert same.multicast_airtime_s == pytest.approx(
        first_airtime(digital, 10, 12.0) + first_airtime(digital, 20, 12.0)
    )
    assert same.unicast_airtime_s == pytest.approx(
        first_airtime(digital, 10, 12.0) + 2 * first_airtime(digital, 30, 12.0)
    )
    # A protected head is float32 control data: 4 parameters' worth at 8 bits, once.
    headed = layered_multicast_cost(three, dict.fromkeys("abc", 12.0), per_rank, 100, digital)
    assert head_weight(digital) == 32 / digital.quant_bits == 4
    assert headed.multicast_airtime_s == pytest.approx(
        first_airtime(digital, 10 + 400, 12.0) + first_airtime(digital, 20, 12.0)
    )
    assert head_weight(digital.model_copy(update={"protect_head": False})) == 1


def test_multicast_rates_follow_the_weakest_receiver_of_each_layer():
    from airlora.deploy.multicast import layer_snr_db

    ranks = {"a": [2, 4], "b": [4, 4], "c": [6, 0]}
    rates = layer_snr_db(ranks, {"a": 5.0, "b": 15.0, "c": 25.0}, ["p", "q"])
    # p: ranks 1-2 go to a, b and c (at a's 5 dB), 3-4 to b and c (15 dB), 5-6 to c alone.
    assert rates["a"].per_rank == {"p": [5.0] * 2, "q": [5.0] * 4}
    assert rates["b"].per_rank == {"p": [5.0, 5.0, 15.0, 15.0], "q": [5.0] * 4}
    assert rates["c"].per_rank == {"p": [5.0, 5.0, 15.0, 15.0, 25.0, 25.0], "q": []}
    assert {r.head_snr_db for r in rates.values()} == {5.0}


def test_multicast_rates_travel_as_a_record_and_a_malformed_one_is_refused():
    pytest.importorskip("flwr")
    from flwr.app import ConfigRecord

    from airlora.deploy.flower_app import HEAD_RATE_KEY, rates_from_record, rates_record
    from airlora.deploy.multicast import LayerRates

    back = rates_from_record(rates_record(LayerRates({"p": [5.0, 15.0], "q": []}, 5.0)))
    assert back.per_rank == {"p": [5.0, 15.0]} and back.head_snr_db == 5.0
    for bad in (
        {"p": "515", HEAD_RATE_KEY: 5.0},  # a string is not the rates [5, 1, 5]
        {"p": ["5", "15"], HEAD_RATE_KEY: 5.0},
        {"p": [5.0]},  # no head rate
        {"p": [math.inf], HEAD_RATE_KEY: 5.0},
    ):
        with pytest.raises(PayloadError, match="rates"):
            rates_from_record(ConfigRecord(bad))


def test_a_block_quantised_on_its_tensors_range_keeps_the_tensors_grid():
    from airlora.link.quantization import dequantize, quantize

    full = quantize(np.random.default_rng(0).standard_normal((8, 16)).astype(np.float32), 4)
    grid = dequantize(full.codes, full.lo, full.hi, 4).reshape(8, 16)
    # A row holding neither the tensor's minimum nor its maximum: a narrower range.
    row = next(r for r in range(8) if grid.min() < grid[r].min() and grid[r].max() < grid.max())
    block = grid[row : row + 1]
    again = quantize(block, 4, (full.lo, full.hi))
    assert np.array_equal(again.codes, full.codes.reshape(8, 16)[row])
    own = quantize(block, 4)  # its own, narrower range: another grid
    assert not np.allclose(dequantize(own.codes, own.lo, own.hi, 4), block.reshape(-1))
    with pytest.raises(ValueError, match="min <= max"):
        quantize(block, 4, (1.0, 0.0))


def test_a_link_sends_at_the_modulation_its_transmitter_picked():
    """A multicast layer reaches a 25 dB edge at the modulation the 5 dB edge sets: more
    symbols on air, and no more errors than at the 25 dB edge's own modulation."""
    from airlora.config import LinkConfig
    from airlora.link import build_link

    config = LinkConfig(scheme="digital", modulation="adaptive", snr_process="fixed")
    tensors = {"w": torch.randn(64, 64)}
    _, own_report = build_link(config, 3).transmit(tensors, 25.0)
    _, low_report = build_link(config, 3).transmit(tensors, 25.0, modulation_snr_db=5.0)
    link = build_link(config)
    assert low_report.extra["modulation"] == link.modulation_at(5.0).name
    assert (
        own_report.extra["modulation"]
        == link.modulation_at(25.0).name
        != (low_report.extra["modulation"])
    )
    assert low_report.airtime_s > own_report.airtime_s
    assert low_report.erased_params <= own_report.erased_params
    assert low_report.snr_db == own_report.snr_db == 25.0
    with pytest.raises(LinkError, match="finite"):
        link.transmit(tensors, 25.0, modulation_snr_db=float("nan"))


def test_multicast_delivery_changes_only_what_the_stronger_edges_receive(
    tiny_model_dir, tiny_data_dir, tmp_path
):
    """Unicast and multicast runs of one deployment: the 5 dB edge, the weakest receiver of
    everything it gets, receives exactly the same; the 25 dB edge receives its shared ranks
    at a lower-order modulation (longer on air); the pricing is the same either way."""
    from airlora.deploy import run_in_process

    # The head unprotected: it crosses the channel too, and its erasures are filled from the
    # receiver's memory like the factors'.
    link = {
        "scheme": "digital",
        "quant_bits": 4,
        "modulation": "adaptive",
        "snr_process": "fixed",
        "erasure_fill": "previous",
        "protect_head": False,
        "deadline_s": None,
    }
    config = _deploy_config(tiny_model_dir, tiny_data_dir, tmp_path, link=link, run_name="uni")
    uni_dir, _ = run_in_process(config)
    multi = _deploy_config(
        tiny_model_dir, tiny_data_dir, tmp_path, link=link, run_name="multi", downlink="multicast"
    )
    multi_dir, _ = run_in_process(multi)
    uni, mc = _rows(uni_dir), _rows(multi_dir)
    keys = ("edge_accuracy", "edge_erased_params", "edge_airtime_s", "edge_payload_bits")
    stronger_longer = 0
    assert sum(r["edge_erased_params"] for r in uni if r["edge"] == "edge0") > 0
    for u, m in zip(uni, mc, strict=True):
        assert u["rank_vector"] == m["rank_vector"] and u["sent_bytes"] == m["sent_bytes"]
        if u["edge"] == "edge0":
            assert [u[k] for k in keys] == [m[k] for k in keys]
        if u["edge"] == "edge2":
            assert m["edge_airtime_s"] > u["edge_airtime_s"]
            stronger_longer += 1
    assert stronger_longer == 3
    assert (uni_dir / "multicast.jsonl").read_text() == (multi_dir / "multicast.jsonl").read_text()
    with pytest.raises(ValueError, match=r"multicast with link\.deadline_s"):
        _deploy_config(tiny_model_dir, tiny_data_dir, tmp_path, downlink="multicast")


def test_cli_deploy_in_process_prints_each_edge_and_writes_the_run(
    tiny_model_dir, tiny_data_dir, tmp_path
):
    config = _deploy_config(tiny_model_dir, tiny_data_dir, tmp_path, run_name="cli")
    path = tmp_path / "deploy.yaml"
    path.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    result = runner.invoke(app, ["deploy", "--config", str(path), "--in-process"])
    assert result.exit_code == 0, result.output
    for name in ("edge0 (5 dB)", "edge1 (15 dB)", "edge2 (25 dB)"):
        assert name in result.output
    run_dir = tmp_path / "runs" / "cli"
    assert len(_rows(run_dir)) == 9 and (run_dir / "multicast.jsonl").is_file()
    result = runner.invoke(app, ["deploy", "--config", str(path), "--in-process", "--json"])
    assert result.exit_code == 2 and "already exists" in result.output


def test_a_packed_payload_is_the_arrays_bytes_and_refuses_what_does_not_fit():
    from airlora.deploy.payload import pack_arrays, unpack_arrays

    encoded = encode_adapter(_tensors(), ["head.classifier.weight"], 5)
    buffer, names = pack_arrays(encoded.arrays)
    assert buffer.dtype == np.uint8 and buffer.nbytes == encoded.nbytes  # nothing added
    unpacked = unpack_arrays(buffer, names, encoded.meta)
    assert list(unpacked) == names
    for name, array in encoded.arrays.items():
        assert unpacked[name].dtype == array.dtype and np.array_equal(unpacked[name], array)
    decoded = decode_adapter(unpacked, encoded.meta)
    assert torch.equal(decoded["head.classifier.weight"], _tensors()["head.classifier.weight"])
    cases = [
        (buffer[:-1], names, encoded.meta, "short"),
        (np.concatenate([buffer, np.zeros(2, np.uint8)]), names, encoded.meta, "past the last"),
        (buffer.view(np.int8), names, encoded.meta, "uint8"),
        (buffer, names[:-1], encoded.meta, "differ"),
        (buffer, [*names[:-1], names[0]], encoded.meta, "differ"),
        (buffer, names, {**encoded.meta, "enc.q.lora_A": [5, 0, 1, -3, 10]}, "malformed"),
        (buffer, names, {**encoded.meta, "enc.q.lora_A": [-5, 0, 1, 3, 10]}, "quantisation"),
        (buffer, names, {**encoded.meta, "enc.q.lora_A": [5, 0, 1, 2.5, 10]}, "integral"),
    ]
    for packed, order, meta, message in cases:
        with pytest.raises(PayloadError, match=message):
            unpack_arrays(packed, order, meta)


def test_a_restarted_cloud_resumes_from_its_last_finished_round(
    tiny_model_dir, tiny_data_dir, tmp_path
):
    """The cloud killed after round 1 of 3 (a partial row half-written after it): the resumed
    run trains rounds 2 and 3 only, and every row equals an uninterrupted run's."""
    from airlora.deploy import run_in_process
    from airlora.deploy.cloud import CLOUD_STATE_FILE

    # An analog link has no erasures, so the edges' receiver memory (not the cloud's to keep)
    # plays no part and the rows must be equal to the bit.
    config = _deploy_config(
        tiny_model_dir, tiny_data_dir, tmp_path, link={"scheme": "analog"}, method="random"
    )
    whole, _ = run_in_process(config.model_copy(update={"run_name": "whole"}))

    class Crash(RuntimeError):
        pass

    def crash(t, _replies) -> None:
        if t == 0:
            raise Crash("the cloud went down")

    cut = tmp_path / "runs" / "cut"
    with pytest.raises(Crash):
        run_in_process(config.model_copy(update={"run_name": "cut"}), on_round=crash)
    assert json.loads((cut / "manifest.json").read_text())["status"] == "failed"
    assert (cut / CLOUD_STATE_FILE).is_file() and len(_rows(cut)) == 3
    with open(cut / "metrics.jsonl", "a") as fh:  # killed while writing round 2's rows
        fh.write('{"round": 1, "edge": "ed')
    run_dir, summary = run_in_process(config, cut, resume=True)
    assert summary["resumed_from_round"] == 1
    assert summary["rounds_trained_by_this_process"] == 2  # rounds 2 and 3, not round 1
    same = ("round", "edge", "rank_vector", "sent_bytes", "train_loss", "edge_accuracy")
    assert [{k: r[k] for k in same} for r in _rows(run_dir)] == [
        {k: r[k] for k in same} for r in _rows(whole)
    ]
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["status"] == "completed"
    assert [r["previous_status"] for r in manifest["resumed"]] == ["failed"]
    assert len(json.loads((run_dir / "multicast.jsonl").read_text().splitlines()[-1])) > 0
    assert len((run_dir / "multicast.jsonl").read_text().splitlines()) == 3
    # A completed run, or another config: refused, the folder left as it was.
    with pytest.raises(ValueError, match="nothing to resume"):
        run_in_process(config, cut, resume=True)
    cut_twice = tmp_path / "runs" / "cut2"
    with pytest.raises(Crash):
        run_in_process(config.model_copy(update={"run_name": "cut2"}), on_round=crash)
    other = config.model_copy(update={"seed": 1})
    with pytest.raises(ValueError, match="another config"):
        run_in_process(other, cut_twice, resume=True)
    assert json.loads((cut_twice / "manifest.json").read_text())["status"] == "failed"
    # Nothing to resume: a clear error, before any model is loaded.
    with pytest.raises(FileNotFoundError, match="no finished round"):
        run_in_process(config, tmp_path / "runs" / "whole-not", resume=True)
    result = runner.invoke(app, ["deploy", "--resume", str(tmp_path / "nowhere"), "--in-process"])
    assert result.exit_code == 2 and "not a deployment" in result.output, result.output


def test_flowers_simulation_engine_runs_the_same_app_on_virtual_edges(
    tiny_model_dir, tiny_data_dir, tmp_path
):
    """The app on Flower's simulation engine (virtual SuperNodes on Ray workers; node i is
    edge i): the same rows as the in-process loop."""
    pytest.importorskip("flwr")
    pytest.importorskip("ray")
    from airlora.deploy import run_in_process
    from airlora.deploy.simulation import simulate

    config = _deploy_config(
        tiny_model_dir,
        tiny_data_dir,
        tmp_path,
        run_name="simulated",
        train={"rounds": 2, "steps_per_round": 1, "warmup_steps": 0},
    )
    run_dir = simulate(config)
    rows = _check_deployment(run_dir, rounds=2)
    assert all(r["edge_wire_array_bytes"] is not None for r in rows)  # it went through Flower
    local, _ = run_in_process(config.model_copy(update={"run_name": "local"}))
    same = ("edge", "round", "rank_vector", "sent_bytes", "edge_accuracy", "edge_erased_params")
    assert [{k: r[k] for k in same} for r in rows] == [
        {k: r[k] for k in same} for r in _rows(local)
    ]
    with pytest.raises(FileExistsError):
        simulate(config)


def test_the_loopback_federation_spares_the_cores_it_shares(monkeypatch, tmp_path):
    """On one machine every Flower poll and page fault takes CPU from the cloud and the edges:
    the loopback processes poll less often than on a dedicated SuperLink and put large
    tensors on huge pages, unless the user chose otherwise."""
    from airlora.deploy.launch import LoopbackFederation

    chosen = {
        "AIRLORA_SUPERNODE_POLL_S": "1.0",
        "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.5",
        "THP_MEM_ALLOC_ENABLE": "1",
        "OMP_WAIT_POLICY": "PASSIVE",
        "FLWR_TELEMETRY_ENABLED": "0",
    }
    for name in chosen:
        monkeypatch.delenv(name, raising=False)
    env = LoopbackFederation(["edge0"], tmp_path).env
    assert {k: env[k] for k in chosen} == chosen
    assert env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] == "1"
    mine = {
        "AIRLORA_SUPERNODE_POLL_S": "0.3",
        "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "2",
        "THP_MEM_ALLOC_ENABLE": "0",
        "OMP_WAIT_POLICY": "ACTIVE",
        "FLWR_TELEMETRY_ENABLED": "1",
    }
    for name, value in mine.items():
        monkeypatch.setenv(name, value)
    env = LoopbackFederation(["edge0"], tmp_path).env
    assert {k: env[k] for k in mine} == mine


def test_an_edge_that_dies_before_its_model_is_ready_stops_the_run_naming_it(
    tiny_model_dir, tiny_data_dir, tmp_path, monkeypatch
):
    """A warm launcher that cannot build its edge (here: a bad AIRLORA_EDGE_THREADS, which
    only the edges read) exits at start-up: the loopback run stops at once with that edge's
    name and reason (not after the cloud's ``register_timeout_s``, an hour here), and no
    process of the federation is left."""
    pytest.importorskip("flwr")
    from airlora.deploy.launch import DeployError, deploy_loopback

    config = _deploy_config(
        tiny_model_dir, tiny_data_dir, tmp_path, run_name="dead", register_timeout_s=3600
    )
    homes: list[str] = []
    monkeypatch.setenv("AIRLORA_EDGE_THREADS", "two")
    launcher = (
        r"edge edge\d: its warm launcher \(python -m airlora.deploy.warm\) exited with status 1"
    )
    with pytest.raises(DeployError, match=launcher) as err:
        deploy_loopback(config, timeout_s=180, on_start=lambda f, _out: homes.append(str(f.home)))
    assert "AIRLORA_EDGE_THREADS must be a whole number >= 1, got 'two'" in str(err.value)
    left = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if f"FLWR_HOME={homes[0]}".encode() in environ.read_bytes().split(b"\0"):
                left.append(environ.parent.name)
        except OSError:  # gone meanwhile, or not ours to read
            continue
    assert not left, f"processes left behind: {left}"
    assert (tmp_path / "runs" / "dead.logs" / "warm-edge0.log").is_file()


def test_the_start_up_watch_and_stop_reach_every_process_of_a_loopback_federation(tmp_path):
    """The start-up watch: an edge ready and then gone, or killed on purpose, is a fault the
    run survives; an edge whose SuperNode dies before its model is ready is named with its
    exit status and log. ``stop`` ends every process of the federation: one that started a
    session of its own (as Flower's SuperExec starts the ServerApp) and one whose parent
    had already exited."""
    import sys
    import time

    from airlora.deploy.launch import DeployError, LoopbackFederation, _alive
    from airlora.deploy.warm import READY

    federation = LoopbackFederation(
        ["edge0", "edge1", "edge2"], tmp_path, warm_config=tmp_path / "deploy.yaml"
    )
    python = sys.executable
    federation._start("warm-edge0", [python, "-c", f"print('loading'); print('{READY} edge0')"])
    federation.processes["warm-edge0"].wait()
    federation._start("warm-edge1", [python, "-c", "import time; time.sleep(60)"])
    federation.kill_edge("edge1")
    dead = "import sys; print('cannot reach the SuperLink'); sys.exit(3)"
    federation._start("supernode-edge2", [python, "-c", dead])
    federation.processes["supernode-edge2"].wait()
    with pytest.raises(DeployError, match="edge edge2: its SuperNode exited with status 3") as err:
        federation.check_edges_starting()
    assert "cannot reach the SuperLink" in str(err.value)
    assert federation.ready == {"edge0"} and federation.down == {"edge1"}

    spawn = (
        "import subprocess, sys, time; "
        "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)'], "
        "start_new_session=True); print('pid', p.pid, flush=True)"
    )
    federation._start("server", [python, "-c", spawn + "; time.sleep(300)"])
    federation._start("orphaning", [python, "-c", spawn])
    pids = {}
    deadline = time.monotonic() + 60
    while len(pids) < 2 and time.monotonic() < deadline:
        for key in ("server", "orphaning"):
            words = federation.logs[key].read_text().split()
            if "pid" in words:
                pids[key] = int(words[words.index("pid") + 1])
        time.sleep(0.05)
    federation.processes["orphaning"].wait()
    assert all(_alive(pid) for pid in pids.values()) and len(pids) == 2
    federation.stop()
    assert not [key for key, pid in pids.items() if _alive(pid)]


def test_a_warm_launcher_freezes_its_objects_so_forked_children_do_not_copy_them():
    """After :func:`freeze_for_fork`, a full collection in a forked child leaves the parent's
    objects alone (few pages written) where it wrote to all of them before."""
    import gc
    import resource

    from airlora.deploy.warm import freeze_for_fork

    keep = [[i] for i in range(300_000)]  # a parent with many (tracked) objects

    def child_collection_faults() -> int:
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: one full collection, its minor page faults to the parent
            try:
                before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                gc.collect()
                after = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                os.write(write, str(after - before).encode())
            finally:
                os._exit(0)
        os.close(write)
        with os.fdopen(read) as fh:
            faults = int(fh.read() or "-1")
        os.waitpid(pid, 0)
        return faults

    gc.collect()  # earlier tests' garbage is not the child's to finalise
    unfrozen = child_collection_faults()
    try:
        freeze_for_fork()
        assert gc.get_freeze_count() >= len(keep)
        frozen = child_collection_faults()
    finally:
        gc.unfreeze()
    assert unfrozen > 1000, unfrozen
    assert frozen < unfrozen / 5, (frozen, unfrozen)
    del keep


def test_the_warm_launcher_serves_flower_tasks_with_its_objects_frozen(monkeypatch):
    """:func:`airlora.deploy.warm.serve` freezes before Flower's SuperExec loop starts and
    hands that loop the forking executor."""
    import gc

    from flwr.supercore.superexec import run_superexec as superexec

    from airlora.deploy import warm

    seen: dict = {}

    def superexec_loop(**kwargs) -> None:
        seen["frozen"] = gc.get_freeze_count()
        seen["executor"] = superexec.get_executor()
        seen["address"] = kwargs["runtime_api_address"]

    monkeypatch.setattr(superexec, "run_superexec", superexec_loop)
    monkeypatch.setattr(superexec, "get_executor", superexec.get_executor)  # serve swaps it
    try:
        warm.serve("127.0.0.1:9094", insecure=True)
    finally:
        gc.unfreeze()
    assert seen["frozen"] > 0
    assert isinstance(seen["executor"], warm.ForkExecutor)
    assert seen["address"] == "127.0.0.1:9094"


def test_the_supernode_entry_point_caps_only_its_loops_sleeps(monkeypatch):
    """``python -m airlora.deploy.supernode`` is flower-supernode whose 3 s idle poll and 0.5 s
    reply checks are shortened; time.sleep elsewhere is untouched; a bad setting is refused."""
    import time

    from flwr.supernode import start_client_internal

    from airlora.deploy import supernode

    waits: list[float] = []
    monkeypatch.setattr(time, "sleep", waits.append)
    monkeypatch.setattr(start_client_internal, "time", time)
    supernode.patch_supernode(0.5, 0.05)
    start_client_internal.time.sleep(3)  # the idle poll
    start_client_internal.time.sleep(0.5)  # waiting for the ClientApp's reply
    start_client_internal.time.sleep(0.01)
    time.sleep(3)
    assert waits == [0.5, 0.05, 0.01, 3]
    assert start_client_internal.time.time is time.time  # the rest of `time` is the same

    # What the patch relies on in flwr (pinned <1.43): the loop sleeps through `time.sleep`.
    import inspect

    source = inspect.getsource(start_client_internal)
    assert "time.sleep(3)" in source and "from time import" not in source
    # A SuperNode process does not import the ML stack (torch, transformers, PEFT).
    import subprocess
    import sys

    probe = "import sys, airlora.deploy.supernode; print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert done.stdout.strip() == "False", done.stderr[-2000:]

    monkeypatch.setenv("AIRLORA_SUPERNODE_POLL_S", "0.5")
    assert supernode.poll_interval_s() == 0.5
    for bad in ("0", "-1", "fast", "nan"):
        monkeypatch.setenv("AIRLORA_SUPERNODE_POLL_S", bad)
        with pytest.raises(SystemExit, match="AIRLORA_SUPERNODE_POLL_S"):
            supernode.poll_interval_s()
