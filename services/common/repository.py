"""The model repository: a directory of `<model>/<version>/model.onnx` plus optional config.

    models/
      digits-mlp/
        config.json          optional: {"platform", "description", "max_batch_size", "warmup", ...}
        warmup/              optional: files that warm-up samples read (services.common.warmup)
        1/model.onnx
        2/model.onnx         versions are positive integers; the highest is the default

The Python runtime (services.common.python_model) reads the same layout with `<version>/model.py`
and a config.json that declares the signature (`inputs`, `outputs`) an ONNX file carries itself.

Requests name a model and optionally a version; an empty version means the latest that loaded.
A model that fails to load (a bad config.json, a file onnxruntime rejects, a failed warm-up)
is kept apart with its reason, as Triton does: it is reported UNAVAILABLE (RepositoryIndex,
ModelReady false, requests get UNAVAILABLE naming the reason) while the others serve.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from services.common.errors import NotFound, Unavailable
from services.common.model import Servable
from services.common.types import DATATYPE_TO_NUMPY, TensorSpec
from services.common.warmup import WarmupSample, parse_warmup

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
    #: None: one row of zeros per input; (): no warm-up; else these samples (services.common.warmup).
    warmup: tuple[WarmupSample, ...] | None = None
    #: The signature of a Python model (an ONNX model's comes from its graph).
    inputs: tuple[TensorSpec, ...] = ()
    outputs: tuple[TensorSpec, ...] = ()
    #: A Python model's class: its name in `<version>/model.py` ("" = the only class there with
    #: a `predict`), or an importable "package.module:Class".
    python_class: str = ""
    #: Free-form settings handed to a Python model's `load` (with the rest of config.json).
    parameters: Mapping[str, Any] = field(default_factory=dict)
    #: config.json as read, for a Python model's `load`; not a key of its own.
    source: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def load(cls, model_path: Path) -> ModelConfig:
        path = model_path / "config.json"
        if not path.exists():
            return cls()
        try:
            data: dict[str, Any] = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not valid JSON: {exc}") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a JSON object")
        known = {f.name for f in fields(cls)} - {"source"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{path}: unknown keys {unknown}; allowed: {sorted(known)}")
        values = dict(data, source=data)
        values["warmup"] = parse_warmup(data.get("warmup"), model_path)
        for key in ("inputs", "outputs"):
            values[key] = parse_tensors(data.get(key, []), f"{path}: {key}")
        if not isinstance(data.get("parameters", {}), dict):
            raise ValueError(f"{path}: parameters must be an object")
        return cls(**values)


def parse_tensors(data: Any, where: str) -> tuple[TensorSpec, ...]:
    """`[{"name", "datatype", "shape"}, ...]` (shape with -1 for any size) as TensorSpecs."""
    if not isinstance(data, list):
        raise ValueError(f"{where} must be a list of {{name, datatype, shape}}")
    specs = []
    for index, item in enumerate(data):
        at = f"{where}[{index}]"
        if not isinstance(item, dict) or set(item) != {"name", "datatype", "shape"}:
            raise ValueError(f"{at} must be an object with exactly name, datatype and shape")
        name, datatype, shape = item["name"], item["datatype"], item["shape"]
        if not isinstance(name, str) or not name:
            raise ValueError(f"{at}: name must be a non-empty string")
        if datatype not in DATATYPE_TO_NUMPY:
            raise ValueError(
                f"{at} ('{name}'): datatype {datatype!r} is not one of {', '.join(DATATYPE_TO_NUMPY)}"
            )
        if not isinstance(shape, list) or not all(isinstance(d, int) and d >= -1 for d in shape):
            raise ValueError(f"{at} ('{name}'): shape must be a list of sizes, -1 for any, got {shape!r}")
        specs.append(TensorSpec(name, datatype, tuple(shape)))
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ValueError(f"{where}: a tensor name appears twice in {names}")
    return tuple(specs)


@dataclass(frozen=True)
class ModelVersionDir:
    name: str
    version: str
    path: Path
    config: ModelConfig


@dataclass(frozen=True)
class LoadFailure:
    """A model version that could not be served, and why (version "" = the whole model)."""

    name: str
    version: str
    reason: str


def scan(model_dir: Path, filename: str | None = "model.onnx") -> Iterator[ModelVersionDir]:
    """Every `<model>/<version>/` under model_dir that holds `filename` (any version directory for
    None), sorted by name, version; a bad config.json raises."""
    entries, failures = scan_repository(model_dir, filename)
    if failures:
        raise ValueError(failures[0].reason)
    yield from entries


def scan_repository(
    model_dir: Path, filename: str | None = "model.onnx"
) -> tuple[list[ModelVersionDir], list[LoadFailure]]:
    """Like `scan`, but a model whose config.json is bad becomes a LoadFailure, not an error."""
    if not model_dir.is_dir():
        raise FileNotFoundError(f"model directory {model_dir} does not exist")
    entries: list[ModelVersionDir] = []
    failures: list[LoadFailure] = []
    for model_path in sorted(p for p in model_dir.iterdir() if p.is_dir()):
        versions = [p for p in model_path.iterdir() if p.is_dir() and p.name.isdigit()]
        found = [
            p
            for p in sorted(versions, key=lambda p: int(p.name))
            if filename is None or (p / filename).exists()
        ]
        if not found:
            continue
        try:
            config = ModelConfig.load(model_path)
        except (ValueError, TypeError, OSError) as exc:
            failures += [LoadFailure(model_path.name, p.name, str(exc)) for p in found]
            continue
        entries += [
            ModelVersionDir(model_path.name, p.name, p / filename if filename else p, config) for p in found
        ]
    return entries, failures


class ModelRepository:
    """The servables of one node by name and version; lookups raise NotFound with the choices."""

    def __init__(self, servables: Iterable[Servable] = ()) -> None:
        self._models: dict[str, dict[str, Servable]] = {}
        #: name -> its highest version: what most requests (version "") ask for, found in one lookup.
        self._latest: dict[str, Servable] = {}
        #: name -> version -> why it could not be served.
        self._failed: dict[str, dict[str, str]] = {}
        self._configs: dict[str, ModelConfig] = {}
        for servable in servables:
            self.add(servable)

    def add(self, servable: Servable, config: ModelConfig | None = None) -> None:
        versions = self._models.setdefault(servable.name, {})
        versions[servable.version] = servable
        self._latest[servable.name] = versions[max(versions, key=_version_key)]
        if config is not None:
            self._configs[servable.name] = config

    def replace(self, servables: Iterable[Servable]) -> None:
        """Swap the whole set at once (the orchestrator's spec reload)."""
        fresh = ModelRepository(servables)
        self._models, self._latest, self._failed = fresh._models, fresh._latest, fresh._failed

    def fail(self, name: str, version: str, reason: str) -> None:
        """Take a model version out of service for good, keeping why (RepositoryIndex shows it)."""
        self._failed.setdefault(name, {})[version] = reason
        versions = self._models.get(name, {})
        versions.pop(version, None)
        if versions:
            self._latest[name] = versions[max(versions, key=_version_key)]
        else:
            self._models.pop(name, None)
            self._latest.pop(name, None)

    def failures(self) -> list[LoadFailure]:
        return [
            LoadFailure(name, version, reason)
            for name, versions in sorted(self._failed.items())
            for version, reason in sorted(versions.items(), key=lambda item: _version_key(item[0]))
        ]

    def failure(self, name: str, version: str = "") -> str | None:
        """Why a model version (or, for "", a model with no version serving) failed; None if it did not."""
        failed = self._failed.get(name)
        if not failed or (not version and name in self._models):
            return None
        if not version:
            return failed[max(failed, key=_version_key)]
        return failed.get(version)

    def config(self, name: str) -> ModelConfig | None:
        """The config.json settings of a model, when it came from a model directory."""
        return self._configs.get(name)

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
        servable = versions.get(version) if versions else None
        if servable is None and (reason := self.failure(name, version)) is not None:
            failed = version or max(self._failed[name], key=_version_key)
            raise Unavailable(f"model '{name}' version {failed} failed to load: {reason}")
        if not versions:
            raise NotFound(
                f"model '{name}' is not served here; available: {', '.join(self.names()) or 'none'}"
            )
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
