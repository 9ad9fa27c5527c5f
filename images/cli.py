"""The command line of `make images` (``python3 -m images [OPTIONS] [IMAGE...]``)."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from images.build import IMAGES, REGISTRY_BASE, build_images, project_version, save_archives
from meshctl.engine import EngineUnavailable, find_engine

#: Where the host keeps its CA bundle on Debian; passed to the build when it exists.
HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")


def default_ca_bundle() -> Path | None:
    """The host's CA bundle: $SSL_CERT_FILE, else Debian's, when the file exists."""
    for candidate in (os.environ.get("SSL_CERT_FILE"), HOST_CA_BUNDLE):
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    return None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python3 -m images",
        description="Build the mesh's images (tagged as k8s/ names them) and print their sizes.",
    )
    parser.add_argument(
        "images",
        nargs="*",
        metavar="IMAGE",
        help=f"which to build (default: all): {', '.join(spec.service for spec in IMAGES)}",
    )
    parser.add_argument("--tag", default=project_version(), help="image tag (default: %(default)s)")
    parser.add_argument(
        "--registry",
        default="",
        help="registry to name the images for, e.g. registry.example.com (default: none)",
    )
    parser.add_argument(
        "--engine",
        choices=("auto", "docker", "podman"),
        default="auto",
        help="auto: docker when its daemon answers, else podman (installed with apt-get when missing)",
    )
    parser.add_argument(
        "--base",
        choices=("auto", "registry", "debian"),
        default="auto",
        help="auto: --python-image when it can be pulled, else base images made from Debian packages",
    )
    parser.add_argument(
        "--python-image",
        default=REGISTRY_BASE,
        help="the base from a registry, e.g. pinned by digest (default: %(default)s)",
    )
    parser.add_argument(
        "--ca-bundle",
        default=None,
        help="CA bundle the build trusts for PyPI, as a build secret, never in an image "
        "(default: $SSL_CERT_FILE or /etc/ssl/certs/ca-certificates.crt; 'none' for none)",
    )
    parser.add_argument("--force", action="store_true", help="rebuild even when up to date")
    parser.add_argument(
        "--save",
        type=Path,
        default=None,
        metavar="DIR",
        help="also write DIR/<name>.tar for kind or minikube",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.ca_bundle == "none":
        ca_bundle = None
    elif args.ca_bundle is not None:
        ca_bundle = Path(args.ca_bundle)
        if not ca_bundle.is_file():
            print(f"error: --ca-bundle {ca_bundle}: no such file", file=sys.stderr)
            return 2
    else:
        ca_bundle = default_ca_bundle()
    started = time.monotonic()
    try:
        engine = find_engine(args.engine)
        built = build_images(
            engine,
            tag=args.tag,
            registry=args.registry,
            services=args.images,
            base=args.base,
            python_image=args.python_image,
            ca_bundle=ca_bundle,
            force=args.force,
        )
        saved = save_archives(engine, built, args.save) if args.save is not None else []
    except (EngineUnavailable, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except subprocess.CalledProcessError as exc:
        print(f"error: `{' '.join(map(str, exc.cmd))}` exited {exc.returncode}", file=sys.stderr)
        return 1
    print(f"\n{len(built)} images ({engine.name}) in {time.monotonic() - started:.0f} s:")
    for image in built:
        print(f"  {image.line()}")
    for path in saved:
        print(f"  saved {path}")
    return 0
