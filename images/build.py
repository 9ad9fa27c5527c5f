"""Build the mesh's images from the Dockerfile, tagged as k8s/ names them; skip what is up to date.

One image per Dockerfile SERVICE: the four nodes and the jobs image. Each is labelled with the
digest of everything its build reads (the Dockerfile, the build context that .dockerignore lets
through, the build arguments and the base images' ids), so a second build of the same source
only checks labels: the container test builds once and reuses the images after that.
"""

from __future__ import annotations

import fnmatch
import hashlib
import subprocess
import time
import tomllib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from images.base import BaseImages, ensure_base_images
from meshctl.engine import ContainerEngine, EngineUnavailable
from meshctl.launcher import DEMO_MESH
from meshctl.mesh import kubernetes_name, load_mesh

REPO = Path(__file__).resolve().parent.parent
DOCKERFILE = REPO / "Dockerfile"
#: The Dockerfile's default base, from a registry (`--base registry`).
REGISTRY_BASE = "python:3.11-slim"
DIGEST_LABEL = "io.onnxmesh.source-digest"
JOBS = "jobs"


@dataclass(frozen=True)
class ImageSpec:
    """One image: the Dockerfile's SERVICE and the repository the manifests pull."""

    service: str
    repository: str

    def ref(self, tag: str, registry: str = "") -> str:
        return f"{registry.rstrip('/')}/{self.repository}:{tag}" if registry else f"{self.repository}:{tag}"


#: The runtime images any mesh's service images are built on (meshctl/images.py).
NODE = "node"
NODE_BUILDER = "node-builder"
#: Every image `make images` builds: the demo mesh's nodes (k8s/base), jobs (k8s/components/jobs),
#: and the runtime images `onnxmesh images` builds a mesh's services on.
IMAGES: tuple[ImageSpec, ...] = tuple(
    ImageSpec(service, f"onnxmesh/{kubernetes_name(service)}")
    for service in (*(node.name for node in load_mesh(DEMO_MESH).nodes), JOBS, NODE, NODE_BUILDER)
)


def image_spec(service: str) -> ImageSpec:
    for spec in IMAGES:
        if service in (spec.service, spec.repository.rsplit("/", 1)[-1]):
            return spec
    names = ", ".join(spec.service for spec in IMAGES)
    raise ValueError(f"no image {service!r}: one of {names}")


def _pyproject() -> dict[str, object]:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def project_version() -> str:
    """The package version, which is also the images' default tag (the manifests pin it)."""
    project = _pyproject()["project"]
    assert isinstance(project, dict)
    return str(project["version"])


def uv_version() -> str:
    """The uv release the dev extra pins: the one that made uv.lock, and the builder's."""
    project = _pyproject()["project"]
    assert isinstance(project, dict)
    for requirement in project["optional-dependencies"]["dev"]:
        if requirement.startswith("uv=="):
            return str(requirement.removeprefix("uv=="))
    raise ValueError("pyproject.toml: the dev extra pins no uv==VERSION")


# --------------------------------------------------------------------------------------------
# The build context, as .dockerignore lets it through


def _ignore_rules(repo: Path) -> tuple[list[str], list[str]]:
    """(paths let in with `!path`, patterns left out) of a `*`-first allowlist .dockerignore."""
    lines = [line.strip() for line in (repo / ".dockerignore").read_text().splitlines()]
    rules = [line for line in lines if line and not line.startswith("#")]
    if not rules or rules[0] != "*":
        raise ValueError(".dockerignore must start with `*` and let paths in with `!path`")
    allowed = [rule[1:].rstrip("/") for rule in rules[1:] if rule.startswith("!")]
    left_out = [rule for rule in rules[1:] if not rule.startswith("!")]
    return allowed, left_out


def _left_out(relative: str, patterns: Sequence[str]) -> bool:
    parts = relative.split("/")
    for pattern in patterns:
        if pattern.startswith("**/"):
            inner = pattern[3:]
            if inner.endswith("/"):
                if inner.rstrip("/") in parts[:-1]:
                    return True
            elif fnmatch.fnmatchcase(parts[-1], inner):
                return True
        elif pattern.endswith("/"):
            if relative.startswith(pattern):
                return True
        elif fnmatch.fnmatchcase(relative, pattern):
            return True
    return False


def context_files(repo: Path = REPO) -> list[Path]:
    """Every file of the build context, sorted: what the engine is sent."""

    def walk(path: Path) -> Iterator[Path]:
        if path.is_file():
            yield path
        elif path.is_dir():
            for child in sorted(path.iterdir()):
                yield from walk(child)

    allowed, left_out = _ignore_rules(repo)
    files = {
        path
        for entry in allowed
        for path in walk(repo / entry)
        if not _left_out(path.relative_to(repo).as_posix(), left_out)
    }
    return sorted(files)


