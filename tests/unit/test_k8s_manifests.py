"""The Kubernetes manifests, checked as rendered: `kubectl kustomize` of the base and every overlay.

Nothing is applied. Each rendered object must pass the API's own schema (kubernetes-validate,
strict: unknown fields fail), and the properties the mesh depends on are asserted one by one:
safe rollouts, native gRPC probes, a drain that fits in the grace period, a restricted security
context, ORT threads that match the CPU limit, headless model Services, a PDB and an HPA per
Deployment, NetworkPolicies that let only the orchestrator reach the models, and the graph spec
mounted as a directory from a ConfigMap whose name never changes.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, fields
from decimal import Decimal
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from demo.topology import DEFAULT_GRAPH_NAMES, DEFAULT_PORTS, ORCHESTRATOR
from meshctl.mesh import kubernetes_name
from orchestrator.addresses import address_variable
from orchestrator.spec import parse_spec
from services.common.settings import ServerSettings
from tests.support import K8S_VERSION, kustomize

Obj = dict[str, Any]

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "k8s"
# The schema version rendered objects are validated against (kubernetes-validate ships
# 1.25 to 1.37); 1.34 is the first with the preStop `sleep` action GA.
NAMESPACE = "onnxmesh"
TARGETS = ["base", *sorted(f"overlays/{p.name}" for p in (K8S / "overlays").iterdir() if p.is_dir())]
#: Each node's Kubernetes name (its app label, Deployment and Service) -> its gRPC port.
GRPC_PORTS = {kubernetes_name(service): port for service, port in DEFAULT_PORTS.items()}
METRICS_PORT = 9090
#: Seconds between the end of the drain and the kubelet's SIGKILL that we insist on.
GRACE_MARGIN = 5
#: The nodes' --drain-delay when a manifest does not set ONNXMESH_DRAIN_DELAY.
DEFAULT_DRAIN_DELAY = str(next(f.default for f in fields(ServerSettings) if f.name == "drain_delay"))
POD_LABELS = (
    "app.kubernetes.io/name",
    "app.kubernetes.io/component",
    "app.kubernetes.io/part-of",
    "app.kubernetes.io/version",
    "onnxmesh.io/model-version",
)


# --------------------------------------------------------------------------------------------
# Rendering


@dataclass(frozen=True)
class Render:
    """The objects one kustomization renders to."""

    target: str
    objects: tuple[Obj, ...]

    def of_kind(self, kind: str) -> list[Obj]:
        return [o for o in self.objects if o["kind"] == kind]

    def get(self, kind: str, name: str) -> Obj | None:
        return next((o for o in self.of_kind(kind) if o["metadata"]["name"] == name), None)

    @property
    def deployments(self) -> list[Obj]:
        return self.of_kind("Deployment")


_renders: dict[str, Render] = {}


def render(target: str) -> Render:
    if target not in _renders:
        _renders[target] = Render(target, kustomize(K8S / target))
    return _renders[target]


@pytest.fixture(params=TARGETS)
def rendered(request: pytest.FixtureRequest) -> Render:
    return render(request.param)


# --------------------------------------------------------------------------------------------
# Helpers


def pod_spec(dep: Obj) -> Obj:
    spec: Obj = dep["spec"]["template"]["spec"]
    return spec


def pod_labels(dep: Obj) -> dict[str, str]:
    labels: dict[str, str] = dep["spec"]["template"]["metadata"]["labels"]
    return labels


def main_container(dep: Obj) -> Obj:
    containers = pod_spec(dep)["containers"]
    assert len(containers) == 1, f"{dep['metadata']['name']}: one container per pod"
    container: Obj = containers[0]
    return container


def app_name(dep: Obj) -> str:
    return pod_labels(dep)["app.kubernetes.io/name"]


def env_of(container: Obj) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}


def grpc_port(dep: Obj) -> int:
    ports = {p["name"]: p["containerPort"] for p in main_container(dep)["ports"]}
    port: int = ports["grpc"]
    return port


def is_orchestrator(dep: Obj) -> bool:
    return app_name(dep) == kubernetes_name(ORCHESTRATOR)


def selector_matches(selector: Obj | None, labels: dict[str, str]) -> bool:
    """A Kubernetes label selector (matchLabels, matchExpressions) against labels; {} = all."""
    if selector is None:
        return False
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values") or []
        if op == "In" and labels.get(key) not in values:
            return False
        if op == "NotIn" and labels.get(key) in values:
            return False
        if op == "Exists" and key not in labels:
            return False
        if op == "DoesNotExist" and key in labels:
            return False
    return True


def cpu_cores(quantity: str | int) -> Decimal:
    text = str(quantity)
    return Decimal(text[:-1]) / 1000 if text.endswith("m") else Decimal(text)


_UNITS = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 10**3, "M": 10**6, "G": 10**9, "": 1}


def memory_bytes(quantity: str | int) -> Decimal:
    m = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", str(quantity))
    assert m and m[2] in _UNITS, f"unexpected memory quantity {quantity!r}"
    return Decimal(m[1]) * _UNITS[m[2]]


def prestop_sleep_seconds(container: Obj) -> int:
    pre_stop = container.get("lifecycle", {}).get("preStop", {})
    if "sleep" in pre_stop:
        seconds: int = pre_stop["sleep"]["seconds"]
        return seconds
    command = pre_stop.get("exec", {}).get("command", [])
    assert command[:1] == ["sleep"], f"{container['name']}: preStop must sleep, got {pre_stop}"
    return int(command[1])


def image_tag(image: str) -> str:
    return image.split("@")[0].rsplit("/", 1)[-1].split(":")[1]


def policies_for(render: Render, labels: dict[str, str], policy_type: str) -> Iterator[Obj]:
    for policy in render.of_kind("NetworkPolicy"):
        spec = policy["spec"]
        types = spec.get("policyTypes") or (["Ingress", "Egress"] if "egress" in spec else ["Ingress"])
        if policy_type in types and selector_matches(spec.get("podSelector"), labels):
            yield policy


def rule_covers_port(rule: Obj, port: int, container: Obj, protocol: str = "TCP") -> bool:
    ports = rule.get("ports") or []
    if not ports:
        return True
    named = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
    for p in ports:
        if p.get("protocol", "TCP") != protocol:
            continue
        number = named.get(p["port"]) if isinstance(p.get("port"), str) else p.get("port")
        if number is None or number == port or (p.get("endPort") and number <= port <= p["endPort"]):
            return True
    return False


# --------------------------------------------------------------------------------------------
# Rendering and schema


def test_every_kustomization_renders_the_whole_mesh(rendered: Render) -> None:
    names = {app_name(d) for d in rendered.deployments}
    assert names == set(GRPC_PORTS), rendered.target
    for obj in rendered.objects:
        if obj["kind"] != "Namespace":
            assert obj["metadata"].get("namespace") == NAMESPACE, f"{obj['kind']}/{obj['metadata']['name']}"


def test_every_object_passes_the_api_schema_strictly(rendered: Render) -> None:
    errors = []
    for obj in rendered.objects:
        where = f"{rendered.target}: {obj['kind']}/{obj['metadata']['name']}"
        try:
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            errors.append(f"{where}: {'.'.join(map(str, exc.path))}: {exc.message}")
        except kubernetes_validate.SchemaNotFoundError as exc:
            errors.append(f"{where}: {exc.message}")
    assert not errors, "\n".join(errors)


# --------------------------------------------------------------------------------------------
# Deployments


def test_deployments_roll_out_without_losing_capacity(rendered: Render) -> None:
    for dep in rendered.deployments:
        name = dep["metadata"]["name"]
        strategy = dep["spec"]["strategy"]
        assert strategy["type"] == "RollingUpdate", name
        assert strategy["rollingUpdate"] == {"maxSurge": 1, "maxUnavailable": 0}, name
        assert dep["spec"].get("minReadySeconds", 0) >= 5, name


def test_probes_are_native_grpc_health_checks_on_numeric_ports(rendered: Render) -> None:
    for dep in rendered.deployments:
        container = main_container(dep)
        port = grpc_port(dep)
        assert port == GRPC_PORTS[app_name(dep)], dep["metadata"]["name"]
        # With TLS on (components/mtls), probes go to the plaintext health port.
        health = env_of(container).get("ONNXMESH_HEALTH_PORT")
        probed = int(health) if health else port
        for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
            probe = container.get(kind)
            assert probe is not None, f"{dep['metadata']['name']}: no {kind}"
            assert set(probe) & {"httpGet", "tcpSocket", "exec"} == set()
            # Kubernetes gRPC probes need a number, and "" asks for the whole server's health.
            assert probe["grpc"] == {"port": probed, "service": ""}, f"{dep['metadata']['name']} {kind}"
            assert isinstance(probe["grpc"]["port"], int)
        startup = container["startupProbe"]
        # Model load and warm-up must not be cut short by the liveness probe.
        assert startup["failureThreshold"] * startup.get("periodSeconds", 10) >= 120


def test_termination_grace_covers_prestop_and_drain(rendered: Render) -> None:
    for dep in rendered.deployments:
        container = main_container(dep)
        pre_stop = prestop_sleep_seconds(container)
        env = env_of(container)
        drain = float(env["ONNXMESH_GRACE"])
        # SIGTERM comes after preStop; the node keeps answering for its drain delay, then drains.
        delay = float(env.get("ONNXMESH_DRAIN_DELAY", DEFAULT_DRAIN_DELAY))
        grace = pod_spec(dep)["terminationGracePeriodSeconds"]
        assert pre_stop > 0
        assert grace >= pre_stop + delay + drain + GRACE_MARGIN, (
            f"{dep['metadata']['name']}: terminationGracePeriodSeconds {grace} < preStop {pre_stop}"
            f" + drain delay {delay} + ONNXMESH_GRACE {drain} + {GRACE_MARGIN}"
        )


def test_pods_run_restricted(rendered: Render) -> None:
    namespace = rendered.get("Namespace", NAMESPACE)
    assert namespace is not None
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    for dep in rendered.deployments:
        name = dep["metadata"]["name"]
        spec = pod_spec(dep)
        pod_sc = spec.get("securityContext", {})
        container = main_container(dep)
        sc = container.get("securityContext", {})
        run_as_user = sc.get("runAsUser", pod_sc.get("runAsUser"))
        assert sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) is True, name
        assert isinstance(run_as_user, int) and run_as_user > 0, name
        assert (sc.get("seccompProfile") or pod_sc.get("seccompProfile")) == {"type": "RuntimeDefault"}, name
        assert sc.get("allowPrivilegeEscalation") is False, name
        assert sc.get("readOnlyRootFilesystem") is True, name
        assert sc.get("capabilities", {}).get("drop") == ["ALL"], name
        assert not sc.get("capabilities", {}).get("add"), name
        assert not sc.get("privileged", False), name
        assert not any(spec.get(k) for k in ("hostNetwork", "hostPID", "hostIPC")), name
        # A read-only root needs a writable /tmp.
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        tmp = [m for m in container.get("volumeMounts", []) if m["mountPath"] == "/tmp"]
        assert len(tmp) == 1 and "emptyDir" in volumes[tmp[0]["name"]], name
        assert not any("hostPath" in v for v in volumes.values()), name


def test_each_component_has_its_own_tokenless_service_account(rendered: Render) -> None:
    accounts = set()
    for dep in rendered.deployments:
        spec = pod_spec(dep)
        account = rendered.get("ServiceAccount", spec.get("serviceAccountName", "default"))
        assert account is not None, f"{dep['metadata']['name']}: its ServiceAccount is not rendered"
        assert account.get("automountServiceAccountToken") is False
        assert spec.get("automountServiceAccountToken") is False
        accounts.add(account["metadata"]["name"])
    assert len(accounts) == len(rendered.deployments)
    # Nothing in the mesh needs the API: no RBAC at all.
    assert not [
        o
        for o in rendered.objects
        if o["kind"] in ("Role", "RoleBinding", "ClusterRole", "ClusterRoleBinding")
    ]


def test_resources_are_bounded_and_ort_threads_match_the_cpu_limit(rendered: Render) -> None:
    for dep in rendered.deployments:
        name = dep["metadata"]["name"]
        container = main_container(dep)
        requests, limits = container["resources"]["requests"], container["resources"]["limits"]
        assert {"cpu", "memory"} <= set(requests) and {"cpu", "memory"} <= set(limits), name
        cpu_limit = cpu_cores(limits["cpu"])
        assert cpu_limit == int(cpu_limit) >= 1, f"{name}: CPU limit must be whole cores, got {limits['cpu']}"
        assert cpu_cores(requests["cpu"]) <= cpu_limit, name
        assert memory_bytes(requests["memory"]) <= memory_bytes(limits["memory"]), name
        assert int(env_of(container)["ONNXMESH_ORT_THREADS"]) == cpu_limit, (
            f"{name}: ORT threads != CPU limit"
        )


def test_pods_listen_on_all_interfaces_and_expose_metrics(rendered: Render) -> None:
    for dep in rendered.deployments:
        name = dep["metadata"]["name"]
        container = main_container(dep)
        env = env_of(container)
        assert env["ONNXMESH_HOST"] == "0.0.0.0", name
        assert int(env["ONNXMESH_PORT"]) == grpc_port(dep), name
        assert int(env["ONNXMESH_METRICS_PORT"]) == METRICS_PORT, name
        # Clients must reconnect now and then to see new replicas (DESIGN.md section 7).
        assert 0 < float(env["ONNXMESH_MAX_CONNECTION_AGE"]) <= 300, name
        assert {"name": "metrics", "containerPort": METRICS_PORT, "protocol": "TCP"} in container["ports"], (
            name
        )
        annotations = dep["spec"]["template"]["metadata"].get("annotations", {})
        assert annotations.get("prometheus.io/scrape") == "true", name
        assert annotations.get("prometheus.io/port") == str(METRICS_PORT), name


def test_pod_labels_name_the_component_and_its_version(rendered: Render) -> None:
    for dep in rendered.deployments:
        name = dep["metadata"]["name"]
        labels = pod_labels(dep)
        assert all(labels.get(k) for k in POD_LABELS), f"{name}: pod labels {labels}"
        assert labels["app.kubernetes.io/part-of"] == "onnxmesh"
        image = main_container(dep)["image"]
        assert image.split(":")[0] == f"onnxmesh/{app_name(dep)}", name
        tag = image_tag(image)
        assert labels["app.kubernetes.io/version"] == tag, f"{name}: version label != image tag {tag}"
        assert labels["onnxmesh.io/model-version"] == tag, f"{name}: model-version label != image tag {tag}"
        selector = dep["spec"]["selector"]["matchLabels"]
        assert selector.items() <= labels.items(), name
        # Selectors are immutable: a version in one would forbid every later rollout.
        assert not {"app.kubernetes.io/version", "onnxmesh.io/model-version"} & set(selector), name


def test_deployments_select_only_their_own_pods(rendered: Render) -> None:
    for dep in rendered.deployments:
        for other in rendered.deployments:
            if other is not dep:
                assert not selector_matches(dep["spec"]["selector"], pod_labels(other)), (
                    f"{dep['metadata']['name']} selects the pods of {other['metadata']['name']}"
                )


@pytest.mark.parametrize("target", ["base", "overlays/dev"])
def test_dev_runs_one_replica_of_each(target: str) -> None:
    replicas = {d["metadata"]["name"]: d["spec"]["replicas"] for d in render(target).deployments}
    assert replicas == dict.fromkeys(GRPC_PORTS, 1)


def test_production_is_redundant_and_spread_over_nodes() -> None:
    prod, dev = render("overlays/production"), render("overlays/dev")
    for dep in prod.deployments:
        name = dep["metadata"]["name"]
        assert dep["spec"]["replicas"] >= 2, name
        hpa = next(
            h for h in prod.of_kind("HorizontalPodAutoscaler") if h["spec"]["scaleTargetRef"]["name"] == name
        )
        assert hpa["spec"]["minReplicas"] >= 2, name
        anti = pod_spec(dep).get("affinity", {}).get("podAntiAffinity", {})
        terms = [
            t["podAffinityTerm"] for t in anti.get("preferredDuringSchedulingIgnoredDuringExecution", [])
        ]
        terms += anti.get("requiredDuringSchedulingIgnoredDuringExecution", [])
        assert any(
            t["topologyKey"] == "kubernetes.io/hostname"
            and selector_matches(t["labelSelector"], pod_labels(dep))
            for t in terms
        ), f"{name}: no anti-affinity on kubernetes.io/hostname against its own pods"
        dev_dep = dev.get("Deployment", name)
        assert dev_dep is not None
        prod_res, dev_res = main_container(dep)["resources"], main_container(dev_dep)["resources"]
        assert cpu_cores(prod_res["requests"]["cpu"]) > cpu_cores(dev_res["requests"]["cpu"]), name
        assert cpu_cores(prod_res["limits"]["cpu"]) >= cpu_cores(dev_res["limits"]["cpu"]), name
        assert memory_bytes(prod_res["limits"]["memory"]) >= memory_bytes(dev_res["limits"]["memory"]), name


# --------------------------------------------------------------------------------------------
# Services, PDBs, HPAs


def test_model_services_are_headless_and_the_orchestrator_has_a_cluster_ip(rendered: Render) -> None:
    for dep in rendered.deployments:
        name = dep["metadata"]["name"]
        services = [
            s
            for s in rendered.of_kind("Service")
            if selector_matches({"matchLabels": s["spec"].get("selector", {})}, pod_labels(dep))
        ]
        assert len(services) == 1, f"{name}: {len(services)} Services select its pods"
        service = services[0]
        assert service["metadata"]["name"] == name
        # No Service may mix this Deployment's pods with another's (a canary with its stable).
        for other in rendered.deployments:
            if other is not dep:
                assert not selector_matches({"matchLabels": service["spec"]["selector"]}, pod_labels(other))
        ports = {p["name"]: p for p in service["spec"]["ports"]}
        assert ports["grpc"]["port"] == grpc_port(dep), name
        assert ports["grpc"]["targetPort"] in ("grpc", grpc_port(dep)), name
        if is_orchestrator(dep):
            assert service["spec"].get("type", "ClusterIP") == "ClusterIP"
            assert service["spec"].get("clusterIP") != "None"
            assert ports["grpc"]["port"] == DEFAULT_PORTS[ORCHESTRATOR]
        else:
            # The orchestrator balances over pod IPs itself (dns:/// + round_robin).
            assert service["spec"].get("clusterIP") == "None", f"{name}: must be headless"


def test_every_deployment_has_a_pdb_and_an_hpa(rendered: Render) -> None:
    for dep in rendered.deployments:
        name = dep["metadata"]["name"]
        pdbs = [
            p
            for p in rendered.of_kind("PodDisruptionBudget")
            if selector_matches(p["spec"]["selector"], pod_labels(dep))
        ]
        assert len(pdbs) == 1, f"{name}: {len(pdbs)} PodDisruptionBudgets"
        pdb = pdbs[0]["spec"]
        replicas = dep["spec"]["replicas"]
        # A budget must allow one voluntary eviction, or node drains hang forever.
        if "maxUnavailable" in pdb:
            assert int(pdb["maxUnavailable"]) >= 1, name
        else:
            assert int(pdb["minAvailable"]) < replicas, name
        hpas = [
            h
            for h in rendered.of_kind("HorizontalPodAutoscaler")
            if h["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": name}
        ]
        assert len(hpas) == 1, f"{name}: {len(hpas)} HorizontalPodAutoscalers"
        hpa = hpas[0]
        assert hpa["apiVersion"] == "autoscaling/v2"
        assert hpa["spec"]["minReplicas"] == replicas <= hpa["spec"]["maxReplicas"], name
        metrics = hpa["spec"]["metrics"]
        assert any(
            m["type"] == "Resource"
            and m["resource"]["name"] == "cpu"
            and m["resource"]["target"]["type"] == "Utilization"
            for m in metrics
        ), name


# --------------------------------------------------------------------------------------------
# NetworkPolicies


def test_namespace_denies_by_default(rendered: Render) -> None:
    deny = [
        p
        for p in rendered.of_kind("NetworkPolicy")
        if p["spec"]["podSelector"] == {}
        and "Ingress" in p["spec"].get("policyTypes", [])
        and not p["spec"].get("ingress")
    ]
    assert deny, "no default-deny ingress NetworkPolicy"


def test_model_services_accept_grpc_only_from_the_orchestrator(rendered: Render) -> None:
    orchestrator = next(d for d in rendered.deployments if is_orchestrator(d))
    others = [d for d in rendered.deployments if not is_orchestrator(d)]
    for dep in others:
        name = dep["metadata"]["name"]
        port, container = grpc_port(dep), main_container(dep)
        allowed = 0
        for policy in policies_for(rendered, pod_labels(dep), "Ingress"):
            for rule in policy["spec"].get("ingress", []):
                if not rule_covers_port(rule, port, container):
                    continue
                peers = rule.get("from") or []
                where = f"{name}: NetworkPolicy {policy['metadata']['name']}"
                assert peers, f"{where} opens port {port} to everyone"
                for peer in peers:
                    assert set(peer) == {"podSelector"}, (
                        f"{where}: peer {peer} is not a same-namespace pod selector"
                    )
                    assert selector_matches(peer["podSelector"], pod_labels(orchestrator)), where
                    assert not any(selector_matches(peer["podSelector"], pod_labels(o)) for o in others), (
                        f"{where}: its peer selector also matches non-orchestrator pods"
                    )
                allowed += 1
        assert allowed, f"{name}: no NetworkPolicy lets the orchestrator reach port {port}"


#: Who may call the orchestrator with mTLS on: its own namespace and labelled namespaces.
ALLOWED_CLIENTS = [
    {"podSelector": {}},
    {"namespaceSelector": {"matchLabels": {"onnxmesh.io/client": "true"}}},
]


def test_orchestrator_accepts_the_clients_it_should(rendered: Render) -> None:
    """The whole cluster without mTLS (dev); with it (production), only allowed namespaces."""
    orchestrator = next(d for d in rendered.deployments if is_orchestrator(d))
    rules = [
        rule
        for policy in policies_for(rendered, pod_labels(orchestrator), "Ingress")
        for rule in policy["spec"].get("ingress", [])
        if rule_covers_port(rule, DEFAULT_PORTS[ORCHESTRATOR], main_container(orchestrator))
    ]
    peers = [peer for r in rules for peer in (r.get("from") or [])]
    if "ONNXMESH_TOKEN_FILE" in env_of(main_container(orchestrator)):
        assert peers == ALLOWED_CLIENTS
    else:
        assert {"namespaceSelector": {}} in peers


def test_metrics_are_open_to_the_monitoring_namespace(rendered: Render) -> None:
    monitoring = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
    for dep in rendered.deployments:
        rules = [
            rule
            for policy in policies_for(rendered, pod_labels(dep), "Ingress")
            for rule in policy["spec"].get("ingress", [])
            if rule_covers_port(rule, METRICS_PORT, main_container(dep))
        ]
        assert any(monitoring in (r.get("from") or []) for r in rules), dep["metadata"]["name"]


def test_orchestrator_egress_reaches_every_service_and_dns(rendered: Render) -> None:
    orchestrator = next(d for d in rendered.deployments if is_orchestrator(d))
    rules = [
        rule
        for policy in policies_for(rendered, pod_labels(orchestrator), "Egress")
        for rule in policy["spec"].get("egress", [])
    ]
    assert any(rule_covers_port(r, 53, {}, "UDP") and not r.get("to") for r in rules), "no DNS egress"
    for dep in rendered.deployments:
        if is_orchestrator(dep):
            continue
        assert any(
            rule_covers_port(r, grpc_port(dep), main_container(dep))
            and any(selector_matches(peer.get("podSelector"), pod_labels(dep)) for peer in r.get("to") or [])
            for r in rules
        ), f"orchestrator cannot reach {dep['metadata']['name']}"


# --------------------------------------------------------------------------------------------
# The graph spec ConfigMap


def test_graph_spec_is_a_fixed_name_configmap_mounted_as_a_directory(rendered: Render) -> None:
    config_maps = rendered.of_kind("ConfigMap")
    assert [c["metadata"]["name"] for c in config_maps] == ["onnxmesh-graphs"], "the name must carry no hash"
    spec = yaml.safe_load(config_maps[0]["data"]["graphs.yaml"])
    assert isinstance(spec["graphs"], dict) and spec["graphs"]

    orchestrator = next(d for d in rendered.deployments if is_orchestrator(d))
    volumes = {v["name"]: v for v in pod_spec(orchestrator)["volumes"]}
    mounts = [
        m
        for m in main_container(orchestrator)["volumeMounts"]
        if volumes[m["name"]].get("configMap", {}).get("name") == "onnxmesh-graphs"
    ]
    assert len(mounts) == 1
    # A subPath mount is never updated by the kubelet: the orchestrator would not see edits.
    assert "subPath" not in mounts[0] and "subPathExpr" not in mounts[0]
    assert mounts[0].get("readOnly") is True
    graphs_path = env_of(main_container(orchestrator))["ONNXMESH_GRAPHS"]
    assert graphs_path == f"{mounts[0]['mountPath']}/graphs.yaml"


def test_orchestrator_knows_the_headless_address_of_every_spec_service(rendered: Render) -> None:
    spec = yaml.safe_load(rendered.of_kind("ConfigMap")[0]["data"]["graphs.yaml"])
    orchestrator = next(d for d in rendered.deployments if is_orchestrator(d))
    env = env_of(main_container(orchestrator))
    for service_name in spec["services"]:
        key = address_variable(service_name)
        assert key in env, f"orchestrator has no {key}"
        m = re.fullmatch(rf"dns:///([a-z0-9-]+)\.{NAMESPACE}\.svc\.cluster\.local:(\d+)", env[key])
        assert m, f"{key}={env[key]}"
        service = rendered.get("Service", m[1])
        assert service is not None, f"{key} points at Service {m[1]}, which is not rendered"
        assert service["spec"].get("clusterIP") == "None", f"{m[1]} must be headless for round_robin"
        assert int(m[2]) in [p["port"] for p in service["spec"]["ports"] if p["name"] == "grpc"]


def test_graph_spec_parses_with_the_orchestrators_parser(rendered: Render) -> None:
    spec = parse_spec(rendered.of_kind("ConfigMap")[0]["data"]["graphs.yaml"])
    assert set(spec.graphs) >= set(DEFAULT_GRAPH_NAMES)


def test_base_graph_spec_is_the_demo_mesh_file() -> None:
    source = REPO / "demo" / "mesh.yaml"
    assert (K8S / "base" / "graphs.yaml").read_text() == source.read_text(), (
        "k8s/base/graphs.yaml differs from demo/mesh.yaml: cp demo/mesh.yaml k8s/base/graphs.yaml"
    )


def _collapse_splitters(value: Any) -> Any:
    """The spec with every splitter step replaced by its first (stable) branch, under the step's name."""
    if isinstance(value, dict):
        if isinstance(value.get("splitter"), dict):
            stable = dict(value["splitter"]["branches"][0])
            stable.pop("weight", None)
            stable["name"] = value["name"]
            return _collapse_splitters(stable)
        return {k: _collapse_splitters(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_collapse_splitters(v) for v in value]
    return value


def test_canary_graph_spec_is_the_base_spec_plus_the_canary() -> None:
    base = yaml.safe_load((K8S / "base" / "graphs.yaml").read_text())
    canary = yaml.safe_load((K8S / "components" / "canary" / "graphs.yaml").read_text())

    # The same services (the orchestrator gets every address from its environment) plus the canary.
    assert set(canary["services"]) == {*base["services"], "model_a_canary"}
    assert _collapse_splitters(canary["graphs"]) == base["graphs"], (
        "k8s/components/canary/graphs.yaml drifted from k8s/base/graphs.yaml"
    )
    [split] = [
        s["splitter"]["branches"] for s in canary["graphs"]["digits-serial"]["steps"] if "splitter" in s
    ]
    # Installing the component moves no traffic until `onnxmesh rollout canary`.
    assert [b["weight"] for b in split] == [100, 0]
    assert [b["service"] for b in split] == ["model_a", "model_a_canary"]


# --------------------------------------------------------------------------------------------
# Per-model rollouts


def test_setting_one_image_changes_one_deployment_only(tmp_path: Path) -> None:
    dev = render("overlays/dev")
    (tmp_path / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "resources": [os.path.relpath(K8S / "overlays" / "dev", tmp_path)],
                # What `kustomize edit set image onnxmesh/model-a=onnxmesh/model-a:v2` writes.
                "images": [{"name": "onnxmesh/model-a", "newName": "onnxmesh/model-a", "newTag": "v2"}],
            }
        )
    )
    changed = kustomize(tmp_path)

    assert len(changed) == len(dev.objects)
    differ = [(a["kind"], a["metadata"]["name"]) for a, b in zip(dev.objects, changed, strict=True) if a != b]
    assert differ == [("Deployment", "model-a")]
    after = next(o for o in changed if o["kind"] == "Deployment" and o["metadata"]["name"] == "model-a")
    assert main_container(after)["image"] == "onnxmesh/model-a:v2"


