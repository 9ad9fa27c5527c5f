"""`python -m meshctl.perf_data`: a mesh's sample rows as Triton perf_analyzer's `--input-data` JSON.

perf_analyzer sends random bytes by default, which a model may rightly refuse (the demo's
preprocessor refuses a pixel above 16); this writes the rows the mesh's client file offers
(meshctl/client.py) instead, one request of one row per entry:

    python -m meshctl.perf_data --count 32 > rows.json          # the demo mesh's
    perf_analyzer -m GRAPH -u 127.0.0.1:8001 -i grpc --shape NAME:1,... --input-data rows.json
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from meshctl.client import ClientError, mesh_samples
from meshctl.launcher import demo_mesh
from meshctl.mesh import Mesh, MeshFileError, load_mesh


def perf_analyzer_data(count: int, mesh: Mesh | None = None) -> dict[str, Any]:
    """`{"data": [{input: {"content": [values], "shape": [1, ...]}, ...}, ...]}`, one row per step."""
    samples = mesh_samples(mesh or demo_mesh())
    rows = [i % len(samples) for i in range(count)]
    return {
        "data": [
            {
                name: {"content": array[row].reshape(-1).tolist(), "shape": [1, *array.shape[1:]]}
                for name, array in samples.inputs.items()
            }
            for row in rows
        ]
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m meshctl.perf_data", description=__doc__.split("\n")[0])
    parser.add_argument("--count", type=int, default=32, help="rows (default: %(default)s)")
    parser.add_argument("--mesh", type=Path, default=None, help="the mesh file (default: the demo's)")
    args = parser.parse_args(argv)
    if args.count < 1:
        parser.error("--count must be at least 1")
    try:
        data = perf_analyzer_data(args.count, load_mesh(args.mesh) if args.mesh else None)
    except (MeshFileError, ClientError) as exc:
        print(f"meshctl.perf_data: {exc}", file=sys.stderr)
        return 1
    json.dump(data, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
