"""The command line of the rollout commands: ``onnxmesh rollout ...`` and ``python -m meshctl.rollout``.

The ``onnxmesh`` CLI hands everything after ``rollout`` to ``main`` (it imports this package only
for that command); ``run_rollout`` runs parsed arguments against a cluster, a fake one in tests.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
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
        cluster = (
            api if api is not None else KubernetesClusterApi(args.namespace, args.context, args.kubeconfig)
        )
        command = args.rollout_command
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
        raise UsageError(f"unknown rollout command {command!r}")
    except RolloutError as exc:
        print(f"error: {exc}", file=err)
        return exc.exit_code
    except ClusterApiError as exc:
        print(f"error: {exc}", file=err)
        return EXIT_FAILURE


def build_parser(prog: str = "python -m meshctl.rollout") -> argparse.ArgumentParser:
    """The parser of the rollout subcommands."""
    parser = argparse.ArgumentParser(prog=prog, description=DESCRIPTION)
    _add_subcommands(parser)
    return parser


def main(argv: Sequence[str] | None = None, *, prog: str = "python -m meshctl.rollout") -> int:
    """Parse ``argv`` (a rollout subcommand and its arguments) and run it; returns the exit code."""
    return run_rollout(build_parser(prog).parse_args(argv))
