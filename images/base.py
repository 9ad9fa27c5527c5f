"""Base images made from Debian packages, for a machine that reaches no container registry.

The Dockerfile's default base is ``python:3.11-slim`` from a registry. Where there is none, the
same two roles are filled from Debian 12's own packages: ``mmdebstrap`` writes a root filesystem
tarball and the engine imports it as an image (``podman import``), once; later builds reuse it
while its recipe (suite, mirrors, packages) is unchanged.

- runtime: ``essential`` (no apt) + python3 + libstdc++6 (onnxruntime needs it), no docs,
  manuals or translations, about 100 MB;
- builder: the same + python3-venv (ensurepip, to install uv); it never reaches an image.

Both have Python at /usr/bin/python3, which the venv built in one and run in the other links to.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from meshctl.engine import ContainerEngine, EngineUnavailable, install_host_packages, missing_host_packages

SUITE = "bookworm"
DEFAULT_MIRROR = "http://deb.debian.org/debian"
DEFAULT_SECURITY_MIRROR = "http://deb.debian.org/debian-security"
RUNTIME_PACKAGES = ("python3", "libstdc++6")
BUILDER_PACKAGES = (*RUNTIME_PACKAGES, "python3-venv")
RUNTIME_IMAGE = "localhost/onnxmesh-base/python:3.11-bookworm"
BUILDER_IMAGE = "localhost/onnxmesh-base/python-build:3.11-bookworm"
RECIPE_LABEL = "io.onnxmesh.base-recipe"
#: Nothing at run time reads these; leaving them out saves about 20 MB.
EXCLUDED_PATHS = ("/usr/share/doc/*", "/usr/share/man/*", "/usr/share/info/*", "/usr/share/locale/*")
IMAGE_CHANGES = (
    "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "ENV LANG=C.UTF-8",
    'CMD ["python3"]',
)


@dataclass(frozen=True)
class BaseImages:
    """The images the Dockerfile's PYTHON_IMAGE and BUILDER_IMAGE arguments name."""

    runtime: str
    builder: str

    def build_args(self) -> dict[str, str]:
        return {"PYTHON_IMAGE": self.runtime, "BUILDER_IMAGE": self.builder}


def sources(mirror: str, security_mirror: str) -> list[str]:
    """The apt source lines: the release, its updates and its security fixes."""
    return [
        f"deb {mirror} {SUITE} main",
        f"deb {mirror} {SUITE}-updates main",
        f"deb {security_mirror} {SUITE}-security main",
    ]


def mmdebstrap_command(packages: tuple[str, ...], tarball: Path, apt_sources: list[str]) -> list[str]:
    """mmdebstrap writing a merged-/usr root filesystem of ``essential`` plus ``packages``."""
    return [
        "mmdebstrap",
        "--variant=essential",
        f"--include={','.join(packages)}",
        # Sets up merged /usr itself, so the usrmerge package (and perl with it) stays out.
        "--hook-dir=/usr/share/mmdebstrap/hooks/merged-usr",
        *(f"--dpkgopt=path-exclude={path}" for path in EXCLUDED_PATHS),
        SUITE,
        str(tarball),
        *apt_sources,
    ]


def recipe(packages: tuple[str, ...], apt_sources: list[str]) -> str:
    """What a base image is made of, as a short digest: a changed recipe means a new image."""
    text = json.dumps(
        {"suite": SUITE, "packages": packages, "sources": apt_sources, "excluded": EXCLUDED_PATHS}
    )
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def ensure_base_images(
    engine: ContainerEngine,
    *,
    mirror: str = DEFAULT_MIRROR,
    security_mirror: str = DEFAULT_SECURITY_MIRROR,
    rebuild: bool = False,
    log: Callable[[str], None] = print,
) -> BaseImages:
    """Build the runtime and builder base images unless images of the same recipe exist."""
    apt_sources = sources(mirror, security_mirror)
    for image, packages in ((RUNTIME_IMAGE, RUNTIME_PACKAGES), (BUILDER_IMAGE, BUILDER_PACKAGES)):
        wanted = recipe(packages, apt_sources)
        labels = engine.image_labels(image)
        if not rebuild and labels is not None and labels.get(RECIPE_LABEL) == wanted:
            log(f"base {image}: up to date")
            continue
        if "mmdebstrap" in missing_host_packages():
            install_host_packages(["mmdebstrap"])
        log(f"base {image}: mmdebstrap {SUITE} + {', '.join(packages)}")
        with tempfile.TemporaryDirectory(prefix="onnxmesh-base-") as tmp:
            tarball = Path(tmp) / "rootfs.tar"
            done = subprocess.run(
                mmdebstrap_command(packages, tarball, apt_sources),
                capture_output=True,
                text=True,
                timeout=1200,
                check=False,
            )
            if done.returncode != 0:
                raise EngineUnavailable(f"mmdebstrap failed for {image}:\n{done.stderr[-3000:]}")
            engine.import_rootfs(tarball, image, [*IMAGE_CHANGES, f"LABEL {RECIPE_LABEL}={wanted}"])
    return BaseImages(RUNTIME_IMAGE, BUILDER_IMAGE)
