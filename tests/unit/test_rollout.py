"""`onnxmesh rollout` against an in-memory cluster (FakeCluster) and a fake clock: no API server."""

from __future__ import annotations

import copy
import difflib
import io
import json
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import urllib3
import yaml

from meshctl.rollout.cli import build_parser, run_rollout
from meshctl.rollout.cluster import KubernetesClusterApi, Obj
from meshctl.rollout.deployments import NAME_LABEL, image_tag, rollout_state
from meshctl.rollout.errors import (
    EXIT_FAILURE,
    EXIT_OK,
    EXIT_USAGE,
    ClusterApiError,
    ConflictError,
    NotFoundError,
    RolloutError,
    UsageError,
)
from meshctl.rollout.graphs import Branch, service_components
from meshctl.rollout.weights import parse_weights, set_splitter_weights, splitter_branches
from orchestrator.spec import parse_spec

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


# --------------------------------------------------------------------------------------------
# The fakes


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
        "status": _done_status(3, replicas),
    }


def _done_status(generation: int, replicas: int) -> Obj:
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


def _in_progress_status(generation: int, replicas: int) -> Obj:
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
            dep["status"] = _done_status(generation, replicas)
        else:
            dep["status"] = _in_progress_status(generation, replicas)

    return control


def never_ready(cluster: FakeCluster, name: str, reads: int) -> None:
    dep = cluster.deployments[name]
    dep["status"] = _in_progress_status(dep["metadata"]["generation"], dep["spec"]["replicas"])


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


@pytest.fixture
def cluster() -> FakeCluster:
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


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


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


# --------------------------------------------------------------------------------------------
# set-image


def test_set_image_patches_only_that_deployment_with_image_and_version_labels(
    cluster: FakeCluster, clock: FakeClock
) -> None:
    untouched = {n: copy.deepcopy(d) for n, d in cluster.deployments.items() if n != "model-a"}
    cluster.controller = ready_after(1)

    result = run(cluster, "set-image", "model-a", "onnxmesh/model-a:0.2.0", clock=clock)

    assert result.code == EXIT_OK, result.err
    assert [name for name, _ in cluster.patches] == ["model-a"]
    patch = cluster.patches[0][1]
    template = patch["spec"]["template"]
    assert template["spec"]["containers"] == [{"name": "model-a", "image": "onnxmesh/model-a:0.2.0"}]
    assert template["metadata"]["labels"] == {
        "onnxmesh.io/model-version": "0.2.0",
        "app.kubernetes.io/version": "0.2.0",
    }
    live = cluster.deployments["model-a"]
    assert live["spec"]["template"]["spec"]["containers"][0]["image"] == "onnxmesh/model-a:0.2.0"
    assert live["spec"]["template"]["metadata"]["labels"]["onnxmesh.io/model-version"] == "0.2.0"
    # The selector is immutable: never part of the patch.
    assert set(patch["spec"]) == {"template"}
    assert "kubernetes.io/change-cause" in patch["metadata"]["annotations"]
    for name, dep in untouched.items():
        assert cluster.deployments[name] == dep
    assert "rollout complete" in result.out


def test_set_image_waits_until_ready_after_a_few_polls(cluster: FakeCluster, clock: FakeClock) -> None:
    cluster.controller = ready_after(4)

    result = run(cluster, "set-image", "model-b", "onnxmesh/model-b:0.3.0", "--timeout", "60", clock=clock)

    assert result.code == EXIT_OK, result.err
    assert cluster.reads_since_patch["model-b"] == 4
    # Polled every 2 s: three sleeps between four reads, far from the timeout.
    assert clock.sleeps == [2.0, 2.0, 2.0]
    assert "1 of 2 replicas updated" in result.out
    assert result.out.strip().endswith("rollout complete")


