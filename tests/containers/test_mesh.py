"""The four node images running as Kubernetes runs them, calling each other over 127.0.0.1.

Each container is started from its Deployment in the rendered dev overlay (tests/containers/pods.py):
read-only root, UID 10001, no capabilities, the manifest's env and limits, /tmp as a tmpfs, the
graph ConfigMap mounted read-only. Then: every node SERVING to a probe like the kubelet's; the
three graphs answer tritonclient with their accuracy; and model_a is replaced by a version-2
image (one model directory added to the same image, nothing rebuilt) while traffic flows:
the old container drains on SIGTERM within its grace period, no request fails, and the
answers move to version 2.

The orchestrator reaches model_a at two addresses, ``ipv4:127.0.0.1:P1,127.0.0.1:P2``, as it
would reach two pod IPs behind the headless Service: the old container serves P1, the new one
comes up on P2, and the old one is stopped only once the orchestrator sends it traffic (on a
cluster: once the endpoints list it and the channel has re-resolved).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import pytest

from demo.topology import DEFAULT_GRAPH_NAMES, MODEL_A, MODEL_SERVICES, ORCHESTRATOR, SERVICES
from images.build import BuiltImage
from meshctl.engine import ContainerEngine
from meshctl.mesh import kubernetes_name
from meshctl.rehearsal import Traffic, versioned_copy
from orchestrator.addresses import address_variable
from tests.containers.conftest import FIGURES, REPO, Manifests
from tests.containers.pods import Container, ContainerSpec
from tests.support import free_port

# The first run of the suite builds the images inside the `images` fixture.
pytestmark = pytest.mark.timeout(1800)

#: The model_a version-2 image: a test name, never mistaken for a release.
V2_IMAGE = "localhost/onnxmesh-test/model-a:2"

TRITON_ACCURACY = textwrap.dedent(
    """
    import json, sys
    import tritonclient.grpc as tc
    from demo.digits import load_holdout

    # One image per request, as a client would send them (the cascade decides per request).
    holdout, client, out = load_holdout(), tc.InferenceServerClient(sys.argv[1]), {}
    for graph in sys.argv[2:]:
        correct = 0
        for image, label in zip(holdout.images, holdout.labels):
            tensor = tc.InferInput("image", [1, 8, 8], "UINT8")
            tensor.set_data_from_numpy(image[None])
            correct += int(client.infer(graph, [tensor], client_timeout=30).as_numpy("label")[0] == label)
        out[graph] = correct / len(holdout)
    print(json.dumps(out))
    """
)


@dataclass
class Node:
    """One running node: its container and its own ports on 127.0.0.1."""

    service: str
    container: Container
    port: int
    metrics_port: int
    startup_seconds: float

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


@dataclass
class Mesh:
    nodes: dict[str, Node]
    manifests: Manifests
    stack: ExitStack
    #: What the orchestrator is told for model_a: the running container's port and a free one.
    model_a_target: str

    def spare_model_a_port(self) -> int:
        ports = [int(a.rsplit(":", 1)[1]) for a in self.model_a_target.removeprefix("ipv4:").split(",")]
        return next(p for p in ports if p != self.nodes[MODEL_A].port)

    def address(self, service: str) -> str:
        return self.nodes[service].address


def container_name(what: str) -> str:
    # The pid keeps concurrent runs on one machine apart.
    return f"onnxmesh-test-{os.getpid()}-{what}"


def start_node(
    engine: ContainerEngine,
    manifests: Manifests,
    service: str,
    *,
    port: int,
    env: dict[str, str],
    name: str,
    image: str | None = None,
) -> tuple[Container, int]:
    spec = ContainerSpec.from_deployment(manifests.get("Deployment", kubernetes_name(service)))
    metrics_port = free_port()
    # Host networking: each container gets its own ports on 127.0.0.1 (a pod has its own IP).
    env = {
        "ONNXMESH_HOST": "127.0.0.1",
        "ONNXMESH_PORT": str(port),
        "ONNXMESH_METRICS_PORT": str(metrics_port),
    } | env
    container = Container(
        engine, spec, name, image=image, env=env, config_map_data=manifests.config_map_data()
    )
    return container, metrics_port


@pytest.fixture(scope="module")
def mesh(engine: ContainerEngine, images: dict[str, BuiltImage], manifests: Manifests) -> Iterator[Mesh]:
    ports = {service: free_port() for service in SERVICES}
    addresses = {address_variable(s): f"127.0.0.1:{ports[s]}" for s in MODEL_SERVICES}
    # The second address is where model_a's next version will come up.
    addresses[address_variable(MODEL_A)] = f"ipv4:127.0.0.1:{ports[MODEL_A]},127.0.0.1:{free_port()}"
    extra = {ORCHESTRATOR: addresses}
    with ExitStack() as stack:
        nodes: dict[str, Node] = {}
        # The model services first, together; the orchestrator checks its graphs against them.
        for group in (MODEL_SERVICES, (ORCHESTRATOR,)):
            started = {}
            for service in group:
                container, metrics_port = start_node(
                    engine,
                    manifests,
                    service,
                    port=ports[service],
                    env=extra.get(service, {}),
                    name=container_name(kubernetes_name(service)),
                )
                stack.enter_context(container)
                started[service] = (container, metrics_port)
            for service, (container, metrics_port) in started.items():
                seconds = container.wait_serving(f"127.0.0.1:{ports[service]}")
                nodes[service] = Node(service, container, ports[service], metrics_port, seconds)
        yield Mesh(nodes, manifests, stack, addresses[address_variable(MODEL_A)])


def test_every_node_is_serving_to_a_probe_like_the_kubelets(mesh: Mesh) -> None:
    lines = []
    for node in mesh.nodes.values():
        spec = node.container.spec
        # The probes' service name is what the kubelet asks for.
        assert {probe_service for _, probe_service in spec.probes.values()} == {""}
        assert node.container.running
        # onnxruntime's telemetry is off in the image: no warning about a read-only $HOME.
        assert "telemetry" not in node.container.log(), node.container.log()[-2000:]
        lines.append(
            f"  {spec.deployment:<13} SERVING after {node.startup_seconds:4.1f} s, "
            f"memory {node.container.stats()} (limit {spec.memory_limit})"
        )
    FIGURES.append(
        "nodes (read-only root, UID 10001, no capabilities, the dev overlay's env):\n" + "\n".join(lines)
    )


def test_the_three_graphs_answer_a_stock_client_with_their_accuracy(mesh: Mesh) -> None:
    # tritonclient registers the same protobuf package as our stubs: its own process.
    done = subprocess.run(
        [sys.executable, "-c", TRITON_ACCURACY, mesh.address(ORCHESTRATOR), *DEFAULT_GRAPH_NAMES],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    accuracy = json.loads(done.stdout)
    assert set(accuracy) == set(DEFAULT_GRAPH_NAMES)
    for graph, value in accuracy.items():
        assert value >= 0.95, (graph, value)
    FIGURES.append(
        "graphs through the orchestrator container (tritonclient, 360 held-out digits): "
        + ", ".join(f"{graph} {value:.3f}" for graph, value in accuracy.items())
    )


def build_v2_image(engine: ContainerEngine, v1: BuiltImage) -> list[str]:
    """model_a's image plus a version-2 model directory, nothing else: returns its layers."""
    info = engine.inspect_image(v1.ref) or {}
    env = dict(item.split("=", 1) for item in info["Config"]["Env"])  # type: ignore[index]
    model_dir = env["ONNXMESH_MODEL_DIR"]
    with tempfile.TemporaryDirectory(prefix="onnxmesh-v2-") as tmp:
        context = Path(tmp)
        versioned_copy(REPO / "services/model_a/models", "digits-mlp", "2", context)
        (context / "Dockerfile").write_text(
            f"FROM {v1.ref}\nCOPY --chown=0:0 digits-mlp/2 {model_dir}/digits-mlp/2\n"
        )
        command = engine.build_command(
            context=context, tag=V2_IMAGE, build_args={}, labels={}, ca_bundle=None, dockerfile=None
        )
        done = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    layers = (engine.inspect_image(V2_IMAGE) or {})["RootFS"]["Layers"]  # type: ignore[index]
    return list(layers)


