"""A rolling update rehearsed locally, with traffic flowing: `python -m meshctl.rehearsal [--mesh MESH]`.

What Kubernetes does for `kubectl set image` on one service (maxSurge 1, maxUnavailable 0), done
with local processes: two replicas of the service behind a graph's step serve their model's
newest version N; each is replaced in turn by a process serving N+1 (start new, wait until ready,
drain old with SIGTERM) while a closed-loop client keeps calling the graph with the mesh's sample
rows (its client file, meshctl/client.py). It reports how many requests were sent and failed, and
how long answers came from both versions. Zero failures is the bar. Default: the demo mesh, its
client file's graph, and that graph's first model step that does not read the request itself.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from meshctl.client import Samples, load_client, mesh_samples
from meshctl.launcher import EPHEMERAL_PORTS, LocalMesh, demo_mesh
from meshctl.mesh import Mesh, load_mesh
from orchestrator.spec.steps import REQUEST, ModelStep
from services.common.errors import MeshError
from services.common.grpc.client import OipClient


@dataclass
class TrafficReport:
    """What a traffic run saw: counts, errors, and which step versions answered when."""

    sent: int = 0
    failed: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    #: (seconds since start, version of the watched step) for every answered request.
    versions: list[tuple[float, str]] = field(default_factory=list)
    seconds: float = 0.0

    def mixed_seconds(self, old: str, new: str) -> float:
        """From the first answer of `new` to the last answer of `old` (0 if they never overlap)."""
        first_new = min((t for t, v in self.versions if v == new), default=None)
        last_old = max((t for t, v in self.versions if v == old), default=None)
        if first_new is None or last_old is None:
            return 0.0
        return max(0.0, last_old - first_new)


class Traffic:
    """Closed-loop requests to one graph from a background thread, bounded in count and time."""

    def __init__(
        self,
        target: str,
        graph: str,
        *,
        steps: Sequence[str],
        concurrency: int = 4,
        max_requests: int = 50_000,
        max_seconds: float = 120.0,
        timeout: float = 5.0,
        samples: Samples | None = None,
    ) -> None:
        self.target, self.graph = target, graph
        self.samples = samples if samples is not None else mesh_samples(demo_mesh())
        # The steps whose answering version is recorded (a splitter's branches: whichever ran).
        self.version_keys = [f"version.{step}" for step in steps]
        self.concurrency, self.max_requests, self.max_seconds = concurrency, max_requests, max_seconds
        self.timeout = timeout
        self.report = TrafficReport()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    def __enter__(self) -> Traffic:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> TrafficReport:
        self._stop.set()
        self._thread.join(self.timeout + 10)
        return self.report

    def wait_for(self, requests: int, timeout: float = 30.0) -> None:
        """Block until `requests` more answers arrived (or timeout)."""
        goal, deadline = len(self.report.versions) + requests, time.monotonic() + timeout
        while len(self.report.versions) < goal and time.monotonic() < deadline and self._thread.is_alive():
            time.sleep(0.02)

    async def _run(self) -> None:
        rows, samples = len(self.samples), self.samples
        started = time.monotonic()
        async with OipClient(self.target) as client:

            async def worker(offset: int) -> None:
                i = offset
                while not self._stop.is_set() and self.report.sent < self.max_requests:
                    if time.monotonic() - started > self.max_seconds:
                        return
                    inputs = samples.rows(i % rows, i % rows + 1)
                    i += self.concurrency
                    self.report.sent += 1
                    try:
                        result = await client.infer(self.graph, inputs, timeout=self.timeout)
                    except MeshError as err:
                        self.report.failed += 1
                        self.report.errors[f"{err.code}: {err.message}"[:200]] += 1
                        continue
                    version = next(
                        (str(result.parameters[k]) for k in self.version_keys if k in result.parameters), "?"
                    )
                    self.report.versions.append((time.monotonic() - started, version))

            await asyncio.gather(*(worker(k) for k in range(self.concurrency)))
        self.report.seconds = time.monotonic() - started


def versioned_copy(model_dir: Path, model: str, version: str, out_dir: Path) -> Path:
    """A model directory whose `model` gets `version` (the newest version's file, repackaged).

    A new version of a model is a new model directory (a new image tag in Kubernetes).
    """
    source = model_dir / model
    latest = max((p for p in source.iterdir() if p.name.isdigit()), key=lambda p: int(p.name))
    target = out_dir / model
    target.mkdir(parents=True, exist_ok=True)
    for extra in source.glob("*.json"):
        shutil.copy(extra, target / extra.name)
    shutil.copytree(latest, target / version)
    return out_dir


@dataclass
class RehearsalResult:
    service: str
    old_version: str
    new_version: str
    requests_sent: int
    requests_failed: int
    errors: dict[str, int]
    seconds_of_mixed_versions: float
    share_new_version_at_end: float
    seconds: float


def rolled_step(mesh: Mesh, graph: str, step: str | None) -> ModelStep:
    """The model step `step` of `graph`; by default its first that does not read the request itself."""
    if graph not in mesh.spec.graphs:
        raise ValueError(f"{mesh.path}: no graph {graph!r}; graphs: {', '.join(mesh.graph_names())}")
    steps = [s for s in mesh.spec.graphs[graph].all_steps() if isinstance(s, ModelStep)]
    for candidate in steps:
        if candidate.name == step or (
            step is None and all(ref.step != REQUEST for ref in candidate.inputs.values())
        ):
            if mesh.services.get(candidate.service) is None:
                raise ValueError(
                    f"step {candidate.name} calls {candidate.service}, which the mesh does not run"
                )
            return candidate
    raise ValueError(f"graph {graph} has no model step {step or 'after its first'} to roll")


def rehearse(
    *,
    mesh: Mesh | None = None,
    graph: str | None = None,
    step: str | None = None,
    concurrency: int = 4,
    say: Callable[[str], None] = lambda line: None,
) -> RehearsalResult:
    """Roll the service behind `step` of `graph` to a new version of its model on two replicas
    while traffic flows; `say` hears of each phase as it happens."""
    mesh = mesh or demo_mesh()
    client = load_client(mesh)
    if client is None:
        raise ValueError(f"{mesh.path} names no client file: the rehearsal sends its sample rows")
    graph = graph or client.DEFAULT_NAME
    rolled = rolled_step(mesh, graph, step)
    service, model_dir = rolled.service, mesh.services[rolled.service].model_dir
    assert model_dir is not None  # a service the mesh runs has its model directory
    old = max((p.name for p in (model_dir / rolled.model).iterdir() if p.name.isdigit()), key=int)
    new = str(int(old) + 1)
    started = time.monotonic()

    def phase(line: str) -> None:
        say(f"[{time.monotonic() - started:5.1f} s] {line}")

    with tempfile.TemporaryDirectory(prefix="onnxmesh-next-") as tmp:
        new_dir = versioned_copy(model_dir, rolled.model, new, Path(tmp))
        phase(f"starting the mesh with {service} x2 ({rolled.model} version {old})")
        with LocalMesh(
            mesh,
            ports=EPHEMERAL_PORTS,
            replicas={service: 2},
            extra_args={service: ["--reuse-port", "1"]},
            grace=5.0,
        ) as running:
            phase(f"mesh ready; {concurrency} clients calling {graph} in a closed loop")
            with Traffic(
                running.address("orchestrator"),
                graph,
                steps=[rolled.name],
                concurrency=concurrency,
                samples=client.samples(),
            ) as traffic:
                traffic.wait_for(200)
                for replica in (1, 2):
                    phase(
                        f"{service}-{replica}: starting version {new} beside it, then draining version {old}"
                    )
                    running.hand_over(service, replica, new_dir)
                    traffic.wait_for(200)
                    report = traffic.report
                    phase(
                        f"{service}-{replica} serves version {new} ({report.sent} requests so far, {report.failed} failed)"
                    )
                report = traffic.stop()
            phase("stopping the mesh")
    tail = [v for _, v in report.versions[-100:]]
    return RehearsalResult(
        service=service,
        old_version=old,
        new_version=new,
        requests_sent=report.sent,
        requests_failed=report.failed,
        errors=dict(report.errors),
        seconds_of_mixed_versions=round(report.mixed_seconds(old, new), 3),
        share_new_version_at_end=sum(v == new for v in tail) / max(1, len(tail)),
        seconds=round(report.seconds, 3),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m meshctl.rehearsal", description=__doc__)
    parser.add_argument("--mesh", type=Path, default=None, help="the mesh file (default: the demo's)")
    parser.add_argument("--graph", default=None, help="(default: the mesh's client file's)")
    parser.add_argument("--step", default=None, help="the model step whose service rolls")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--json", action="store_true", help="print the result as JSON only")
    args = parser.parse_args(argv)
    say = (lambda line: None) if args.json else (lambda line: print(line, flush=True))
    mesh = load_mesh(args.mesh) if args.mesh else None
    result = rehearse(mesh=mesh, graph=args.graph, step=args.step, concurrency=args.concurrency, say=say)
    passed = result.requests_failed == 0 and result.share_new_version_at_end == 1.0
    if args.json:
        print(json.dumps(asdict(result), indent=2))
    else:
        print(
            f"rolled {result.service} from version {result.old_version} to {result.new_version} under "
            f"traffic: {result.requests_sent} requests in "
            f"{result.seconds:.1f} s, {result.requests_failed} failed, "
            f"{result.seconds_of_mixed_versions:.2f} s of answers from both versions, "
            f"{result.share_new_version_at_end:.0%} version 2 at the end"
        )
        for error, count in result.errors.items():
            print(f"  {count} x {error}")
        print(
            "PASS: no request failed" if passed else "FAIL: requests failed or the old version still answers"
        )
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
