"""`onnxmesh rollout`: roll out one model at a time and move canary traffic on Kubernetes.

Every node of the mesh is its own Deployment and each model service's image carries its model,
so a new model version is a new image tag of one Deployment; canary and shadow traffic are steps
of the graph spec that the orchestrator reads from the ConfigMap ``onnxmesh-graphs``. This
module drives both through the Kubernetes API, on the current kubeconfig context:

===========================================  ===============================================
``status``                                   each Deployment's image, model version, replicas
                                             and rollout condition; which graphs use which
                                             service; splitter weights and mirrors
``set-image COMPONENT IMAGE [--timeout S]``  patch one Deployment's image and version labels,
                                             then wait until the rollout completes
``canary GRAPH STEP --weights a=90,b=10``    set the branch weights of one splitter step
``promote GRAPH STEP [--branch B]``          send 100 % of the step to the canary branch
``abort GRAPH STEP``                         send 100 % back to the stable (first) branch
===========================================  ===============================================

Exit codes: 0 success, 1 failure (a rollout that does not become ready, an API error), 2 usage
(a bad argument, an unknown graph, step, branch or Deployment).

Wiring into a CLI: ``add_rollout_parser(subparsers)`` adds the ``rollout`` command (its
``func`` default is ``run_rollout``), and ``run_rollout(args)`` runs it.
``python -m meshctl.rollout ...`` runs the same subcommands standalone.

The Kubernetes API is reached only through the ``ClusterApi`` seam (``KubernetesClusterApi`` is
the real one) and time only through ``Clock``, so tests drive everything with fakes.

Errors::

    RolloutError            a command failed: exit 1
     └── UsageError          the user asked for something that does not exist or is invalid: exit 2
    ClusterApiError         the API answered an error (or could not be reached): exit 1
     ├── NotFoundError       404
     └── ConflictError       409: the object changed since it was read (resourceVersion)
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol, TextIO

import yaml

from services.common.topology import address_variable, kubernetes_name, service_of_address_variable

#: A Kubernetes object as the API returns it in JSON (camelCase keys), e.g. a Deployment.
Obj = dict[str, Any]

DEFAULT_NAMESPACE = "onnxmesh"
DEFAULT_CONFIGMAP = "onnxmesh-graphs"
DEFAULT_GRAPHS_KEY = "graphs.yaml"
DEFAULT_ORCHESTRATOR = "orchestrator"
DEFAULT_TIMEOUT = 300.0
DEFAULT_POLL_INTERVAL = 2.0

PART_OF_SELECTOR = "app.kubernetes.io/part-of=onnxmesh"
NAME_LABEL = "app.kubernetes.io/name"
VERSION_LABEL = "app.kubernetes.io/version"
MODEL_VERSION_LABEL = "onnxmesh.io/model-version"
CHANGE_CAUSE = "kubernetes.io/change-cause"

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2

# Label values: at most 63 characters, alphanumerics with - _ . inside (what a tag must fit).
_LABEL_VALUE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9_.-]{0,61}[A-Za-z0-9])?$")
# How many not-ready pods a failure message details; the rest are counted.
_MAX_PODS_REPORTED = 5


# --------------------------------------------------------------------------------------------
# Errors


class RolloutError(Exception):
    """A rollout command failed; the message says what happened and what to do (exit 1)."""

    exit_code = EXIT_FAILURE


class UsageError(RolloutError):
    """A bad argument or a name that does not exist in the cluster or the spec (exit 2)."""

    exit_code = EXIT_USAGE


class ClusterApiError(Exception):
    """The Kubernetes API answered with an error or could not be reached."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class NotFoundError(ClusterApiError):
    """The object does not exist (HTTP 404)."""


class ConflictError(ClusterApiError):
    """The object changed since it was read: its resourceVersion is stale (HTTP 409)."""


# --------------------------------------------------------------------------------------------
# Seams: the cluster and the clock


class ClusterApi(Protocol):
    """The few Kubernetes API calls the rollout commands need, in one namespace.

    Objects go in and out as plain JSON dictionaries (camelCase, as ``kubectl get -o json``
    prints them), so a fake needs nothing from the kubernetes package.
    """

    namespace: str

    def list_deployments(self, label_selector: str) -> list[Obj]:
        """Deployments matching a label selector (``a=b,c=d``)."""
        ...

    def read_deployment(self, name: str) -> Obj:
        """One Deployment, with its status. Raises NotFoundError."""
        ...

    def patch_deployment(self, name: str, patch: Obj) -> Obj:
        """Apply a strategic merge patch; returns the patched Deployment. Raises NotFoundError."""
        ...

    def list_pods(self, label_selector: str) -> list[Obj]:
        """Pods matching a label selector."""
        ...

    def list_events(self, object_name: str) -> list[Obj]:
        """Events about the object of that name (e.g. a pod's probe failures), oldest first."""
        ...

    def read_config_map(self, name: str) -> Obj:
        """One ConfigMap, with metadata.resourceVersion. Raises NotFoundError."""
        ...

    def replace_config_map(self, name: str, body: Obj) -> Obj:
        """Replace a ConfigMap. Raises ConflictError if body's resourceVersion is stale."""
        ...


class Clock(Protocol):
    """Time for the wait loop: tests pass a fake that advances on sleep."""

    def monotonic(self) -> float:
        """Seconds on a clock that never goes back."""
        ...

    def sleep(self, seconds: float) -> None:
        """Block for that long."""
        ...


class SystemClock:
    """The real clock."""

    def monotonic(self) -> float:
        return time.monotonic()

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)