def test_set_image_times_out_naming_the_pods_that_are_not_ready_and_how_to_undo(
    cluster: FakeCluster, clock: FakeClock
) -> None:
    cluster.controller = never_ready
    new = "onnxmesh/model-a:0.2.0"
    cluster.pods = [
        pod("model-a-old-1", "onnxmesh/model-a:0.1.0", ready=True),
        pod("model-a-old-2", "onnxmesh/model-a:0.1.0", ready=True),
        pod(
            "model-a-new-pull",
            new,
            ready=False,
            containerStatuses=[
                {
                    "name": "model-a",
                    "ready": False,
                    "restartCount": 0,
                    "state": {"waiting": {"reason": "ImagePullBackOff", "message": "Back-off pulling image"}},
                }
            ],
        ),
        pod(
            "model-a-new-probe",
            new,
            ready=False,
            containerStatuses=[
                {"name": "model-a", "ready": False, "restartCount": 0, "state": {"running": {}}}
            ],
        ),
    ]
    cluster.events["model-a-new-probe"] = [
        {"type": "Normal", "reason": "Started", "message": "Started container model-a"},
        {
            "type": "Warning",
            "reason": "Unhealthy",
            "message": 'Readiness probe failed: service unhealthy (responded with "NOT_SERVING")',
        },
    ]

    result = run(cluster, "set-image", "model-a", new, "--timeout", "30", clock=clock)

    assert result.code == EXIT_FAILURE
    assert sum(clock.sleeps) == pytest.approx(30.0)
    err = result.err
    assert "not complete after 30s" in err
    assert "model-a-new-pull" in err and "ImagePullBackOff" in err
    assert "model-a-new-probe" in err and "Readiness probe failed" in err
    assert "model-a-old-1" not in err  # ready pods are not blamed
    assert "kubectl -n onnxmesh rollout undo deployment/model-a" in err
    assert "onnxmesh rollout set-image model-a onnxmesh/model-a:0.1.0" in err


def test_failed_canary_rollout_points_at_the_splitter_to_abort(
    cluster: FakeCluster, clock: FakeClock
) -> None:
    cluster.controller = never_ready

    result = run(
        cluster, "set-image", "model-a-canary", "onnxmesh/model-a:0.3.0", "--timeout", "10", clock=clock
    )

    assert result.code == EXIT_FAILURE
    assert "onnxmesh rollout abort digits-parallel mlp" in result.err


def test_progress_deadline_exceeded_fails_at_once(cluster: FakeCluster, clock: FakeClock) -> None:
    def deadline_exceeded(cluster: FakeCluster, name: str, reads: int) -> None:
        never_ready(cluster, name, reads)
        cluster.deployments[name]["status"]["conditions"] = [
            {
                "type": "Progressing",
                "status": "False",
                "reason": "ProgressDeadlineExceeded",
                "message": 'ReplicaSet "model-b-7c9" has timed out progressing.',
            }
        ]

    cluster.controller = deadline_exceeded

    result = run(cluster, "set-image", "model-b", "onnxmesh/model-b:0.2.0", "--timeout", "300", clock=clock)

    assert result.code == EXIT_FAILURE
    assert clock.sleeps == []
    assert "progress deadline exceeded" in result.err and "has timed out progressing" in result.err


@pytest.mark.parametrize(
    ("component", "image", "message"),
    [
        ("model-c", "onnxmesh/model-c:0.1.0", "no deployment 'model-c'"),
        ("model-a", "onnxmesh/model-a", "has no tag"),
        ("model-a", "onnxmesh/model-a:" + "x" * 70, "cannot be a label value"),
    ],
)
def test_set_image_usage_errors_patch_nothing(
    cluster: FakeCluster, component: str, image: str, message: str
) -> None:
    result = run(cluster, "set-image", component, image)

    assert result.code == EXIT_USAGE
    assert message in result.err
    assert cluster.patches == []


def test_set_image_warns_when_the_repository_changes(cluster: FakeCluster) -> None:
    cluster.controller = ready_after(1)

    result = run(cluster, "set-image", "model-a", "onnxmesh/model-b:0.2.0")

    assert result.code == EXIT_OK
    assert "different repository" in result.err


