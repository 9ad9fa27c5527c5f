"""`onnxmesh k8s MESH --out DIR`: a kustomize base rendered from a mesh file.

For every service of the mesh: a ServiceAccount without a token, a Deployment (native gRPC
probes on its port, non-root, read-only root filesystem, its resources and settings), a headless
Service (the orchestrator balances over every pod itself), a PodDisruptionBudget and an HPA; for
the orchestrator the same with a ClusterIP Service and the mesh file mounted from a ConfigMap; a
namespace under the restricted Pod Security standard and NetworkPolicies that let clients reach
the orchestrator, the orchestrator reach each service's gRPC port, Prometheus reach metrics, and
nothing else. Overlays and components (mtls, observability, jobs, canary) apply on top.

The manifests are the templates of meshctl/k8s_templates/ filled in; k8s/base is the demo's
output (tests/unit/test_k8s_render.py keeps it up to date).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from string import Template

from meshctl.mesh import ORCHESTRATOR, Mesh, Node, kubernetes_name
from orchestrator.addresses import address_variable

NAMESPACE = "onnxmesh"
#: The port every pod serves Prometheus metrics on.
METRICS_PORT = 9090
#: Resources of a node whose mesh file gives none.
DEFAULT_RESOURCES: Mapping[str, Mapping[str, str]] = {
    "requests": {"cpu": "250m", "memory": "256Mi"},
    "limits": {"cpu": "1", "memory": "512Mi"},
}
#: The HPA may grow a Deployment to this many times its replicas.
SCALE_UP_FACTOR = 4
_INDENT = " " * 12


def _template(name: str) -> Template:
    return Template(resources.files("meshctl").joinpath("k8s_templates", name).read_text(encoding="utf-8"))


def _quoted(value: str) -> str:
    """A YAML scalar that stays a string ("1" is not the number 1)."""
    return json.dumps(value) if re.fullmatch(r"[-+.\d]+|true|false|yes|no|on|off|null|", value) else value


def image_of(mesh: Mesh, node: Node) -> str:
    """The image a node's Deployment runs, as `onnxmesh images` tags it."""
    return f"{mesh.images.prefix}{kubernetes_name(node.name)}:{mesh.images.tag}"


def _resources(node: Node) -> str:
    given = node.resources or DEFAULT_RESOURCES
    lines = []
    for kind in ("requests", "limits"):
        amounts = given.get(kind) or DEFAULT_RESOURCES[kind]
        lines.append(f"{_INDENT}{kind}:")
        lines += [f"{_INDENT}  {key}: {_quoted(value)}" for key, value in amounts.items()]
    return "\n".join(lines)


def _env(name: str, value: str) -> str:
    return f"{_INDENT}- name: {name}\n{_INDENT}  value: {_quoted(value)}\n"


def _with_settings(text: str, node: Node) -> str:
    """The template with the node's settings as ONNXMESH_* variables: a variable the template
    already sets gets the node's value, the others are added at $settings."""
    added = ""
    for key, value in node.settings.items():
        variable = f"ONNXMESH_{key.upper()}"
        pattern = re.compile(rf"(- name: {variable}\n\s+value: ).*\n")
        if pattern.search(text):
            text = pattern.sub(lambda match: f"{match[1]}{_quoted(value)}\n", text)  # noqa: B023 (used at once)
        else:
            added += _env(variable, value)
    return text.replace("$settings", added.replace("$", "$$"))


def render_service(mesh: Mesh, node: Node) -> str:
    text = _with_settings(_template("service.yaml").template, node)
    return Template(text).substitute(
        service=node.name,
        runtime=node.runtime,
        name=kubernetes_name(node.name),
        image=image_of(mesh, node),
        version=mesh.images.tag,
        port=node.port,
        replicas=node.replicas,
        max_replicas=node.replicas * SCALE_UP_FACTOR,
        resources=_resources(node),
    )


def render_orchestrator(mesh: Mesh) -> str:
    node = mesh.orchestrator
    addresses = f"{_INDENT}# dns:/// + round_robin over the headless Services: every ready pod IP is used.\n"
    for service in mesh.services.values():
        address = f"dns:///{kubernetes_name(service.name)}.{NAMESPACE}.svc.cluster.local:{service.port}"
        addresses += _env(address_variable(service.name), address)
    for name, address in mesh.external.items():
        addresses += _env(address_variable(name), address)
    text = _with_settings(_template("orchestrator.yaml").template, node)
    return Template(text).substitute(
        image=image_of(mesh, node),
        version=mesh.images.tag,
        port=node.port,
        replicas=node.replicas,
        max_replicas=node.replicas * SCALE_UP_FACTOR,
        resources=_resources(node),
        addresses=addresses,
    )


_EGRESS = """    - to:
        - podSelector:
            matchLabels:
              app.kubernetes.io/name: {name}
      ports:
        - protocol: TCP
          port: {port}
"""

_INGRESS = """apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: {name}-ingress
spec:
  podSelector:
    matchLabels:
      app.kubernetes.io/name: {name}
  policyTypes:
    - Ingress
  ingress:
    - from:
        - podSelector:
            matchLabels:
              app.kubernetes.io/name: orchestrator
      ports:
        - protocol: TCP
          port: {port}
"""


def render_network_policies(mesh: Mesh) -> str:
    services = list(mesh.services.values())
    text = _template("networkpolicies.yaml").substitute(
        port=mesh.orchestrator.port,
        service_ports="/".join(str(s.port) for s in services),
        services=", ".join(kubernetes_name(s.name) for s in services),
    )
    text += (
        "# The orchestrator reaches each service on its gRPC port and nothing else (a service the\n"
        "# mesh only calls by address needs an egress rule of your own).\n"
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata:\n  name: orchestrator-egress\n"
        "spec:\n  podSelector:\n    matchLabels:\n      app.kubernetes.io/name: orchestrator\n"
        "  policyTypes:\n    - Egress\n  egress:\n"
    )
    text += "".join(_EGRESS.format(name=kubernetes_name(s.name), port=s.port) for s in services)
    text += (
        "---\n# The services answer only the orchestrator. The selectors match on the name, not\n"
        "# the track, so canary pods of a service are covered by the same rules.\n"
    )
    text += "---\n".join(_INGRESS.format(name=kubernetes_name(s.name), port=s.port) for s in services)
    return text


def render(mesh: Mesh) -> dict[str, str]:
    """File name -> text of the kustomize base of `mesh`."""
    files = {
        "namespace.yaml": _template("namespace.yaml").template,
        "networkpolicies.yaml": render_network_policies(mesh),
    }
    for node in mesh.services.values():
        files[f"{kubernetes_name(node.name)}.yaml"] = render_service(mesh, node)
    files[f"{ORCHESTRATOR}.yaml"] = render_orchestrator(mesh)
    listed = "\n".join(f"  - {name}" for name in files)
    files["kustomization.yaml"] = _template("kustomization.yaml").substitute(resources=listed)
    files["graphs.yaml"] = mesh.path.read_text(encoding="utf-8")
    return files


def write(mesh: Mesh, out: Path) -> list[Path]:
    """Render `mesh` into `out` (made if missing); the files written. Other files in `out` stay."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in render(mesh).items():
        path = out / name
        path.write_text(text, encoding="utf-8")
        written.append(path)
    return written
