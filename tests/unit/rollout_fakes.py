"""The fakes of the rollout tests: an in-memory cluster, a clock that moves only when slept on,
and the kubernetes client's own API classes answered by that cluster (no API server).
"""

from __future__ import annotations

import copy
import difflib
import io
import json
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import Any

import urllib3

from meshctl.rollout.cli import build_parser, run_rollout
from meshctl.rollout.cluster import Obj
from meshctl.rollout.deployments import NAME_LABEL
from meshctl.rollout.errors import ClusterApiError, ConflictError, NotFoundError
from meshctl.rollout.weights import splitter_branches

NS = "onnxmesh"
REPO = Path(__file__).resolve().parents[2]

# The brief's example graph, with comments and flow mappings, as an operator would keep it.
SPEC = """\
# Graph spec of the test mesh.
services:
  preprocess: {address: "127.0.0.1:8011"}
  model_a: {address: "127.0.0.1:8021"}
  model_b: {address: "127.0.0.1:8031"}
  model_a_canary: {address: "127.0.0.1:8022"}
  model_b_canary: {address: "127.0.0.1:8032"}
graphs:
  digits-parallel:
    timeout: 5.0
    inputs: [{name: image, datatype: UINT8, shape: [-1, 8, 8]}]
    steps:
      - {name: pre, service: preprocess, model: digits-preprocess, inputs: {image: request.image}}
      - name: mlp
        splitter:
          branches:  # stable first
            - {weight: 90, name: mlp-stable, service: model_a, model: digits-mlp, inputs: {features: pre.features}}
            - {weight: 10, name: mlp-canary, service: model_a_canary, model: digits-mlp, inputs: {features: pre.features}}
      - name: shadowed
        mirror:
          primary: {name: head, service: model_b, model: digits-head, inputs: {embedding: mlp.embedding}}
          shadow: {name: head-next, service: model_b_canary, model: digits-head, inputs: {embedding: mlp.embedding}}
          compare: probabilities
    outputs: {probabilities: shadowed.probabilities, label: argmax(shadowed.probabilities)}
  digits-serial:
    timeout: 5.0
    inputs: [{name: image, datatype: UINT8, shape: [-1, 8, 8]}]
    steps:
      - {name: pre, service: preprocess, model: digits-preprocess, inputs: {image: request.image}}
      - {name: mlp, service: model_a, model: digits-mlp, inputs: {features: pre.features}}
      - {name: head, service: model_b, model: digits-head, inputs: {embedding: mlp.embedding}}
    outputs: {probabilities: head.probabilities}
"""

ADDRESSES = {
    "PREPROCESS": "dns:///preprocess.onnxmesh.svc.cluster.local:8011",
    "MODEL_A": "dns:///model-a.onnxmesh.svc.cluster.local:8021",
    "MODEL_B": "dns:///model-b.onnxmesh.svc.cluster.local:8031",
    "MODEL_A_CANARY": "dns:///model-a-canary.onnxmesh.svc.cluster.local:8021",
}


