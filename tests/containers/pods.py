"""Run an image the way Kubernetes runs a Deployment's container, read from the rendered manifest.

``ContainerSpec.from_deployment`` reads what the kubelet would apply (image, env, ports, gRPC
probes, security context, limits, emptyDir and ConfigMap mounts, grace period) and ``Container``
runs it with the engine: read-only root, the manifest's user, no capabilities, no privilege
escalation, the limits, a tmpfs for each emptyDir and the ConfigMap's files mounted read-only.
What differs, and why: host networking on 127.0.0.1 (no pod network here), so the test gives
each container its own ports and the orchestrator 127.0.0.1 addresses instead of DNS names.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from meshctl.engine import ContainerEngine

Obj = dict[str, Any]


def _memory(quantity: str) -> str:
    """A Kubernetes memory quantity as the engine's --memory wants it (512Mi -> 512m, bytes)."""
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "K": 10**3, "M": 10**6, "G": 10**9}
    for suffix, factor in units.items():
        if quantity.endswith(suffix):
            return str(int(Decimal(quantity.removesuffix(suffix)) * factor))
    return str(int(Decimal(quantity)))


def _cpus(quantity: str) -> str:
    """A Kubernetes CPU quantity as --cpus wants it (250m -> 0.25)."""
    if quantity.endswith("m"):
        return str(Decimal(quantity[:-1]) / 1000)
    return quantity


@dataclass(frozen=True)
class ContainerSpec:
    """The parts of a Deployment's (first) container that decide how it runs."""

    deployment: str
    image: str
    env: dict[str, str]
    ports: dict[str, int]
    #: (port, service) of each gRPC probe, by kind (startupProbe, readinessProbe, livenessProbe).
    probes: dict[str, tuple[int, str]]
    #: Seconds the kubelet allows the startup probe: periodSeconds x failureThreshold.
    startup_budget: float
    user: int
    group: int
    read_only: bool
    drop_all: bool
    no_privilege_escalation: bool
    memory_limit: str | None
    cpu_limit: str | None
    #: mountPath -> emptyDir sizeLimit (or None).
    empty_dirs: dict[str, str | None]
    #: mountPath -> ConfigMap name.
    config_maps: dict[str, str]
    grace_period: float
    #: Seconds of the preStop sleep, which the kubelet counts against the grace period.
    pre_stop_sleep: float
    command: list[str] = field(default_factory=list)

    @classmethod
    def from_deployment(cls, deployment: Obj) -> ContainerSpec:
        pod = deployment["spec"]["template"]["spec"]
        container = pod["containers"][0]
        pod_security = pod.get("securityContext") or {}
        security = container.get("securityContext") or {}
        volumes = {v["name"]: v for v in pod.get("volumes") or []}
        empty_dirs: dict[str, str | None] = {}
        config_maps: dict[str, str] = {}
        for mount in container.get("volumeMounts") or []:
            volume = volumes[mount["name"]]
            if "emptyDir" in volume:
                empty_dirs[mount["mountPath"]] = (volume["emptyDir"] or {}).get("sizeLimit")
            elif "configMap" in volume:
                config_maps[mount["mountPath"]] = volume["configMap"]["name"]
        probes = {
            kind: (int(container[kind]["grpc"]["port"]), str(container[kind]["grpc"].get("service", "")))
            for kind in ("startupProbe", "readinessProbe", "livenessProbe")
            if "grpc" in (container.get(kind) or {})
        }
        startup = container.get("startupProbe") or {}
        limits = (container.get("resources") or {}).get("limits") or {}
        return cls(
            deployment=deployment["metadata"]["name"],
            image=container["image"],
            env={e["name"]: str(e["value"]) for e in container.get("env") or [] if "value" in e},
            ports={
                p.get("name", str(p["containerPort"])): int(p["containerPort"]) for p in container["ports"]
            },
            probes=probes,
            startup_budget=float(startup.get("periodSeconds", 10) * startup.get("failureThreshold", 3)),
            user=int(security.get("runAsUser", pod_security.get("runAsUser", -1))),
            group=int(security.get("runAsGroup", pod_security.get("runAsGroup", 0))),
            read_only=bool(security.get("readOnlyRootFilesystem")),
            drop_all="ALL" in ((security.get("capabilities") or {}).get("drop") or []),
            no_privilege_escalation=security.get("allowPrivilegeEscalation") is False,
            memory_limit=limits.get("memory"),
            cpu_limit=limits.get("cpu"),
            empty_dirs=empty_dirs,
            config_maps=config_maps,
            grace_period=float(pod.get("terminationGracePeriodSeconds", 30)),
            pre_stop_sleep=float(
                (((container.get("lifecycle") or {}).get("preStop") or {}).get("sleep") or {}).get(
                    "seconds", 0
                )
            ),
            command=list(container.get("command") or []),
        )


def health(address: str, service: str = "", timeout: float = 2.0) -> str:
    """grpc.health.v1 Check, as the kubelet's gRPC probe sends it: SERVING, NOT_SERVING, ..."""
    with grpc.insecure_channel(address) as channel:
        answer = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=timeout
        )
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status))


