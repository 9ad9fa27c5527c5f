"""The helpers every test folder shares (the one place for them; no test imports another test).

A real MeshServer on 127.0.0.1:0 in a background thread (its own event loop, so plain tests can
call it with blocking stubs; `stop()` always drains it); waiting on conditions (`until`), never
on the clock; coroutines run with a bound (`run`); processes stopped with their whole group.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.request
from collections.abc import Awaitable, Callable, Coroutine, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import grpc
import numpy as np
import promql_parser
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from proto.gen.inference import grpc_predict_v2_pb2_grpc as pb_grpc
from services.common.model import Model
from services.common.model_node import build_repository
from services.common.repository import ModelRepository
from services.common.server import MeshServer
from services.common.settings import ServerSettings
from services.common.types import ModelSignature, TensorSpec

ROOT = Path(__file__).resolve().parent.parent
#: The Kubernetes version every rendered object is validated against (kubernetes-validate, strict).
K8S_VERSION = "1.34"
T = TypeVar("T")
#: How long `run` lets one test's coroutine take before failing it (a bug must not hang the run).
RUN_TIMEOUT = 60.0


def run(coro: Awaitable[T], timeout: float = RUN_TIMEOUT) -> T:
    """Run one test's coroutine on a fresh event loop; a bug fails the test instead of hanging it."""

    async def bounded() -> T:
        async with asyncio.timeout(timeout):  # in the main task: no task of its own for the bound
            return await coro

    return asyncio.run(bounded())


def until(condition: Callable[[], T | None], what: str, timeout: float = 30.0, interval: float = 0.02) -> T:
    """Poll `condition` until it returns something true, and return that; fail naming `what`."""
    deadline = time.monotonic() + timeout
    while not (found := condition()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)  # the poll interval of until()
    return found


async def until_async(condition: Callable[[], object], interval: float = 0.002) -> None:
    """`until` inside a coroutine, for state other threads change; `run`'s timeout bounds it."""
    while not condition():  # noqa: ASYNC110 - polled: the state is not the event loop's
        await asyncio.sleep(interval)  # the poll interval of until_async()


def kill_group(proc: subprocess.Popen[Any]) -> None:
    """SIGKILL a process started with `start_new_session=True` and whatever of its group lives on,
    reap it and close its pipes: what a test started never outlives the test, passed or failed."""
    # Safe after the leader was reaped too: Linux never reuses a pid still naming a live group.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(30)
    for pipe in (proc.stdin, proc.stdout, proc.stderr):
        if pipe is not None:
            pipe.close()


class ServerThread:
    """A MeshServer on its own loop in a daemon thread."""

    def __init__(self, repository: ModelRepository, settings: ServerSettings | None = None) -> None:
        self.settings = settings or ServerSettings(service="test", host="127.0.0.1", port=0, grace=2.0)
        self.repository = repository
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server = self.call(self._make)

    async def _make(self) -> MeshServer:
        return MeshServer(self.settings, self.repository)

    def call(self, factory: Callable[[], Coroutine[Any, Any, T]], timeout: float = 30.0) -> T:
        return asyncio.run_coroutine_threadsafe(factory(), self.loop).result(timeout)

    def submit(self, factory: Callable[[], Coroutine[Any, Any, T]]) -> Any:
        return asyncio.run_coroutine_threadsafe(factory(), self.loop)

    def start(self, *, load: bool = True) -> int:
        port = self.call(self.server.start)
        if load:
            self.call(self.server.load)
        return port

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.server.port}"

    def stop(self, grace: float = 0.0) -> None:
        try:
            self.call(lambda: self.server.stop(grace))
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
            if not self.thread.is_alive():
                self.loop.close()


GATED_SIGNATURE = ModelSignature(
    "gated", ("1",), "test", (TensorSpec("x", "FP32", (-1,)),), (TensorSpec("y", "FP32", (-1,)),)
)


class GatedModelDouble(Model):
    """A test double whose load and predict wait for the test to open a gate."""

    def __init__(self, executor: ThreadPoolExecutor) -> None:
        super().__init__("gated", "1", executor)
        self.signature = GATED_SIGNATURE
        self.load_gate = threading.Event()
        self.predict_gate = threading.Event()
        self.predict_started = threading.Event()

    def load_sync(self) -> None:
        assert self.load_gate.wait(20)

    def warmup_inputs(self) -> dict[str, np.ndarray]:
        return {}

    def predict(self, inputs: Mapping[str, np.ndarray], outputs: Sequence[str]) -> dict[str, np.ndarray]:
        if not inputs:  # warm-up
            return {}
        self.predict_started.set()
        assert self.predict_gate.wait(20)
        return {"y": inputs["x"] * 2}


def model_repository(*model_dirs: Path, executor: ThreadPoolExecutor) -> ModelRepository:
    """The real ONNX models of the given directories in one repository."""
    repo = ModelRepository()
    for model_dir in model_dirs:
        settings = ServerSettings(service="test", model_dir=model_dir)
        for servable in build_repository(settings, executor).all():
            repo.add(servable)
    return repo


@contextmanager
def serving(repository: ModelRepository) -> Iterator[ServerThread]:
    server = ServerThread(repository)
    try:
        server.start()
        yield server
    finally:
        server.stop()


@contextmanager
def stub(address: str) -> Iterator[pb_grpc.GRPCInferenceServiceStub]:
    with grpc.insecure_channel(address) as channel:
        yield pb_grpc.GRPCInferenceServiceStub(channel)


