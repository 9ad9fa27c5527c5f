"""The local mesh: every node as its own process on one machine (`make run`, e2e tests, benchmarks).

`onnxmesh up MESH` (meshctl/run.py) starts every service of a mesh file (meshctl/mesh.py) and the
orchestrator as separate processes, the same way Kubernetes runs them as separate Deployments, waits until
each answers grpc.health.v1 SERVING, streams their logs prefixed with their name, and stops
them all on Ctrl-C or SIGTERM. `LocalMesh` is the same thing as a class:

    with LocalMesh(load_mesh("mesh.yaml"), ports=EPHEMERAL_PORTS) as mesh:
        address = mesh.address("features")         # "127.0.0.1:<port>"
        mesh.stop_service("features")              # e.g. a fault-tolerance test

Every node gets its ports from one layout, the mesh file's: gRPC on its port (the orchestrator at
base + 1, the services at base + 11, 21, 31, ...; replica i on port + i - 1), KServe v2 REST on that port + HTTP_OFFSET and, with `metrics=True`
(`--metrics`), Prometheus on that port + METRICS_OFFSET: no two nodes share one, whatever
ONNXMESH_* variables the launcher itself was given (it drops the per-node port variables).

Each node is one `meshctl.process.ServiceProcess` (its life cycle is described there): it says
where it listens once bound (so port 0 works), reports SERVING once its models are warm, and
drains and exits 0 on SIGTERM. Each node has a process group of its own, so a Ctrl-C in the
terminal reaches only the launcher, which stops them in order (`stop()`); a node whose launcher
dies gets SIGTERM; and a launcher that fails halfway through starting stops what it started
before raising.
"""

from __future__ import annotations

import asyncio
import atexit
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import TextIO

from meshctl.mesh import HTTP_OFFSET, METRICS_OFFSET, ORCHESTRATOR, Mesh, load_mesh
from meshctl.process import (
    POLL_S,
    REPO,
    STOP_TIMEOUT,
    MeshStartupError,
    ServiceProcess,
    connect_host,
    replica_target,
    run_async,
    wait_serving,
)
from meshctl.supervise import Restarter
from orchestrator.addresses import address_variable
from orchestrator.spec import SpecError, load_spec
from services.common.errors import MeshError
from services.common.grpc.client import OipClient
from services.common.grpc.security import ClientSecurity, TlsFiles, read_token
from services.common.types import ModelSignature

#: `ports=EPHEMERAL_PORTS`: every node on a free port chosen by the OS (tests); the launcher reads
#: the bound port back.
EPHEMERAL_PORTS: Mapping[str, int] = MappingProxyType({})
#: The mesh `make run` starts when given no mesh file: the digits demo.
DEMO_MESH = REPO / "demo" / "mesh.yaml"
#: What each node runs: `python -m` of these.
NODE_MODULE = "services.common.model_node"
ORCHESTRATOR_MODULE = "orchestrator"
#: Port variables that name one node's port: a launcher given one would hand it to every node.
PER_NODE_VARIABLES = ("ONNXMESH_PORT", "ONNXMESH_HTTP_PORT", "ONNXMESH_METRICS_PORT", "ONNXMESH_HEALTH_PORT")
#: Where `--tls` keeps the local CA, node certificate and token (`make certs`; ignored by git).
CERTS_DIR = REPO / "certs"
STARTUP_TIMEOUT = 60.0


def demo_mesh() -> Mesh:
    """The digits demo's mesh file, checked."""
    return load_mesh(DEMO_MESH)


def ports_from_base(base: int, mesh: Mesh | None = None) -> dict[str, int]:
    """A mesh's ports laid out around another base (9000 -> 9001, 9011, ...); 0 = all free."""
    return (mesh or demo_mesh()).ports(base)


async def probe_models(
    target: str, names: Iterable[str], *, timeout: float = 2.0, security: ClientSecurity | None = None
) -> dict[str, ModelSignature | MeshError]:
    """ModelMetadata of each name at `target`: the signature, or the error it answered with."""
    async with OipClient(target, security=security) as client:

        async def one(name: str) -> ModelSignature | MeshError:
            try:
                return await client.metadata(name, timeout=timeout)
            except MeshError as err:
                return err

        names = list(names)
        answers = await asyncio.gather(*(one(name) for name in names))
    return dict(zip(names, answers, strict=True))


def spec_graph_names(path: Path) -> list[str]:
    """The graphs of a spec file, as the orchestrator reads it; none if it cannot be read."""
    try:
        return list(load_spec(path).graphs)
    except SpecError:
        return []


