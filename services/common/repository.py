"""The model repository: a directory of `<model>/<version>/model.onnx` plus optional config.

    models/
      digits-mlp/
        config.json          optional: {"platform", "description", "max_batch_size", ...}
        1/model.onnx
        2/model.onnx         versions are positive integers; the highest is the default

Requests name a model and optionally a version; an empty version means the latest.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from services.common.errors import NotFound
from services.common.model import Servable

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelConfig:
    """Per-model settings from `<model>/config.json`; every key is optional."""

    platform: str = "onnxruntime_onnx"
    description: str = ""
    #: 0 turns adaptive batching off (also forced off when the first dim is fixed).
    max_batch_size: int = 0
    max_queue_delay_ms: float = 2.0
    max_queue_size: int = 1024

    @classmethod
    def load(cls, model_path: Path) -> ModelConfig:
        path = model_path / "config.json"
        if not path.exists():
            return cls()
        data: dict[str, Any] = json.loads(path.read_text())
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{path}: unknown keys {unknown}; allowed: {sorted(known)}")
        return cls(**data)


@dataclass(frozen=True)
class ModelVersionDir:
    name: str
    version: str
    path: Path
    config: ModelConfig


def scan(model_dir: Path, filename: str = "model.onnx") -> Iterator[ModelVersionDir]:
    """Every `<model>/<version>/` under model_dir that holds `filename`, sorted by name, version."""
    if not model_dir.is_dir():
        raise FileNotFoundError(f"model directory {model_dir} does not exist")
    for model_path in sorted(p for p in model_dir.iterdir() if p.is_dir()):
        config = ModelConfig.load(model_path)
        versions = [p for p in model_path.iterdir() if p.is_dir() and p.name.isdigit()]
        for version_path in sorted(versions, key=lambda p: int(p.name)):
            if (version_path / filename).exists():
                yield ModelVersionDir(model_path.name, version_path.name, version_path / filename, config)


class ModelRepository:
    """The servables of one node by name and version; lookups raise NotFound with the choices."""

    def __init__(self, servables: Iterable[Servable] = ()) -> None:
        self._models: dict[str, dict[str, Servable]] = {}
        #: name -> its highest version: what most requests (version "") ask for, found in one lookup.
        self._latest: dict[str, Servable] = {}
        for servable in servables:
            self.add(servable)

    def add(self, servable: Servable) -> None:
        versions = self._models.setdefault(servable.name, {})
        versions[servable.version] = servable
        self._latest[servable.name] = versions[max(versions, key=_version_key)]

    def replace(self, servables: Iterable[Servable]) -> None:
        """Swap the whole set at once (the orchestrator's spec reload)."""
        fresh = ModelRepository(servables)
        self._models, self._latest = fresh._models, fresh._latest

    def names(self) -> list[str]:
        return sorted(self._models)

    def all(self) -> list[Servable]:
        return [s for versions in self._models.values() for s in versions.values()]

    def versions(self, name: str) -> list[str]:
        return sorted(self._models.get(name, {}), key=_version_key)

    def get(self, name: str, version: str = "") -> Servable:
        if not version:
            latest = self._latest.get(name)
            if latest is not None:
                return latest
        versions = self._models.get(name)
        if not versions:
            raise NotFound(
                f"model '{name}' is not served here; available: {', '.join(self.names()) or 'none'}"
            )
        servable = versions.get(version)
        if servable is None:
            raise NotFound(
                f"model '{name}' has no version '{version}'; available: {', '.join(self.versions(name))}"
            )
        return servable

    @property
    def ready(self) -> bool:
        return bool(self._models) and all(s.ready for s in self.all())


def _version_key(version: str) -> tuple[int, str]:
    return (int(version), "") if version.isdigit() else (-1, version)