def test_image_tag_ignores_registry_ports_and_digests() -> None:
    assert image_tag("localhost:5001/onnxmesh/model-a:0.2.0") == "0.2.0"
    assert image_tag("onnxmesh/model-a:v2@sha256:" + "a" * 64) == "v2"
    with pytest.raises(UsageError):
        image_tag("localhost:5001/onnxmesh/model-a")


# --------------------------------------------------------------------------------------------
# rollout_state


@pytest.mark.parametrize(
    ("status", "done", "failed", "message"),
    [
        (_done_status(3, 2), True, False, "complete"),
        (_done_status(2, 2), False, False, "controller"),  # observedGeneration behind
        ({**_done_status(3, 2), "updatedReplicas": 1}, False, False, "1 of 2 replicas updated"),
        ({**_done_status(3, 2), "replicas": 3}, False, False, "1 old replica(s)"),
        ({**_done_status(3, 2), "readyReplicas": 1}, False, False, "1 of 2 updated replicas ready"),
        ({**_done_status(3, 2), "availableReplicas": 1}, False, False, "1 of 2 updated replicas available"),
        ({"observedGeneration": 3}, False, False, "0 of 2"),  # the API omits zero counts
    ],
)
def test_rollout_state(status: Obj, done: bool, failed: bool, message: str) -> None:
    dep = make_deployment("model-a", "onnxmesh/model-a:0.1.0")
    dep["status"] = status

    state = rollout_state(dep)

    assert (state.done, state.failed) == (done, failed)
    assert message in state.message


def test_rollout_state_paused_is_a_failure() -> None:
    dep = make_deployment("model-a", "onnxmesh/model-a:0.1.0")
    dep["spec"]["paused"] = True
    assert rollout_state(dep).failed


# --------------------------------------------------------------------------------------------
# canary, promote, abort


def test_canary_edits_exactly_the_weights_in_the_configmap(cluster: FakeCluster) -> None:
    result = run(cluster, "canary", "digits-parallel", "mlp", "--weights", "mlp-stable=75,mlp-canary=25")

    assert result.code == EXIT_OK, result.err
    [(name, body)] = cluster.replaced
    assert name == "onnxmesh-graphs"
    # Optimistic concurrency: the write carries the resourceVersion that was read.
    assert body["metadata"]["resourceVersion"] == "41"
    after = cluster.graphs_text()
    assert changed_lines(SPEC, after) == [
        "-            - {weight: 90, name: mlp-stable, service: model_a, model: digits-mlp,"
        " inputs: {features: pre.features}}",
        "-            - {weight: 10, name: mlp-canary, service: model_a_canary, model: digits-mlp,"
        " inputs: {features: pre.features}}",
        "+            - {weight: 75, name: mlp-stable, service: model_a, model: digits-mlp,"
        " inputs: {features: pre.features}}",
        "+            - {weight: 25, name: mlp-canary, service: model_a_canary, model: digits-mlp,"
        " inputs: {features: pre.features}}",
    ]
    assert "# Graph spec of the test mesh." in after and "# stable first" in after
    assert "mlp-canary: 10 -> 25 (25%)" in result.out


def test_canary_accepts_stable_and_canary_for_the_two_branches(cluster: FakeCluster) -> None:
    result = run(cluster, "canary", "digits-parallel", "mlp", "--weights", "stable=95,canary=5")

    assert result.code == EXIT_OK, result.err
    assert weights_in(cluster.graphs_text()) == {"mlp-stable": 95, "mlp-canary": 5}


