"""`onnxmesh images MESH`: one image per service of a mesh file, tagged as `onnxmesh k8s` names them.

Each service's image is the onnxmesh runtime image (`onnxmesh/node:<version>`, the Dockerfile's
svc-node stage, built by `make images` in a checkout) plus the service's model directory and its
settings, and for a Python service its extra requirements (installed with uv in
`onnxmesh/node-builder`, then its venv copied over: no pip or uv in the final image). The
orchestrator's image is the same runtime with the mesh file at the path its ConfigMap is mounted
on. The build context of each image is a temporary folder holding only its Dockerfile, its model
directory (or the mesh file) and nothing else.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

from meshctl.engine import EngineUnavailable, find_engine
from meshctl.k8s import METRICS_PORT, image_of
from meshctl.mesh import Images, Mesh, Node

#: Where a service's image keeps its model directory, and the orchestrator its mesh file.
MODEL_DIR = "/opt/onnxmesh/models"
GRAPHS = "/etc/onnxmesh/graphs.yaml"


def runtime_images(mesh: Mesh) -> tuple[str, str]:
    """The onnxmesh runtime images (node, node-builder) of this onnxmesh release."""
    tag = Images("onnxmesh/").tag
    return f"onnxmesh/node:{tag}", f"onnxmesh/node-builder:{tag}"


def dockerfile(mesh: Mesh, node: Node, qualify: Callable[[str], str] = str) -> str:
    """The Dockerfile of one node's image (its context: `models/` or `mesh.yaml` beside it);
    `qualify` names the runtime images as the engine stores them (podman: docker.io/...)."""
    runtime, builder = map(qualify, runtime_images(mesh))
    lines = [f"# {node.name}: rendered by `onnxmesh images` from {mesh.path.name}; do not edit."]
    if node.requirements:
        requirements = " ".join(f"'{r}'" for r in node.requirements)
        lines += [
            f"FROM {builder} AS requirements",
            "RUN --mount=type=secret,id=ca_bundle with-ca \\",
            f"    uv pip install --python /opt/venv/bin/python --no-cache {requirements}",
        ]
    lines.append(f"FROM {runtime}")
    if node.requirements:
        lines.append("COPY --from=requirements /opt/venv /opt/venv")
    if node.model_dir is None:  # the orchestrator
        lines += [
            f"COPY --chown=0:0 mesh.yaml {GRAPHS}",
            f"ENV ONNXMESH_PORT={node.port} ONNXMESH_GRAPHS={GRAPHS}",
            'ENTRYPOINT ["python", "-m", "orchestrator"]',
        ]
    else:
        lines += [
            f"COPY --chown=0:0 models {MODEL_DIR}",
            f"ENV ONNXMESH_NAME={node.name} ONNXMESH_RUNTIME={node.runtime} "
            f"ONNXMESH_MODEL_DIR={MODEL_DIR} ONNXMESH_PORT={node.port}",
        ]
    lines.append(f"EXPOSE {node.port} {METRICS_PORT}")
    return "\n".join(lines) + "\n"


def build_context(mesh: Mesh, node: Node, directory: Path, qualify: Callable[[str], str] = str) -> Path:
    """Write one node's build context into `directory`; returns it."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "Dockerfile").write_text(dockerfile(mesh, node, qualify))
    if node.model_dir is None:
        shutil.copyfile(mesh.path, directory / "mesh.yaml")
    else:
        shutil.copytree(node.model_dir, directory / "models", ignore=shutil.ignore_patterns("__pycache__"))
    return directory


def build(
    mesh: Mesh,
    *,
    engine_name: str = "auto",
    ca_bundle: Path | None = None,
    log: Callable[[str], None] = print,
) -> list[str]:
    """Build every node's image with the container engine found (meshctl.engine); their names.

    The runtime images must exist: `make images` in an onnxmesh checkout builds them.
    """

    engine = find_engine(engine_name)
    missing = [image for image in runtime_images(mesh) if engine.image_id(engine.qualified(image)) is None]
    if missing:
        raise EngineUnavailable(
            f"the runtime images {', '.join(missing)} are not in {engine.name}: `make images` in an "
            "onnxmesh checkout builds them (or pull them from your registry)"
        )
    built = []
    with tempfile.TemporaryDirectory(prefix="onnxmesh-images-") as tmp:
        for node in mesh.nodes:
            context = build_context(mesh, node, Path(tmp) / node.name, engine.qualified)
            ref = engine.qualified(image_of(mesh, node))
            log(f"building {ref} ({engine.name})")
            command = engine.build_command(
                context=context, tag=ref, build_args={}, labels={}, ca_bundle=ca_bundle
            )
            subprocess.run(
                command, env=engine.build_env(), check=True, timeout=3600, capture_output=True, text=True
            )
            built.append(ref)
    return built
