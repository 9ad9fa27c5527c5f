"""A mesh's own client conveniences: the rows `onnxmesh predict` (and `batch`, `meshctl.perf_data`,
the rollout rehearsal) send when told nothing but a graph.

Any mesh can be called with `onnxmesh predict GRAPH --input NAME=FILE.npy`. A mesh file may also
name a Python file (`client: client.py`, relative to it) that knows its data, with:

- ``DEFAULT_NAME``: the graph `predict` calls when none is named;
- ``add_arguments(parser)``: its own `predict` options (e.g. which sample to send);
- ``select(args) -> Samples``: the rows those options pick;
- ``samples() -> Samples``: its sample rows, for the tools that take no options.

Like a Python model's `model.py`, it is code the CLI runs. When its folder is a package (it has an
``__init__.py``), it is imported as a module of that package, so it may import its siblings.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Protocol, cast

import numpy as np
from numpy.typing import NDArray

from meshctl.mesh import Mesh


@dataclass(frozen=True)
class Samples:
    """Rows to send: input name -> array (rows on the first axis), their true labels when known,
    and one description per row."""

    inputs: Mapping[str, NDArray[Any]]
    labels: NDArray[np.int64] | None = None
    description: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(next(iter(self.inputs.values()))) if self.inputs else 0

    def rows(self, start: int, stop: int) -> dict[str, NDArray[Any]]:
        return {name: array[start:stop] for name, array in self.inputs.items()}


class MeshClient(Protocol):
    DEFAULT_NAME: str

    def add_arguments(self, parser: argparse.ArgumentParser) -> None: ...

    def select(self, args: argparse.Namespace) -> Samples: ...

    def samples(self) -> Samples: ...


class ClientError(Exception):
    """The mesh's client file cannot be imported, or has no rows to offer."""


@functools.cache
def _import(path: Path) -> ModuleType:
    folder = path.parent
    if (folder / "__init__.py").is_file():
        root, name = folder.parent, f"{folder.name}.{path.stem}"
    else:
        root, name = folder, path.stem
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    try:
        return importlib.import_module(name)
    except Exception as exc:  # a user's file: any failure is theirs to read
        raise ClientError(
            f"{path}: cannot import the mesh's client file: {type(exc).__name__}: {exc}"
        ) from None


def load_client(mesh: Mesh) -> MeshClient | None:
    """The mesh's client file as a module, or None when the mesh names none."""
    if mesh.client is None:
        return None
    module = _import(mesh.client)
    missing = [n for n in ("DEFAULT_NAME", "add_arguments", "select", "samples") if not hasattr(module, n)]
    if missing:
        raise ClientError(f"{mesh.client}: a mesh's client file defines {', '.join(missing)}")
    return cast(MeshClient, module)


def mesh_samples(mesh: Mesh) -> Samples:
    """The sample rows of the mesh's client file; ClientError when it has none."""
    client = load_client(mesh)
    if client is None:
        raise ClientError(f"{mesh.path} names no client file with sample rows (client: FILE.py)")
    return client.samples()