class LocalMesh:
    """The services of a mesh file (the demo's by default) and, optionally, its orchestrator, as
    local processes.

    `ports` maps a service to its first replica's port (missing services use the mesh file's
    layout; 0 = a free port; EPHEMERAL_PORTS: every one free); replica i listens on port + i - 1.
    `replicas` maps a service to its replica count (default: the file's). `model_dirs` and
    `extra_args` pass per-service `--model-dir` and flags (after the file's `settings`).
    `graphs` is the orchestrator's spec (default: the mesh file itself).
    `echo` receives every log line as `[name] line` (None: only kept for error messages).
    `http` serves KServe v2 REST on every node, `metrics` Prometheus (ports: the module docstring).
    `tls`: a directory made by `meshctl.certs` (ca.pem, node.pem, node-key.pem, tokens): every
    node then serves mTLS only, with grpc.health.v1 on a plaintext health port, no REST, and
    the orchestrator requires a bearer token; `client_security` is how to call it.
    Use as a context manager, or call `start()` and `stop()`.
    """

    def __init__(
        self,
        mesh: Mesh | None = None,
        *,
        host: str = "127.0.0.1",
        ports: Mapping[str, int] | None = None,
        replicas: Mapping[str, int] | None = None,
        include_orchestrator: bool = True,
        http: bool = True,
        metrics: bool = False,
        graphs: Path | None = None,
        model_dirs: Mapping[str, Path] | None = None,
        extra_args: Mapping[str, Sequence[str]] | None = None,
        env: Mapping[str, str] | None = None,
        log_format: str = "json",
        log_level: str = "INFO",
        grace: float | None = None,
        echo: TextIO | None = None,
        startup_timeout: float = STARTUP_TIMEOUT,
        stop_timeout: float = STOP_TIMEOUT,
        python: str = sys.executable,
        restart: bool = False,
        tls: Path | None = None,
    ) -> None:
        self.host = host
        self.tls = tls
        self.client_security = ClientSecurity()
        self._tls_env: dict[str, str] = {}
        if tls is not None:
            http = False  # REST is plaintext with no tokens: the node refuses it beside TLS
            files = TlsFiles(tls / "node.pem", tls / "node-key.pem", tls / "ca.pem")
            self.client_security = ClientSecurity(files, read_token(tls / "tokens"))
            self._tls_env = {
                "ONNXMESH_TLS_CERT": str(files.cert),
                "ONNXMESH_TLS_KEY": str(files.key),
                "ONNXMESH_TLS_CA": str(tls / "ca.pem"),
            }
        self.mesh = mesh or demo_mesh()
        #: The services the mesh runs, in start order, and every node (the orchestrator last).
        self.model_services = tuple(self.mesh.services)
        self.all_services = (*self.model_services, ORCHESTRATOR)
        self.include_orchestrator = include_orchestrator
        self.http = http
        self.metrics = metrics
        self.services = self.all_services if include_orchestrator else self.model_services
        for label, mapping in (("ports", ports), ("replicas", replicas), ("model_dirs", model_dirs)):
            self._check_names(label, mapping or {})
        self._check_names("extra_args", extra_args or {})
        laid_out = dict.fromkeys(self.all_services, 0) if ports is EPHEMERAL_PORTS else self.mesh.ports()
        self.ports = {**laid_out, **(ports or {})}
        self.replicas = {node.name: node.replicas for node in self.mesh.nodes} | dict(replicas or {})
        if any(count < 1 for count in self.replicas.values()):
            raise ValueError(f"replica counts must be at least 1: {self.replicas}")
        _check_port_ranges({s: (self.ports[s], self.replicas[s]) for s in self.services})
        self.graphs = graphs
        self.model_dirs = {
            n.name: n.model_dir for n in self.mesh.services.values() if n.model_dir is not None
        }
        self.model_dirs.update(model_dirs or {})
        self.extra_args = {k: list(v) for k, v in (extra_args or {}).items()}
        self.env = dict(env or {})
        self.log_format = log_format
        self.log_level = log_level
        self.grace = grace
        self.startup_timeout = startup_timeout
        self.stop_timeout = stop_timeout
        self.python = python
        self._echo_stream = echo
        self._echo_lock = threading.Lock()
        self._procs: list[ServiceProcess] = []
        #: Every process ever started, restarted ones included: `stop()` makes sure none survives.
        self.spawned: list[ServiceProcess] = []
        #: Exit code of each node `stop()` stopped (also when `start()` failed and stopped them).
        self.exit_codes: dict[str, int] = {}
        self._closing = threading.Event()
        # Restart on exit (meshctl/supervise.py): nodes stopped on purpose are left alone.
        self.restart = restart
        self.restarter: Restarter | None = None
        self._stopped_on_purpose: set[int] = set()

    # -- life cycle ------------------------------------------------------------------------------

    def start(self) -> LocalMesh:
        """Start every node and wait until each is SERVING; on any failure stop them all and raise."""
        if self._procs:
            raise RuntimeError("the mesh is already started")
        self._closing.clear()
        atexit.register(self.stop)
        try:
            backends = [
                self._spawn(s, i) for s in self.model_services for i in range(1, self.replicas[s] + 1)
            ]
            self._wait_serving(backends)
            if self.include_orchestrator:
                replicas = range(1, self.replicas[ORCHESTRATOR] + 1)
                self._wait_serving([self._spawn(ORCHESTRATOR, i) for i in replicas])
        except BaseException:
            self.stop()
            raise
        if self.restart:
            self.restarter = Restarter(self, say=self._say).start()
        return self

    def stop(self, timeout: float | None = None) -> dict[str, int]:
        """Stop every node (the orchestrator first, so it never sees its services vanish); exit codes.

        Each node gets SIGTERM and drains; whatever is still alive after `timeout` is killed.
        """
        self._closing.set()
        atexit.unregister(self.stop)
        bound = self.stop_timeout if timeout is None else timeout
        codes: dict[str, int] = {}
        live = [p for p in self.spawned if p.running]
        orchestrators = [p for p in live if p.service == ORCHESTRATOR]
        for group in (orchestrators, [p for p in live if p.service != ORCHESTRATOR]):
            for proc in group:
                proc.signal(signal.SIGTERM)
            deadline = time.monotonic() + bound
            for proc in group:
                codes[proc.name] = proc.wait(max(0.0, deadline - time.monotonic()))
        for proc in self.spawned:  # reap anything that exited on its own, and join its readers
            proc.wait(bound)
        # Only now: a node it restarted gets SIGTERM when its thread ends (the parent-death signal).
        if self.restarter is not None:
            self.restarter.stop()
        self._procs = []
        self.exit_codes.update(codes)
        return codes

    def interrupt(self) -> None:
        """Make a `start()` in progress give up soon (it then stops what it started and raises
        MeshStopped). Safe from a signal handler: it only sets a flag."""
        self._closing.set()

    def kill(self) -> None:
        """SIGKILL every node now (a second Ctrl-C while stopping); `stop()` still reaps them."""
        for proc in self.spawned:
            proc.signal(signal.SIGKILL)

    def __enter__(self) -> LocalMesh:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- one service -----------------------------------------------------------------------------

    def processes(self, service: str | None = None) -> list[ServiceProcess]:
        """The current process of each replica (of one service, or of all), in start order."""
        return [p for p in self._procs if service is None or p.service == service]

    def process(self, service: str, replica: int = 1) -> ServiceProcess:
        for proc in self._procs:
            if proc.service == service and proc.replica == replica:
                return proc
        raise KeyError(f"no replica {replica} of '{service}' in this mesh")

    def address(self, service: str, replica: int = 1) -> str:
        """`host:port` of one replica."""
        return self.process(service, replica).address

    def target(self, service: str) -> str:
        """The gRPC target of every replica of a service (round robin when there are several)."""
        ports = [p.port for p in self.processes(service) if p.port is not None]
        if not ports:
            raise KeyError(f"'{service}' has no replica with a known port")
        return replica_target(connect_host(self.host), ports)

    def stop_service(
        self, service: str, replica: int | None = None, timeout: float | None = None
    ) -> list[int]:
        """Gracefully stop one replica (or all replicas) of a service; their exit codes."""
        procs = self._select(service, replica)
        for proc in procs:
            self._stopped_on_purpose.add(proc.pid)
            proc.signal(signal.SIGTERM)
        bound = self.stop_timeout if timeout is None else timeout
        return [proc.wait(bound) for proc in procs]

    def kill_service(self, service: str, replica: int | None = None) -> list[int]:
        """SIGKILL one replica (or all replicas) of a service: a crash, no drain; their exit codes."""
        return [proc.kill() for proc in self._select(service, replica)]

    def restart_service(self, service: str, replica: int | None = None) -> list[ServiceProcess]:
        """Stop a service's replicas and start them again on the same ports; waits until SERVING.

        Restarting the orchestrator also picks up replicas added since it started.
        """
        new: list[ServiceProcess] = []
        for old in self._select(service, replica):
            old.stop(self.stop_timeout)
            # Same port, so clients (the orchestrator) find the new process where the old one was.
            fresh = self._spawn(old.service, old.replica, port=old.port or old.requested_port, register=False)
            self._procs[self._procs.index(old)] = fresh
            new.append(fresh)
        self._wait_serving(new)
        return new

    def add_replica(self, service: str) -> ServiceProcess:
        """Start one more replica of a service (next port, or a free one) and wait until SERVING.

        A running orchestrator keeps its address list: restart it to send it traffic.
        """
        existing = self.processes(service)
        replica = max((p.replica for p in existing), default=0) + 1
        proc = self._spawn(service, replica)
        try:
            self._wait_serving([proc])
        except BaseException:
            proc.stop(self.stop_timeout)
            self._procs.remove(proc)
            raise
        self.replicas[service] = max(self.replicas[service], replica)
        return proc

    def hand_over(self, service: str, replica: int, model_dir: Path | None = None) -> ServiceProcess:
        """Replace one replica the way a rolling update does: start new, wait ready, drain old.

        The new process binds the SAME port beside the old one (both run with `--reuse-port 1`),
        so clients need no new address: once the old one drains (SIGTERM: NOT_SERVING, in-flight
        calls finish, connections close), they reconnect and land on the new one.
        """
        old = self._select(service, replica)[0]
        if old.port is None:
            raise RuntimeError(f"{old.name} has no port to hand over")
        command = self._command(service, old.port)
        if model_dir is not None:
            command += ["--model-dir", str(model_dir)]  # the last flag wins
        if self.metrics:
            command += ["--metrics-port", "0"]  # metrics cannot share a port; REST and gRPC do
        fresh = ServiceProcess(
            service,
            replica,
            self.host,
            old.port,
            command,
            self._child_env(service),
            self._echo if self._echo_stream is not None else None,
        )
        self.spawned.append(fresh)
        # Health checks on the shared port could reach the old process: wait for the new one's
        # own ready line instead (printed once its models are warm and it reports SERVING).
        deadline = time.monotonic() + self.startup_timeout
        while not fresh.ready_line_seen:
            if not fresh.running or time.monotonic() > deadline:
                fresh.kill()
                raise MeshStartupError(fresh.name, "the new process never got ready", list(fresh.tail))
            time.sleep(POLL_S)
        self._procs[self._procs.index(old)] = fresh
        old.stop(self.stop_timeout)
        return fresh

    def served_graphs(self, timeout: float = 2.0) -> list[str]:
        """The graphs the orchestrator answers ModelMetadata for (known names and the spec's)."""
        names = dict.fromkeys([*self.mesh.graph_names(), *spec_graph_names(self.graphs or self.mesh.path)])
        target = self.target(ORCHESTRATOR)
        answers = run_async(
            lambda: probe_models(target, names, timeout=timeout, security=self.client_security)
        )
        return [name for name, answer in answers.items() if isinstance(answer, ModelSignature)]

    # -- restart on exit (meshctl/supervise.py) ---------------------------------------------------

    @property
    def closing(self) -> bool:
        """True once the mesh is stopping (or asked to)."""
        return self._closing.is_set()

    def stopped_on_purpose(self, proc: ServiceProcess) -> bool:
        """Whether the mesh itself stopped `proc` (so it is not to be restarted)."""
        return proc.pid in self._stopped_on_purpose

    def _say(self, line: str) -> None:
        if self._echo_stream is not None:
            self._echo("launcher", line)
        else:
            print(line, file=sys.stderr, flush=True)

    # -- internals -------------------------------------------------------------------------------

    def _select(self, service: str, replica: int | None) -> list[ServiceProcess]:
        procs = [p for p in self.processes(service) if replica is None or p.replica == replica]
        if not procs:
            raise KeyError(
                f"no {'replica ' + str(replica) + ' of ' if replica else ''}'{service}' in this mesh"
            )
        return procs

    def _command(self, service: str, port: int) -> list[str]:
        if service == ORCHESTRATOR:
            command = [self.python, "-m", ORCHESTRATOR_MODULE, "--graphs", str(self.graphs or self.mesh.path)]
        else:
            node = self.mesh.services[service]
            command = [self.python, "-m", NODE_MODULE, "--name", service, "--runtime", node.runtime]
            command += ["--model-dir", str(self.model_dirs[service])]
        command += ["--host", self.host, "--port", str(port)]
        command += ["--log-format", self.log_format, "--log-level", self.log_level]
        command += ["--http-port", str(side_port(port, HTTP_OFFSET)) if self.http else "off"]
        command += ["--metrics-port", str(side_port(port, METRICS_OFFSET)) if self.metrics else "off"]
        if self.tls is not None:
            command += ["--health-port", "0"]
        if self.grace is not None:
            command += ["--grace", str(self.grace)]
        return command + self.mesh.node(service).flags() + self.extra_args.get(service, [])

    def _child_env(self, service: str) -> dict[str, str]:
        env = {**os.environ, **self.env, "PYTHONUNBUFFERED": "1"}
        for name in PER_NODE_VARIABLES:
            env.pop(name, None)
        env.update(self._tls_env)
        if service == ORCHESTRATOR and self.tls is not None:
            env["ONNXMESH_TOKEN_FILE"] = str(self.tls / "tokens")
        if service == ORCHESTRATOR:
            # The orchestrator reads addresses from its spec; point it at this mesh's replicas.
            for backend in self.model_services:
                env[address_variable(backend)] = self.target(backend)
        return env

    def _spawn(
        self, service: str, replica: int, *, port: int | None = None, register: bool = True
    ) -> ServiceProcess:
        """Start one node; `register=False` leaves its place in `processes()` to the caller."""
        if port is None:
            base = self.ports[service]
            port = base + replica - 1 if base else 0
        if port:
            self._check_port_free(f"{service}-{replica}", port)
            if self.http:
                self._check_port_free(f"{service}-{replica} (REST)", side_port(port, HTTP_OFFSET))
            if self.metrics:
                self._check_port_free(f"{service}-{replica} (metrics)", side_port(port, METRICS_OFFSET))
        proc = ServiceProcess(
            service,
            replica,
            self.host,
            port,
            self._command(service, port),
            self._child_env(service),
            self._echo if self._echo_stream is not None else None,
        )
        self.spawned.append(proc)
        if register:
            self._procs.append(proc)
        return proc

    def _check_port_free(self, name: str, port: int) -> None:
        """Fail early and clearly when a fixed port is taken (e.g. a mesh is already running).

        gRPC servers bind with SO_REUSEPORT, so a second node on a busy port would start fine and
        silently share the port with the first. A bind with SO_REUSEADDR only still fails on a
        listening socket, yet ignores TIME_WAIT leftovers of a mesh that just stopped.
        """
        with socket.socket(socket.AF_INET6 if ":" in self.host else socket.AF_INET) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((self.host, port))
            except OSError as exc:
                raise MeshStartupError(
                    name,
                    f"port {port} on {self.host} is already in use ({exc.strerror}); "
                    "is a mesh already running? check with 'onnxmesh health'",
                ) from None

    def _echo(self, name: str, line: str) -> None:
        stream = self._echo_stream
        if stream is None:
            return
        with self._echo_lock:
            stream.write(f"[{name}] {line}\n")
            stream.flush()

    def _wait_serving(self, procs: Sequence[ServiceProcess]) -> None:
        wait_serving(procs, self.startup_timeout, self._closing, self.client_security)

    def _check_names(self, label: str, mapping: Mapping[str, object]) -> None:
        unknown = sorted(set(mapping) - set(self.all_services))
        if unknown:
            raise ValueError(
                f"{label}: unknown service(s) {', '.join(unknown)}; {self.mesh.path} has {', '.join(self.all_services)}"
            )


def side_port(port: int, offset: int) -> int:
    """A node's REST or metrics port beside its gRPC `port` (0 = a free one, like the gRPC port)."""
    if not port:
        return 0
    if port + offset > 65535:
        raise ValueError(f"port {port} + {offset} is above 65535; pick a lower --base-port")
    return port + offset


def _check_port_ranges(plan: Mapping[str, tuple[int, int]]) -> None:
    """Fixed port ranges (first port, replica count) must not overlap: one service of 12 replicas would
    reach the next one's ports."""
    taken: dict[int, str] = {}
    for service, (first, count) in plan.items():
        if first == 0:
            continue
        for port in range(first, first + count):
            if port in taken:
                raise ValueError(
                    f"port {port} is planned for both {taken[port]} and {service}; pick other ports"
                )
            taken[port] = service
