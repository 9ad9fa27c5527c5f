"""The Dockerfile, the lock and the image tooling, read as files: no engine needed, never skipped.

The Dockerfile must build on BuildKit and on Debian 12's buildah (no heredocs), install only from
uv.lock (every direct and indirect package pinned there), find each file it copies in the build
context .dockerignore lets through, and bootstrap the uv release that made the lock. What the
images install, computed from the lock, never includes the Kubernetes client or dev tools.
"""

from __future__ import annotations

import os
import re
import subprocess
import tomllib
from pathlib import Path

import pytest

from demo.topology import SERVICES
from images.build import IMAGES, JOBS, NODE, NODE_BUILDER, REPO, context_files, source_digest, uv_version
from meshctl.engine import ContainerEngine

DOCKERFILE = (REPO / "Dockerfile").read_text()


def instructions(text: str) -> list[str]:
    """The Dockerfile's instructions, comments dropped and continuation lines joined."""
    code = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    return [line.strip() for line in code.replace("\\\n", " ").splitlines() if line.strip()]


INSTRUCTIONS = instructions(DOCKERFILE)
#: Packages no runtime image may have (by their names in the lock).
NEVER_IN_AN_IMAGE = {
    "kubernetes", "pip", "setuptools", "uv", "grpcio-tools", "pytest", "mypy", "ruff", "tritonclient",
    "scikit-learn", "onnx", "matplotlib", "pyarrow", "kubernetes-validate", "py-spy",
}  # fmt: skip
JOBS_EXTRA = {"sqlalchemy", "psycopg", "psycopg-binary", "tqdm"}


def test_no_heredocs_buildah_1_28_would_run_them_on_empty_input() -> None:
    assert not [i for i in INSTRUCTIONS if "<<" in i]


def test_the_builder_bootstraps_the_uv_that_made_the_lock() -> None:
    [default] = re.findall(r"^ARG UV_VERSION=(\S+)$", DOCKERFILE, re.MULTILINE)
    assert default == uv_version()


def test_packages_come_only_from_the_lock() -> None:
    runs = [i for i in INSTRUCTIONS if i.startswith("RUN ")]
    syncs = [r for r in runs if "uv sync" in r]
    assert syncs and all("--locked" in r for r in syncs)
    # pip installs uv and nothing else; nothing is installed by name without the lock.
    pip_installs = [r for r in runs if "pip install" in r]
    assert len(pip_installs) == 1 and '"uv==$UV_VERSION"' in pip_installs[0]
    assert not [r for r in runs if re.search(r"uv pip install|apt-get|--all-extras", r)]
    extras = {e for r in syncs for e in re.findall(r"--extra (\S+)", r)}
    assert extras <= {"proto", JOBS}


def test_the_ca_bundle_is_only_ever_a_secret_mount() -> None:
    downloading = [i for i in INSTRUCTIONS if i.startswith("RUN ") and ("uv sync" in i or "pip install" in i)]
    assert downloading and all(
        "--mount=type=secret,id=ca_bundle" in i and " with-ca " in i for i in downloading
    )
    assert not re.search(r"ca-certificates\.crt|SSL_CERT_FILE|PIP_CERT", "\n".join(INSTRUCTIONS))


def test_every_copied_file_is_in_the_build_context() -> None:
    context = {p.relative_to(REPO).as_posix() for p in context_files()}
    for instruction in INSTRUCTIONS:
        if not instruction.startswith("COPY ") or "--from=" in instruction:
            continue
        sources = [w for w in instruction.split()[1:-1] if not w.startswith("--")]
        for source in sources:
            source = source.rstrip("/")
            assert any(f == source or f.startswith(f"{source}/") for f in context), (instruction, source)


def test_one_final_stage_per_image() -> None:
    stages = set(re.findall(r"^FROM \S+ AS svc-(\S+)$", DOCKERFILE, re.MULTILINE))
    assert stages == {spec.service for spec in IMAGES} == {*SERVICES, JOBS, NODE, NODE_BUILDER}


