"""`python -m bench` (`make bench`): the mesh against two all-in-one servers and the no-network floor.

Writes <out>/report.md, report.json and latency_throughput.png (and, with --profile, the
orchestrator's py-spy flame graph and stacks). See bench/suite.py for what runs, in what order.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from bench.report import write as report
from bench.runner import Timing
from bench.suite import GRAPHS, PROFILE_SECONDS, Options, Suite
from bench.targets import growth
from bench.targets.in_process import GRAPHS as FLOOR_GRAPHS
from bench.targets.large_model import DEFAULT_EPOCHS, DEFAULT_HIDDEN

DEFAULT_OUT = Path(__file__).resolve().parent / "out"
DEFAULT_TIMING = Timing(warmup=2.0, duration=4.0)
QUICK_TIMING = Timing(warmup=0.5, duration=1.5)


def _ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got '{text}'") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got '{text}'")
    return values


def _graphs(text: str) -> tuple[str, ...]:
    names = tuple(v.strip() for v in text.split(",") if v.strip())
    known = [g for g in FLOOR_GRAPHS if g != "digits-mlp"]
    unknown = [n for n in names if n not in known]
    if not names or unknown:
        raise argparse.ArgumentTypeError(f"graphs must be among {', '.join(known)}, got '{text}'")
    return names


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"short points ({QUICK_TIMING.warmup:g} s warm-up + {QUICK_TIMING.duration:g} s) unless "
        "--warmup/--duration say otherwise",
    )
    parser.add_argument(
        "--duration",
        type=float,
        default=None,
        help=f"measured seconds per point (default: {DEFAULT_TIMING.duration:g})",
    )
    parser.add_argument(
        "--warmup",
        type=float,
        default=None,
        help=f"unmeasured seconds before each point (default: {DEFAULT_TIMING.warmup:g})",
    )
    parser.add_argument(
        "--concurrency", type=_ints, default=(1, 8, 32), help="closed-loop concurrencies (default: 1,8,32)"
    )
    parser.add_argument(
        "--graphs", type=_graphs, default=GRAPHS, help=f"graphs (default: {','.join(GRAPHS)})"
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output directory (default: bench/out)")
    parser.add_argument(
        "--profile", action="store_true", help="py-spy the orchestrator during an extra point"
    )
    parser.add_argument(
        "--profile-seconds", type=float, default=PROFILE_SECONDS, help="length of each py-spy recording"
    )
    parser.add_argument(
        "--skip-large", action="store_true", help="leave out the large-model and batching rows"
    )
    parser.add_argument(
        "--growth-steps",
        type=int,
        default=growth.DEFAULT_MAX_STEPS,
        help="longest chain and widest fan-out of the cost-growth rows (0 = leave them out; default: "
        f"{growth.DEFAULT_MAX_STEPS})",
    )
    parser.add_argument(
        "--large-hidden",
        type=_ints,
        default=DEFAULT_HIDDEN,
        help=f"hidden layers of the large MLP, the last 32 wide (default: {','.join(map(str, DEFAULT_HIDDEN))})",
    )
    parser.add_argument(
        "--large-epochs", type=int, default=DEFAULT_EPOCHS, help="training epochs of the large MLP"
    )
    return parser


def options_from_args(args: argparse.Namespace, argv: Sequence[str]) -> Options:
    base = QUICK_TIMING if args.quick else DEFAULT_TIMING
    timing = Timing(
        warmup=base.warmup if args.warmup is None else args.warmup,
        duration=base.duration if args.duration is None else args.duration,
    )
    if timing.duration <= 0 or timing.warmup < 0:
        raise ValueError("--duration must be > 0 and --warmup >= 0")
    if args.growth_steps < 0:
        raise ValueError("--growth-steps must be >= 0")
    return Options(
        timing=timing,
        concurrency=tuple(sorted(set(args.concurrency))),
        graphs=args.graphs,
        out=args.out,
        profile=args.profile,
        skip_large=args.skip_large,
        large_hidden=args.large_hidden,
        large_epochs=args.large_epochs,
        profile_seconds=args.profile_seconds,
        growth_steps=args.growth_steps,
        command=shlex.join([sys.executable, "-m", "bench", *argv]),
    )


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    try:
        options = options_from_args(args, argv)
    except ValueError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 2
    started = time.perf_counter()
    data = Suite(options).run()
    paths = report.write(data, options.out)
    print("\n".join(report.console_summary(data)))
    print(
        f"bench: wrote {', '.join(str(p) for p in paths.values())} in {time.perf_counter() - started:.0f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
