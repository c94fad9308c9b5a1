"""`airlora deploy`: a SuperLink and one SuperNode per edge on loopback, the app, then stop.

Everything runs as real Flower processes (``flower-superlink``, ``flower-supernode``, ``flwr
run``) talking over TCP on 127.0.0.1, exactly as on several machines; only the addresses
differ (README, "Deploying on real machines"). The run folder is the one the ServerApp
writes; the processes' logs are copied into its ``logs/``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from importlib.resources import files
from pathlib import Path

from airlora.config import DeployConfig, dump_config
from airlora.deploy.security import Certificates, make_certificates, make_node_key
from airlora.deploy.warm import READY
from airlora.errors import DeployError
from airlora.runs import MANIFEST_FILE

APP_DIR = Path(str(files("airlora.deploy") / "app"))


def free_port() -> int:
    """A TCP port nothing listens on now (the OS's pick)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _tool(name: str) -> str:
    """A Flower command of this interpreter's environment."""
    path = Path(sys.executable).parent / name
    if path.exists():
        return str(path)
    found = shutil.which(name)
    if found is None:
        raise DeployError(f"{name} is not installed: pip install 'airlora[deploy]'")
    return found


def _wait_for_port(port: int, proc: subprocess.Popen, log: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise DeployError(f"the SuperLink exited ({proc.returncode}): {_tail(log)}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise DeployError(f"the SuperLink did not listen on port {port} in {timeout_s:.0f} s")


def _tail(path: Path, n: int = 1500) -> str:
    text = path.read_text(encoding="utf-8", errors="replace") if path.exists() else ""
    return text[-n:]


class LoopbackFederation:
    """A SuperLink and SuperNodes on 127.0.0.1 (free ports), stopped on exit.

    Parameters
    ----------
    edges: the SuperNodes' edge names (one node each).
    workdir: where logs, certificates, keys and Flower's home (``FLWR_HOME``) go.
    tls: encrypt every connection (a CA and a server certificate for 127.0.0.1 are made).
    authenticate: SuperNode authentication (needs ``tls``): each edge gets an EC key pair,
        its public key is registered with the SuperLink before the node starts, and only
        registered nodes are let in.
    warm_config: the deployment's YAML: each SuperNode runs its ClientApps through a warm
        launcher (:mod:`airlora.deploy.warm`) that built the edge's model from it once.
        None: Flower's own launcher, a cold process per message.
    """

    def __init__(
        self,
        edges: list[str],
        workdir: Path,
        tls: bool = False,
        authenticate: bool = False,
        warm_config: Path | None = None,
    ) -> None:
        if authenticate and not tls:
            raise ValueError("SuperNode authentication needs TLS")
        self.edges = edges
        self.workdir = Path(workdir)
        self.port = free_port()
        self.home = self.workdir / "flwr-home"
        self.processes: dict[str, subprocess.Popen] = {}
        self.logs: dict[str, Path] = {}
        self.tls, self.authenticate = tls, authenticate
        self.certificates: Certificates | None = None
        self.node_keys: dict[str, Path] = {}
        self.warm_config = warm_config
        self.stopped = False
        # run_app's start-up watch: edges whose warm launcher reported its model ready since
        # it was last started (its log read from where that start began), and edges brought
        # down on purpose (kill_edge) and not started again.
        self.ready: set[str] = set()
        self.down: set[str] = set()
        self._log_start: dict[str, int] = {}

    @property
    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            "FLWR_HOME": str(self.home),
            # No network on an edge: the app's dependencies are the installed airlora.
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            "PYTHONUNBUFFERED": "1",
            # How often a SuperExec asks its node for a task (Flower's default: 1 s), and how
            # often an idle SuperNode asks the SuperLink for a message (ours: 0.5 s, Flower's:
            # 3 s). On one machine every poll's CPU is taken from the cloud and the edges:
            # idle, the federation polling at 0.25 s / 0.5 s cost 5.5 CPU-s per 30 s, about
            # 9 % of 2 cores, against 3.1 at 0.5 s / 1 s. The longer wait before an edge
            # picks up a round is spent by the cloud training the next one.
            "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": os.environ.get(
                "FLWR_SUPEREXEC_TASK_POLL_INTERVAL", "0.5"
            ),
            "AIRLORA_SUPERNODE_POLL_S": os.environ.get("AIRLORA_SUPERNODE_POLL_S", "1.0"),
            # Tensors of 2 MB and more on transparent huge pages (PyTorch's allocator): a
            # forked ClientApp faults in every activation buffer afresh, ~220k page faults and
            # 0.7 s of system time per round with 4 kB pages, ~42k and 0.4 s with these.
            "THP_MEM_ALLOC_ENABLE": os.environ.get("THP_MEM_ALLOC_ENABLE", "1"),
            # Flower reports start and exit of every process to its telemetry server and
            # waits up to 4 s for it at each exit; off on loopback unless the user set it.
            "FLWR_TELEMETRY_ENABLED": os.environ.get("FLWR_TELEMETRY_ENABLED", "0"),
            # The cloud and every edge share this machine's cores: a thread that waits at an
            # OpenMP barrier sleeps instead of spinning on a core another process needs
            # (numbers unchanged; one process alone is faster spinning, as in process).
            "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE"),
            # Flower starts its helpers (flower-superexec, flwr-serverapp, ...) by name.
            "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
        }

    def _log(self, key: str) -> Path:
        return self.workdir / f"{key}.log"

    def _start(self, key: str, command: list[str]) -> subprocess.Popen:
        log = self._log(key)
        self.logs[key] = log
        with open(log, "ab") as fh:
            proc = subprocess.Popen(
                command, stdout=fh, stderr=subprocess.STDOUT, env=self.env, start_new_session=True
            )
        self.processes[key] = proc
        return proc

    def start(self, timeout_s: float = 60.0) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        connection = f'[superlink.loopback]\naddress = "127.0.0.1:{self.port}"\n'
        security = ["--insecure"]
        if self.tls:
            self.certificates = make_certificates(self.workdir / "certificates")
            c = self.certificates
            connection += f'root-certificates = "{c.ca_cert}"\n'
            security = ["--ssl-ca-certfile", str(c.ca_cert), "--ssl-certfile", str(c.server_cert)]
            security += ["--ssl-keyfile", str(c.server_key)]
            if self.authenticate:
                security.append("--enable-supernode-auth")
        else:
            connection += "insecure = true\n"
        (self.home / "config.toml").write_text(
            f'[superlink]\ndefault = "loopback"\n\n{connection}', encoding="utf-8"
        )
        link = self._start(
            "superlink",
            [
                _tool("flower-superlink"),
                *security,
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--disable-runtime-dependency-installation",
            ],
        )
        _wait_for_port(self.port, link, self.logs["superlink"], timeout_s)
        for name in self.edges:
            self.start_edge(name)

    def register(self, name: str) -> Path:
        """Make edge ``name``'s key pair and register its public key with the SuperLink."""
        key_name = f"{name}-{len(list((self.workdir / 'node-keys').glob(f'{name}*.pub')))}"
        private, public = make_node_key(self.workdir / "node-keys", key_name)
        log = self.workdir / f"register-{name}.log"
        with open(log, "ab") as fh:
            done = subprocess.run(
                [_tool("flwr"), "supernode", "register", str(public), "loopback"],
                stdout=fh,
                stderr=subprocess.STDOUT,
                env=self.env,
                timeout=120,
                check=False,
            )
        if done.returncode != 0:
            raise DeployError(f"registering edge {name} failed: {_tail(log)}")
        self.node_keys[name] = private
        return private

    def start_edge(self, name: str, new_identity: bool = False) -> subprocess.Popen:
        """Start (or restart) the SuperNode of edge ``name`` (registered first, once, when
        the federation authenticates its nodes; ``new_identity``: with a new key, as a
        replaced device would come back)."""
        if self.stopped:
            raise DeployError("the federation has stopped")
        log = self._log(f"warm-{name}")
        log_start = log.stat().st_size if log.exists() else 0
        security = ["--insecure"]
        if self.certificates is not None:
            security = ["--root-certificates", str(self.certificates.ca_cert)]
            if self.authenticate:
                key = None if new_identity else self.node_keys.get(name)
                key = key or self.register(name)
                security += ["--auth-supernode-private-key", str(key)]
        runtime_port = free_port()
        isolation = ["--isolation", "process"] if self.warm_config is not None else []
        # Warm edges also get a SuperNode that polls every 1 s here (0.5 s by default) instead of
        # Flower's 3 s when idle
        # (airlora.deploy.supernode); --cold runs Flower's own processes unchanged.
        supernode = (
            [sys.executable, "-m", "airlora.deploy.supernode"]
            if self.warm_config is not None
            else [_tool("flower-supernode")]
        )
        node = self._start(
            f"supernode-{name}",
            [
                *supernode,
                *security,
                *isolation,
                "--superlink",
                f"127.0.0.1:{self.port}",
                "--port",
                str(runtime_port),
                "--node-config",
                f'edge="{name}"',
            ],
        )
        if self.warm_config is not None:
            self._start(
                f"warm-{name}",
                [
                    sys.executable,
                    "-m",
                    "airlora.deploy.warm",
                    "--runtime-api-address",
                    f"127.0.0.1:{runtime_port}",
                    "--insecure",  # the SuperNode's Runtime API, on this machine only
                    "--parent-pid",
                    str(node.pid),
                    "--config",
                    str(self.warm_config),
                    "--edge",
                    name,
                ],
            )
        # Watched again from here, once its new processes exist (until then the old, killed
        # ones would read as an edge that died starting up).
        self._log_start[name] = log_start
        self.ready.discard(name)
        self.down.discard(name)
        return node

    def run_app(self, config_file: Path, out: Path, timeout_s: float, resume: bool = False) -> None:
        """``flwr run`` the deployment app against this SuperLink; waits for it to end.

        An edge whose warm launcher or SuperNode exits before its model is ready (a model
        or data it cannot load, no memory) stops the run at once with that process's log,
        instead of the cloud waiting ``register_timeout_s`` for an edge that will never
        answer. Once ready, an edge that goes down is a fault the run survives (it misses
        rounds; :meth:`start_edge` brings it back)."""
        log = self.workdir / "flwr-run.log"
        self.logs["flwr-run"] = log
        run_config = f'config="{config_file}" out="{out}" resume={str(resume).lower()}'
        deadline = time.monotonic() + timeout_s
        with open(log, "ab") as fh:
            proc = subprocess.Popen(
                [_tool("flwr"), "run", str(APP_DIR), "loopback", "-c", run_config, "--stream"],
                stdout=fh,
                stderr=subprocess.STDOUT,
                env=self.env,
            )
            try:
                while proc.poll() is None:
                    if time.monotonic() > deadline:
                        raise DeployError(f"the deployment took longer than {timeout_s:.0f} s")
                    self.check_edges_starting()
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        proc.wait(timeout=0.5)
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        if proc.returncode != 0:
            raise DeployError(f"flwr run exited with {proc.returncode}: {_tail(log)}")

    def check_edges_starting(self) -> None:
        """Raise :class:`DeployError` for a warm edge whose launcher or SuperNode has exited
        before the launcher reported its model ready (:data:`~airlora.deploy.warm.READY`)
        since it was last started; an edge stopped by :meth:`kill_edge` is not watched."""
        if self.warm_config is None:
            return
        for name in self.edges:
            if name in self.ready or name in self.down:
                continue
            log = self.logs.get(f"warm-{name}")
            if log is not None and log.exists():
                with open(log, "rb") as fh:
                    fh.seek(self._log_start.get(name, 0))
                    if READY.encode() in fh.read():
                        self.ready.add(name)
                        continue
            for key, what in (
                (f"warm-{name}", "warm launcher (python -m airlora.deploy.warm)"),
                (f"supernode-{name}", "SuperNode"),
            ):
                proc = self.processes.get(key)
                if proc is not None and proc.poll() is not None:
                    code = proc.returncode
                    how = f"exited with status {code}"
                    if code < 0:
                        with contextlib.suppress(ValueError):
                            how = f"was killed by {signal.Signals(-code).name}"
                    raise DeployError(
                        f"edge {name}: its {what} {how} before its model was ready "
                        f"(its whole log is kept with the run's logs as {key}.log): "
                        f"{_tail(self.logs[key])}"
                    )

    def kill_edge(self, name: str) -> None:
        """SIGKILL the SuperNode of edge ``name`` and whatever it started (a crash)."""
        self.down.add(name)
        for key in (f"supernode-{name}", f"warm-{name}"):
            proc = self.processes.get(key)
            if proc is None:
                continue
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    def stop(self) -> None:
        """SIGTERM every process group, and every process of this federation that left its
        group (the SuperLink's SuperExec runs the ServerApp in a session of its own, and a
        ServerApp stopped mid-request retries for as long as it lives); SIGKILL what is left
        after 10 s."""
        self.stopped = True
        live = [p.pid for p in self.processes.values() if p.poll() is None]
        strays = _federation_processes(self.home, live)
        for proc in self.processes.values():
            # The group, even when its leader has exited: its children may not have.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGTERM)
        for pid in strays:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        for proc in self.processes.values():
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        while True:
            # Checked again right before any SIGKILL: a pid that exited may be reused.
            strays = [pid for pid in strays if _alive(pid)]
            if not strays or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        for pid in strays:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        settle = time.monotonic() + 5
        while any(_alive(pid) for pid in strays) and time.monotonic() < settle:
            time.sleep(0.05)


def _federation_processes(home: Path, roots: Iterable[int]) -> list[int]:
    """The processes of the federation whose Flower home is ``home``: on Linux, every
    process whose environment names it (the federation's processes and all they started,
    wherever they were re-parented); elsewhere, the processes below ``roots`` now (``ps``).
    Empty when neither can be read: ``stop`` then signals the process groups only."""
    marker = f"FLWR_HOME={home}".encode()
    proc = Path("/proc")
    if proc.is_dir():
        found = []
        for environ in proc.glob("[0-9]*/environ"):
            try:
                if marker in environ.read_bytes().split(b"\0"):
                    found.append(int(environ.parent.name))
            except (OSError, ValueError):  # gone meanwhile, or not ours to read
                continue
        return [pid for pid in found if pid != os.getpid()]
    try:
        table = subprocess.run(
            ["ps", "-A", "-o", "pid=,ppid="], capture_output=True, text=True, check=True
        )
        children: dict[int, list[int]] = {}
        for line in table.stdout.splitlines():
            pid, ppid = (int(v) for v in line.split())
            children.setdefault(ppid, []).append(pid)
    except (OSError, ValueError, subprocess.CalledProcessError):
        return []
    found, stack = [], list(roots)
    while stack:
        for child in children.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return found


def _alive(pid: int) -> bool:
    """Whether ``pid`` is a process that has not exited (a zombie has)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    if not Path("/proc").is_dir():
        return True  # no process table to read a zombie's state from: it exists
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:  # it exited between the two looks
        return False
    return not (state and state[0] == "Z")


def _exit_on_sigterm(signum: int, _frame) -> None:
    raise SystemExit(128 + signum)


def _keep_logs(federation: LoopbackFederation, out: Path) -> None:
    """The processes' logs into the run folder (one exists once the ServerApp started), or,
    when the run never began, beside where it would have been, before the temporary folder
    holding them goes."""
    logs = out / "logs" if out.exists() else out.parent / f"{out.name}.logs"
    logs.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for key, path in federation.logs.items():
        if path.exists():
            target = logs / f"{key}.log"
            if target.exists():  # a resumed run keeps the logs of its first part
                target = logs / f"{key}.resumed-{stamp}.log"
            shutil.copy(path, target)


class LoopbackDeployment:
    """A federation on loopback for one deployment config, stopped on exit; :meth:`run` runs
    the app on it (again, to resume a run whose cloud stopped, on the same federation).

    Parameters
    ----------
    config: the deployment.
    tls, authenticate: see :class:`LoopbackFederation`.
    warm: every edge's ClientApps forked from a process holding its model
        (:mod:`airlora.deploy.warm`), else Flower's cold process per message.
    """

    def __init__(
        self,
        config: DeployConfig,
        tls: bool = False,
        authenticate: bool = False,
        warm: bool = True,
    ) -> None:
        self.config = config
        self._tmp = tempfile.TemporaryDirectory(prefix="airlora-deploy-")
        self.workdir = Path(self._tmp.name)
        self.config_file = self.workdir / "deploy.yaml"
        self.config_file.write_text(dump_config(config), encoding="utf-8")
        edges = [e.name for e in config.edges]
        self.federation = LoopbackFederation(
            edges, self.workdir, tls, authenticate, self.config_file if warm else None
        )
        self._outs: list[Path] = []
        self._previous_handler = None

    def keep_logs_in(self, out: Path) -> None:
        """Copy the processes' logs into ``out/logs`` when the federation stops (beside
        ``out`` if no run folder was made there); :meth:`run` does this for its folder."""
        out = Path(out).resolve()
        if out not in self._outs:
            self._outs.append(out)

    def __enter__(self) -> LoopbackDeployment:
        # The processes run in sessions of their own: a SIGTERM to this one must still stop
        # them (``__exit__``), not leave a federation running without its launcher.
        if threading.current_thread() is threading.main_thread():
            self._previous_handler = signal.signal(signal.SIGTERM, _exit_on_sigterm)
        try:
            self.federation.start()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *_exc) -> None:
        try:
            self.federation.stop()
            for out in self._outs:
                _keep_logs(self.federation, out)
        finally:
            if self._previous_handler is not None:
                signal.signal(signal.SIGTERM, self._previous_handler)
            self._tmp.cleanup()

    def run(self, out: Path, timeout_s: float = 3600.0, resume: bool = False) -> Path:
        """Run the app writing the run folder ``out`` (``resume``: take it up from its last
        finished round); returns ``out`` once the run completed, else raises
        :class:`DeployError` (the processes' logs go to ``out/logs`` when the federation
        stops)."""
        out = Path(out).resolve()
        self.keep_logs_in(out)
        self.federation.run_app(self.config_file, out, timeout_s, resume)
        manifest = out / MANIFEST_FILE
        if not manifest.is_file():
            tail = _tail(self.federation.logs.get("flwr-run", self.workdir / "none"))
            raise DeployError(f"the ServerApp wrote no run folder: {tail}")
        status = json.loads(manifest.read_text(encoding="utf-8")).get("status")
        if status != "completed":
            raise DeployError(f"the deployment ended {status}: see {out / 'logs'}")
        return out


def deploy_loopback(
    config: DeployConfig,
    timeout_s: float = 3600.0,
    on_start: Callable[[LoopbackFederation, Path], None] | None = None,
    tls: bool = False,
    authenticate: bool = False,
    warm: bool = True,
    resume: Path | None = None,
) -> Path:
    """Run a deployment with every edge a SuperNode on this machine; returns the run folder
    (config, manifest, ``metrics.jsonl`` with one row per round and edge, ``logs/``).

    ``on_start(federation, run_dir)`` is called once the processes are up, before the app
    runs (a fault-injection test starts a thread there that kills and restarts an edge).
    ``tls``, ``authenticate``, ``warm``: see :class:`LoopbackDeployment`. ``resume``: a run
    folder whose cloud stopped (a crash, a kill): the cloud takes it up from its last
    finished round, with ``config`` (its own; :func:`~airlora.deploy.cloud.resume_config`)."""
    if resume is not None:
        from airlora.deploy.cloud import require_cloud_state

        out = Path(resume).resolve()
        require_cloud_state(out)  # nothing to resume: fail before any process starts
    else:
        name = config.run_name or f"deploy-{time.strftime('%Y%m%d-%H%M%S')}-seed{config.seed}"
        out = (Path(config.out_dir) / name).resolve()
        if out.exists():
            raise FileExistsError(f"run folder {out} already exists; choose another run name")
    deployment = LoopbackDeployment(config, tls, authenticate, warm)
    deployment.keep_logs_in(out)  # a federation that fails to start leaves its logs too
    with deployment:
        if on_start is not None:
            on_start(deployment.federation, out)
        return deployment.run(out, timeout_s, resume is not None)