# --------------------------------------------------------------------------------------------
# mTLS (components/mtls, on in production; components/mtls-cert-manager)

TLS_VARIABLES = ("ONNXMESH_TLS_CERT", "ONNXMESH_TLS_KEY", "ONNXMESH_TLS_CA")


def secret_mount(dep: Obj, path: str) -> tuple[Obj, str]:
    """The read-only directory mount holding `path`, and the Secret it comes from."""
    container = main_container(dep)
    name = dep["metadata"]["name"]
    mounts = [
        m for m in container.get("volumeMounts", []) if path.startswith(m["mountPath"].rstrip("/") + "/")
    ]
    assert len(mounts) == 1, f"{name}: {path} is not under one mount"
    mount = mounts[0]
    assert mount.get("readOnly") is True and "subPath" not in mount, f"{name}: {mount}"
    volume = next(v for v in pod_spec(dep)["volumes"] if v["name"] == mount["name"])
    assert "secret" in volume, f"{name}: {path} is not from a Secret"
    return mount, str(volume["secret"]["secretName"])


def check_mtls(render: Render) -> dict[str, str]:
    """Every node on mTLS from a read-only Secret, health on its own port; node -> Secret."""
    secrets: dict[str, str] = {}
    for dep in render.deployments:
        container, name = main_container(dep), app_name(dep)
        env = env_of(container)
        paths = [env[v] for v in TLS_VARIABLES]
        secret_names = {secret_mount(dep, p)[1] for p in paths}
        assert secret_names == {f"onnxmesh-{name}-tls"}, f"{name}: {secret_names}"
        secrets[name] = secret_names.pop()
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert int(env["ONNXMESH_HEALTH_PORT"]) == ports["health"] != ports["grpc"], name
        assert env.get("ONNXMESH_HTTP_PORT", "off") == "off", f"{name}: REST would bypass TLS"
        if is_orchestrator(dep):
            assert secret_mount(dep, env["ONNXMESH_TOKEN_FILE"])[1] == "onnxmesh-tokens"
            assert env["ONNXMESH_TLS_REQUIRE_CLIENT_CERT"] == "0"  # its clients carry tokens
        else:
            # Only a caller with a certificate of the CA (the orchestrator) gets in.
            assert env.get("ONNXMESH_TLS_REQUIRE_CLIENT_CERT", "1") == "1", name
    return secrets