def test_canary_sets_only_the_branches_given(cluster: FakeCluster) -> None:
    result = run(cluster, "canary", "digits-parallel", "mlp", "--weights", "mlp-canary=30")

    assert result.code == EXIT_OK, result.err
    assert weights_in(cluster.graphs_text()) == {"mlp-stable": 90, "mlp-canary": 30}


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["digits-parallel", "mlp", "--weights", "mlp-next=10"], "no branch 'mlp-next'"),
        (["digits-parallel", "mlp", "--weights", "mlp-stable=ninety"], "must be an integer"),
        (["digits-parallel", "mlp", "--weights", "mlp-stable=-1"], "must be an integer >= 0"),
        (["digits-parallel", "mlp", "--weights", "mlp-stable=0,mlp-canary=0"], "at least one weight"),
        (["digits-parallel", "mlp", "--weights", "mlp-stable"], "BRANCH=WEIGHT"),
        (["digits-parallel", "mlp", "--weights", "stable=1,mlp-stable=2"], "given twice"),
        (["digits-parallel", "shadowed", "--weights", "stable=1"], "not a splitter"),
        (["digits-parallel", "nope", "--weights", "stable=1"], "has no step 'nope'"),
        (["digits-nope", "mlp", "--weights", "stable=1"], "no graph 'digits-nope'"),
    ],
)
def test_canary_rejects_bad_requests_and_writes_nothing(
    cluster: FakeCluster, argv: list[str], message: str
) -> None:
    result = run(cluster, "canary", *argv)

    assert result.code == EXIT_USAGE
    assert message in result.err
    assert cluster.replaced == []
    assert cluster.graphs_text() == SPEC


def test_canary_retries_on_a_concurrent_edit_and_keeps_it(cluster: FakeCluster) -> None:
    def someone_else_edits(fake: FakeCluster) -> None:
        cm = fake.config_maps["onnxmesh-graphs"]
        cm["data"]["graphs.yaml"] = cm["data"]["graphs.yaml"].replace("timeout: 5.0", "timeout: 7.5")
        cm["metadata"]["resourceVersion"] = "42"

    cluster.before_replace = someone_else_edits

    result = run(cluster, "canary", "digits-parallel", "mlp", "--weights", "stable=50,canary=50")

    assert result.code == EXIT_OK, result.err
    [(_, body)] = cluster.replaced
    assert body["metadata"]["resourceVersion"] == "42"
    after = cluster.graphs_text()
    assert "timeout: 7.5" in after
    assert weights_in(after) == {"mlp-stable": 50, "mlp-canary": 50}


def test_promote_then_abort(cluster: FakeCluster) -> None:
    promoted = run(cluster, "promote", "digits-parallel", "mlp")

    assert promoted.code == EXIT_OK, promoted.err
    assert weights_in(cluster.graphs_text()) == {"mlp-stable": 0, "mlp-canary": 100}
    # How to finish: the stable Deployment takes the canary's image, then traffic goes back.
    assert (
        "onnxmesh rollout set-image model-a onnxmesh/model-a:0.2.0 && onnxmesh rollout abort digits-parallel mlp"
        in promoted.out
    )

    aborted = run(cluster, "abort", "digits-parallel", "mlp")

    assert aborted.code == EXIT_OK, aborted.err
    assert weights_in(cluster.graphs_text()) == {"mlp-stable": 100, "mlp-canary": 0}
    assert len(cluster.replaced) == 2
    # Nothing but the two weight lines ever changed.
    assert len(changed_lines(SPEC, cluster.graphs_text())) == 4


def test_promote_needs_a_branch_when_there_are_three(cluster: FakeCluster) -> None:
    three = SPEC.replace(
        "            - {weight: 10, name: mlp-canary,",
        "            - {weight: 0, name: mlp-other, service: model_a_canary, model: digits-mlp,"
        " inputs: {features: pre.features}}\n            - {weight: 10, name: mlp-canary,",
    )
    cluster.config_maps["onnxmesh-graphs"]["data"]["graphs.yaml"] = three

    assert run(cluster, "promote", "digits-parallel", "mlp").code == EXIT_USAGE
    result = run(cluster, "promote", "digits-parallel", "mlp", "--branch", "mlp-other")

    assert result.code == EXIT_OK, result.err
    assert weights_in(cluster.graphs_text()) == {"mlp-stable": 0, "mlp-other": 100, "mlp-canary": 0}