class KubernetesClusterApi:
    """``ClusterApi`` over the official kubernetes client.

    Uses the kubeconfig's current context (or ``context``), and the in-cluster service account
    when there is no kubeconfig. Responses are read as raw JSON rather than client models, so
    callers see exactly what the API sent, in the same shape as ``kubectl -o json``.
    """

    def __init__(self, namespace: str, context: str | None = None) -> None:
        # Imported here: `onnxmesh` commands that never touch a cluster should not pay for it.
        from kubernetes import client, config

        # The kubernetes package ships py.typed but leaves its config loaders unannotated.
        try:
            api_client = config.new_client_from_config(context=context)  # type: ignore[no-untyped-call]
        except (config.ConfigException, OSError) as exc:
            if context is not None:
                raise ClusterApiError(f"cannot load kubeconfig context {context!r}: {exc}") from exc
            # No kubeconfig: inside a pod, use its service account.
            try:
                config.load_incluster_config()  # type: ignore[no-untyped-call]
            except config.ConfigException:
                raise ClusterApiError(f"cannot load a kubeconfig: {exc}") from exc
            api_client = client.ApiClient()
        self.namespace = namespace
        self._apps = client.AppsV1Api(api_client)
        self._core = client.CoreV1Api(api_client)

    def _call(self, what: str, method: Callable[..., Any], *args: Any, **kwargs: Any) -> Obj:
        from kubernetes.client.exceptions import ApiException
        from urllib3.exceptions import HTTPError

        try:
            response = method(*args, _preload_content=False, **kwargs)
        except ApiException as exc:
            message = _api_error_message(exc.body) or str(exc.reason)
            error = f"{what}: {message} (HTTP {exc.status})"
            if exc.status == 404:
                raise NotFoundError(error, exc.status) from exc
            if exc.status == 409:
                raise ConflictError(error, exc.status) from exc
            raise ClusterApiError(error, exc.status) from exc
        except (HTTPError, OSError) as exc:
            raise ClusterApiError(f"{what}: cannot reach the Kubernetes API: {exc}") from exc
        data: Obj = json.loads(response.data)
        return data

    def list_deployments(self, label_selector: str) -> list[Obj]:
        found = self._call(
            "list deployments",
            self._apps.list_namespaced_deployment,
            self.namespace,
            label_selector=label_selector,
        )
        return list(found.get("items") or [])

    def read_deployment(self, name: str) -> Obj:
        return self._call(
            f"read deployment {name}", self._apps.read_namespaced_deployment, name, self.namespace
        )

    def patch_deployment(self, name: str, patch: Obj) -> Obj:
        # The client would pick JSON Patch for a dict body; we send a strategic merge patch,
        # which merges containers by name (what `kubectl set image` does).
        return self._call(
            f"patch deployment {name}",
            self._apps.patch_namespaced_deployment,
            name,
            self.namespace,
            patch,
            _content_type="application/strategic-merge-patch+json",
        )

    def list_pods(self, label_selector: str) -> list[Obj]:
        found = self._call(
            "list pods", self._core.list_namespaced_pod, self.namespace, label_selector=label_selector
        )
        return list(found.get("items") or [])

    def list_events(self, object_name: str) -> list[Obj]:
        found = self._call(
            f"list events of {object_name}",
            self._core.list_namespaced_event,
            self.namespace,
            field_selector=f"involvedObject.name={object_name}",
        )
        return sorted(found.get("items") or [], key=_event_time)

    def read_config_map(self, name: str) -> Obj:
        return self._call(
            f"read configmap {name}", self._core.read_namespaced_config_map, name, self.namespace
        )

    def replace_config_map(self, name: str, body: Obj) -> Obj:
        return self._call(
            f"replace configmap {name}",
            self._core.replace_namespaced_config_map,
            name,
            self.namespace,
            body,
            _content_type="application/json",
        )


def _api_error_message(body: object) -> str | None:
    """The `message` of a Kubernetes Status error body, if the body is one."""
    if not isinstance(body, str | bytes):
        return None
    try:
        status = json.loads(body)
    except ValueError:
        return None
    message = status.get("message") if isinstance(status, dict) else None
    return message if isinstance(message, str) else None


def _event_time(event: Obj) -> str:
    # RFC 3339 timestamps in UTC sort as strings.
    return str(event.get("lastTimestamp") or event.get("eventTime") or "")


# --------------------------------------------------------------------------------------------
# Images and Deployments


def image_tag(image: str) -> str:
    """The tag of an image reference (``registry:5000/onnxmesh/model-a:0.2.0`` -> ``0.2.0``).

    Raises UsageError when there is none: with the model in the image, the tag names the model
    version, and an implicit ``latest`` would make the version label meaningless.
    """
    name = image.split("@", 1)[0]
    last = name.rsplit("/", 1)[-1]
    if ":" not in last:
        raise UsageError(f"image {image!r} has no tag; give one (e.g. {name}:0.2.0): it names the version")
    tag = last.rsplit(":", 1)[1]
    if not _LABEL_VALUE.match(tag):
        raise UsageError(
            f"image tag {tag!r} cannot be a label value (at most 63 characters: letters, digits, "
            "'-', '_', '.'; starting and ending with a letter or digit)"
        )
    return tag


def image_repository(image: str) -> str:
    """An image reference without its tag and digest."""
    name = image.split("@", 1)[0]
    head, _, last = name.rpartition("/")
    last = last.split(":", 1)[0]
    return f"{head}/{last}" if head else last


def _containers(deployment: Obj) -> list[Obj]:
    return list(deployment.get("spec", {}).get("template", {}).get("spec", {}).get("containers") or [])


def main_container(deployment: Obj, wanted: str | None = None) -> Obj:
    """The container that serves: ``wanted``, else the one named like the Deployment or its app."""
    containers = _containers(deployment)
    name = deployment["metadata"]["name"]
    if wanted is not None:
        candidates = [c for c in containers if c.get("name") == wanted]
    else:
        app = deployment["metadata"].get("labels", {}).get(NAME_LABEL)
        candidates = [c for c in containers if c.get("name") in (name, app)] or (
            containers if len(containers) == 1 else []
        )
    if len(candidates) != 1:
        names = ", ".join(str(c.get("name")) for c in containers)
        raise UsageError(f"deployment {name}: pick a container with --container (it has: {names})")
    return candidates[0]


