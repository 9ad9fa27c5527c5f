"""Who is who in the mesh: the services, their default ports and modules, the models they serve.

Plain data and two small functions, no grpc, so anything may import it: the nodes' entry points
(their default ``--port``), the local launcher, the ``onnxmesh`` CLI, the Kubernetes rollout and
the tests. A name or a port is written here once. What cannot import Python (the graph specs
``demo/mesh.yaml`` and ``k8s/**/graphs.yaml``, the Kubernetes manifests, the Dockerfile)
is checked against this module by ``tests/unit/test_topology.py``.
"""

from __future__ import annotations

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

#: What ``python -m`` runs for each node: every service of a mesh runs the same model node.
MODULES: Mapping[str, str] = MappingProxyType(
    {
        PREPROCESS: "services.common.model_node",
        MODEL_A: "services.common.model_node",
        MODEL_B: "services.common.model_node",
        ORCHESTRATOR: "orchestrator",
    }
)
#: The runtime each service runs (demo/mesh.yaml's).
RUNTIMES: Mapping[str, str] = MappingProxyType({PREPROCESS: "python", MODEL_A: "onnx", MODEL_B: "onnx"})

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
