"""`python -m meshctl.perf_data`: real held-out digits as Triton perf_analyzer's `--input-data` JSON.

perf_analyzer sends random bytes by default, and a pixel above 16 is rightly refused; this
writes images it can send instead:

    python -m meshctl.perf_data --count 32 > digits.json
    perf_analyzer -m digits-serial -u 127.0.0.1:8001 -i grpc --shape image:1,8,8 --input-data digits.json
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

from demo.digits import load_holdout


def perf_analyzer_data(count: int, input_name: str = "image") -> dict[str, Any]:
    """`{"data": [{input: {"content": [64 pixels], "shape": [1, 8, 8]}}, ...]}`, one image per step."""
    images = load_holdout().images
    rows = [images[i % len(images)] for i in range(count)]
    return {
        "data": [
            {input_name: {"content": row.reshape(-1).tolist(), "shape": [1, *row.shape]}} for row in rows
        ]
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m meshctl.perf_data", description=__doc__.split("\n")[0])
    parser.add_argument("--count", type=int, default=32, help="images (default: %(default)s)")
    parser.add_argument("--input", default="image", help="the graph's input name (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.count < 1:
        parser.error("--count must be at least 1")
    json.dump(perf_analyzer_data(args.count, args.input), sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