def test_abort_when_already_stable_writes_nothing(cluster: FakeCluster) -> None:
    assert run(cluster, "abort", "digits-parallel", "mlp").code == EXIT_OK
    before = len(cluster.replaced)

    result = run(cluster, "abort", "digits-parallel", "mlp")

    assert result.code == EXIT_OK
    assert len(cluster.replaced) == before
    assert "unchanged" in result.out


def test_canary_refuses_a_spec_the_orchestrator_would_reject(cluster: FakeCluster) -> None:
    broken = SPEC.replace(
        "service: preprocess, model: digits-preprocess", "service: nowhere, model: digits-preprocess"
    )
    cluster.config_maps["onnxmesh-graphs"]["data"]["graphs.yaml"] = broken

    result = run(cluster, "canary", "digits-parallel", "mlp", "--weights", "stable=50,canary=50")

    assert result.code == EXIT_FAILURE
    assert "would reject" in result.err and "nowhere" in result.err
    assert cluster.replaced == []


def test_missing_configmap_is_a_failure(cluster: FakeCluster) -> None:
    del cluster.config_maps["onnxmesh-graphs"]

    result = run(cluster, "canary", "digits-parallel", "mlp", "--weights", "stable=1")

    assert result.code == EXIT_FAILURE
    assert "no ConfigMap onnxmesh/onnxmesh-graphs" in result.err


# --------------------------------------------------------------------------------------------
# Editing the spec text


def test_set_weights_keeps_block_style_and_comments_and_adds_a_missing_weight() -> None:
    text = """\
graphs:
  g:
    steps:
      - name: s  # the split
        splitter:
          branches:
            - name: a   # stable
              service: model_a
            - name: b
              weight: 3
              service: model_b
"""
    new = set_splitter_weights(text, "g", "s", {"a": 4, "b": 6})

    assert sorted(changed_lines(text, new)) == sorted(
        [
            "-            - name: a   # stable",
            "+            - weight: 4",
            "+              name: a   # stable",
            "-              weight: 3",
            "+              weight: 6",
        ]
    )
    assert weights_in(new, "g", "s") == {"a": 4, "b": 6}


def test_set_weights_finds_a_splitter_nested_in_another_step() -> None:
    text = """\
graphs:
  g:
    steps:
      - name: fan
        ensemble:
          branches:
            - name: inner
              splitter:
                branches:
                  - {name: x, weight: 1, service: model_a}
                  - {name: y, weight: 1, service: model_a_canary}
"""
    new = set_splitter_weights(text, "g", "inner", {"y": 0})

    assert weights_in(new, "g", "inner") == {"x": 1, "y": 0}


def test_parse_weights() -> None:
    assert parse_weights(" a=1 , b=0") == {"a": 1, "b": 0}
    for bad in ("", "a", "=1", "a=1.5", "a=1,a=2"):
        with pytest.raises(UsageError):
            parse_weights(bad)


def test_splitter_branches_reports_services() -> None:
    assert splitter_branches(SPEC, "digits-parallel", "mlp") == [
        Branch("mlp-stable", 90, "model_a"),
        Branch("mlp-canary", 10, "model_a_canary"),
    ]


def test_invalid_spec_is_a_failure_not_a_usage_error() -> None:
    with pytest.raises(RolloutError) as caught:
        set_splitter_weights("graphs: [unclosed", "g", "s", {"a": 1})
    assert not isinstance(caught.value, UsageError)


# --------------------------------------------------------------------------------------------
# status


