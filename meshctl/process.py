"""One node of a local mesh as a child process: started, watched, waited for, stopped.

A node prints `<service> listening on HOST:PORT` once bound (so port 0 works: the bound port is
read back from it), `<service> metrics on HOST:PORT` with --metrics-port, `<service> http on
HOST:PORT` with --http-port (KServe v2 REST), and `<service> ready on
HOST:PORT` once its models are warm; it reports SERVING on grpc.health.v1 from then on, and drains
and exits 0 on SIGTERM (services/common/server.py). `ServiceProcess` runs one such process and
reads those lines; `wait_serving` waits until a group of them answers SERVING.

Each node runs in a process group of its own, so a terminal's Ctrl-C reaches only the launcher,
which then stops the nodes in order (the orchestrator first); and it gets SIGTERM (a drain) if
the launcher dies, even by SIGKILL, so no node outlives it: the node asks for that itself
(`services.common.server.follow_launcher`, from $ONNXMESH_LAUNCHER_PID). Not in a preexec
function: a fork that runs Python code in a process using gRPC can crash the child.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import signal
import subprocess
import threading
import time
from collections import deque
from collections.abc import Callable, Coroutine, Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO, TypeVar

from services.common.errors import MeshError
from services.common.grpc.client import OipClient
from services.common.grpc.security import ClientSecurity
from services.common.settings import LAUNCHER_ENV

#: Where the nodes run from (the checkout, or site-packages when installed).
REPO = Path(__file__).resolve().parent.parent
STOP_TIMEOUT = 15.0
TAIL_LINES = 40
POLL_S = 0.05
_HEALTH_CALL_S = 1.0

T = TypeVar("T")


class MeshStopped(RuntimeError):
    """`start()` gave up because the mesh was asked to stop (Ctrl-C, SIGTERM, `interrupt()`)."""


class MeshStartupError(RuntimeError):
    """A node died or never became SERVING; the message names it and shows its last stderr lines."""

    def __init__(self, name: str, reason: str, tail: Sequence[str] = ()) -> None:
        message = f"{name} failed to start: {reason}"
        if tail:
            message += f"\n--- last {len(tail)} stderr lines of {name} ---\n" + "\n".join(tail)
        super().__init__(message)
        self.name = name
        self.reason = reason
        self.tail = list(tail)


def replica_target(host: str, ports: Sequence[int]) -> str:
    """The gRPC target of every replica: `host:port` for one, a static `ipv4:`/`ipv6:` list for several.

    The orchestrator's client balances round robin over every address of a target.
    """
    if len(ports) == 1:
        return f"{bracket(host)}:{ports[0]}"
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"several replicas need an IP address to list them, not host '{host}'") from None
    scheme = "ipv4" if ip.version == 4 else "ipv6"
    return f"{scheme}:" + ",".join(f"{bracket(host)}:{port}" for port in ports)


def bracket(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def connect_host(host: str) -> str:
    """Where clients connect to a node that listens on `host` (a wildcard is reachable on loopback)."""
    return {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)


def run_async(factory: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run a coroutine to completion on a fresh event loop in a worker thread.

    A worker thread keeps this usable from code that already runs an event loop (a benchmark)
    and keeps the caller's thread interruptible: Ctrl-C lands in the caller, not inside asyncio.
    """
    result: list[T] = []
    error: list[BaseException] = []

    def work() -> None:
        try:
            result.append(asyncio.run(factory()))
        except BaseException as exc:
            error.append(exc)

    worker = threading.Thread(target=work, name="onnxmesh-async", daemon=True)
    worker.start()
    worker.join()
    if error:
        raise error[0]
    return result[0]


