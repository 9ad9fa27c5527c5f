"""demo/topology.py against what cannot import it: graph specs, the Dockerfile, k8s/.

The services' entry points, the launcher, the CLI and rollout read their names and ports from the
topology; the YAML files and the Dockerfile write them out again, so these tests keep them equal.
The manifests are read as files here (no kubectl): test_k8s_manifests.py checks them rendered.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from demo.topology import (
    DEFAULT_GRAPH_NAMES,
    DEFAULT_PORTS,
    MODEL_A,
    MODEL_SERVICES,
    MODULES,
    ORCHESTRATOR,
    RUNTIMES,
    SERVICE_MODELS,
    SERVICES,
)
from meshctl.mesh import kubernetes_name, load_mesh
from orchestrator.addresses import address_variable, service_of_address_variable
from orchestrator.spec import load_spec

REPO = Path(__file__).resolve().parents[2]
SPECS = ["k8s/components/canary/graphs.yaml"]
NAMESPACE = "onnxmesh"
METRICS_PORT = 9090
DNS_PORT = 53

Obj = dict[str, Any]


def manifests(*parts: str) -> list[Obj]:
    """Every object of the YAML files under k8s/<parts> (not rendered: as written)."""
    directory = REPO.joinpath("k8s", *parts)
    return [
        doc
        for path in sorted(directory.glob("*.yaml"))
        if path.name not in ("kustomization.yaml", "graphs.yaml")
        for doc in yaml.safe_load_all(path.read_text())
        if doc
    ]


def find(objects: list[Obj], kind: str, name: str) -> Obj:
    found = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, f"{len(found)} {kind} named {name}"
    return found[0]


def container(deployment: Obj) -> Obj:
    [only] = deployment["spec"]["template"]["spec"]["containers"]
    return dict(only)


def env_of(deployment: Obj) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container(deployment).get("env", []) if "value" in e}


def grpc_port(ports: list[Obj], key: str) -> int:
    [port] = [p[key] for p in ports if p["name"] == "grpc"]
    return int(port)


# -- the module itself ---------------------------------------------------------------------------------


def test_every_service_has_a_port_a_module_and_models() -> None:
    assert set(DEFAULT_PORTS) == set(MODULES) == set(SERVICES) == {*MODEL_SERVICES, ORCHESTRATOR}
    assert set(SERVICE_MODELS) == set(MODEL_SERVICES)
    assert len(set(DEFAULT_PORTS.values())) == len(DEFAULT_PORTS)
    for service, module in MODULES.items():
        assert importlib.util.find_spec(module) is not None, service


def test_service_models_are_the_model_directories() -> None:
    for service, models in SERVICE_MODELS.items():
        directories = {p.name for p in (REPO / "services" / service / "models").iterdir() if p.is_dir()}
        assert set(models) == directories, service


@pytest.mark.parametrize(
    ("service", "variable"),
    [
        ("model_a", "ONNXMESH_SERVICE_MODEL_A_ADDRESS"),
        ("model-a", "ONNXMESH_SERVICE_MODEL_A_ADDRESS"),
        ("preprocess", "ONNXMESH_SERVICE_PREPROCESS_ADDRESS"),
        ("model_a_canary", "ONNXMESH_SERVICE_MODEL_A_CANARY_ADDRESS"),
        ("Model.B2", "ONNXMESH_SERVICE_MODEL_B2_ADDRESS"),
    ],
)
def test_address_variable_and_back(service: str, variable: str) -> None:
    assert address_variable(service) == variable
    assert (
        service_of_address_variable(variable)
        == variable.removeprefix("ONNXMESH_SERVICE_").removesuffix("_ADDRESS").lower()
    )


@pytest.mark.parametrize(
    "name",
    [
        "ONNXMESH_GRAPHS",
        "ONNXMESH_SERVICE__ADDRESS",
        "ONNXMESH_SERVICE_model_a_ADDRESS",
        "X_ONNXMESH_SERVICE_A_ADDRESS",
    ],
)
def test_other_variables_name_no_service(name: str) -> None:
    assert service_of_address_variable(name) is None


def test_kubernetes_names_are_dns_labels() -> None:
    assert kubernetes_name(MODEL_A) == "model-a"
    for service in SERVICES:
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", kubernetes_name(service)), service


# -- graph specs ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", SPECS)
def test_graph_specs_address_every_service_on_its_default_port(path: str) -> None:
    spec = load_spec(REPO / path)
    for service in MODEL_SERVICES:
        assert spec.services[service].address == f"127.0.0.1:{DEFAULT_PORTS[service]}", (path, service)


def test_the_demo_mesh_lays_out_the_default_ports() -> None:
    assert load_mesh(REPO / "demo" / "mesh.yaml").ports() == dict(DEFAULT_PORTS)


def test_the_default_spec_serves_the_default_graphs_from_the_services_models() -> None:
    spec = load_spec(REPO / "demo" / "mesh.yaml")
    assert tuple(spec.graphs) == DEFAULT_GRAPH_NAMES
    assert set(spec.services) == set(MODEL_SERVICES)
    for graph in spec.graphs.values():
        for step in graph.model_steps():
            assert step.model in SERVICE_MODELS[step.service], (graph.name, step.name)


# -- the Dockerfile ------------------------------------------------------------------------------------


def dockerfile_stages() -> dict[str, str]:
    """`FROM runtime AS svc-<SERVICE>` stage -> its text."""
    text = (REPO / "Dockerfile").read_text()
    stages = re.split(r"^(?=FROM )", text, flags=re.MULTILINE)
    found = {}
    for stage in stages:
        m = re.match(r"FROM (?:runtime|runtime-jobs|svc-node) AS svc-(\S+)\n", stage)
        if m and m[1] not in ("node", "jobs"):  # the runtime and the jobs service are not mesh services
            found[m[1]] = stage
    return found


def test_dockerfile_has_one_stage_per_service_on_its_port_running_its_module() -> None:
    stages = dockerfile_stages()
    assert set(stages) == set(SERVICES)
    for service, stage in stages.items():
        port = DEFAULT_PORTS[service]
        assert re.search(rf"^ENV .*\bONNXMESH_PORT={port}\b", stage, re.MULTILINE), service
        assert re.search(rf"^EXPOSE {port} {METRICS_PORT}$", stage, re.MULTILINE), service
        if service == ORCHESTRATOR:
            assert f'ENTRYPOINT ["python", "-m", "{MODULES[service]}"]' in stage, service
        else:  # the node's entrypoint (python -m services.common.model_node), told what to serve
            assert stage.startswith("FROM svc-node AS"), service
            assert f"ONNXMESH_NAME={service} ONNXMESH_RUNTIME={RUNTIMES[service]} " in stage, service


# -- Kubernetes manifests ------------------------------------------------------------------------------


def test_each_deployment_and_service_listens_on_the_default_port() -> None:
    base = manifests("base")
    for service in SERVICES:
        name, port = kubernetes_name(service), DEFAULT_PORTS[service]
        deployment = find(base, "Deployment", name)
        assert grpc_port(container(deployment)["ports"], "containerPort") == port, name
        assert env_of(deployment)["ONNXMESH_PORT"] == str(port), name
        assert grpc_port(find(base, "Service", name)["spec"]["ports"], "port") == port, name


def test_the_orchestrator_is_told_each_service_at_its_kubernetes_name_and_port() -> None:
    env = env_of(find(manifests("base"), "Deployment", kubernetes_name(ORCHESTRATOR)))
    addresses = {k: v for k, v in env.items() if service_of_address_variable(k) is not None}
    assert set(addresses) == {address_variable(s) for s in MODEL_SERVICES}
    for service in MODEL_SERVICES:
        host = f"{kubernetes_name(service)}.{NAMESPACE}.svc.cluster.local"
        assert addresses[address_variable(service)] == f"dns:///{host}:{DEFAULT_PORTS[service]}"


def test_the_model_a_canary_listens_where_model_a_does() -> None:
    canary = manifests("components", "canary")
    port = DEFAULT_PORTS[MODEL_A]
    deployment = find(canary, "Deployment", "model-a-canary")
    assert grpc_port(container(deployment)["ports"], "containerPort") == port
    assert env_of(deployment)["ONNXMESH_PORT"] == str(port)
    assert grpc_port(find(canary, "Service", "model-a-canary")["spec"]["ports"], "port") == port
    env = env_of(find(canary, "Deployment", kubernetes_name(ORCHESTRATOR)))
    variable = address_variable(f"{MODEL_A}_canary")
    assert env[variable] == f"dns:///model-a-canary.{NAMESPACE}.svc.cluster.local:{port}"


def test_network_policies_open_exactly_the_default_ports() -> None:
    ports = {
        int(port["port"])
        for policy in manifests("base")
        if policy["kind"] == "NetworkPolicy"
        for direction in ("ingress", "egress")
        for rule in policy["spec"].get(direction, [])
        for port in rule.get("ports", [])
    }
    assert ports - {METRICS_PORT, DNS_PORT} == set(DEFAULT_PORTS.values())
