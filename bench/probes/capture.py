"""`python -m bench.probes.capture` (`make bench-capture`): what payload capture costs.

Three local meshes run at once, digits-serial capturing 0 %, 1 % and 100 % of its requests (the
graph's inputs and outputs, into a SQLite store of their own); the load generator
(`bench.load.loadgen`, its own process) measures each in turn, alternating the order for
`--rounds` rounds so drift on a shared machine hits all alike. Reported: the median over rounds of
c=1 p50 and c=16 throughput, and their ratios to 0 % (figures, never assertions: the machine is
shared and noisy), with the records written and dropped at 100 %.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import urllib.request
from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from pathlib import Path

import yaml
from prometheus_client.parser import text_string_to_metric_families

from bench.probes.tls import GRAPH, loadgen
from meshctl.launcher import EPHEMERAL_PORTS, LocalMesh

ROOT = Path(__file__).resolve().parents[2]
RATES = {"0%": 0.0, "1%": 0.01, "100%": 1.0}


def metric_total(port: int, sample: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples if s.name == sample)


def spec(rate: float, path: Path) -> Path:
    raw = yaml.safe_load((ROOT / "demo/mesh.yaml").read_text())
    if rate > 0:
        raw["graphs"][GRAPH]["capture"] = {"rate": rate}
    path.write_text(yaml.safe_dump(raw))
    return path


def measure(rounds: int, duration: float) -> tuple[dict[str, dict[str, list[float]]], dict[str, float]]:
    figures: dict[str, dict[str, list[float]]] = {r: {"p50_c1": [], "rps_c16": []} for r in RATES}
    env = {k: v for k, v in os.environ.items() if not k.startswith("ONNXMESH_")}
    with tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
        directory = Path(tmp)
        meshes = {
            name: stack.enter_context(
                LocalMesh(
                    ports=EPHEMERAL_PORTS,
                    http=False,
                    graphs=spec(rate, directory / f"graphs-{i}.yaml"),
                    extra_args={"orchestrator": ["--metrics-port", "0"]},
                    env={"ONNXMESH_CAPTURE_DB": str(directory / f"captures-{i}.sqlite")},
                )
            )
            for i, (name, rate) in enumerate(RATES.items())
        }
        for i in range(rounds):
            order = list(RATES) if i % 2 == 0 else list(reversed(RATES))
            for name in order:
                p50 = loadgen(meshes[name].address("orchestrator"), 1, duration, env)["latency_ms"]["p50"]
                figures[name]["p50_c1"].append(float(p50))
            for name in order:
                rps = loadgen(meshes[name].address("orchestrator"), 16, duration, env)["rps"]
                figures[name]["rps_c16"].append(float(rps))
        port = meshes["100%"].process("orchestrator").metrics_port
        assert port is not None
        store = {
            "written": metric_total(port, "onnxmesh_capture_records_total"),
            "dropped": metric_total(port, "onnxmesh_capture_dropped_total"),
        }
    return figures, store


def report(figures: Mapping[str, Mapping[str, Sequence[float]]]) -> dict[str, float]:
    med = {r: {k: statistics.median(v) for k, v in f.items()} for r, f in figures.items()}
    out: dict[str, float] = {}
    for name in RATES:
        out[f"p50_c1_ms[{name}]"] = med[name]["p50_c1"]
        out[f"rps_c16[{name}]"] = med[name]["rps_c16"]
        out[f"p50_ratio[{name}]"] = med[name]["p50_c1"] / med["0%"]["p50_c1"]
        out[f"rps_ratio[{name}]"] = med[name]["rps_c16"] / med["0%"]["rps_c16"]
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.probes.capture", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds (default: 2)")
    parser.add_argument("--duration", type=float, default=3.0, help="measured seconds per run (default: 3)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures as JSON here")
    args = parser.parse_args(argv)
    figures, store = measure(args.rounds, args.duration)
    summary = report(figures)
    print(f"{GRAPH} with payload capture, median of {args.rounds} rounds:")
    print(f"  {'capture':>8}  {'c=1 p50 ms':>10}  {'x 0%':>5}  {'c=16 rps':>8}  {'x 0%':>5}")
    for name in RATES:
        print(
            f"  {name:>8}  {summary[f'p50_c1_ms[{name}]']:>10.2f}  {summary[f'p50_ratio[{name}]']:>5.2f}"
            f"  {summary[f'rps_c16[{name}]']:>8.0f}  {summary[f'rps_ratio[{name}]']:>5.2f}"
        )
    print(f"  at 100 %: {store['written']:.0f} records written, {store['dropped']:.0f} dropped")
    if args.json is not None:
        args.json.write_text(json.dumps({"runs": figures, "summary": summary, "store": store}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