def label_selector(deployment: Obj) -> str:
    """The Deployment's pod selector as a label selector string (matchLabels only)."""
    selector = deployment.get("spec", {}).get("selector", {})
    match = selector.get("matchLabels") or {}
    return ",".join(f"{k}={v}" for k, v in sorted(match.items()))


@dataclass(frozen=True)
class RolloutState:
    """Where a Deployment's rollout stands: finished, still going, or failed (and why)."""

    done: bool
    failed: bool
    message: str


def rollout_state(deployment: Obj, generation: int | None = None) -> RolloutState:
    """Judge a Deployment's rollout the way ``kubectl rollout status`` does, plus readiness.

    Done means the controller has seen the latest spec (observedGeneration >= ``generation``,
    by default metadata.generation) and every desired replica is updated, ready and available,
    with no old replica left.
    """
    spec = deployment.get("spec", {})
    status = deployment.get("status") or {}
    want_generation = generation if generation is not None else deployment["metadata"].get("generation", 0)
    desired = int(spec.get("replicas", 1))
    # The API leaves out zero counts.
    total = int(status.get("replicas", 0))
    updated = int(status.get("updatedReplicas", 0))
    ready = int(status.get("readyReplicas", 0))
    available = int(status.get("availableReplicas", 0))
    if spec.get("paused"):
        return RolloutState(False, True, "the rollout is paused (kubectl rollout resume to continue)")
    if int(status.get("observedGeneration", 0)) < want_generation:
        return RolloutState(False, False, "waiting for the controller to see the new spec")
    for condition in status.get("conditions") or []:
        if condition.get("type") == "Progressing" and condition.get("reason") == "ProgressDeadlineExceeded":
            return RolloutState(False, True, f"progress deadline exceeded: {condition.get('message', '')}")
    if updated < desired:
        return RolloutState(False, False, f"{updated} of {desired} replicas updated")
    if total > updated:
        return RolloutState(False, False, f"{total - updated} old replica(s) still running")
    if ready < desired:
        return RolloutState(False, False, f"{ready} of {desired} updated replicas ready")
    if available < desired:
        return RolloutState(False, False, f"{available} of {desired} updated replicas available")
    return RolloutState(True, False, "complete")


def _pod_ready(pod: Obj) -> bool:
    conditions = pod.get("status", {}).get("conditions") or []
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)


def describe_pod_problem(pod: Obj, events: Sequence[Obj]) -> str:
    """Why a pod is not ready, from what the API says: container states, conditions, events."""
    status = pod.get("status", {})
    reasons: list[str] = []
    for cs in status.get("containerStatuses") or []:
        state = cs.get("state", {})
        waiting = state.get("waiting")
        if waiting:
            reasons.append(
                _join(f"{cs.get('name')} waiting: {waiting.get('reason', '')}", waiting.get("message"))
            )
        terminated = (cs.get("lastState") or {}).get("terminated")
        if terminated and cs.get("restartCount", 0):
            reasons.append(
                f"{cs.get('name')} restarted {cs['restartCount']}x, last exit "
                f"{terminated.get('exitCode')} ({terminated.get('reason', '')})"
            )
    for condition in status.get("conditions") or []:
        if condition.get("status") == "False" and condition.get("type") in ("PodScheduled", "Ready"):
            text = condition.get("message") or condition.get("reason")
            if text and not (condition.get("type") == "Ready" and reasons):
                reasons.append(f"{condition['type']}=False: {text}")
    warnings = [e for e in events if e.get("type") == "Warning"]
    if warnings:
        last = warnings[-1]
        reasons.append(_join(f"last warning {last.get('reason', '')}", last.get("message")))
    if not reasons:
        reasons.append(f"phase {status.get('phase', 'unknown')}, no reason given yet")
    return "; ".join(reasons)


def _join(head: str, message: object) -> str:
    return f"{head}: {str(message).strip()}" if message else head


# --------------------------------------------------------------------------------------------
# The graph spec: reading, and editing splitter weights in place


@dataclass(frozen=True)
class Branch:
    """One branch of a splitter step: its name, weight and the spec service it calls."""

    name: str
    weight: int
    service: str | None


@dataclass(frozen=True)
class Splitter:
    """A splitter step of a graph."""

    graph: str
    step: str
    branches: tuple[Branch, ...]

    def describe(self, components: Mapping[str, str] | None = None) -> str:
        total = sum(b.weight for b in self.branches)
        parts = []
        for b in self.branches:
            share = f"{100 * b.weight / total:.0f}%" if total else "-"
            target = (components or {}).get(b.service or "", b.service or "?")
            parts.append(f"{b.name}={b.weight} ({share}) -> {target}")
        return f"{self.graph}/{self.step}: " + ", ".join(parts)


def load_spec(text: str) -> dict[str, Any]:
    """Parse the graph spec YAML; raises RolloutError if it is not a mapping with `graphs`."""
    try:
        spec = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise RolloutError(f"the graph spec is not valid YAML: {exc}") from exc
    if not isinstance(spec, dict) or not isinstance(spec.get("graphs"), dict):
        raise RolloutError("the graph spec has no `graphs:` mapping")
    return spec


def _walk(value: Any) -> Iterator[dict[str, Any]]:
    """Every mapping inside a loaded YAML value, depth first (steps nest inside steps)."""
    if isinstance(value, dict):
        yield value
        for child in value.values():
            yield from _walk(child)
    elif isinstance(value, list):
        for child in value:
            yield from _walk(child)


def services_by_graph(spec: Mapping[str, Any]) -> dict[str, set[str]]:
    """For each graph, the spec services any of its steps, branches or shadows call."""
    return {
        graph: {m["service"] for m in _walk(body) if isinstance(m.get("service"), str)}
        for graph, body in spec["graphs"].items()
    }