def test_status_reports_versions_replicas_graphs_and_weights(cluster: FakeCluster) -> None:
    never_ready(cluster, "model-b", 0)

    result = run(cluster, "status")

    assert result.code == EXIT_OK, result.err
    rows = {line.split()[0]: line.split() for line in result.out.splitlines()[1:6]}
    assert set(rows) == {"preprocess", "model-a", "model-a-canary", "model-b", "orchestrator"}
    assert rows["model-a-canary"][1:5] == ["onnxmesh/model-a:0.2.0", "0.2.0", "1/1", "1"]
    assert rows["model-a"][1:4] == ["onnxmesh/model-a:0.1.0", "0.1.0", "2/2"]
    assert rows["model-a"][-1] == "complete"
    assert " ".join(rows["model-b"][6:]) == "1 of 2 replicas updated"
    assert "  model-a (model_a): digits-parallel, digits-serial" in result.out
    assert "  model-a-canary (model_a_canary): digits-parallel" in result.out
    assert (
        "digits-parallel/mlp: mlp-stable=90 (90%) -> model-a, mlp-canary=10 (10%) -> model-a-canary"
        in result.out
    )
    assert "digits-parallel/shadowed: model-b answers, model-b-canary shadows" in result.out


def test_status_json(cluster: FakeCluster) -> None:
    result = run(cluster, "status", "-o", "json")

    data = json.loads(result.out)
    assert [c["name"] for c in data["components"]] == [
        "model-a",
        "model-a-canary",
        "model-b",
        "orchestrator",
        "preprocess",
    ]
    assert data["splitters"][0]["branches"][1] == {
        "name": "mlp-canary",
        "weight": 10,
        "service": "model_a_canary",
    }
    assert data["service_components"]["model_b_canary"] == "model-b-canary"  # no env: by convention


def test_status_without_a_graph_spec_still_lists_deployments(cluster: FakeCluster) -> None:
    del cluster.config_maps["onnxmesh-graphs"]

    result = run(cluster, "status")

    assert result.code == EXIT_OK
    assert "model-a-canary" in result.out
    assert "note: graph spec unavailable" in result.out


def test_status_of_a_spec_the_orchestrator_rejects_says_why(cluster: FakeCluster) -> None:
    cluster.config_maps["onnxmesh-graphs"]["data"]["graphs.yaml"] = SPEC.replace(
        "service: model_b, model: digits-head", "service: nowhere, model: digits-head"
    )

    result = run(cluster, "status")

    assert result.code == EXIT_OK
    assert "model-a-canary" in result.out and "SPLITTERS" not in result.out
    assert "note: graph spec unavailable: the orchestrator rejects the spec" in result.out
    assert "nowhere" in result.out


def test_service_components_reads_the_orchestrator_environment(cluster: FakeCluster) -> None:
    mapping = service_components(parse_spec(SPEC), cluster.deployments["orchestrator"])

    assert mapping == {
        "preprocess": "preprocess",
        "model_a": "model-a",
        "model_b": "model-b",
        "model_a_canary": "model-a-canary",
        "model_b_canary": "model-b-canary",
    }


# --------------------------------------------------------------------------------------------
# Command line


def test_command_lines_parse() -> None:
    args = build_parser().parse_args(["canary", "g", "s", "--weights", "stable=9,canary=1", "-n", "mesh"])

    assert (args.rollout_command, args.graph, args.step, args.namespace) == ("canary", "g", "s", "mesh")
    assert (args.configmap, args.graphs_key, args.orchestrator) == (
        "onnxmesh-graphs",
        "graphs.yaml",
        "orchestrator",
    )


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["canary", "g", "s"],  # --weights is required
        ["set-image", "model-a"],
        ["set-image", "model-a", "onnxmesh/model-a:1", "--timeout", "0"],
        ["status", "-o", "yaml"],
    ],
)
def test_bad_command_lines_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        build_parser().parse_args(argv)
    assert caught.value.code == EXIT_USAGE


# --------------------------------------------------------------------------------------------
# A short API outage during the wait


