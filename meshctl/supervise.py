"""Restart on exit: the nodes of a local mesh that exit on their own are started again, as a
Deployment's controller restarts a crashed pod.

    a node exits (crash, SIGKILL, a bug)  -- not stopped on purpose, the mesh not stopping --
        -> wait the back-off (base, doubling per restart of that replica, at most `cap`; reset once
           a replica has run `stable_after` seconds) -> start it again on the same port, wait
           until SERVING -> say so

Nodes the mesh stops itself (`stop_service`, `restart_service`, `hand_over`, `stop`) are left
alone. `LocalMesh(restart=True)` runs one; `python -m meshctl.run` does unless `--no-restart`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from meshctl.process import MeshStartupError, MeshStopped, ServiceProcess

if TYPE_CHECKING:
    from meshctl.launcher import LocalMesh

POLL_S = 0.1


@dataclass(frozen=True)
class Restart:
    """One restart: which replica, how the old process ended, after what wait, and the new pid."""

    name: str
    exit_code: int | None
    delay: float
    pid: int | None


class Restarter:
    """Watches a started mesh from a thread of its own; `start()` and `stop()` it."""

    def __init__(
        self,
        mesh: LocalMesh,
        *,
        base: float = 0.5,
        cap: float = 30.0,
        stable_after: float = 30.0,
        say: Callable[[str], None] = print,
    ) -> None:
        self.mesh = mesh
        self.base = base
        self.cap = cap
        self.stable_after = stable_after
        self._say = say
        #: Restarts made so far, in order.
        self.restarts: list[Restart] = []
        self._count: dict[str, int] = {}  # restarts in a row per replica, for the back-off
        self._started_at: dict[int, float] = {}  # pid -> when it was seen running
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="onnxmesh-restarter", daemon=True)

    def start(self) -> Restarter:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(5.0)

    def delay(self, name: str) -> float:
        """The wait before the next restart of replica `name`."""
        return float(min(self.cap, self.base * 2 ** self._count.get(name, 0)))

    def _watch(self) -> None:
        # The thread lives until `stop()`, even once the mesh is closing: the nodes it started
        # get their parent-death signal when it ends (meshctl/process.py).
        while not self._stopping.wait(POLL_S):
            for proc in self.mesh.processes():
                if self._stopping.is_set() or self.mesh.closing:
                    break
                self._started_at.setdefault(proc.pid, time.monotonic())
                if not proc.running and not self.mesh.stopped_on_purpose(proc):
                    self._restart(proc)

    def _restart(self, proc: ServiceProcess) -> None:
        ran = time.monotonic() - self._started_at.get(proc.pid, time.monotonic())
        if ran >= self.stable_after:
            self._count.pop(proc.name, None)
        delay = self.delay(proc.name)
        self._count[proc.name] = self._count.get(proc.name, 0) + 1
        self._say(
            f"onnxmesh: {proc.name} exited unexpectedly with code {proc.returncode}; "
            f"restarting in {delay:.1f}s (restart {self._count[proc.name]})"
        )
        if self._stopping.wait(delay) or self.mesh.closing:
            return
        try:
            (fresh,) = self.mesh.restart_service(proc.service, proc.replica)
        except (MeshStartupError, MeshStopped, KeyError) as exc:
            self._say(f"onnxmesh: restarting {proc.name} failed: {exc}")
            self.restarts.append(Restart(proc.name, proc.returncode, delay, None))
            return
        self.restarts.append(Restart(proc.name, proc.returncode, delay, fresh.pid))
        self._say(f"onnxmesh: {fresh.name} restarted (pid {fresh.pid}) and SERVING on {fresh.address}")