def splitters(spec: Mapping[str, Any]) -> list[Splitter]:
    """Every splitter step of every graph, with its current weights."""
    found = []
    for graph, body in spec["graphs"].items():
        for step in _walk(body):
            split = step.get("splitter")
            if isinstance(split, dict) and isinstance(split.get("branches"), list):
                branches = tuple(
                    Branch(str(b.get("name")), _weight_or_zero(b.get("weight")), b.get("service"))
                    for b in split["branches"]
                    if isinstance(b, dict)
                )
                found.append(Splitter(graph, str(step.get("name")), branches))
    return found


@dataclass(frozen=True)
class Mirror:
    """A mirror step of a graph: the service that answers and the one that gets a shadow copy."""

    graph: str
    step: str
    primary: str | None
    shadow: str | None

    def describe(self, components: Mapping[str, str] | None = None) -> str:
        def target(service: str | None) -> str:
            return (components or {}).get(service or "", service or "?")

        return f"{self.graph}/{self.step}: {target(self.primary)} answers, {target(self.shadow)} shadows"


def mirrors(spec: Mapping[str, Any]) -> list[Mirror]:
    """Every mirror step of every graph."""
    found = []
    for graph, body in spec["graphs"].items():
        for step in _walk(body):
            mirror = step.get("mirror")
            if isinstance(mirror, dict):
                primary = mirror.get("primary") or {}
                shadow = mirror.get("shadow") or {}
                found.append(
                    Mirror(graph, str(step.get("name")), primary.get("service"), shadow.get("service"))
                )
    return found


def _weight_or_zero(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _node_get(node: yaml.Node, key: str) -> yaml.Node | None:
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            if isinstance(k, yaml.ScalarNode) and k.value == key:
                return v  # type: ignore[no-any-return]
    return None


def _walk_nodes(
    node: yaml.Node, path: tuple[Any, ...] = ()
) -> Iterator[tuple[tuple[Any, ...], yaml.MappingNode]]:
    """Every mapping node with its path of keys and indexes, skipping repeated (aliased) nodes."""
    seen: set[int] = set()
    stack: list[tuple[tuple[Any, ...], yaml.Node]] = [(path, node)]
    while stack:
        at, current = stack.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, yaml.MappingNode):
            yield at, current
            for k, v in reversed(current.value):
                if isinstance(k, yaml.ScalarNode):
                    stack.append(((*at, k.value), v))
        elif isinstance(current, yaml.SequenceNode):
            for i, v in reversed(list(enumerate(current.value))):
                stack.append(((*at, i), v))


@dataclass
class _SplitterNodes:
    """Where a splitter's branches are in the YAML text, for in-place edits."""

    path: tuple[Any, ...]  # of the step mapping, for checking the edit against the loaded spec
    branches: list[yaml.MappingNode] = field(default_factory=list)
    names: list[str] = field(default_factory=list)
    weights: list[int] = field(default_factory=list)
    weight_nodes: list[yaml.ScalarNode | None] = field(default_factory=list)


def _find_splitter(text: str, graph: str, step: str) -> _SplitterNodes:
    spec = load_spec(text)
    if graph not in spec["graphs"]:
        raise UsageError(f"no graph {graph!r} in the spec (graphs: {', '.join(sorted(spec['graphs']))})")
    root = yaml.compose(text, Loader=yaml.SafeLoader)
    graphs_node = _node_get(root, "graphs") if root is not None else None
    graph_node = _node_get(graphs_node, graph) if graphs_node is not None else None
    if graph_node is None:
        raise RolloutError(f"graph {graph!r} is not a plain mapping in the spec; edit it by hand")
    named = [
        (p, n) for p, n in _walk_nodes(graph_node, ("graphs", graph)) if _scalar(_node_get(n, "name")) == step
    ]
    matches = [(p, n) for p, n in named if _node_get(n, "splitter") is not None]
    if not matches:
        if named:
            raise UsageError(f"step {step!r} of graph {graph!r} is not a splitter (no `splitter:`)")
        steps = sorted({str(s.get("name")) for s in _walk(spec["graphs"][graph]) if "name" in s})
        raise UsageError(f"graph {graph!r} has no step {step!r} (names in it: {', '.join(steps)})")
    if len(matches) > 1:
        raise UsageError(f"graph {graph!r} has {len(matches)} splitter steps named {step!r}")
    path, step_node = matches[0]
    splitter_node = _node_get(step_node, "splitter")
    branches_node = _node_get(splitter_node, "branches") if splitter_node is not None else None
    if not isinstance(branches_node, yaml.SequenceNode) or not branches_node.value:
        raise RolloutError(f"splitter {graph}/{step} has no list of branches")
    found = _SplitterNodes(path)
    constructor = yaml.SafeLoader("")  # only its constructor is used, on nodes of `text`
    for i, branch in enumerate(branches_node.value):
        name = _scalar(_node_get(branch, "name"))
        if not isinstance(branch, yaml.MappingNode) or name is None:
            raise RolloutError(f"branch #{i + 1} of splitter {graph}/{step} has no name")
        weight_node = _node_get(branch, "weight")
        weight = constructor.construct_object(weight_node) if weight_node is not None else 0
        if not isinstance(weight_node, yaml.ScalarNode | None) or not _is_weight(weight):
            raise RolloutError(f"branch {name!r} of splitter {graph}/{step} has a bad weight {weight!r}")
        found.branches.append(branch)
        found.names.append(name)
        found.weights.append(int(weight))
        found.weight_nodes.append(weight_node)
    return found


def _scalar(node: yaml.Node | None) -> str | None:
    return str(node.value) if isinstance(node, yaml.ScalarNode) else None


