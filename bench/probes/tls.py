"""`python -m bench.probes.tls`: what mTLS costs, a plaintext and an mTLS mesh side by side.

Two local meshes run at once, one plaintext and one on mTLS with a token (`make run ARGS=--tls`);
the load generator (`bench.load.loadgen`, its own process) measures digits-serial through each in
turn, alternating mesh and concurrency for `--rounds` rounds so drift on a shared machine hits
both alike. digits-serial is four sequential hops (client -> orchestrator -> preprocess ->
model_a -> model_b), so the c=1 p50 difference over four is the cost of one hop. Reported:
the median over rounds of c=1 p50 and c=32 throughput, and their ratios (figures, never
assertions: the machine is shared and noisy).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from meshctl import certs
from meshctl.launcher import EPHEMERAL_PORTS, LocalMesh

GRAPH = "digits-serial"
HOPS = 4


def loadgen(target: str, concurrency: int, duration: float, env: Mapping[str, str]) -> dict[str, Any]:
    command = [sys.executable, "-m", "bench.load.loadgen", "--target", target, "--model", GRAPH]
    command += ["--concurrency", str(concurrency), "--duration", str(duration), "--warmup", "1", "--json"]
    done = subprocess.run(
        command, capture_output=True, text=True, env=dict(env), timeout=duration + 120, check=True
    )
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    if result.get("errors"):
        raise RuntimeError(f"loadgen saw errors: {result['errors']}")
    return result


def measure(rounds: int, duration: float) -> dict[str, dict[str, list[float]]]:
    figures: dict[str, dict[str, list[float]]] = {m: {"p50_c1": [], "rps_c32": []} for m in ("plain", "mtls")}
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        certs.make_local(directory)
        plain_env = {k: v for k, v in os.environ.items() if not k.startswith("ONNXMESH_")}
        tls_env = plain_env | {
            "ONNXMESH_TLS_CERT": str(directory / "node.pem"),
            "ONNXMESH_TLS_KEY": str(directory / "node-key.pem"),
            "ONNXMESH_TLS_CA": str(directory / "ca.pem"),
            "ONNXMESH_TOKEN_FILE": str(directory / "tokens"),
        }
        with (
            LocalMesh(ports=EPHEMERAL_PORTS, http=False) as plain,
            LocalMesh(ports=EPHEMERAL_PORTS, tls=directory) as mtls,
        ):
            meshes = {"plain": (plain, plain_env), "mtls": (mtls, tls_env)}
            for i in range(rounds):
                order = ["plain", "mtls"] if i % 2 == 0 else ["mtls", "plain"]
                for name in order:
                    mesh, env = meshes[name]
                    one = loadgen(mesh.address("orchestrator"), 1, duration, env)
                    figures[name]["p50_c1"].append(float(one["latency_ms"]["p50"]))
                for name in order:
                    mesh, env = meshes[name]
                    figures[name]["rps_c32"].append(
                        float(loadgen(mesh.address("orchestrator"), 32, duration, env)["rps"])
                    )
    return figures


def report(figures: Mapping[str, Mapping[str, Sequence[float]]]) -> dict[str, float]:
    med = {m: {k: statistics.median(v) for k, v in f.items()} for m, f in figures.items()}
    return {
        "plain_p50_c1_ms": med["plain"]["p50_c1"],
        "mtls_p50_c1_ms": med["mtls"]["p50_c1"],
        "p50_c1_ratio": med["mtls"]["p50_c1"] / med["plain"]["p50_c1"],
        "per_hop_ms": (med["mtls"]["p50_c1"] - med["plain"]["p50_c1"]) / HOPS,
        "plain_rps_c32": med["plain"]["rps_c32"],
        "mtls_rps_c32": med["mtls"]["rps_c32"],
        "rps_c32_ratio": med["mtls"]["rps_c32"] / med["plain"]["rps_c32"],
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.probes.tls", description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds (default: 3)")
    parser.add_argument("--duration", type=float, default=4.0, help="measured seconds per run (default: 4)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures as JSON here")
    args = parser.parse_args(argv)
    figures = measure(args.rounds, args.duration)
    summary = report(figures)
    print(
        f"{GRAPH} ({HOPS} hops), median of {args.rounds} rounds:\n"
        f"  c=1 p50   plaintext {summary['plain_p50_c1_ms']:.2f} ms, mTLS {summary['mtls_p50_c1_ms']:.2f} ms "
        f"(x{summary['p50_c1_ratio']:.2f}; {summary['per_hop_ms'] * 1000:+.0f} us per hop)\n"
        f"  c=32 rps  plaintext {summary['plain_rps_c32']:.0f}, mTLS {summary['mtls_rps_c32']:.0f} "
        f"(x{summary['rps_c32_ratio']:.2f})"
    )
    if args.json is not None:
        args.json.write_text(json.dumps({"runs": figures, "summary": summary}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
