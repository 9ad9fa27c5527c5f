"""The models and data every benchmark mode shares: the same files, the same servables, the same inputs.

The floor and the all-in-one server build each service's servables here, from the same model
directories the mesh's services read, with the same runtimes (`PythonModel`, `OnnxModel`)
and without batching, so the three modes run exactly the same model code.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from concurrent.futures import Executor
from pathlib import Path

import numpy as np

from demo.topology import MODEL_SERVICES, PREPROCESS
from meshctl.process import REPO
from services.common.model import Model, Servable
from services.common.onnx_model import OnnxModel
from services.common.python_model import PythonModel
from services.common.repository import ModelRepository, ModelVersionDir, scan
from services.common.settings import ServerSettings

#: The model directory each service reads by default (`services/<name>/models`).
DEFAULT_DIRS: dict[str, Path] = {
    service: REPO / "services" / service / "models" for service in MODEL_SERVICES
}


def service_dir(text: str) -> tuple[str, Path]:
    """`--service-dir SERVICE=PATH`, as the floor and the all-in-one server take it."""
    name, _, value = text.partition("=")
    if not name or not value:
        raise argparse.ArgumentTypeError("expected SERVICE=PATH, e.g. model_a=/tmp/large-models")
    return name, Path(value)


def model_dirs(overrides: Mapping[str, Path] | None = None) -> dict[str, Path]:
    """Each service's model directory: the defaults, with `overrides` (e.g. the large model) on top."""
    return {**DEFAULT_DIRS, **(overrides or {})}


def bare_servable(
    service: str, entry: ModelVersionDir, settings: ServerSettings, executor: Executor
) -> Servable:
    """The servable a service would build for `entry`, never wrapped in batching."""
    if service == PREPROCESS:
        return PythonModel(entry.name, entry.version, entry.path, entry.config, executor)
    return OnnxModel(entry.name, entry.version, entry.path, executor, threads=settings.ort_threads)


def service_repository(
    service: str, directory: Path, settings: ServerSettings, executor: Executor
) -> ModelRepository:
    """Every model version under `directory`, as `service` serves it (minus batching)."""
    filename = None if service == PREPROCESS else "model.onnx"
    entries = list(scan(directory, filename))
    if not entries:
        raise FileNotFoundError(f"{service}: no <model>/<version>/{filename or ''} under {directory}")
    return ModelRepository(bare_servable(service, entry, settings, executor) for entry in entries)


def local_repositories(
    dirs: Mapping[str, Path], settings: ServerSettings, executor: Executor
) -> dict[str, ModelRepository]:
    """One repository per service, keyed by the service names of the graph spec."""
    return {service: service_repository(service, path, settings, executor) for service, path in dirs.items()}


def load_models_sync(repositories: Mapping[str, ModelRepository]) -> dict[str, Model]:
    """Load every model on the calling thread and index them by model name (the floor's view)."""
    models: dict[str, Model] = {}
    for repository in repositories.values():
        for servable in repository.all():
            if not isinstance(servable, Model):
                raise TypeError(f"{servable.name}: expected a Model, got {type(servable).__name__}")
            if servable.name in models:
                raise ValueError(f"model '{servable.name}' is served by two services")
            servable.load_sync()
            models[servable.name] = servable
    return models


def features_of(images: np.ndarray, preprocess_dir: Path | None = None) -> np.ndarray:
    """What the preprocess service answers for `images`, computed by the same class in-process."""
    directory = preprocess_dir or DEFAULT_DIRS[PREPROCESS]
    entry = next(iter(scan(directory, None)))
    model = PythonModel(entry.name, entry.version, entry.path, entry.config, _NoExecutor())
    model.load_sync()
    return model.predict({"image": images}, ())["features"]


class _NoExecutor(Executor):
    """For models only called synchronously (`load_sync`, `predict`): it never runs anything."""