def _is_weight(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def splitter_branches(text: str, graph: str, step: str) -> list[Branch]:
    """The branches of splitter ``step`` in ``graph``; raises UsageError if there is none."""
    found = _find_splitter(text, graph, step)
    services = [_scalar(_node_get(b, "service")) for b in found.branches]
    return [Branch(n, w, s) for n, w, s in zip(found.names, found.weights, services, strict=True)]


def set_splitter_weights(text: str, graph: str, step: str, weights: Mapping[str, int]) -> str:
    """The spec text with the weights of splitter ``step`` in ``graph`` set; nothing else changes.

    The weights are rewritten in place in the text, so comments, ordering and formatting of the
    ConfigMap survive; a branch without a ``weight`` key gets one. Branches not in ``weights``
    keep theirs. The result is parsed again and compared with the intended spec before it is
    returned, so a text edit can never silently change anything else.
    """
    found = _find_splitter(text, graph, step)
    unknown = sorted(set(weights) - set(found.names))
    if unknown:
        raise UsageError(
            f"splitter {graph}/{step} has no branch {', '.join(map(repr, unknown))} "
            f"(branches: {', '.join(found.names)})"
        )
    for name, weight in weights.items():
        if not _is_weight(weight):
            raise UsageError(f"weight of {name!r} must be an integer >= 0, not {weight!r}")
    final = [weights.get(n, w) for n, w in zip(found.names, found.weights, strict=True)]
    if not any(final):
        raise UsageError(f"splitter {graph}/{step} would get no traffic: at least one weight must be > 0")

    edits: list[tuple[int, int, str]] = []
    for branch, name, node in zip(found.branches, found.names, found.weight_nodes, strict=True):
        if name not in weights:
            continue
        value = str(weights[name])
        if node is not None:
            edits.append((node.start_mark.index, node.end_mark.index, value))
        else:
            first_key = branch.value[0][0]
            at = first_key.start_mark.index
            # Put the new key before the first one, in the mapping's own style and indentation.
            insert = (
                f"weight: {value}, "
                if branch.flow_style
                else f"weight: {value}\n{' ' * first_key.start_mark.column}"
            )
            edits.append((at, at, insert))
    new_text = text
    for start, end, value in sorted(edits, reverse=True):
        new_text = new_text[:start] + value + new_text[end:]

    failed = RolloutError(f"editing the weights of {graph}/{step} in place went wrong; nothing was written")
    expected = yaml.safe_load(text)
    try:
        step_obj: Any = expected
        for key in found.path:
            step_obj = step_obj[key]
        for branch_obj in step_obj["splitter"]["branches"]:
            if branch_obj.get("name") in weights:
                branch_obj["weight"] = weights[branch_obj["name"]]
    except (KeyError, IndexError, TypeError):
        # Keys the loader resolves to non-strings (`yes`, `1`) in the path: no safe check possible.
        raise failed from None
    if yaml.safe_load(new_text) != expected:
        raise failed
    return new_text


def parse_weights(text: str) -> dict[str, int]:
    """``a=90,b=10`` -> ``{"a": 90, "b": 10}``; raises UsageError on anything else."""
    weights: dict[str, int] = {}
    for item in text.split(","):
        name, sep, value = item.strip().partition("=")
        name = name.strip()
        if not sep or not name:
            raise UsageError(f"--weights wants BRANCH=WEIGHT[,BRANCH=WEIGHT...], got {text!r}")
        try:
            weight = int(value.strip())
        except ValueError:
            raise UsageError(f"weight of {name!r} must be an integer >= 0, not {value.strip()!r}") from None
        if weight < 0:
            raise UsageError(f"weight of {name!r} must be an integer >= 0, not {weight}")
        if name in weights:
            raise UsageError(f"branch {name!r} is given twice in --weights")
        weights[name] = weight
    return weights


def resolve_branch_names(weights: Mapping[str, int], branches: Sequence[Branch]) -> dict[str, int]:
    """Map ``stable`` / ``canary`` to branch names, when no branch is literally called so.

    ``stable`` is the first branch (where ``abort`` sends traffic); ``canary`` is the other one
    of a two-branch splitter. Real branch names always win.
    """
    names = [b.name for b in branches]
    resolved: dict[str, int] = {}
    for key, weight in weights.items():
        name = key
        if key not in names and key == "stable":
            name = names[0]
        elif key not in names and key == "canary":
            if len(names) != 2:
                raise UsageError(
                    f"'canary' is ambiguous with {len(names)} branches; name one of {', '.join(names)}"
                )
            name = names[1]
        if name in resolved:
            raise UsageError(f"branch {name!r} is given twice in --weights (as {key!r})")
        resolved[name] = weight
    return resolved


# --------------------------------------------------------------------------------------------
# Mapping the spec's services to Deployments


def service_components(spec: Mapping[str, Any] | None, orchestrator: Obj | None) -> dict[str, str]:
    """Spec service name -> the Kubernetes Service (= Deployment) it reaches.

    Read from the orchestrator's ``ONNXMESH_SERVICE_<NAME>_ADDRESS`` environment
    (``dns:///model-a.onnxmesh.svc.cluster.local:8021`` -> ``model-a``); a service without one
    is assumed to be named like the spec service with ``-`` for ``_``.
    """
    addresses: dict[str, str] = {}
    if orchestrator is not None:
        for container in _containers(orchestrator):
            for env in container.get("env") or []:
                variable = str(env.get("name", ""))
                if service_of_address_variable(variable) is not None:
                    addresses[variable] = str(env.get("value", ""))
    names: set[str] = set()
    if spec is not None:
        names.update(spec.get("services") or {})
        for used in services_by_graph(spec).values():
            names |= used
    return {
        name: _address_host(addresses.get(address_variable(name), "")) or kubernetes_name(name)
        for name in names
    }


def _address_host(address: str) -> str | None:
    """The first DNS label of a gRPC target's host (``dns:///model-a.ns.svc:8021`` -> ``model-a``).

    None for IP addresses and unix sockets, which name no Service.
    """
    target = address.strip()
    if target.startswith(("ipv4:", "ipv6:", "unix:", "unix-abstract:", "[")):
        return None
    if "://" in target:
        # dns:///host:port, or dns://resolver/host:port with a resolver authority.
        target = target.split("://", 1)[1].split("/", 1)[-1]
    elif target.startswith("dns:"):
        target = target[len("dns:") :]
    host = target.rsplit(":", 1)[0]
    if not host or all(part.isdigit() for part in host.split(".")):
        return None
    return host.split(".", 1)[0]


# --------------------------------------------------------------------------------------------
# Commands


@dataclass
class RolloutSettings:
    """Where the mesh lives in the cluster."""

    configmap: str = DEFAULT_CONFIGMAP
    graphs_key: str = DEFAULT_GRAPHS_KEY
    orchestrator: str = DEFAULT_ORCHESTRATOR


def read_spec_text(api: ClusterApi, settings: RolloutSettings) -> tuple[Obj, str]:
    """The graph spec ConfigMap and its YAML text."""
    try:
        config_map = api.read_config_map(settings.configmap)
    except NotFoundError:
        raise RolloutError(
            f"no ConfigMap {api.namespace}/{settings.configmap}; is the mesh deployed?"
        ) from None
    text = (config_map.get("data") or {}).get(settings.graphs_key)
    if not isinstance(text, str):
        raise RolloutError(
            f"ConfigMap {api.namespace}/{settings.configmap} has no key {settings.graphs_key!r}"
        )
    return config_map, text


def check_spec(text: str) -> None:
    """Raise RolloutError if the orchestrator would reject ``text``.

    It would keep running the old spec and only log the rejection, so the operator would
    believe the traffic had moved: better to refuse the write.
    """
    try:
        from orchestrator.spec import SpecError, parse_spec
    except ImportError:  # the weights were validated already; the full check is a bonus
        return
    try:
        parse_spec(text)
    except SpecError as exc:
        raise RolloutError(
            f"the orchestrator would reject the edited spec (and keep the old one): {exc}"
        ) from exc


def edit_splitter(
    api: ClusterApi,
    settings: RolloutSettings,
    graph: str,
    step: str,
    choose: Callable[[list[Branch]], dict[str, int]],
    *,
    attempts: int = 5,
) -> tuple[list[Branch], list[Branch]]:
    """Read-modify-write the weights of one splitter in the ConfigMap; returns (before, after).

    ``choose`` turns the current branches into the new weights by branch name. The write is a
    replace carrying the resourceVersion that was read, so a concurrent edit is never lost: on
    a conflict the whole cycle starts again from a fresh read.
    """
    for _ in range(attempts):
        config_map, text = read_spec_text(api, settings)
        before = splitter_branches(text, graph, step)
        new_text = set_splitter_weights(text, graph, step, choose(before))
        after = splitter_branches(new_text, graph, step)
        if new_text == text:
            return before, after
        check_spec(new_text)
        body = copy.deepcopy(config_map)
        body["data"][settings.graphs_key] = new_text
        try:
            api.replace_config_map(settings.configmap, body)
        except ConflictError:
            continue
        return before, after
    raise RolloutError(
        f"ConfigMap {api.namespace}/{settings.configmap} changed on every one of {attempts} attempts; try again"
    )


def _print_weights(
    out: TextIO,
    api: ClusterApi,
    settings: RolloutSettings,
    graph: str,
    step: str,
    before: Sequence[Branch],
    after: Sequence[Branch],
) -> None:
    total = sum(b.weight for b in after)
    for old, new in zip(before, after, strict=True):
        share = 100 * new.weight / total if total else 0
        print(f"  {new.name}: {old.weight} -> {new.weight} ({share:.0f}%)", file=out)
    if [b.weight for b in before] == [b.weight for b in after]:
        print(f"{graph}/{step}: weights unchanged; nothing written.", file=out)
    else:
        print(
            f"{graph}/{step}: ConfigMap {api.namespace}/{settings.configmap} updated. The orchestrators "
            "reload the spec when the kubelet refreshes the mounted file (usually within a minute); "
            "no pod restarts.",
            file=out,
        )


def cmd_canary(
    api: ClusterApi, settings: RolloutSettings, graph: str, step: str, weights_text: str, out: TextIO
) -> int:
    """Set some or all branch weights of one splitter step."""
    wanted = parse_weights(weights_text)
    before, after = edit_splitter(
        api, settings, graph, step, lambda branches: resolve_branch_names(wanted, branches)
    )
    _print_weights(out, api, settings, graph, step, before, after)
    return EXIT_OK


def cmd_promote(
    api: ClusterApi, settings: RolloutSettings, graph: str, step: str, branch: str | None, out: TextIO
) -> int:
    """Send all of a splitter's traffic to its canary branch."""

    def choose(branches: list[Branch]) -> dict[str, int]:
        names = [b.name for b in branches]
        if branch is not None:
            if branch not in names:
                raise UsageError(
                    f"splitter {graph}/{step} has no branch {branch!r} (branches: {', '.join(names)})"
                )
            target = branch
        elif len(names) == 2:
            target = names[1]
        else:
            raise UsageError(f"splitter {graph}/{step} has {len(names)} branches; say which with --branch")
        return {n: 100 if n == target else 0 for n in names}

    before, after = edit_splitter(api, settings, graph, step, choose)
    _print_weights(out, api, settings, graph, step, before, after)
    stable, promoted = after[0], next(b for b in after if b.weight)
    if promoted.name != stable.name:
        _print_promote_hint(api, settings, graph, step, stable, promoted, out)
    return EXIT_OK


def _print_promote_hint(
    api: ClusterApi,
    settings: RolloutSettings,
    graph: str,
    step: str,
    stable: Branch,
    promoted: Branch,
    out: TextIO,
) -> None:
    # To finish, the stable Deployment takes the canary's image and traffic goes back to it;
    # name the exact commands when the cluster tells us the images.
    try:
        spec = load_spec(read_spec_text(api, settings)[1])
        components = service_components(spec, _read_optional(api, settings.orchestrator))
        stable_dep = components.get(stable.service or "")
        canary_dep = components.get(promoted.service or "")
        image = main_container(api.read_deployment(canary_dep))["image"] if canary_dep else None
    except (RolloutError, ClusterApiError, KeyError):
        return
    if stable_dep and image:
        print(
            f"To finish: onnxmesh rollout set-image {stable_dep} {image} && "
            f"onnxmesh rollout abort {graph} {step}",
            file=out,
        )


def cmd_abort(api: ClusterApi, settings: RolloutSettings, graph: str, step: str, out: TextIO) -> int:
    """Send all of a splitter's traffic back to its stable (first) branch."""
    before, after = edit_splitter(
        api,
        settings,
        graph,
        step,
        lambda branches: {b.name: 100 if i == 0 else 0 for i, b in enumerate(branches)},
    )
    _print_weights(out, api, settings, graph, step, before, after)
    return EXIT_OK


def _read_optional(api: ClusterApi, name: str) -> Obj | None:
    try:
        return api.read_deployment(name)
    except ClusterApiError:
        return None


def wait_for_rollout(
    api: ClusterApi,
    name: str,
    *,
    timeout: float,
    clock: Clock,
    poll_interval: float = DEFAULT_POLL_INTERVAL,
    generation: int | None = None,
    on_progress: Callable[[str], None] | None = None,
) -> Obj:
    """Poll Deployment ``name`` until its rollout is done; returns it.

    Raises RolloutError when the rollout fails (paused, progress deadline exceeded) or is not
    done within ``timeout`` seconds; the message names the pods that are not ready and why.
    """
    deadline = clock.monotonic() + timeout
    last = ""
    while True:
        deployment = api.read_deployment(name)
        state = rollout_state(deployment, generation)
        if state.done:
            return deployment
        if state.message != last and on_progress is not None:
            on_progress(state.message)
        last = state.message
        now = clock.monotonic()
        if state.failed or now >= deadline:
            headline = state.message if state.failed else f"not complete after {timeout:g}s: {state.message}"
            raise RolloutError(
                f"deployment {api.namespace}/{name}: {headline}" + _pod_report(api, deployment)
            )
        clock.sleep(min(poll_interval, deadline - now))


def _pod_report(api: ClusterApi, deployment: Obj) -> str:
    """The not-ready pods of a Deployment and why, as lines for an error message."""
    try:
        pods = api.list_pods(label_selector(deployment))
    except ClusterApiError as exc:
        return f"\n  (could not list its pods: {exc})"
    stuck = [p for p in pods if not p["metadata"].get("deletionTimestamp") and not _pod_ready(p)]
    if not stuck:
        return ""
    lines = ["", "Pods not ready:"]
    for pod in stuck[:_MAX_PODS_REPORTED]:
        pod_name = pod["metadata"]["name"]
        try:
            events = api.list_events(pod_name)
        except ClusterApiError:
            events = []
        images = ", ".join(c.get("image", "?") for c in pod.get("spec", {}).get("containers") or [])
        lines.append(f"  {pod_name} ({images}): {describe_pod_problem(pod, events)}")
    if len(stuck) > _MAX_PODS_REPORTED:
        lines.append(f"  ... and {len(stuck) - _MAX_PODS_REPORTED} more")
    return "\n".join(lines)


def cmd_set_image(
    api: ClusterApi,
    settings: RolloutSettings,
    component: str,
    image: str,
    *,
    container: str | None,
    timeout: float,
    clock: Clock,
    out: TextIO,
    err: TextIO,
    poll_interval: float = DEFAULT_POLL_INTERVAL,
) -> int:
    """Roll one Deployment to a new image (a new model version) and wait for it."""
    tag = image_tag(image)
    try:
        deployment = api.read_deployment(component)
    except NotFoundError:
        raise UsageError(f"no deployment {component!r} in namespace {api.namespace}") from None
    target = main_container(deployment, container)
    previous = str(target.get("image", ""))
    if previous and image_repository(previous) != image_repository(image):
        print(f"warning: {component} ran {previous}; {image} is a different repository", file=err)
    patch: Obj = {
        "metadata": {"annotations": {CHANGE_CAUSE: f"onnxmesh rollout set-image {component} {image}"}},
        "spec": {
            "template": {
                "metadata": {"labels": {MODEL_VERSION_LABEL: tag, VERSION_LABEL: tag}},
                "spec": {"containers": [{"name": target["name"], "image": image}]},
            }
        },
    }
    patched = api.patch_deployment(component, patch)
    generation = patched["metadata"].get("generation")
    print(
        f"deployment {api.namespace}/{component}: {previous or '?'} -> {image} (model version {tag})",
        file=out,
    )

    def progress(message: str) -> None:
        print(f"  waiting: {message}", file=out)

    try:
        wait_for_rollout(
            api,
            component,
            timeout=timeout,
            clock=clock,
            poll_interval=poll_interval,
            generation=generation,
            on_progress=progress,
        )
    except RolloutError as exc:
        raise RolloutError(f"{exc}\n{_undo_hint(api, settings, component, previous)}") from None
    print(f"deployment {api.namespace}/{component}: rollout complete", file=out)
    return EXIT_OK


def _undo_hint(api: ClusterApi, settings: RolloutSettings, component: str, previous: str) -> str:
    lines = [
        "The pods of the previous version keep serving (maxUnavailable: 0). To undo:",
        f"  kubectl -n {api.namespace} rollout undo deployment/{component}",
    ]
    if previous:
        lines.append(f"  onnxmesh rollout set-image {component} {previous}")
    # If a splitter sends traffic to this Deployment as a canary, moving traffic back is the
    # fastest way out: name the exact steps.
    try:
        spec = load_spec(read_spec_text(api, settings)[1])
        components = service_components(spec, _read_optional(api, settings.orchestrator))
    except (RolloutError, ClusterApiError):
        return "\n".join(lines)
    for split in splitters(spec):
        if any(components.get(b.service or "") == component for b in split.branches[1:]):
            lines.append(
                f"  onnxmesh rollout abort {split.graph} {split.step}   (traffic back to the stable branch)"
            )
    return "\n".join(lines)


@dataclass
class ComponentStatus:
    """One Deployment as `status` reports it."""

    name: str
    image: str
    model_version: str
    desired: int
    ready: int
    updated: int
    available: int
    rollout: str
    spec_services: list[str]
    graphs: list[str]


@dataclass
class MeshStatus:
    """What `status` reports: the Deployments, the splitters, and what could not be read."""

    namespace: str
    components: list[ComponentStatus]
    splitters: list[Splitter]
    mirrors: list[Mirror]
    #: Spec service name -> Deployment, for naming a splitter's targets.
    service_components: dict[str, str]
    notes: list[str]

    def to_json(self) -> dict[str, Any]:
        return {
            "namespace": self.namespace,
            "components": [asdict(c) for c in self.components],
            "splitters": [asdict(s) for s in self.splitters],
            "mirrors": [asdict(m) for m in self.mirrors],
            "service_components": self.service_components,
            "notes": self.notes,
        }


def collect_status(api: ClusterApi, settings: RolloutSettings) -> MeshStatus:
    """Read every Deployment of the mesh and the graph spec."""
    notes: list[str] = []
    deployments = sorted(api.list_deployments(PART_OF_SELECTOR), key=lambda d: str(d["metadata"]["name"]))
    spec: dict[str, Any] | None = None
    try:
        spec = load_spec(read_spec_text(api, settings)[1])
    except (RolloutError, ClusterApiError) as exc:
        notes.append(f"graph spec unavailable: {exc}")
    orchestrator = next((d for d in deployments if d["metadata"]["name"] == settings.orchestrator), None)
    components = service_components(spec, orchestrator)
    graphs_of = services_by_graph(spec) if spec is not None else {}

    rows = []
    for dep in deployments:
        name = dep["metadata"]["name"]
        try:
            image = str(main_container(dep).get("image", "?"))
        except UsageError:
            image = ", ".join(str(c.get("image")) for c in _containers(dep))
        status = dep.get("status") or {}
        template_labels = dep["spec"]["template"].get("metadata", {}).get("labels", {})
        state = rollout_state(dep)
        services = sorted(s for s, c in components.items() if c == name)
        rows.append(
            ComponentStatus(
                name=name,
                image=image,
                model_version=str(template_labels.get(MODEL_VERSION_LABEL, "-")),
                desired=int(dep["spec"].get("replicas", 1)),
                ready=int(status.get("readyReplicas", 0)),
                updated=int(status.get("updatedReplicas", 0)),
                available=int(status.get("availableReplicas", 0)),
                rollout=("FAILED: " if state.failed else "") + state.message,
                spec_services=services,
                graphs=sorted(g for g, used in graphs_of.items() if used & set(services)),
            )
        )
    return MeshStatus(
        namespace=api.namespace,
        components=rows,
        splitters=splitters(spec) if spec is not None else [],
        mirrors=mirrors(spec) if spec is not None else [],
        service_components=components,
        notes=notes,
    )


def format_status(status: MeshStatus) -> str:
    """The text `status` prints: a table of Deployments, graphs by component, splitters."""
    lines: list[str] = []
    if not status.components:
        lines.append(f"no onnxmesh deployments in namespace {status.namespace} ({PART_OF_SELECTOR})")
    else:
        table = [("COMPONENT", "IMAGE", "MODEL-VERSION", "READY", "UP-TO-DATE", "AVAILABLE", "ROLLOUT")]
        for c in status.components:
            ready = f"{c.ready}/{c.desired}"
            table.append(
                (c.name, c.image, c.model_version, ready, str(c.updated), str(c.available), c.rollout)
            )
        widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
        lines += [
            "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in table
        ]
    used = [c for c in status.components if c.spec_services]
    if used:
        lines += ["", "GRAPHS BY COMPONENT"]
        for c in used:
            lines.append(f"  {c.name} ({', '.join(c.spec_services)}): {', '.join(c.graphs) or '(no graph)'}")
    if status.splitters:
        lines += ["", "SPLITTERS"]
        lines += [f"  {s.describe(status.service_components)}" for s in status.splitters]
    if status.mirrors:
        lines += ["", "MIRRORS"]
        lines += [f"  {m.describe(status.service_components)}" for m in status.mirrors]
    lines += [f"note: {note}" for note in status.notes]
    return "\n".join(lines) + "\n"


def cmd_status(api: ClusterApi, settings: RolloutSettings, output: str, out: TextIO) -> int:
    """Print the mesh's Deployments, which graphs use them, splitter weights and mirrors."""
    status = collect_status(api, settings)
    if output == "json":
        out.write(json.dumps(status.to_json(), indent=2) + "\n")
    else:
        out.write(format_status(status))
    return EXIT_OK


# --------------------------------------------------------------------------------------------
# Command line


def _add_subcommands(parser: argparse.ArgumentParser) -> None:
    common = argparse.ArgumentParser(add_help=False)
    where = common.add_argument_group("cluster")
    where.add_argument(
        "-n", "--namespace", default=DEFAULT_NAMESPACE, help="namespace of the mesh (default: %(default)s)"
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
    set_image.add_argument("component", metavar="COMPONENT", help="Deployment name, e.g. model-a")
    set_image.add_argument("image", metavar="IMAGE", help="image with a tag, e.g. onnxmesh/model-a:0.2.0")
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


def add_rollout_parser(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add the ``rollout`` command (and its subcommands) to a CLI; it runs ``run_rollout``."""
    parser = subparsers.add_parser(
        "rollout",
        help="per-model rollouts and canary weights on Kubernetes",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
    )
    _add_subcommands(parser)
    parser.set_defaults(func=run_rollout)


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
        cluster = api if api is not None else KubernetesClusterApi(args.namespace, args.context)
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
    """A standalone parser with the rollout subcommands at the top level."""
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0] if __doc__ else None)
    _add_subcommands(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m meshctl.rollout SUBCOMMAND ...``."""
    return run_rollout(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