def test_model_a_is_replaced_by_version_2_with_traffic_flowing_and_no_request_fails(
    mesh: Mesh, engine: ContainerEngine, images: dict[str, BuiltImage]
) -> None:
    v1_layers = (engine.inspect_image(images[MODEL_A].ref) or {})["RootFS"]["Layers"]  # type: ignore[index]
    v2_layers = build_v2_image(engine, images[MODEL_A])
    mesh.stack.callback(lambda: subprocess.run(engine.cli("rmi", "--force", V2_IMAGE), capture_output=True))
    # Nothing rebuilt: the same layers, plus the one holding the new model version.
    assert v2_layers[:-1] == v1_layers and len(v2_layers) == len(v1_layers) + 1

    old = mesh.nodes[MODEL_A]
    spec = old.container.spec
    port = mesh.spare_model_a_port()
    traffic = Traffic(
        mesh.address(ORCHESTRATOR), "digits-serial", steps=["mlp"], concurrency=4, max_seconds=300
    )
    with traffic:
        traffic.wait_for(200)
        # maxSurge 1, maxUnavailable 0: the new container is ready before the old one goes.
        new, metrics_port = start_node(
            engine,
            mesh.manifests,
            MODEL_A,
            port=port,
            env={},
            name=container_name("model-a-v2"),
            image=V2_IMAGE,
        )
        mesh.stack.enter_context(new)
        new.wait_serving(f"127.0.0.1:{port}")
        # The orchestrator's channel finds the new replica when it next tries that address
        # (gRPC's reconnect backoff, at most 2 minutes): its answers are the condition.
        picked_up = time.monotonic()
        deadline = picked_up + 150
        while "2" not in {version for _, version in report_versions(traffic)} and time.monotonic() < deadline:
            time.sleep(0.1)  # the poll interval of the wait on the answers above
        picked_up = time.monotonic() - picked_up
        assert "2" in {v for _, v in report_versions(traffic)}, "the orchestrator never called version 2"
        # The kubelet's preStop sleep only waits for the endpoints to drop the pod; there are
        # none here, so SIGTERM comes at once and must be done within what the grace period leaves.
        drain_budget = spec.grace_period - spec.pre_stop_sleep
        signalled = time.monotonic()
        old.container.signal("TERM")
        exit_code = old.container.wait_exit(timeout=drain_budget)
        drained = time.monotonic() - signalled
        traffic.wait_for(300)
        report = traffic.stop()
    mesh.nodes[MODEL_A] = Node(MODEL_A, new, port, metrics_port, 0.0)

    assert exit_code == 0, old.container.log()[-3000:]
    assert "draining" in old.container.log()
    assert report.failed == 0, report.errors
    answered = [version for _, version in report.versions]
    assert answered[:50] == ["1"] * 50
    assert answered[-100:] == ["2"] * 100, answered[-100:]
    FIGURES.append(
        f"model_a 1 -> 2 under traffic (digits-serial, 4 clients): {report.sent} requests sent, "
        f"{report.failed} failed, {report.mixed_seconds('1', '2'):.2f} s of mixed versions; "
        f"the orchestrator sent the new container traffic {picked_up:.1f} s after it was SERVING; "
        f"the old one drained and exited {exit_code} {drained:.1f} s after SIGTERM (budget {drain_budget:.0f} s)"
    )


def report_versions(traffic: Traffic) -> list[tuple[float, str]]:
    # A copy: the traffic thread appends while the test reads.
    return list(traffic.report.versions)