def source_digest(build_args: dict[str, str], base_ids: Sequence[str], repo: Path = REPO) -> str:
    """The digest of everything a build reads; equal digests build equal images."""
    digest = hashlib.sha256()
    for path in [repo / "Dockerfile", *context_files(repo)]:
        digest.update(path.relative_to(repo).as_posix().encode() + b"\0")
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    for key, value in sorted(build_args.items()):
        digest.update(f"{key}={value}\0".encode())
    for base_id in base_ids:
        digest.update(f"base={base_id}\0".encode())
    return digest.hexdigest()[:24]


# --------------------------------------------------------------------------------------------
# Building


@dataclass(frozen=True)
class BuiltImage:
    """One image after `build_images`: its name, size, and whether it was built or reused."""

    spec: ImageSpec
    ref: str
    size: int
    seconds: float
    reused: bool

    def line(self) -> str:
        how = "up to date" if self.reused else f"built in {self.seconds:.0f} s"
        return f"{self.ref:<40} {self.size / 1e6:6.0f} MB   {how}"


def resolve_base(
    engine: ContainerEngine, base: str, python_image: str, log: Callable[[str], None]
) -> BaseImages | None:
    """The base images to build on; None means the Dockerfile's default (a registry's).

    ``auto`` takes ``python_image`` when it is here or can be pulled, else builds the bases
    from Debian packages (the offline path).
    """
    if base not in ("auto", "registry", "debian"):
        raise ValueError(f"unknown base {base!r}: auto, registry or debian")
    if base != "debian":
        if engine.image_id(python_image) is not None or engine.pull(python_image):
            return None if python_image == REGISTRY_BASE else BaseImages(python_image, python_image)
        if base == "registry":
            raise EngineUnavailable(f"cannot pull {python_image}: no registry answers (try --base debian)")
        log(f"no registry answers for {python_image}: building the base images from Debian packages")
    return ensure_base_images(engine, log=log)


def build_images(
    engine: ContainerEngine,
    *,
    tag: str,
    registry: str = "",
    services: Sequence[str] = (),
    base: str = "auto",
    python_image: str = REGISTRY_BASE,
    ca_bundle: Path | None = None,
    force: bool = False,
    output: IO[str] | None = None,
    log: Callable[[str], None] = print,
) -> list[BuiltImage]:
    """Build the images (all, or those of ``services``) unless they are up to date.

    The engine's own output goes to ``output`` (the terminal when None). Raises
    EngineUnavailable when the base cannot be had and CalledProcessError when a build fails.
    """
    specs = [image_spec(s) for s in services] if services else list(IMAGES)
    bases = resolve_base(engine, base, python_image, log)
    base_args = bases.build_args() if bases is not None else {}
    base_images = sorted(set(base_args.values())) if bases is not None else [python_image]
    base_ids = [engine.image_id(image) or image for image in base_images]
    built = []
    for spec in specs:
        ref = engine.qualified(spec.ref(tag, registry))
        build_args = {**base_args, "SERVICE": spec.service, "UV_VERSION": uv_version()}
        digest = source_digest(build_args, base_ids)
        labels = engine.image_labels(ref)
        started = time.monotonic()
        reused = not force and labels is not None and labels.get(DIGEST_LABEL) == digest
        if not reused:
            log(f"building {ref} ({engine.name})")
            command = engine.build_command(
                context=REPO,
                tag=ref,
                build_args=build_args,
                labels={DIGEST_LABEL: digest},
                ca_bundle=ca_bundle,
                dockerfile=DOCKERFILE,
            )
            subprocess.run(
                command,
                cwd=REPO,
                env=engine.build_env(),
                stdout=output,
                stderr=subprocess.STDOUT if output is not None else None,
                text=True,
                check=True,
                timeout=3600,
            )
        built.append(BuiltImage(spec, ref, engine.image_size(ref), time.monotonic() - started, reused))
    return built


def save_archives(engine: ContainerEngine, images: Sequence[BuiltImage], directory: Path) -> list[Path]:
    """One docker-archive tarball per image, for `kind load image-archive` or `minikube image load`."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for image in images:
        path = directory / f"{image.spec.repository.rsplit('/', 1)[-1]}.tar"
        path.unlink(missing_ok=True)
        command = engine.cli("save", "--output", str(path), image.ref)
        if engine.is_podman:
            command[-1:-1] = ["--format", "docker-archive"]
        subprocess.run(command, check=True, capture_output=True, timeout=600)
        paths.append(path)
    return paths