def test_production_runs_mtls_with_a_token_and_keeps_the_network_policies() -> None:
    production = render("overlays/production")
    check_mtls(production)
    policies = {p["metadata"]["name"] for p in production.of_kind("NetworkPolicy")}
    assert policies == {p["metadata"]["name"] for p in render("base").of_kind("NetworkPolicy")}


def test_cert_manager_issues_the_certificates_the_nodes_mount(tmp_path: Path) -> None:
    # An overlay of production plus cert-manager, in a copy of k8s/ (kustomize wants relative paths).
    shutil.copytree(K8S, tmp_path / "k8s")
    overlay = tmp_path / "k8s" / "overlays" / "cert-manager"
    overlay.mkdir()
    (overlay / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                "resources": ["../production"],
                "components": ["../../components/mtls-cert-manager"],
            }
        )
    )
    rendered = Render("production+cert-manager", kustomize(overlay))
    mounted = check_mtls(rendered)
    certificates = {c["spec"]["secretName"]: c for c in rendered.of_kind("Certificate")}
    orchestrator = next(d for d in rendered.deployments if is_orchestrator(d))
    addresses = env_of(main_container(orchestrator))
    for name, secret in mounted.items():
        spec = certificates[secret]["spec"]
        assert spec["issuerRef"]["name"] == "onnxmesh-ca" and set(spec["usages"]) == {
            "server auth",
            "client auth",
        }
        assert spec["renewBefore"] and spec["privateKey"]["rotationPolicy"] == "Always"
        if not is_orchestrator(next(d for d in rendered.deployments if app_name(d) == name)):
            # The orchestrator checks the name it dials against the certificate.
            target = next(v for k, v in addresses.items() if k.endswith("_ADDRESS") and f"//{name}." in v)
            host = target.removeprefix("dns:///").rsplit(":", 1)[0]
            assert host in spec["dnsNames"], f"{name}: {host} not in {spec['dnsNames']}"
    assert certificates["onnxmesh-ca"]["spec"]["isCA"] is True