def metric_total(port: int, sample: str, **labels: str) -> float:
    """The sum of a sample's values on a node's /metrics, over series carrying ``labels``."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return sum(
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items())
    )


def tool(name: str, installed_by: str) -> str:
    """The path of a tool the project installs into .venv/bin (that one first: pinned), else on PATH.

    The project installs it (`make test` runs `installed_by` first), so its absence is the test's
    failure, saying which make target installs it, as is a tool that is there but fails."""
    found = ROOT / ".venv/bin" / name
    if found.exists():
        return str(found)
    on_path = shutil.which(name)
    if on_path is None:
        pytest.fail(f"{name} is not installed: `{installed_by}` installs it")
    return on_path


def server_missing(name: str) -> NoReturn:
    """A server the tests start for themselves is not installed: a skip, but a failure as root,
    where `make test` installs it (scripts/install_test_servers.sh), so that CI cannot pass
    without it."""
    message = f"{name} is not installed (scripts/install_test_servers.sh installs it as root)"
    if os.geteuid() == 0:
        pytest.fail(message)
    pytest.skip(message)


def free_port() -> int:
    """A 127.0.0.1 port nothing listens on now (whoever binds it a moment later may lose a race)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class RedisServer:
    """A redis-server of the test's own on 127.0.0.1 (no persistence), in a process group of its
    own; `stop()` kills it (tests call it mid-run for "the store went away")."""

    def __init__(self, directory: Path) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            server_missing("redis-server")
        log = directory / "redis.log"
        options = ["--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(directory)]
        for _ in range(3):  # the free port may be taken before redis binds it: try another
            self.port = free_port()
            self.proc = subprocess.Popen(
                [binary, "--port", str(self.port), "--logfile", str(log), *options],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
            try:
                until(lambda: self.proc.poll() is not None or self.answers(), "redis-server to answer PING")
            except BaseException:
                self.stop()
                raise
            if self.proc.poll() is None:
                return
            output = log.read_text() if log.exists() else ""
            if "already in use" not in output:
                raise RuntimeError(f"redis-server did not start ({self.proc.returncode}):\n{output[-2000:]}")
        raise RuntimeError("redis-server lost the race for a free port three times")

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1.0) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self) -> None:
        kill_group(self.proc)


@contextmanager
def redis_server(directory: Path) -> Iterator[RedisServer]:
    server = RedisServer(directory)
    try:
        yield server
    finally:
        server.stop()


def kustomize(directory: Path) -> tuple[dict[str, Any], ...]:
    """The objects `kubectl kustomize DIRECTORY` renders."""
    proc = subprocess.run(
        [tool("kubectl", "make setup"), "kustomize", str(directory)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, f"kubectl kustomize {directory} failed:\n{proc.stderr}"
    return tuple(doc for doc in yaml.safe_load_all(proc.stdout) if doc)


def kustomize_overlay(
    root: Path, overlay: str, components: tuple[str, ...] = ()
) -> tuple[dict[str, Any], ...]:
    """Render k8s/overlays/OVERLAY plus k8s/components/C..., from a kustomization written in `root`."""
    up = os.path.relpath(ROOT / "k8s", root)  # kustomize refuses absolute paths
    listed = ", ".join(f"{up}/components/{c}" for c in components)
    (root / "kustomization.yaml").write_text(
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n"
        f"resources: [{up}/overlays/{overlay}]\ncomponents: [{listed}]\n"
    )
    return kustomize(root)


# -- the observability assets: the dashboard's and the alerts' queries ----------------------------

COMPONENT = ROOT / "k8s/components/observability"
DASHBOARD = COMPONENT / "dashboard.json"
RULES = COMPONENT / "prometheusrule.yaml"
#: Grafana's variables, replaced by what they stand for before an expression is parsed.
VARIABLES = {"$__rate_interval": "5m", "$graph": "digits-serial|digits-parallel"}


def dashboard() -> dict[str, Any]:
    return dict(json.loads(DASHBOARD.read_text()))


def rule_groups() -> list[dict[str, Any]]:
    return list(yaml.safe_load(RULES.read_text())["spec"]["groups"])


def expressions() -> Iterator[tuple[str, str]]:
    """(where, PromQL) of every query of the dashboard and every rule."""
    for panel in dashboard()["panels"]:
        for target in panel.get("targets", ()):
            yield f"panel {panel['title']!r} {target['refId']}", target["expr"]
    for group in rule_groups():
        for rule in group["rules"]:
            yield f"rule {rule.get('alert') or rule.get('record')}", rule["expr"]


def selectors(expr: str) -> list[tuple[str, set[str]]]:
    """(metric name, label names it filters or groups on) of each series an expression selects."""
    for variable, meaning in VARIABLES.items():
        expr = expr.replace(variable, meaning)
    assert "$" not in expr, f"an unknown Grafana variable in {expr}"
    found: list[tuple[str, set[str]]] = []
    grouping: set[str] = set()

    def visit(node: Any) -> bool:
        if isinstance(node, promql_parser.VectorSelector):
            assert node.name is not None, f"a selector without a metric name in {expr}"
            found.append((node.name, {m.name for m in node.matchers.matchers}))
        elif isinstance(node, promql_parser.AggregateExpr) and node.modifier is not None:
            grouping.update(node.modifier.labels)
        return True

    promql_parser.walk(promql_parser.parse(expr), visit)
    # Grouping labels are checked against every series of the expression.
    return [(name, labels | grouping) for name, labels in found]