def outage(reads: range, status: int | None = None) -> Controller:
    """A controller under which the reads numbered in `reads` (after the patch) fail, then all is done."""

    def control(cluster: FakeCluster, name: str, count: int) -> None:
        if cluster.patches and count in reads:
            raise ClusterApiError(f"read deployment {name}: cannot reach the Kubernetes API", status)
        ready_after(1)(cluster, name, count)

    return control


def test_the_wait_rides_out_a_short_api_outage_with_back_off(cluster: FakeCluster, clock: FakeClock) -> None:
    cluster.controller = outage(range(1, 5))  # four reads fail: the API server restarts

    result = run(cluster, "set-image", "model-a", "onnxmesh/model-a:0.2.0", "--timeout", "120", clock=clock)

    assert result.code == EXIT_OK, result.err
    assert clock.sleeps == [1.0, 2.0, 4.0, 8.0]
    assert "does not answer" in result.out and "answers again (after 15s)" in result.out
    assert result.out.strip().endswith("rollout complete")


def test_an_outage_longer_than_the_timeout_fails_saying_the_rollout_goes_on(
    cluster: FakeCluster, clock: FakeClock
) -> None:
    cluster.controller = outage(range(1, 1000), status=503)

    result = run(cluster, "set-image", "model-a", "onnxmesh/model-a:0.2.0", "--timeout", "30", clock=clock)

    assert result.code == EXIT_FAILURE
    assert sum(clock.sleeps) == pytest.approx(30.0)
    assert "not complete after 30s" in result.err and "has not answered for the last 30s" in result.err
    assert "kubectl -n onnxmesh rollout status deployment/model-a" in result.err


def test_an_api_refusal_during_the_wait_is_not_retried(cluster: FakeCluster, clock: FakeClock) -> None:
    cluster.controller = outage(range(1, 1000), status=403)

    result = run(cluster, "set-image", "model-a", "onnxmesh/model-a:0.2.0", clock=clock)

    assert result.code == EXIT_FAILURE
    assert clock.sleeps == []


# --------------------------------------------------------------------------------------------
# Hints that name what exists


def test_set_image_of_an_unknown_deployment_names_the_ones_there_and_the_likely_one(
    cluster: FakeCluster,
) -> None:
    result = run(cluster, "set-image", "model_a", "onnxmesh/model-a:0.2.0")

    assert result.code == EXIT_USAGE
    assert "no deployment 'model_a' in namespace onnxmesh; did you mean 'model-a'?" in result.err
    assert "(Deployments: model-a, model-a-canary, model-b, orchestrator, preprocess)" in result.err
    assert cluster.patches == []


def test_canary_on_a_spec_without_splitters_says_which_overlay_has_them(cluster: FakeCluster) -> None:
    # The spec the dev and production overlays deploy.
    cluster.config_maps["onnxmesh-graphs"]["data"]["graphs.yaml"] = (
        REPO / "k8s/base/graphs.yaml"
    ).read_text()

    result = run(cluster, "canary", "digits-serial", "mlp", "--weights", "stable=90,canary=10")

    assert result.code == EXIT_USAGE
    assert "step 'mlp' of graph 'digits-serial' is not a splitter" in result.err
    assert "kubectl apply -k k8s/overlays/dev-canary" in result.err
    assert cluster.replaced == []


def test_canary_with_a_typo_lists_the_steps_and_the_splitters_not_the_inputs(cluster: FakeCluster) -> None:
    result = run(cluster, "canary", "digits-parallel", "mpl", "--weights", "stable=1")

    assert result.code == EXIT_USAGE
    steps = result.err.split("its steps: ", 1)[1].split(")", 1)[0].split(", ")
    assert steps == ["head", "head-next", "mlp", "mlp-canary", "mlp-stable", "pre", "shadowed"]
    assert "splitter steps in the spec: digits-parallel/mlp" in result.err


# --------------------------------------------------------------------------------------------
# The real client: field manager, kubeconfig, an unreachable API


