"""The jobs component (k8s/components/jobs), rendered on top of the dev overlay with
`kubectl kustomize` and checked like the rest of the manifests: strict API schemas, then the
properties batch and async serving depend on. Nothing is applied."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest

from tests.support import kustomize_overlay

Obj = dict[str, Any]
REPO = Path(__file__).resolve().parents[2]
K8S_VERSION = "1.34"
BASE_APPS = {"orchestrator", "preprocess", "model-a", "model-b"}


@pytest.fixture(scope="module")
def objects(tmp_path_factory: pytest.TempPathFactory) -> list[Obj]:
    return list(kustomize_overlay(tmp_path_factory.mktemp("jobs-overlay"), "dev", ("jobs",)))


def get(objects: list[Obj], kind: str, name: str) -> Obj:
    found = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}"
    return found[0]


def pod_spec(obj: Obj) -> Obj:
    if obj["kind"] == "CronJob":
        return pod_spec({"kind": "Job", "spec": obj["spec"]["jobTemplate"]["spec"]})
    spec: Obj = obj["spec"]["template"]["spec"]
    return spec


def jobs_workloads(objects: list[Obj]) -> list[Obj]:
    return [
        get(objects, "Deployment", "jobs"),
        get(objects, "Deployment", "jobs-worker"),
        get(objects, "CronJob", "batch-digits"),
        get(objects, "Job", "batch-digits-once"),
    ]


def test_every_object_passes_the_api_schema_strictly(objects: list[Obj]) -> None:
    errors = []
    for obj in objects:
        try:
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
        except (kubernetes_validate.ValidationError, kubernetes_validate.SchemaNotFoundError) as exc:
            errors.append(f"{obj['kind']}/{obj['metadata']['name']}: {exc}")
    assert not errors, "\n".join(errors)


def test_the_mesh_is_unchanged_and_the_jobs_nodes_are_added(objects: list[Obj]) -> None:
    apps = {
        d["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/name"]
        for d in objects
        if d["kind"] == "Deployment"
    }
    assert apps == BASE_APPS | {"jobs", "jobs-worker"}
    for obj in objects:
        if obj["kind"] != "Namespace":
            assert obj["metadata"]["namespace"] == "onnxmesh", f"{obj['kind']}/{obj['metadata']['name']}"
            assert obj["metadata"]["labels"]["app.kubernetes.io/part-of"] == "onnxmesh"


def test_the_scheduled_batch_never_overlaps_and_keeps_a_short_history(objects: list[Obj]) -> None:
    cron = get(objects, "CronJob", "batch-digits")["spec"]
    assert cron["concurrencyPolicy"] == "Forbid"
    assert 0 < cron["startingDeadlineSeconds"] <= 3600
    assert 0 < cron["successfulJobsHistoryLimit"] <= 5 and 0 < cron["failedJobsHistoryLimit"] <= 5
    job = cron["jobTemplate"]["spec"]
    assert 0 < job["activeDeadlineSeconds"] < 3600, "a run must end before the next hourly one"
    once = get(objects, "Job", "batch-digits-once")["spec"]
    assert once["activeDeadlineSeconds"] > 0 and once["ttlSecondsAfterFinished"] > 0
    for spec in (job, once):
        pod = spec["template"]["spec"]
        assert pod["restartPolicy"] == "Never" and spec["backoffLimit"] >= 1
        (container,) = pod["containers"]
        assert container["command"][:4] == ["python", "-m", "jobs", "batch"]
        data = next(m for m in container["volumeMounts"] if m["name"] == "data")
        assert data["readOnly"] is True
        volume = next(v for v in pod["volumes"] if v["name"] == "data")
        assert volume["persistentVolumeClaim"]["claimName"] == "onnxmesh-batch-data"


def test_the_database_url_only_comes_from_a_secret(objects: list[Obj]) -> None:
    for obj in jobs_workloads(objects):
        (container,) = pod_spec(obj)["containers"]
        env = {e["name"]: e for e in container["env"]}
        db = env["ONNXMESH_JOBS_DB"]
        assert "value" not in db, f"{obj['metadata']['name']}: a literal database URL"
        assert db["valueFrom"]["secretKeyRef"] == {"name": "onnxmesh-jobs-db", "key": "url"}
        assert "orchestrator" in env["ONNXMESH_TARGET"]["value"]


def test_jobs_pods_run_restricted_with_native_grpc_probes(objects: list[Obj]) -> None:
    for obj in jobs_workloads(objects):
        name = obj["metadata"]["name"]
        pod = pod_spec(obj)
        assert pod["securityContext"]["runAsNonRoot"] is True and pod["automountServiceAccountToken"] is False
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        (container,) = pod["containers"]
        sc = container["securityContext"]
        assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False, name
        assert sc["capabilities"]["drop"] == ["ALL"], name
        assert {"cpu", "memory"} <= set(container["resources"]["limits"]), name
        if obj["kind"] == "Deployment":
            port = container["ports"][0]["containerPort"]
            assert port == int(next(e["value"] for e in container["env"] if e["name"] == "ONNXMESH_PORT"))
            for probe in ("startupProbe", "livenessProbe"):
                assert container[probe]["grpc"] == {"port": port, "service": ""}, f"{name} {probe}"
            assert obj["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": 1, "maxUnavailable": 0}
    # The workers scale on their own, apart from the orchestrators.
    hpa = get(objects, "HorizontalPodAutoscaler", "jobs-worker")
    assert hpa["spec"]["scaleTargetRef"]["name"] == "jobs-worker"


def test_network_policies_let_jobs_pods_reach_the_orchestrator_and_the_database(objects: list[Obj]) -> None:
    egress = get(objects, "NetworkPolicy", "jobs-egress")["spec"]
    (selector,) = egress["podSelector"]["matchExpressions"]
    assert set(selector["values"]) == {"jobs", "jobs-worker", "jobs-batch"}
    ports = {p["port"] for rule in egress["egress"] for p in rule["ports"]}
    assert ports == {8001, 5432}
    ingress = get(objects, "NetworkPolicy", "jobs-ingress")["spec"]
    assert ingress["ingress"][0]["ports"] == [{"protocol": "TCP", "port": 8041}]