class ServiceProcess:
    """One running node: its process, the port it bound, and the tail of its logs.

    Two reader threads drain its stdout and stderr (a full pipe would block the node), echo
    each line with a `[name]` prefix when asked to, and pick the bound port out of the
    `listening on` line.
    """

    def __init__(
        self,
        service: str,
        replica: int,
        host: str,
        requested_port: int,
        command: Sequence[str],
        env: Mapping[str, str],
        echo: Callable[[str, str], None] | None,
    ) -> None:
        self.service = service
        self.replica = replica
        self.name = f"{service}-{replica}"
        self.host = host
        self.requested_port = requested_port
        self.command = list(command)
        self.port: int | None = None
        #: The Prometheus /metrics port, when the node was started with --metrics-port.
        self.metrics_port: int | None = None
        #: The KServe v2 REST port, when the node was started with --http-port.
        self.http_port: int | None = None
        self.health_port: int | None = None
        self.ready_line_seen = False
        self.tail: deque[str] = deque(maxlen=TAIL_LINES)
        self._echo = echo
        self.proc = subprocess.Popen(
            self.command,
            cwd=REPO,
            # The node follows this process: it gets SIGTERM when the launcher dies.
            env={**env, LAUNCHER_ENV: str(os.getpid())},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            encoding="utf-8",
            errors="replace",
            bufsize=1,
            process_group=0,
        )
        self._readers = [
            threading.Thread(target=self._read, args=(self.proc.stdout, True), daemon=True),
            threading.Thread(target=self._read, args=(self.proc.stderr, False), daemon=True),
        ]
        for reader in self._readers:
            reader.start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def address(self) -> str:
        """`host:port` to connect to; only known once the node printed its `listening on` line."""
        if self.port is None:
            raise RuntimeError(f"{self.name} has not bound a port yet")
        return f"{bracket(connect_host(self.host))}:{self.port}"

    @property
    def running(self) -> bool:
        return self.proc.poll() is None

    @property
    def returncode(self) -> int | None:
        return self.proc.poll()

    def _read(self, stream: TextIO | None, is_stdout: bool) -> None:
        if stream is None:
            return
        for raw in stream:
            line = raw.rstrip("\n")
            if is_stdout:
                self._announcement(line)
            else:
                self.tail.append(line)
            if self._echo is not None:
                self._echo(self.name, line)
        stream.close()

    def _announcement(self, line: str) -> None:
        """Parse the `<service> listening|metrics|http|health|ready on HOST:PORT` lines a node prints on stdout."""
        words = line.split()
        if len(words) == 4 and words[1:3] == ["listening", "on"]:
            self.port = int(words[3].rsplit(":", 1)[1])
        elif len(words) == 4 and words[1:3] == ["metrics", "on"]:
            self.metrics_port = int(words[3].rsplit(":", 1)[1])
        elif len(words) == 4 and words[1:3] == ["http", "on"]:
            self.http_port = int(words[3].rsplit(":", 1)[1])
        elif len(words) == 4 and words[1:3] == ["health", "on"]:
            self.health_port = int(words[3].rsplit(":", 1)[1])
        elif len(words) == 4 and words[1:3] == ["ready", "on"]:
            self.ready_line_seen = True

    def signal(self, sig: signal.Signals) -> None:
        # Until it is reaped the child's pid cannot be reused, so signalling it is safe.
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(sig)

    def stop(self, timeout: float = STOP_TIMEOUT) -> int:
        """SIGTERM (the node drains), then SIGKILL if it is still alive after `timeout`; the exit code."""
        self.signal(signal.SIGTERM)
        return self.wait(timeout)

    def kill(self) -> int:
        self.signal(signal.SIGKILL)
        return self.wait(STOP_TIMEOUT)

    def wait(self, timeout: float) -> int:
        """Wait for exit, killing the node once `timeout` has passed; joins the log readers."""
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.signal(signal.SIGKILL)
            code = self.proc.wait()
        for reader in self._readers:
            reader.join(2.0)
        return code

    def __repr__(self) -> str:
        state = "running" if self.running else f"exited {self.returncode}"
        return f"<ServiceProcess {self.name} pid={self.pid} port={self.port} {state}>"


def wait_serving(
    procs: Sequence[ServiceProcess],
    timeout: float,
    stopping: threading.Event,
    security: ClientSecurity | None = None,
) -> None:
    """Wait until every node of ``procs`` is SERVING, all at once, within ``timeout`` seconds.

    Raises MeshStartupError naming the first node that died or ran out of time, and MeshStopped
    as soon as ``stopping`` is set.
    """

    async def all_serving() -> None:
        async with asyncio.TaskGroup() as group:
            for proc in procs:
                group.create_task(until_serving(proc, timeout, stopping, security))

    try:
        run_async(all_serving)
    except BaseExceptionGroup as group:
        # Report the first node that failed, not a group: that is the one to look at.
        raise _first_leaf(group) from None


async def until_serving(
    proc: ServiceProcess, timeout: float, stopping: threading.Event, security: ClientSecurity | None = None
) -> None:
    """Poll one node's health until SERVING; raise if it dies, the mesh stops, or time runs out."""
    deadline = time.monotonic() + timeout
    client: OipClient | None = None
    status = "not bound yet"
    try:
        while True:
            if stopping.is_set():
                raise MeshStopped(f"stopped while {proc.name} was starting")
            if not proc.running:
                await asyncio.sleep(0.2)  # let the reader threads collect its last words
                raise MeshStartupError(
                    proc.name, f"exited with code {proc.returncode} before it was ready", list(proc.tail)
                )
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise MeshStartupError(
                    proc.name,
                    f"not SERVING after {timeout:g}s (last: {status})",
                    list(proc.tail),
                )
            # Only connect once the node said it is bound: a refused first attempt would put the
            # channel into reconnect backoff and slow every later check.
            if proc.port is not None:
                client = client or OipClient(proc.address, security=security)
                try:
                    status = await client.health(timeout=min(_HEALTH_CALL_S, remaining))
                except MeshError as err:
                    status = f"{err.code}: {err.message}"
                if status == "SERVING":
                    return
            await asyncio.sleep(POLL_S)
    finally:
        if client is not None:
            await client.close()


def _first_leaf(group: BaseExceptionGroup[BaseException]) -> BaseException:
    first = group.exceptions[0]
    return _first_leaf(first) if isinstance(first, BaseExceptionGroup) else first
