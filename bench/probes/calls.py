"""`python -m bench.probes.calls`: Python function calls per request on each node, counted by cProfile.

Latency and CPU figures move with the machine's load; call counts do not. This runs the local
mesh with every node under cProfile, sends N1 and then N2 sequential requests (two separate
meshes) and reports, per node, (calls after N2 - calls after N1) / (N2 - N1): start-up, warm-up
and shutdown cancel out. Two counts per node: calls into the project's own code (the frames a
request passes through that we wrote) and every Python call (grpc's, asyncio's, protobuf's and
prometheus_client's included). cProfile counts each resumption of a coroutine as a call, so an
`await` that suspends counts again when it resumes. A third figure, files per request, is how many
of the project's files hold a function the request calls (at least once a request): how far one
request travels through the code. With `--functions`, each node's project functions follow, as
`file:function` and calls per request (what `tests/e2e/test_lean_path.py` checks: an unused
feature's module has none).

Two points: `digits-serial` through the orchestrator (one request = three hops) and `digits-mlp`
called directly on model_a (one hop, no orchestrator).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import pstats
import shlex
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from demo.digits import load_holdout
from meshctl.launcher import EPHEMERAL_PORTS, LocalMesh
from services.common.grpc.client import OipClient

ROOT = Path(__file__).resolve().parents[2]
#: The project's own code: the packages of the nodes and the tooling (not bench, not proto/gen).
OURS = tuple(str(ROOT / name) + "/" for name in ("services", "orchestrator", "meshctl", "jobs"))


@dataclass(frozen=True)
class Point:
    label: str
    target: str
    model: str


POINTS = (
    Point("digits-serial", "orchestrator", "digits-serial"),
    Point("model_a direct", "model_a", "digits-mlp"),
)


@dataclass(frozen=True)
class Count:
    point: str
    node: str
    project_calls: float
    all_calls: float
    project_files: int
    #: "path/in/repo.py:function" -> calls per request, for each project function the requests
    #: called (same-named functions of one file summed; a nested one is named by itself).
    functions: dict[str, float] = field(default_factory=dict)


def _wrapper(directory: Path) -> Path:
    """A `python` for LocalMesh that runs `-m MODULE ARGS` under cProfile, one file per process."""
    script = directory / "python-profiled"
    script.write_text(
        "#!/bin/sh\n"
        f'mod="$2"; shift 2\n'
        f'exec {shlex.quote(sys.executable)} -m cProfile -o "{directory}/$mod-$$.prof" -m "$mod" "$@"\n'
    )
    script.chmod(0o755)
    return script


@dataclass
class Totals:
    """One node's calls over a session: into project code, all Python calls, and per project function."""

    ours: int = 0
    every: int = 0
    functions: dict[tuple[str, int, str], int] = field(default_factory=dict)


def _totals(directory: Path) -> dict[str, Totals]:
    """node module -> its calls, summed over its profile files."""
    out: dict[str, Totals] = {}
    for path in directory.glob("*.prof"):
        totals = out.setdefault(path.name.rsplit("-", 1)[0], Totals())
        stats: Mapping[tuple[str, int, str], tuple[int, int, float, float, object]]
        stats = pstats.Stats(str(path)).stats  # type: ignore[attr-defined]
        for key, value in stats.items():
            totals.every += value[1]
            if key[0].startswith(OURS):
                totals.ours += value[1]
                totals.functions[key] = totals.functions.get(key, 0) + value[1]
    return out


def _files_per_request(first: Totals, second: Totals, n: int) -> int:
    """Project files holding a function called at least once a request (second session minus first)."""
    return len(
        {key[0] for key, calls in second.functions.items() if calls - first.functions.get(key, 0) >= n}
    )


def _functions_per_request(first: Totals, second: Totals, n: int) -> dict[str, float]:
    """file:function -> calls per request (second session minus first), most called first."""
    out: dict[str, float] = {}
    for key, calls in second.functions.items():
        delta = calls - first.functions.get(key, 0)
        if delta > 0:
            name = f"{Path(key[0]).relative_to(ROOT)}:{key[2]}"
            out[name] = out.get(name, 0.0) + delta / n
    return {
        name: round(calls, 2) for name, calls in sorted(out.items(), key=lambda item: (-item[1], item[0]))
    }


def _session(point: Point, requests: int, inputs: Mapping[str, np.ndarray]) -> dict[str, Totals]:
    with tempfile.TemporaryDirectory(prefix="onnxmesh-calls-") as tmp:
        directory = Path(tmp)
        with LocalMesh(ports=EPHEMERAL_PORTS, python=str(_wrapper(directory))) as mesh:
            address = mesh.address(point.target)

            async def send() -> None:
                async with OipClient(address) as client:
                    for _ in range(requests):
                        await client.infer(point.model, inputs, timeout=10.0)

            asyncio.run(send())
        return _totals(directory)


def count(point: Point, low: int, high: int) -> list[Count]:
    images = load_holdout().images[:1]
    features = np.zeros((1, 64), np.float32)
    inputs = {"image": images} if point.target == "orchestrator" else {"features": features}
    first, second = _session(point, low, inputs), _session(point, high, inputs)
    n = high - low
    counts = []
    for node in sorted(second):
        before = first.get(node, Totals())
        ours = (second[node].ours - before.ours) / n
        every = (second[node].every - before.every) / n
        if every >= 10.0:  # nodes the request never reached (health checks only) stay out
            files = _files_per_request(before, second[node], n)
            functions = _functions_per_request(before, second[node], n)
            counts.append(Count(point.label, node, round(ours, 1), round(every, 1), files, functions))
    return counts


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.probes.calls", description=__doc__.splitlines()[0] if __doc__ else None
    )
    parser.add_argument("--low", type=int, default=50, help="requests in the first mesh (default: 50)")
    parser.add_argument("--high", type=int, default=250, help="requests in the second mesh (default: 250)")
    parser.add_argument("--json", type=Path, default=None, help="also write the counts as JSON here")
    parser.add_argument(
        "--functions", action="store_true", help="also list each node's project functions, calls per request"
    )
    args = parser.parse_args(argv)
    if not 0 <= args.low < args.high:
        parser.error("need 0 <= --low < --high")
    counts = [c for point in POINTS for c in count(point, args.low, args.high)]
    print("| point | node | project calls/request | all Python calls/request | project files/request |")
    print("|---|---|---|---|---|")
    for c in counts:
        print(f"| {c.point} | {c.node} | {c.project_calls:.1f} | {c.all_calls:.1f} | {c.project_files} |")
    if args.functions:
        for c in counts:
            print(f"\n{c.point}, {c.node}: project functions, calls per request")
            for name, calls in c.functions.items():
                print(f"  {calls:8.2f}  {name}")
    if args.json is not None:
        args.json.write_text(json.dumps([asdict(c) for c in counts], indent=2) + "\n")


if __name__ == "__main__":
    main()
