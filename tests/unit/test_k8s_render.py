"""`onnxmesh k8s`: k8s/base is the demo mesh file rendered, and a user's mesh renders valid objects.

The rendered objects' properties (probes, security, drain, policies) are asserted on k8s/base by
test_k8s_manifests.py; here: the base is up to date, and any mesh renders a base that passes the
API schema strictly with one Deployment, headless Service, PDB and HPA per service.
"""

from __future__ import annotations

from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from meshctl.cli import main as cli_main
from meshctl.k8s import render
from meshctl.mesh import load_mesh
from tests.support import K8S_VERSION, ROOT, kustomize
from tests.unit.mesh_fakes import mesh, write


def test_k8s_base_is_the_demo_mesh_rendered() -> None:
    rendered = render(load_mesh(ROOT / "demo" / "mesh.yaml"))
    stale = [name for name, text in rendered.items() if (ROOT / "k8s/base" / name).read_text() != text]
    extra = sorted({p.name for p in (ROOT / "k8s/base").glob("*.yaml")} - set(rendered))
    assert not stale and not extra, (
        f"k8s/base is not the demo mesh rendered (stale: {stale}, not rendered: {extra}): "
        "onnxmesh k8s demo/mesh.yaml --out k8s/base"
    )


def test_a_users_mesh_renders_a_valid_base(folder: Path, tmp_path: Path) -> None:
    body = mesh(folder, images={"prefix": "registry.example.com/team/", "tag": "2.0"})
    body["services"]["double"]["settings"] = {"inference_workers": 3, "grace": 20}
    out = tmp_path / "base"
    assert cli_main(["k8s", str(write(folder, body)), "--out", str(out)]) == 0
    # Strictly valid as written, before kustomize (kubectl may be absent).
    for path in out.glob("*.yaml"):
        if path.name in ("kustomization.yaml", "graphs.yaml"):
            continue
        for obj in yaml.safe_load_all(path.read_text()):
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    objects = [
        o
        for p in out.glob("*.yaml")
        if p.name not in ("kustomization.yaml", "graphs.yaml")
        for o in yaml.safe_load_all(p.read_text())
    ]
    kinds = {(o["kind"], o["metadata"]["name"]) for o in objects}
    for name in ("double", "negate", "orchestrator"):
        for kind in (
            "Deployment",
            "Service",
            "PodDisruptionBudget",
            "HorizontalPodAutoscaler",
            "ServiceAccount",
        ):
            assert (kind, name) in kinds
    deployment = next(o for o in objects if o["kind"] == "Deployment" and o["metadata"]["name"] == "double")
    assert deployment["spec"]["replicas"] == 2
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert container["image"] == "registry.example.com/team/double:2.0"
    env = {e["name"]: e["value"] for e in container["env"]}
    assert (env["ONNXMESH_INFERENCE_WORKERS"], env["ONNXMESH_GRACE"], env["ONNXMESH_PORT"]) == (
        "3",
        "20",
        "8011",
    )
    assert container["readinessProbe"]["grpc"]["port"] == 8011
    orchestrator = next(
        o for o in objects if o["kind"] == "Deployment" and o["metadata"]["name"] == "orchestrator"
    )
    env = {e["name"]: e["value"] for e in orchestrator["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["ONNXMESH_SERVICE_NEGATE_ADDRESS"] == "dns:///negate.onnxmesh.svc.cluster.local:8021"
    service = next(o for o in objects if o["kind"] == "Service" and o["metadata"]["name"] == "negate")
    assert service["spec"]["clusterIP"] == "None"


def test_a_users_base_builds_with_kustomize(folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "base"
    assert cli_main(["k8s", str(write(folder, mesh(folder))), "--out", str(out)]) == 0
    objects = kustomize(out)
    config = next(o for o in objects if o["kind"] == "ConfigMap")
    assert "double-negate" in yaml.safe_load(config["data"]["graphs.yaml"])["graphs"]
    assert all(o["metadata"].get("namespace") == "onnxmesh" for o in objects if o["kind"] != "Namespace")
    with pytest.raises(StopIteration):
        next(o for o in objects if o["metadata"]["name"] == "model-a")


def test_each_service_image_is_the_runtime_plus_its_models_and_requirements(folder: Path) -> None:
    from meshctl.images import MODEL_DIR, build_context, dockerfile

    body = mesh(folder, images={"prefix": "team/", "tag": "3"})
    body["services"]["double"]["requirements"] = ["six==1.17.0"]
    loaded = load_mesh(write(folder, body))
    python_step = dockerfile(loaded, loaded.services["double"])
    assert "uv pip install --python /opt/venv/bin/python --no-cache 'six==1.17.0'" in python_step
    assert "COPY --from=requirements /opt/venv /opt/venv" in python_step
    assert (
        f"ENV ONNXMESH_NAME=double ONNXMESH_RUNTIME=python ONNXMESH_MODEL_DIR={MODEL_DIR} ONNXMESH_PORT=8011"
        in python_step
    )
    onnx_step = dockerfile(loaded, loaded.services["negate"])
    assert (
        "requirements" not in onnx_step
        and onnx_step.startswith("# negate")
        and "FROM onnxmesh/node:" in onnx_step
    )
    orchestrator = dockerfile(loaded, loaded.orchestrator)
    assert 'ENTRYPOINT ["python", "-m", "orchestrator"]' in orchestrator
    context = build_context(loaded, loaded.services["double"], folder / "context")
    assert (context / "models/double/1/model.py").is_file() and (context / "Dockerfile").is_file()
