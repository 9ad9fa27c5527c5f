"""The container engine: docker when its daemon answers, else podman (installed when missing).

Both are driven through the same few calls (build, run, inspect, import), so the image build
and the container test do not care which one runs. What this machine kind needs is known and
written here once:

- podman's default runtime (crun) fails on a kernel with hybrid cgroups; runc works, given
  explicit ``nofile`` and ``nproc`` limits (it may not raise them past the host's);
- ``podman build --isolation chroot --network host``: no nested namespaces, the host's network;
- podman names a local image ``localhost/NAME`` unless told a registry: images are tagged
  ``docker.io/onnxmesh/...`` so that a saved archive loads into kind or minikube under the very
  name the manifests use (``onnxmesh/model-a:0.1.0`` means ``docker.io/onnxmesh/model-a:0.1.0``).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

#: Debian packages for building and running images without docker (Debian 12 names).
HOST_PACKAGES = ("podman", "runc", "mmdebstrap")
#: Limits runc is given explicitly (the defaults it would set are refused here).
ULIMITS = ("nofile=1024:1024", "nproc=1024:1024")


class EngineUnavailable(RuntimeError):
    """No container engine can be used here; the message says why and what would fix it."""


@dataclass(frozen=True)
class ContainerEngine:
    """One container engine CLI (``docker`` or ``podman``) and the flags it needs here."""

    name: str
    #: The command and its global flags, e.g. ``("podman", "--runtime", "/usr/sbin/runc")``.
    command: tuple[str, ...]

    @property
    def is_podman(self) -> bool:
        return self.name == "podman"

    def qualified(self, image: str) -> str:
        """The name to tag an image with: ``docker.io/`` added for podman (see the module doc)."""
        first = image.split("/", 1)[0]
        has_registry = "/" in image and ("." in first or ":" in first or first == "localhost")
        return image if has_registry or not self.is_podman else f"docker.io/{image}"

    def build_command(
        self,
        *,
        context: Path,
        tag: str,
        build_args: Mapping[str, str],
        labels: Mapping[str, str],
        ca_bundle: Path | None,
        dockerfile: Path | None = None,
    ) -> list[str]:
        """``build`` with the flags each engine needs; the CA bundle goes in as a build secret."""
        command = [*self.command, "build", "--tag", tag]
        if self.is_podman:
            command += ["--isolation", "chroot", "--network", "host", "--layers"]
        if dockerfile is not None:
            command += ["--file", str(dockerfile)]
        for key, value in build_args.items():
            command += ["--build-arg", f"{key}={value}"]
        for key, value in labels.items():
            command += ["--label", f"{key}={value}"]
        if ca_bundle is not None:
            command += ["--secret", f"id=ca_bundle,src={ca_bundle}"]
        return [*command, str(context)]

    def build_env(self) -> dict[str, str]:
        """The environment of a build: BuildKit for docker (the Dockerfile's RUN --mount needs it)."""
        env = dict(os.environ)
        if not self.is_podman:
            env["DOCKER_BUILDKIT"] = "1"
        return env

    def run_command(self, *args: str) -> list[str]:
        """``run`` with the limits and the host network that work on this machine kind."""
        command = [*self.command, "run", "--network", "host"]
        if self.is_podman:
            for limit in ULIMITS:
                command += ["--ulimit", limit]
        return [*command, *args]

    def cli(self, *args: str) -> list[str]:
        """Any other subcommand, e.g. ``cli("kill", "--signal", "TERM", name)``."""
        return [*self.command, *args]

    def inspect_image(self, image: str) -> dict[str, object] | None:
        """The engine's JSON about a local image, or None when there is no such image."""
        done = subprocess.run(
            self.cli("image", "inspect", image), capture_output=True, text=True, timeout=60, check=False
        )
        if done.returncode != 0:
            return None
        found = json.loads(done.stdout)
        return found[0] if isinstance(found, list) and found else None

    def image_labels(self, image: str) -> dict[str, str] | None:
        """The labels of a local image ({} without any), or None when there is no such image."""
        info = self.inspect_image(image)
        if info is None:
            return None
        config = info.get("Config")
        labels = config.get("Labels") if isinstance(config, dict) else None
        return {str(k): str(v) for k, v in labels.items()} if isinstance(labels, dict) else {}

    def image_size(self, image: str) -> int:
        """Bytes of a local image, uncompressed (what ``images`` shows)."""
        info = self.inspect_image(image)
        size = info.get("Size") if info is not None else None
        if not isinstance(size, int):
            raise EngineUnavailable(f"{self.name} cannot tell the size of {image}")
        return size

    def image_id(self, image: str) -> str | None:
        info = self.inspect_image(image)
        image_id = info.get("Id") if info is not None else None
        return str(image_id) if image_id else None

    def import_rootfs(self, tarball: Path, image: str, changes: Sequence[str]) -> None:
        """An image made of one root filesystem tarball (``import``), with Dockerfile-style changes."""
        command = self.cli("import")
        for change in changes:
            command += ["--change", change]
        subprocess.run([*command, str(tarball), image], check=True, capture_output=True, timeout=600)

    def pull(self, image: str, timeout: float = 120.0) -> bool:
        """Try to pull an image; False when no registry answers (the offline case)."""
        try:
            done = subprocess.run(
                self.cli("pull", image), capture_output=True, text=True, timeout=timeout, check=False
            )
        except subprocess.TimeoutExpired:
            return False
        return done.returncode == 0


def _docker_answers() -> bool:
    docker = shutil.which("docker")
    if docker is None:
        return False
    try:
        done = subprocess.run([docker, "info"], capture_output=True, timeout=20, check=False)
    except subprocess.TimeoutExpired:
        return False
    return done.returncode == 0


def _runc() -> str | None:
    # /usr/sbin is not on every PATH.
    return shutil.which("runc") or ("/usr/sbin/runc" if Path("/usr/sbin/runc").exists() else None)


def _podman() -> ContainerEngine:
    runc = _runc()
    return ContainerEngine("podman", ("podman", "--runtime", runc) if runc else ("podman",))


def missing_host_packages() -> list[str]:
    """Which of podman, runc and mmdebstrap are not installed."""
    found = {"podman": shutil.which("podman"), "runc": _runc(), "mmdebstrap": shutil.which("mmdebstrap")}
    return [package for package in HOST_PACKAGES if not found[package]]


def install_host_packages(packages: Sequence[str]) -> None:
    """apt-get install the packages (as root, on Debian); EngineUnavailable if that cannot be done."""
    if not packages:
        return
    if os.geteuid() != 0:
        raise EngineUnavailable(
            f"{', '.join(packages)} not installed and not root: run `sudo apt-get install -y "
            f"{' '.join(packages)}` (or start a docker daemon)"
        )
    if shutil.which("apt-get") is None:
        raise EngineUnavailable(f"{', '.join(packages)} not installed and no apt-get to install them")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", *packages]):
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900, check=False)
        if done.returncode != 0:
            raise EngineUnavailable(f"`{' '.join(command)}` failed:\n{done.stderr[-2000:]}")


def find_engine(prefer: str = "auto", *, install: bool = True) -> ContainerEngine:
    """The engine to use: ``docker`` when its daemon answers, else ``podman``.

    With ``install``, podman, runc and mmdebstrap are installed with apt-get when missing (root
    only). Raises EngineUnavailable with the reason when neither engine can be used.
    """
    if prefer not in ("auto", "docker", "podman"):
        raise ValueError(f"unknown engine {prefer!r}: auto, docker or podman")
    if prefer in ("auto", "docker") and _docker_answers():
        return ContainerEngine("docker", ("docker",))
    if prefer == "docker":
        raise EngineUnavailable("docker was asked for, but no docker daemon answers `docker info`")
    missing = [p for p in missing_host_packages() if p != "mmdebstrap"]
    if missing and install:
        install_host_packages(missing)
    elif missing:
        raise EngineUnavailable(f"no docker daemon, and {', '.join(missing)} not installed")
    return _podman()
