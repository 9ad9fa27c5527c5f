"""Who is who in the mesh: the services, their default ports and modules, the models they serve.

Plain data and two small functions, no grpc, so anything may import it: the nodes' entry points
(their default ``--port``), the local launcher, the ``onnxmesh`` CLI, the Kubernetes rollout and
the tests. A name or a port is written here once. What cannot import Python (the graph specs
``demo/mesh.yaml`` and ``k8s/**/graphs.yaml``, the Kubernetes manifests, the Dockerfile)
is checked against this module by ``tests/unit/test_topology.py``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from types import MappingProxyType

PREPROCESS = "preprocess"
MODEL_A = "model_a"
MODEL_B = "model_b"
ORCHESTRATOR = "orchestrator"

#: The services that serve models, in start order: the orchestrator calls them, so it starts last.
MODEL_SERVICES: tuple[str, ...] = (PREPROCESS, MODEL_A, MODEL_B)
#: Every node of the mesh.
SERVICES: tuple[str, ...] = (*MODEL_SERVICES, ORCHESTRATOR)

#: The port each node listens on unless told otherwise (gRPC; metrics are off by default).
DEFAULT_PORTS: Mapping[str, int] = MappingProxyType(
    {ORCHESTRATOR: 8001, PREPROCESS: 8011, MODEL_A: 8021, MODEL_B: 8031}
)

#: What ``python -m`` runs for each node.
MODULES: Mapping[str, str] = MappingProxyType(
    {
        PREPROCESS: "services.preprocess",
        MODEL_A: "services.model_a",
        MODEL_B: "services.model_b",
        ORCHESTRATOR: "orchestrator",
    }
)

#: The models each service serves from its own model directory (OIP has no call that lists them).
SERVICE_MODELS: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {
        PREPROCESS: ("digits-preprocess",),
        MODEL_A: ("digits-mlp",),
        MODEL_B: ("digits-logreg", "digits-head"),
    }
)

#: The graphs of the orchestrator's default spec (demo/mesh.yaml), each served as a model.
DEFAULT_GRAPH_NAMES: tuple[str, ...] = ("digits-serial", "digits-parallel", "digits-cascade")

_ADDRESS_VARIABLE = re.compile(r"ONNXMESH_SERVICE_(?P<name>[A-Z0-9_]+)_ADDRESS")


def address_variable(service: str) -> str:
    """The environment variable that tells the orchestrator where a spec service is.

    ``model_a`` -> ``ONNXMESH_SERVICE_MODEL_A_ADDRESS``: upper case, and every character other
    than a letter or a digit becomes ``_`` (``model-a`` names the same variable).
    """
    return f"ONNXMESH_SERVICE_{re.sub(r'[^A-Z0-9]', '_', service.upper())}_ADDRESS"


def service_of_address_variable(name: str) -> str | None:
    """The service an address variable is about, in lower case; None for any other variable.

    ``ONNXMESH_SERVICE_MODEL_A_CANARY_ADDRESS`` -> ``model_a_canary``. A variable does not tell
    ``-`` from ``_``: compare ``address_variable(service)`` with it to match a given service.
    """
    match = _ADDRESS_VARIABLE.fullmatch(name)
    return match["name"].lower() if match else None


def kubernetes_name(service: str) -> str:
    """The name of a service's Deployment and Service on Kubernetes (``model_a`` -> ``model-a``).

    Kubernetes names are DNS labels, which have no ``_``.
    """
    return service.replace("_", "-")
