"""Fixtures of the container tests: the engine, the rendered manifests, the images (built once).

The tests need root (podman with runc, as CI has) or a docker daemon; elsewhere they skip and
say why. As root on Debian, podman, runc and mmdebstrap are installed with apt-get when missing
(meshctl/engine.py). The images are built by ``make images``' own code; an image whose source
digest is unchanged is reused, so only the first run pays for the build. Figures the tests
measure (sizes, build time, rollout counts) are printed at the end of the run.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from images.build import BuiltImage, build_images
from images.cli import default_ca_bundle
from meshctl.engine import ContainerEngine, EngineUnavailable, find_engine
from tests.support import kustomize_overlay

Obj = dict[str, Any]
REPO = Path(__file__).resolve().parents[2]

#: Lines for the end of the run: what the container tests measured.
FIGURES: list[str] = []


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if FIGURES:
        terminalreporter.write_sep("-", "container figures")
        for line in FIGURES:
            terminalreporter.write_line(line)


@pytest.fixture(scope="session")
def engine() -> ContainerEngine:
    if os.environ.get("ONNXMESH_CONTAINER_TESTS") == "0":
        pytest.skip("container tests turned off (ONNXMESH_CONTAINER_TESTS=0)")
    try:
        return find_engine(install=os.geteuid() == 0)
    except EngineUnavailable as exc:
        if os.geteuid() == 0:
            # Root can install podman: CI must not pass silently when that breaks.
            pytest.fail(f"no container engine, and installing podman failed: {exc}")
        pytest.skip(f"container tests need root (podman with runc) or a docker daemon: {exc}")


@dataclass(frozen=True)
class Manifests:
    """The objects `kubectl kustomize` renders for the dev overlay with the jobs component."""

    objects: tuple[Obj, ...]

    def get(self, kind: str, name: str) -> Obj:
        found = [o for o in self.objects if o["kind"] == kind and o["metadata"]["name"] == name]
        assert len(found) == 1, f"{kind}/{name}: {len(found)} rendered"
        return found[0]

    def images(self) -> set[str]:
        """Every image a pod template of the manifests names."""
        found = set()
        for obj in self.objects:
            spec = obj.get("spec") or {}
            if obj["kind"] == "CronJob":
                spec = spec["jobTemplate"]["spec"]
            pod = (spec.get("template") or {}).get("spec") or {}
            found |= {c["image"] for c in pod.get("containers") or []}
        return found

    def config_map_data(self) -> dict[str, dict[str, str]]:
        return {
            o["metadata"]["name"]: dict(o.get("data") or {}) for o in self.objects if o["kind"] == "ConfigMap"
        }


@pytest.fixture(scope="session")
def manifests(tmp_path_factory: pytest.TempPathFactory) -> Manifests:
    root = tmp_path_factory.mktemp("containers-overlay")
    return Manifests(kustomize_overlay(root, "dev", ("jobs",)))


def manifest_tag(manifests: Manifests) -> str:
    tags = {image.rsplit(":", 1)[1] for image in manifests.images()}
    assert len(tags) == 1, f"the manifests name several tags: {sorted(tags)}"
    return tags.pop()


@pytest.fixture(scope="session")
def images(
    engine: ContainerEngine, manifests: Manifests, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, BuiltImage]]:
    """Every image, by Dockerfile SERVICE, with the manifests' tag: built unless up to date."""
    log_path = tmp_path_factory.mktemp("images") / "build.log"
    started = time.monotonic()
    with log_path.open("w") as log:
        try:
            built = build_images(
                engine,
                tag=manifest_tag(manifests),
                ca_bundle=default_ca_bundle(),
                output=log,
                log=lambda line: print(line, file=log, flush=True),
            )
        except (subprocess.CalledProcessError, EngineUnavailable) as exc:
            pytest.fail(f"building the images failed: {exc}\n{log_path.read_text()[-5000:]}")
    seconds = time.monotonic() - started
    reused = all(image.reused for image in built)
    FIGURES.append(
        f"images ({engine.name}): {'all up to date' if reused else 'built'} in {seconds:.0f} s"
        + "".join(f"\n  {image.line()}" for image in built)
    )
    yield {image.spec.service: image for image in built}
