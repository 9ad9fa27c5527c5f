"""The built images against the rendered manifests, and what is (not) inside them.

The manifests and the images are written apart (k8s/, Dockerfile); these tests read both so
they cannot drift: every image a pod names is built; each node's image listens on the port its
Deployment exposes and probes, runs as the manifest's user, exposes the metrics port, reads the
graph spec where the ConfigMap is mounted; the jobs workloads' commands run in the jobs image.
And the images are lean: no pip, compilers, Kubernetes client or test tools, the jobs extra only
in the jobs and orchestrator images (capture writes to the job store), no trace of the CA
bundle the build was given.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from demo.topology import MODULES, ORCHESTRATOR, SERVICES
from images.build import JOBS, NODE, NODE_BUILDER, BuiltImage
from images.cli import default_ca_bundle
from meshctl.engine import ContainerEngine
from meshctl.mesh import kubernetes_name
from tests.containers.conftest import FIGURES, Manifests
from tests.containers.pods import ContainerSpec

# The first run of the suite builds the images inside the `images` fixture.
pytestmark = pytest.mark.timeout(1800)

#: Modules and programs no runtime image may have.
NEVER = [
    "pip",
    "setuptools",
    "wheel",
    "uv",
    "kubernetes",
    "grpc_tools",
    "pytest",
    "mypy",
    "tritonclient",
    "sklearn",
]
PROGRAMS = ["gcc", "cc", "c++", "make", "pip", "pip3", "apt-get"]
JOBS_EXTRA = ["sqlalchemy", "psycopg", "tqdm"]

PROBE = """
import importlib.util, json, shutil, sys
modules, programs = sys.argv[1].split(","), sys.argv[2].split(",")
print(json.dumps({
    "modules": [m for m in modules if importlib.util.find_spec(m) is not None],
    "programs": [p for p in programs if shutil.which(p)],
}))
"""


def config(engine: ContainerEngine, image: BuiltImage) -> dict[str, Any]:
    info = engine.inspect_image(image.ref)
    assert info is not None, f"{image.ref} is not there"
    found: dict[str, Any] = info["Config"]  # type: ignore[assignment]
    return found


def image_env(engine: ContainerEngine, image: BuiltImage) -> dict[str, str]:
    return dict(item.split("=", 1) for item in config(engine, image).get("Env") or [])


def run_in(
    engine: ContainerEngine, image: BuiltImage, *command: str, user: str | None = None
) -> subprocess.CompletedProcess[str]:
    as_user = ["--user", user] if user is not None else []
    return subprocess.run(
        engine.run_command(
            "--rm", "--read-only", *as_user, "--entrypoint", command[0], image.ref, *command[1:]
        ),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def unqualified(image: str) -> str:
    return image.removeprefix("docker.io/")


def test_every_image_the_manifests_name_is_built_under_that_name(
    images: dict[str, BuiltImage], manifests: Manifests
) -> None:
    # Beside them, the runtime images `onnxmesh images` builds any mesh's services on.
    runtimes = {unqualified(images[name].ref) for name in (NODE, NODE_BUILDER)}
    assert {unqualified(i.ref) for i in images.values()} == manifests.images() | runtimes
    FIGURES.append(
        "image sizes: " + ", ".join(f"{unqualified(i.ref)} {i.size / 1e6:.0f} MB" for i in images.values())
    )


@pytest.mark.parametrize("service", SERVICES)
def test_each_node_image_matches_its_deployment(
    service: str, engine: ContainerEngine, images: dict[str, BuiltImage], manifests: Manifests
) -> None:
    spec = ContainerSpec.from_deployment(manifests.get("Deployment", kubernetes_name(service)))
    image = images[service]
    cfg, env = config(engine, image), image_env(engine, image)

    # One port everywhere: what the image listens on, what the pod exposes and every probe calls.
    assert env["ONNXMESH_PORT"] == spec.env["ONNXMESH_PORT"] == str(spec.ports["grpc"])
    assert set(spec.probes) == {"startupProbe", "readinessProbe", "livenessProbe"}
    assert {port for port, _ in spec.probes.values()} == {spec.ports["grpc"]}
    assert env["ONNXMESH_METRICS_PORT"] == spec.env["ONNXMESH_METRICS_PORT"] == str(spec.ports["metrics"])
    assert set(cfg.get("ExposedPorts") or {}) == {f"{port}/tcp" for port in spec.ports.values()}
    # The user runAsNonRoot checks, numeric, as the pod's securityContext sets it.
    assert cfg["User"] == f"{spec.user}:{spec.group}" and spec.user != 0
    assert cfg["Entrypoint"] == ["python", "-m", MODULES[service]]
    assert not spec.command, "the image's entrypoint is what runs"
    if service == ORCHESTRATOR:
        # The spec baked into the image sits where the ConfigMap is mounted.
        assert env["ONNXMESH_GRAPHS"] == spec.env["ONNXMESH_GRAPHS"]
        assert str(Path(env["ONNXMESH_GRAPHS"]).parent) in spec.config_maps
    else:
        listing = run_in(engine, image, "ls", env["ONNXMESH_MODEL_DIR"])
        assert listing.returncode == 0, listing.stderr
        assert listing.stdout.split(), f"{image.ref}: no model in {env['ONNXMESH_MODEL_DIR']}"


def test_the_jobs_workloads_commands_run_in_the_jobs_image(
    engine: ContainerEngine, images: dict[str, BuiltImage], manifests: Manifests
) -> None:
    image = images[JOBS]
    workloads = [manifests.get("Deployment", "jobs"), manifests.get("Deployment", "jobs-worker")]
    cron = manifests.get("CronJob", "batch-digits")
    for workload in [*workloads, {"metadata": cron["metadata"], "spec": cron["spec"]["jobTemplate"]["spec"]}]:
        container = workload["spec"]["template"]["spec"]["containers"][0]
        assert unqualified(image.ref) == container["image"]
        command = [*container["command"], *(container.get("args") or []), "--help"]
        done = run_in(engine, image, *command)
        assert done.returncode == 0, (workload["metadata"]["name"], command, done.stderr[-2000:])
    service = ContainerSpec.from_deployment(workloads[0])
    assert image_env(engine, image)["ONNXMESH_PORT"] == str(service.ports["grpc"])


@pytest.mark.parametrize("service", [*SERVICES, JOBS])
def test_the_image_is_lean(service: str, engine: ContainerEngine, images: dict[str, BuiltImage]) -> None:
    image = images[service]
    modules = NEVER + JOBS_EXTRA
    done = run_in(engine, image, "python", "-c", PROBE, ",".join(modules), ",".join(PROGRAMS))
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout)
    assert found["programs"] == [], f"{image.ref} has {found['programs']}"
    expected = JOBS_EXTRA if service in (JOBS, ORCHESTRATOR) else []  # capture writes to the job store
    assert found["modules"] == expected, f"{image.ref} has {found['modules']}"


def test_the_build_ca_bundle_is_in_no_image(engine: ContainerEngine, images: dict[str, BuiltImage]) -> None:
    bundle = default_ca_bundle()
    if bundle is None:
        pytest.skip("no host CA bundle was given to the build")
    digest = hashlib.sha256(bundle.read_bytes()).hexdigest()
    find = (
        r"find / -xdev -type f \( -name '*.crt' -o -name '*.pem' -o -name 'ca_bundle' \) -exec sha256sum {} +"
    )
    for image in images.values():
        env = image_env(engine, image)
        assert not {"SSL_CERT_FILE", "PIP_CERT", "REQUESTS_CA_BUNDLE"} & set(env), image.ref
        # As root, to see every file.
        done = run_in(engine, image, "sh", "-c", find, user="0")
        assert done.returncode == 0, done.stderr
        assert digest not in done.stdout, f"{image.ref} carries the build's CA bundle"
        assert "/run/secrets" not in done.stdout
