"""The command line of the rollout commands: ``onnxmesh rollout ...`` and ``python -m meshctl.rollout``.

The ``onnxmesh`` CLI hands everything after ``rollout`` to ``main`` (it imports this package only
for that command); ``run_rollout`` runs parsed arguments against a cluster, a fake one in tests.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

from meshctl.rollout.cluster import Clock, ClusterApi, KubernetesClusterApi, SystemClock
from meshctl.rollout.commands import cmd_abort, cmd_canary, cmd_promote, cmd_set_image, cmd_status
from meshctl.rollout.errors import EXIT_FAILURE, ClusterApiError, RolloutError, UsageError
from meshctl.rollout.graphs import (
    DEFAULT_CONFIGMAP,
    DEFAULT_GRAPHS_KEY,
    DEFAULT_ORCHESTRATOR,
    RolloutSettings,
)
from meshctl.rollout.progressive import (
    DEFAULT_STEPS,
    ConfigMapWeights,
    Gates,
    SpecFile,
    WeightStore,
    run_progressive,
    scrape,
)

DEFAULT_NAMESPACE = "onnxmesh"
DEFAULT_TIMEOUT = 300.0
DESCRIPTION = "Roll out one model at a time and move canary traffic on Kubernetes."


def _add_subcommands(parser: argparse.ArgumentParser) -> None:
    common = argparse.ArgumentParser(add_help=False)
    where = common.add_argument_group("cluster")
    where.add_argument(
        "-n", "--namespace", default=DEFAULT_NAMESPACE, help="namespace of the mesh (default: %(default)s)"
    )
    where.add_argument(
        "--kubeconfig", default=None, help="kubeconfig file (default: $KUBECONFIG, else ~/.kube/config)"
    )
    where.add_argument("--context", default=None, help="kubeconfig context (default: the current one)")
    where.add_argument(
        "--configmap", default=DEFAULT_CONFIGMAP, help="graph spec ConfigMap (default: %(default)s)"
    )
    where.add_argument("--graphs-key", default=DEFAULT_GRAPHS_KEY, help="its data key (default: %(default)s)")
    where.add_argument(
        "--orchestrator", default=DEFAULT_ORCHESTRATOR, help="orchestrator Deployment (default: %(default)s)"
    )

    sub = parser.add_subparsers(dest="rollout_command", required=True, metavar="SUBCOMMAND")
    status = sub.add_parser(
        "status", parents=[common], help="Deployments, versions, graphs and splitter weights"
    )
    status.add_argument("-o", "--output", choices=("text", "json"), default="text")

    set_image = sub.add_parser(
        "set-image", parents=[common], help="roll one component to a new image (model version) and wait"
    )
    set_image.add_argument("component", metavar="COMPONENT", help="Deployment name (a service of the mesh)")
    set_image.add_argument("image", metavar="IMAGE", help="image with a tag, e.g. REGISTRY/NAME:0.2.0")
    set_image.add_argument("--container", default=None, help="container to update (default: the service's)")
    set_image.add_argument(
        "--timeout",
        type=_positive_float,
        default=DEFAULT_TIMEOUT,
        help="seconds to wait (default: %(default)s)",
    )

    canary = sub.add_parser("canary", parents=[common], help="set the branch weights of a splitter step")
    canary.add_argument("graph", metavar="GRAPH")
    canary.add_argument("step", metavar="STEP")
    canary.add_argument(
        "--weights",
        required=True,
        help="BRANCH=WEIGHT,...; 'stable' is the first branch and 'canary' the second of two",
    )

    promote = sub.add_parser("promote", parents=[common], help="send 100%% of a splitter step to its canary")
    promote.add_argument("graph", metavar="GRAPH")
    promote.add_argument("step", metavar="STEP")
    promote.add_argument("--branch", default=None, help="the branch to promote (needed with 3+ branches)")

    abort = sub.add_parser("abort", parents=[common], help="send 100%% of a splitter step back to stable")
    abort.add_argument("graph", metavar="GRAPH")
    abort.add_argument("step", metavar="STEP")

    gates = Gates()
    progressive = sub.add_parser(
        "progressive",
        parents=[common],
        help="move a splitter's canary through weights, gated on errors, p99 and agreement; promote or abort",
    )
    progressive.add_argument("graph", metavar="GRAPH")
    progressive.add_argument("step", metavar="STEP")
    progressive.add_argument(
        "--spec",
        type=Path,
        default=None,
        help="the local mesh's spec file (default: the cluster's ConfigMap)",
    )
    progressive.add_argument(
        "--metrics",
        action="append",
        required=True,
        help="an orchestrator's /metrics URL (repeat for each replica), e.g. http://127.0.0.1:9101/metrics",
    )
    progressive.add_argument(
        "--steps", type=_steps, default=DEFAULT_STEPS, help="canary weights before 100%% (default: 5,25,50)"
    )
    progressive.add_argument(
        "--window", type=_positive_float, default=60.0, help="seconds per step (default: 60)"
    )
    progressive.add_argument(
        "--max-wait",
        type=_positive_float,
        default=600.0,
        help="longest wait for --min-requests (default: 600)",
    )
    progressive.add_argument(
        "--min-requests", type=int, default=gates.min_requests, help="per branch and step"
    )
    progressive.add_argument("--max-error-increase", type=float, default=gates.max_error_increase)
    progressive.add_argument("--max-p99-ratio", type=float, default=gates.max_p99_ratio)
    progressive.add_argument("--min-agreement", type=float, default=gates.min_agreement)
    progressive.add_argument(
        "--mirror", default=None, help="GRAPH/STEP of a mirror shadowing stable with the canary"
    )


def _steps(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected weights such as 5,25,50, got {text!r}") from None


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError("must be > 0")
    return value


def run_rollout(
    args: argparse.Namespace,
    *,
    api: ClusterApi | None = None,
    clock: Clock | None = None,
    out: TextIO | None = None,
    err: TextIO | None = None,
) -> int:
    """Run a parsed ``rollout`` command; returns the exit code (0 ok, 1 failure, 2 usage).

    ``api`` and ``clock`` default to the cluster of the current kubeconfig context and the
    system clock; tests pass fakes.
    """
    out = out if out is not None else sys.stdout
    err = err if err is not None else sys.stderr
    settings = RolloutSettings(args.configmap, args.graphs_key, args.orchestrator)
    try:
        command = args.rollout_command
        if command == "progressive" and args.spec is not None:
            return _progressive(args, SpecFile(args.spec, args.graph, args.step), out)
        cluster = (
            api if api is not None else KubernetesClusterApi(args.namespace, args.context, args.kubeconfig)
        )
        if command == "status":
            return cmd_status(cluster, settings, args.output, out)
        if command == "set-image":
            return cmd_set_image(
                cluster,
                settings,
                args.component,
                args.image,
                container=args.container,
                timeout=args.timeout,
                clock=clock if clock is not None else SystemClock(),
                out=out,
                err=err,
            )
        if command == "canary":
            return cmd_canary(cluster, settings, args.graph, args.step, args.weights, out)
        if command == "promote":
            return cmd_promote(cluster, settings, args.graph, args.step, args.branch, out)
        if command == "abort":
            return cmd_abort(cluster, settings, args.graph, args.step, out)
        if command == "progressive":
            return _progressive(args, ConfigMapWeights(cluster, settings, args.graph, args.step), out)
        raise UsageError(f"unknown rollout command {command!r}")
    except RolloutError as exc:
        print(f"error: {exc}", file=err)
        return exc.exit_code
    except ClusterApiError as exc:
        print(f"error: {exc}", file=err)
        return EXIT_FAILURE


def _progressive(args: argparse.Namespace, weights: WeightStore, out: TextIO) -> int:
    gates = Gates(args.max_error_increase, args.max_p99_ratio, args.min_agreement, args.min_requests)
    try:
        return run_progressive(
            weights,
            lambda: scrape(args.metrics),
            args.graph,
            args.step,
            steps=args.steps,
            window=args.window,
            max_wait=args.max_wait,
            gates=gates,
            mirror=args.mirror,
            out=out,
        )
    except KeyboardInterrupt:
        print(
            f"{args.graph}/{args.step}: interrupted; the weights stay as they are. Run the same command "
            f"again to resume, or `rollout abort {args.graph} {args.step}`.",
            file=out,
        )
        return 130


def build_parser(prog: str = "python -m meshctl.rollout") -> argparse.ArgumentParser:
    """The parser of the rollout subcommands."""
    parser = argparse.ArgumentParser(prog=prog, description=DESCRIPTION)
    _add_subcommands(parser)
    return parser


def main(argv: Sequence[str] | None = None, *, prog: str = "python -m meshctl.rollout") -> int:
    """Parse ``argv`` (a rollout subcommand and its arguments) and run it; returns the exit code."""
    return run_rollout(build_parser(prog).parse_args(argv))