class Container:
    """One container run from a ContainerSpec, attached so its output is read as it comes.

    Always stopped and removed on ``close()`` (a context manager), whatever the test did.
    """

    def __init__(
        self,
        engine: ContainerEngine,
        spec: ContainerSpec,
        name: str,
        *,
        image: str | None = None,
        env: Mapping[str, str] | None = None,
        config_map_data: Mapping[str, Mapping[str, str]] | None = None,
    ) -> None:
        self.engine, self.spec, self.name = engine, spec, name
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self._dirs: list[Path] = []
        args = ["--rm", "--name", name, "--user", f"{spec.user}:{spec.group}"]
        if spec.read_only:
            args.append("--read-only")
        if spec.drop_all:
            args += ["--cap-drop", "ALL"]
        if spec.no_privilege_escalation:
            args += ["--security-opt", "no-new-privileges"]
        if spec.memory_limit:
            args += ["--memory", _memory(spec.memory_limit)]
        if spec.cpu_limit:
            args += ["--cpus", _cpus(spec.cpu_limit)]
        for path, size in spec.empty_dirs.items():
            args += ["--tmpfs", f"{path}:rw,mode=1777" + (f",size={_memory(size)}" if size else "")]
        for path, config_map in spec.config_maps.items():
            args += ["--volume", f"{self._config_map_dir((config_map_data or {})[config_map])}:{path}:ro"]
        for key, value in {**spec.env, **(env or {})}.items():
            args += ["--env", f"{key}={value}"]
        # A pod's `command` replaces the image's ENTRYPOINT (its first word; the rest follow the image).
        if spec.command:
            args += ["--entrypoint", spec.command[0]]
        self.started = time.monotonic()
        self.process = subprocess.Popen(
            engine.run_command(*args, image or spec.image, *spec.command[1:]),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _config_map_dir(self, data: Mapping[str, str]) -> Path:
        # What the kubelet does with a ConfigMap volume: one file per key, readable by the pod.
        directory = Path(tempfile.mkdtemp(prefix="onnxmesh-configmap-"))
        self._dirs.append(directory)
        directory.chmod(0o755)
        for key, text in data.items():
            (directory / key).write_text(text)
            (directory / key).chmod(0o644)
        return directory

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            with self._changed:
                self.lines.append(line.rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    @property
    def running(self) -> bool:
        return self.process.poll() is None

    def log(self) -> str:
        with self._changed:
            return "\n".join(self.lines)

    def wait_for_line(self, predicate: Callable[[str], bool], timeout: float) -> str:
        """The first output line that satisfies ``predicate``; fails if the container exits first."""
        deadline = time.monotonic() + timeout
        seen = 0
        with self._changed:
            while True:
                for line in self.lines[seen:]:
                    if predicate(line):
                        return line
                seen = len(self.lines)
                left = deadline - time.monotonic()
                if left <= 0 or (self.process.poll() is not None and not self._reader.is_alive()):
                    raise AssertionError(
                        f"{self.name}: no such line within {timeout:.0f} s "
                        f"(running: {self.running}); output:\n{self.log()[-3000:]}"
                    )
                self._changed.wait(min(left, 0.5))

    def wait_serving(self, address: str, service: str = "") -> float:
        """Probe health like the startup probe until SERVING; returns seconds since the start."""
        deadline = time.monotonic() + self.spec.startup_budget
        last = "no answer"
        while time.monotonic() < deadline:
            if not self.running:
                raise AssertionError(f"{self.name} exited ({self.process.poll()}):\n{self.log()[-3000:]}")
            try:
                last = health(address, service, timeout=2.0)
            except grpc.RpcError as exc:
                last = str(exc.code())
            if last == "SERVING":
                return time.monotonic() - self.started
            time.sleep(0.2)  # the kubelet's probe period, shortened
        raise AssertionError(f"{self.name} not SERVING after {self.spec.startup_budget:.0f} s: {last}")

    def signal(self, name: str) -> None:
        subprocess.run(self.engine.cli("kill", "--signal", name, self.name), check=True, timeout=30)

    def wait_exit(self, timeout: float) -> int:
        """The container's exit code; TimeoutExpired if it runs on."""
        code = self.process.wait(timeout)
        self._reader.join(10)
        return code

    def stats(self) -> str:
        """Memory in use as the engine reports it (e.g. '41.2MB / 536.9MB')."""
        done = subprocess.run(
            self.engine.cli("stats", "--no-stream", "--format", "{{.MemUsage}}", self.name),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        return done.stdout.strip() or "?"

    def close(self) -> None:
        if self.running:
            subprocess.run(self.engine.cli("rm", "--force", self.name), capture_output=True, timeout=60)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
        if self.process.stdout is not None:
            self.process.stdout.close()
        for directory in self._dirs:
            shutil.rmtree(directory, ignore_errors=True)

    def __enter__(self) -> Container:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