class FakeClock:
    """Time stands still except when the code under test sleeps."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        assert seconds >= 0
        self.sleeps.append(seconds)
        self.now += seconds


def _merge(live: Any, patch: Any) -> Any:
    """The part of a strategic merge patch the rollout commands use: maps merge, lists of named
    objects merge by name, anything else is replaced."""
    if isinstance(live, dict) and isinstance(patch, dict):
        merged = dict(live)
        for key, value in patch.items():
            merged[key] = _merge(live.get(key), value) if key in live else copy.deepcopy(value)
        return merged
    if (
        isinstance(live, list)
        and isinstance(patch, list)
        and all(isinstance(p, dict) and "name" in p for p in patch)
    ):
        merged_list = [copy.deepcopy(item) for item in live]
        for item in patch:
            at = next((i for i, x in enumerate(merged_list) if x.get("name") == item["name"]), None)
            if at is None:
                merged_list.append(copy.deepcopy(item))
            else:
                merged_list[at] = _merge(merged_list[at], item)
        return merged_list
    return copy.deepcopy(patch)


#: Called on every read of a Deployment with (cluster, name, reads since its last patch).
Controller = Callable[["FakeCluster", str, int], None]


class FakeCluster:
    """An in-memory ClusterApi: Deployments, pods, events and ConfigMaps of one namespace.

    ``controller`` plays the Deployment controller: it runs on every read of a Deployment, so a
    test scripts how a rollout progresses from poll to poll.
    """

    def __init__(self, namespace: str = NS) -> None:
        self.namespace = namespace
        self.deployments: dict[str, Obj] = {}
        self.config_maps: dict[str, Obj] = {}
        self.pods: list[Obj] = []
        self.events: dict[str, list[Obj]] = {}
        self.patches: list[tuple[str, Obj]] = []
        self.replaced: list[tuple[str, Obj]] = []
        self.controller: Controller | None = None
        self.reads_since_patch: dict[str, int] = {}
        #: Run just before a replace is checked, e.g. to simulate someone else's concurrent edit.
        self.before_replace: Callable[[FakeCluster], None] | None = None

    # ClusterApi
    def list_deployments(self, label_selector: str) -> list[Obj]:
        return [copy.deepcopy(d) for d in self.deployments.values() if _selects(label_selector, d)]

    def read_deployment(self, name: str) -> Obj:
        if name not in self.deployments:
            raise NotFoundError(f"deployments.apps {name!r} not found", 404)
        self.reads_since_patch[name] = self.reads_since_patch.get(name, 0) + 1
        if self.controller is not None:
            self.controller(self, name, self.reads_since_patch[name])
        return copy.deepcopy(self.deployments[name])

    def patch_deployment(self, name: str, patch: Obj) -> Obj:
        if name not in self.deployments:
            raise NotFoundError(f"deployments.apps {name!r} not found", 404)
        self.patches.append((name, copy.deepcopy(patch)))
        live = self.deployments[name]
        merged = _merge(live, patch)
        if merged["spec"] != live["spec"]:
            merged["metadata"]["generation"] += 1
        self.deployments[name] = merged
        self.reads_since_patch[name] = 0
        return copy.deepcopy(merged)

    def list_pods(self, label_selector: str) -> list[Obj]:
        return [copy.deepcopy(p) for p in self.pods if _selects(label_selector, p)]

    def list_events(self, object_name: str) -> list[Obj]:
        return copy.deepcopy(self.events.get(object_name, []))

    def read_config_map(self, name: str) -> Obj:
        if name not in self.config_maps:
            raise NotFoundError(f"configmaps {name!r} not found", 404)
        return copy.deepcopy(self.config_maps[name])

    def replace_config_map(self, name: str, body: Obj) -> Obj:
        if self.before_replace is not None:
            hook, self.before_replace = self.before_replace, None
            hook(self)
        live = self.config_maps[name]
        if body["metadata"].get("resourceVersion") != live["metadata"]["resourceVersion"]:
            raise ConflictError(f"configmaps {name!r}: the object has been modified", 409)
        stored = copy.deepcopy(body)
        stored["metadata"]["resourceVersion"] = str(int(live["metadata"]["resourceVersion"]) + 1)
        self.config_maps[name] = stored
        self.replaced.append((name, copy.deepcopy(body)))
        return copy.deepcopy(stored)

    # Helpers for tests
    def graphs_text(self) -> str:
        text: str = self.config_maps["onnxmesh-graphs"]["data"]["graphs.yaml"]
        return text


def _selects(selector: str, obj: Obj) -> bool:
    labels = obj["metadata"].get("labels", {})
    pairs = [p.split("=", 1) for p in selector.split(",") if p]
    return all(labels.get(k) == v for k, v in pairs)


def make_deployment(
    name: str, image: str, *, replicas: int = 2, app: str | None = None, env: list[Obj] | None = None
) -> Obj:
    """A Deployment as the API returns it, fully rolled out."""
    tag = image.rsplit(":", 1)[1]
    app = app or name
    track = "canary" if name.endswith("-canary") else "stable"
    selector = {NAME_LABEL: app, "onnxmesh.io/track": track}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {
            "name": name,
            "namespace": NS,
            "generation": 3,
            "labels": {NAME_LABEL: app, "app.kubernetes.io/part-of": "onnxmesh"},
        },
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": selector},
            "template": {
                "metadata": {
                    "labels": {
                        **selector,
                        "app.kubernetes.io/version": tag,
                        "onnxmesh.io/model-version": tag,
                    }
                },
                "spec": {"containers": [{"name": app, "image": image, "env": env or []}]},
            },
        },
        "status": done_status(3, replicas),
    }


def done_status(generation: int, replicas: int) -> Obj:
    return {
        "observedGeneration": generation,
        "replicas": replicas,
        "updatedReplicas": replicas,
        "readyReplicas": replicas,
        "availableReplicas": replicas,
        "conditions": [
            {"type": "Available", "status": "True", "reason": "MinimumReplicasAvailable"},
            {"type": "Progressing", "status": "True", "reason": "NewReplicaSetAvailable"},
        ],
    }


def in_progress_status(generation: int, replicas: int) -> Obj:
    # One new pod surged (maxSurge 1) and is not ready; the old ones still serve.
    return {
        "observedGeneration": generation,
        "replicas": replicas + 1,
        "updatedReplicas": 1,
        "readyReplicas": replicas,
        "availableReplicas": replicas,
        "conditions": [{"type": "Progressing", "status": "True", "reason": "ReplicaSetUpdated"}],
    }


def ready_after(polls: int) -> Controller:
    """A controller that finishes the rollout on the `polls`-th read after a patch."""

    def control(cluster: FakeCluster, name: str, reads: int) -> None:
        dep = cluster.deployments[name]
        generation, replicas = dep["metadata"]["generation"], dep["spec"]["replicas"]
        if reads >= polls:
            dep["status"] = done_status(generation, replicas)
        else:
            dep["status"] = in_progress_status(generation, replicas)

    return control


def never_ready(cluster: FakeCluster, name: str, reads: int) -> None:
    dep = cluster.deployments[name]
    dep["status"] = in_progress_status(dep["metadata"]["generation"], dep["spec"]["replicas"])


def pod(name: str, image: str, *, app: str = "model-a", ready: bool, **status: Any) -> Obj:
    return {
        "metadata": {"name": name, "labels": {NAME_LABEL: app, "onnxmesh.io/track": "stable"}},
        "spec": {"containers": [{"name": app, "image": image}]},
        "status": {
            "phase": "Running" if ready else "Pending",
            "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
            **status,
        },
    }


def mesh_cluster() -> FakeCluster:
    """The mesh of the tests: five Deployments (a model-a canary among them) and the spec ConfigMap."""
    fake = FakeCluster()
    env = [{"name": f"ONNXMESH_SERVICE_{k}_ADDRESS", "value": v} for k, v in ADDRESSES.items()]
    env.append({"name": "ONNXMESH_GRAPHS", "value": "/etc/onnxmesh/graphs.yaml"})
    for dep in (
        make_deployment("preprocess", "onnxmesh/preprocess:0.1.0"),
        make_deployment("model-a", "onnxmesh/model-a:0.1.0"),
        make_deployment("model-a-canary", "onnxmesh/model-a:0.2.0", replicas=1, app="model-a"),
        make_deployment("model-b", "onnxmesh/model-b:0.1.0"),
        make_deployment("orchestrator", "onnxmesh/orchestrator:0.1.0", replicas=3, env=env),
    ):
        fake.deployments[dep["metadata"]["name"]] = dep
    fake.config_maps["onnxmesh-graphs"] = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "onnxmesh-graphs", "namespace": NS, "resourceVersion": "41"},
        "data": {"graphs.yaml": SPEC},
    }
    return fake


class Run:
    """One invocation of the standalone CLI against the fakes."""

    def __init__(self, code: int, out: str, err: str) -> None:
        self.code, self.out, self.err = code, out, err


def run(cluster: FakeCluster, *argv: str, clock: FakeClock | None = None) -> Run:
    out, err = io.StringIO(), io.StringIO()
    args = build_parser().parse_args(list(argv))
    code = run_rollout(args, api=cluster, clock=clock or FakeClock(), out=out, err=err)
    return Run(code, out.getvalue(), err.getvalue())


def changed_lines(before: str, after: str) -> list[str]:
    return [
        line
        for line in difflib.unified_diff(before.splitlines(), after.splitlines(), lineterm="", n=0)
        if line[:1] in "+-" and not line.startswith(("+++", "---"))
    ]


def weights_in(text: str, graph: str = "digits-parallel", step: str = "mlp") -> dict[str, int]:
    return {b.name: b.weight for b in splitter_branches(text, graph, step)}


def outage(reads: range, status: int | None = None) -> Controller:
    """A controller under which the reads numbered in `reads` (after the patch) fail, then all is done."""

    def control(cluster: FakeCluster, name: str, count: int) -> None:
        if cluster.patches and count in reads:
            raise ClusterApiError(f"read deployment {name}: cannot reach the Kubernetes API", status)
        ready_after(1)(cluster, name, count)

    return control


def client_over_fake(cluster: FakeCluster) -> Any:
    """The kubernetes client's own API classes, answered by a FakeCluster instead of a server.

    Every request the real client builds (method, URL with its query, body) is recorded and
    served from the fake, so what goes over the wire is what a test checks. ``down`` makes the
    next requests fail as an unreachable server does. (Imported here: the client is slow to load.)
    """
    from kubernetes.client import ApiClient, Configuration
    from kubernetes.client.rest import RESTResponse

    class ClientOverFake(ApiClient):
        """An ApiClient whose transport is the fake cluster; `requests` records (method, URL)."""

        def __init__(self, cluster: FakeCluster) -> None:
            super().__init__(Configuration(host="https://kubernetes.test"))
            self.cluster = cluster
            self.requests: list[tuple[str, str]] = []
            self.down = 0

        def call_api(
            self, method: str, url: str, header_params: Any = None, body: Any = None, *_: Any, **__: Any
        ) -> Any:
            self.requests.append((method, url))
            if self.down:
                self.down -= 1
                raise urllib3.exceptions.MaxRetryError(None, url, "connection refused")  # type: ignore[arg-type]
            parts = urllib.parse.urlsplit(url)
            path, query = parts.path.strip("/").split("/"), urllib.parse.parse_qs(parts.query)
            kind, name = (
                (path[-1], None) if path[-1] in ("deployments", "pods", "events") else (path[-2], path[-1])
            )
            try:
                data = self._serve(method, kind, name, query, body)
            except NotFoundError as exc:
                return RESTResponse(
                    urllib3.HTTPResponse(json.dumps({"message": str(exc)}).encode(), status=404)
                )
            return RESTResponse(urllib3.HTTPResponse(json.dumps(data).encode(), status=200))

        def _serve(
            self, method: str, kind: str, name: str | None, query: dict[str, list[str]], body: Any
        ) -> Any:
            selector = (query.get("labelSelector") or [""])[0]
            if name is None:
                listed = {
                    "deployments": lambda: self.cluster.list_deployments(selector),
                    "pods": lambda: self.cluster.list_pods(selector),
                    "events": lambda: self.cluster.list_events(query["fieldSelector"][0].split("=", 1)[1]),
                }[kind]()
                return {"items": listed}
            calls: dict[tuple[str, str], Callable[[], Obj]] = {
                ("GET", "deployments"): lambda: self.cluster.read_deployment(name),
                ("PATCH", "deployments"): lambda: self.cluster.patch_deployment(name, body),
                ("GET", "configmaps"): lambda: self.cluster.read_config_map(name),
                ("PUT", "configmaps"): lambda: self.cluster.replace_config_map(name, body),
            }
            return calls[(method, kind)]()

    return ClientOverFake(cluster)
