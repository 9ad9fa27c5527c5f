"""The graph spec as the rollout commands read it: from its ConfigMap, with the orchestrator's parser.

Canary and shadow traffic are steps of the spec (``splitter``, ``mirror``). Reading goes through
``orchestrator.spec`` so rollout sees exactly the graphs the orchestrator serves, and refuses to
write a spec the orchestrator would reject. Editing a splitter's weights works on the YAML text
itself, so comments and layout survive: see ``meshctl.rollout.weights``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from meshctl.mesh import ORCHESTRATOR, kubernetes_name
from meshctl.rollout.cluster import ClusterApi, Obj
from meshctl.rollout.deployments import pod_containers
from meshctl.rollout.errors import NotFoundError, RolloutError
from orchestrator.addresses import address_variable, service_of_address_variable
from orchestrator.spec import MeshSpec, MirrorStep, ModelStep, SpecError, SplitterStep, Step, parse_spec

DEFAULT_CONFIGMAP = "onnxmesh-graphs"
DEFAULT_GRAPHS_KEY = "graphs.yaml"
DEFAULT_ORCHESTRATOR = kubernetes_name(ORCHESTRATOR)


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


def read_spec(api: ClusterApi, settings: RolloutSettings) -> MeshSpec:
    """The graph spec of the ConfigMap, parsed and checked as the orchestrator does it.

    Raises RolloutError when it cannot be read or when the orchestrator rejects it (the
    orchestrator then keeps serving the last spec it accepted).
    """
    text = read_spec_text(api, settings)[1]
    try:
        return parse_spec(text)
    except SpecError as exc:
        raise RolloutError(
            f"the orchestrator rejects the spec in ConfigMap {api.namespace}/{settings.configmap} "
            f"(and keeps serving the last one it accepted): {exc}"
        ) from exc


def check_spec(text: str) -> None:
    """Raise RolloutError if the orchestrator would reject ``text``.

    It would keep running the old spec and only log the rejection, so the operator would
    believe the traffic had moved: better to refuse the write.
    """
    try:
        parse_spec(text)
    except SpecError as exc:
        raise RolloutError(
            f"the orchestrator would reject the edited spec (and keep the old one): {exc}"
        ) from exc


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


def services_by_graph(spec: MeshSpec) -> dict[str, set[str]]:
    """For each graph, the spec services any of its steps, branches or shadows call."""
    return {name: {step.service for step in graph.model_steps()} for name, graph in spec.graphs.items()}


def splitters(spec: MeshSpec) -> list[Splitter]:
    """Every splitter step of every graph, with its current weights."""
    return [
        Splitter(
            name,
            step.name,
            tuple(Branch(b.step.name, b.weight, b.step.service) for b in step.branches),
        )
        for name, graph in spec.graphs.items()
        for step in graph.all_steps()
        if isinstance(step, SplitterStep)
    ]


def mirrors(spec: MeshSpec) -> list[Mirror]:
    """Every mirror step of every graph."""
    return [
        Mirror(name, step.name, _service_of(step.primary), _service_of(step.shadow))
        for name, graph in spec.graphs.items()
        for step in graph.all_steps()
        if isinstance(step, MirrorStep)
    ]


def _service_of(step: Step) -> str | None:
    """The service a model step calls; None for a composite step (it may call several)."""
    return step.service if isinstance(step, ModelStep) else None


def service_components(spec: MeshSpec | None, orchestrator: Obj | None) -> dict[str, str]:
    """Spec service name -> the Kubernetes Service (= Deployment) it reaches.

    Read from the orchestrator's ``ONNXMESH_SERVICE_<NAME>_ADDRESS`` environment
    (``dns:///model-a.onnxmesh.svc.cluster.local:8021`` -> ``model-a``); a service without one
    is assumed to be named like the spec service, with ``-`` for ``_`` (``kubernetes_name``).
    """
    addresses: dict[str, str] = {}
    if orchestrator is not None:
        for container in pod_containers(orchestrator):
            for env in container.get("env") or []:
                variable = str(env.get("name", ""))
                if service_of_address_variable(variable) is not None:
                    addresses[variable] = str(env.get("value", ""))
    # The parser checked that every step calls a service the spec declares.
    names = spec.services if spec is not None else {}
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