def test_the_context_leaves_out_generated_and_cached_files(tmp_path: Path) -> None:
    (tmp_path / ".dockerignore").write_text("*\n!keep/\n!one.txt\nkeep/gen/\n**/__pycache__/\n**/*.py[cod]\n")
    for name in (
        "keep/a.py",
        "keep/gen/b.py",
        "keep/x/__pycache__/c.pyc",
        "keep/d.pyc",
        "one.txt",
        "other.txt",
    ):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(name)
    (tmp_path / "Dockerfile").write_text("FROM scratch\n")

    assert [p.relative_to(tmp_path).as_posix() for p in context_files(tmp_path)] == ["keep/a.py", "one.txt"]
    before = source_digest({"SERVICE": "model_a"}, ["base"], tmp_path)
    (tmp_path / "keep/gen/b.py").write_text("changed")  # outside the context
    assert source_digest({"SERVICE": "model_a"}, ["base"], tmp_path) == before
    (tmp_path / "keep/a.py").write_text("changed")
    assert source_digest({"SERVICE": "model_a"}, ["base"], tmp_path) != before
    assert source_digest({"SERVICE": "model_b"}, ["base"], tmp_path) != source_digest(
        {"SERVICE": "model_a"}, ["base"], tmp_path
    )


def locked_closure(extras: set[str]) -> set[str]:
    """Every package the lock installs for the project with these extras (markers ignored)."""
    packages = {p["name"]: p for p in tomllib.loads((REPO / "uv.lock").read_text())["package"]}
    project = packages["onnxmesh"]
    todo = list(project.get("dependencies") or [])
    for extra in extras:
        todo += project["optional-dependencies"][extra]
    seen: set[str] = set()
    while todo:
        dep = todo.pop()
        package = packages[dep["name"]]
        for extra in dep.get("extra") or []:
            todo += (package.get("optional-dependencies") or {}).get(extra) or []
        if dep["name"] not in seen:
            seen.add(dep["name"])
            todo += package.get("dependencies") or []
    return seen


def test_the_images_install_neither_the_kubernetes_client_nor_dev_tools() -> None:
    nodes, jobs = locked_closure(set()), locked_closure({JOBS})
    assert {"grpcio", "onnxruntime", "numpy", "protobuf"} <= nodes
    assert not nodes & (NEVER_IN_AN_IMAGE | JOBS_EXTRA), nodes & (NEVER_IN_AN_IMAGE | JOBS_EXTRA)
    assert jobs >= JOBS_EXTRA and not jobs & NEVER_IN_AN_IMAGE


def test_the_lock_matches_pyproject() -> None:
    uv = REPO / ".venv/bin/uv"
    if not uv.exists():
        pytest.skip("no .venv/bin/uv: run `make setup`")
    done = subprocess.run(
        [str(uv), "lock", "--check"],
        cwd=REPO,
        env={**os.environ, "UV_PYTHON_DOWNLOADS": "never"},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, f"uv.lock is out of date: run `make lock`\n{done.stderr}"


def test_podman_names_images_as_the_manifests_do_for_kind() -> None:
    podman, docker = ContainerEngine("podman", ("podman",)), ContainerEngine("docker", ("docker",))
    assert podman.qualified("onnxmesh/model-a:0.1.0") == "docker.io/onnxmesh/model-a:0.1.0"
    assert (
        podman.qualified("localhost:5000/onnxmesh/model-a:0.1.0") == "localhost:5000/onnxmesh/model-a:0.1.0"
    )
    assert docker.qualified("onnxmesh/model-a:0.1.0") == "onnxmesh/model-a:0.1.0"
    build = podman.build_command(
        context=REPO, tag="t", build_args={"A": "1"}, labels={}, ca_bundle=Path("/ca.crt")
    )
    assert build[build.index("--isolation") :][:2] == ["--isolation", "chroot"]
    assert "id=ca_bundle,src=/ca.crt" in build