def client_over_fake(cluster: FakeCluster) -> Any:
    """The kubernetes client's own API classes, answered by a FakeCluster instead of a server.

    Every request the real client builds (method, URL with its query, body) is recorded and
    served from the fake, so what goes over the wire is what a test checks. ``down`` makes the
    next requests fail as an unreachable server does. (Imported here: the client is slow to load.)
    """
    from kubernetes.client import ApiClient, Configuration
    from kubernetes.client.rest import RESTResponse

    class ClientOverFake(ApiClient):  # type: ignore[misc]
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


def test_every_write_is_made_as_field_manager_onnxmesh(cluster: FakeCluster, clock: FakeClock) -> None:
    cluster.controller = ready_after(2)
    wire = client_over_fake(cluster)
    api = KubernetesClusterApi(NS, api_client=wire)
    out, err = io.StringIO(), io.StringIO()

    for argv in (
        ["set-image", "model-a", "onnxmesh/model-a:0.2.0"],
        ["canary", "digits-parallel", "mlp", "--weights", "stable=50,canary=50"],
    ):
        code = run_rollout(build_parser().parse_args(argv), api=api, clock=clock, out=out, err=err)
        assert code == EXIT_OK, err.getvalue()

    writes = [(method, url) for method, url in wire.requests if method not in ("GET", "HEAD")]
    assert [method for method, _ in writes] == ["PATCH", "PUT"]
    for _, url in writes:
        assert urllib.parse.parse_qs(urllib.parse.urlsplit(url).query)["fieldManager"] == ["onnxmesh"]
    assert weights_in(cluster.graphs_text()) == {"mlp-stable": 50, "mlp-canary": 50}


def test_an_unreachable_api_through_the_real_client_is_ridden_out(
    cluster: FakeCluster, clock: FakeClock
) -> None:
    cluster.controller = ready_after(1)
    wire = client_over_fake(cluster)
    api = KubernetesClusterApi(NS, api_client=wire)
    # The patch goes through; then the server is away for three reads.
    original = cluster.patch_deployment

    def patch_then_go_away(name: str, patch: Obj) -> Obj:
        wire.down = 3
        return original(name, patch)

    cluster.patch_deployment = patch_then_go_away  # type: ignore[method-assign]
    out, err = io.StringIO(), io.StringIO()
    args = build_parser().parse_args(["set-image", "model-b", "onnxmesh/model-b:0.2.0", "--timeout", "120"])

    assert run_rollout(args, api=api, clock=clock, out=out, err=err) == EXIT_OK, err.getvalue()
    assert "cannot reach the Kubernetes API" in out.getvalue()
    assert clock.sleeps[:3] == [1.0, 2.0, 4.0]


def test_kubeconfig_flag_names_the_file_that_is_read(tmp_path: Path) -> None:
    args = build_parser().parse_args(["status", "--kubeconfig", str(tmp_path / "nope.yaml")])
    assert args.kubeconfig == str(tmp_path / "nope.yaml")
    err = io.StringIO()

    assert run_rollout(args, err=err, out=io.StringIO()) == EXIT_FAILURE
    assert f"cannot load kubeconfig {tmp_path / 'nope.yaml'}" in err.getvalue()

    kubeconfig = tmp_path / "config.yaml"
    kubeconfig.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "c", "cluster": {"server": "https://127.0.0.1:1"}}],
                "users": [{"name": "u", "user": {"token": "t"}}],
                "contexts": [{"name": "mine", "context": {"cluster": "c", "user": "u"}}],
                "current-context": "mine",
            }
        )
    )
    # Loads (nothing is called yet), and a context the file lacks is named in the error.
    KubernetesClusterApi(NS, None, str(kubeconfig))
    args = build_parser().parse_args(["status", "--kubeconfig", str(kubeconfig), "--context", "theirs"])
    err = io.StringIO()
    assert run_rollout(args, err=err, out=io.StringIO()) == EXIT_FAILURE
    assert f"cannot load kubeconfig {kubeconfig}" in err.getvalue() and "theirs" in err.getvalue()
