"""The Python runtime: a user's model class, served like any ONNX model.

A model directory of the Python runtime holds, per model, a config.json that declares the
signature and `<version>/model.py` with the class (or config.json's `python_class` names an
importable `package.module:Class`):

    features/
      config.json      {"inputs": [{"name": "image", "datatype": "UINT8", "shape": [-1, 8, 8]}],
                        "outputs": [{"name": "features", "datatype": "FP32", "shape": [-1, 64]}],
                        "max_batch_size": 32, "parameters": {...}}
      1/model.py       class Model:
                           def load(self, version_dir, config): ...
                           def predict(self, inputs): return {"features": ...}
      1/stats.json     anything the class reads from its version directory

The class imports nothing from onnxmesh: `load(version_dir: pathlib.Path, config: dict)` runs once
(config is config.json as read), and `predict(inputs: dict[str, ndarray]) -> dict[str, ndarray]`
is batch-native (row i of every output belongs to row i of the inputs), so adaptive batching,
warm-up, statistics, metrics, tracing, the Triton extensions and REST all work as for ONNX.
A ValueError or TypeError from `predict` is the caller's fault (INVALID_ARGUMENT, its message);
anything else is INTERNAL with a fixed message, the traceback in the node's log.

A model directory with Python in it is code: the node imports and runs it with the node's rights.
A model.py that fails to import, or a class that fails to load, is a model that failed to load
(UNAVAILABLE with the reason, in RepositoryIndex); the node serves its other models.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import logging
import sys
from collections.abc import Mapping, Sequence
from concurrent.futures import Executor
from pathlib import Path
from typing import Any

import numpy as np

from services.common.errors import InvalidInput, MeshError, truncate
from services.common.model import Model
from services.common.repository import ModelConfig
from services.common.types import DATATYPE_TO_NUMPY, ModelSignature

log = logging.getLogger(__name__)

PLATFORM = "python"
#: The file of a version directory that holds the class, unless config.json names an importable one.
MODEL_FILE = "model.py"


def find_class(name: str, version_dir: Path, python_class: str) -> type:
    """The user's class: `python_class` as "module:Class", else the class of `<version_dir>/model.py`
    (named by `python_class`, or the only class defined there with a `predict`)."""
    if ":" in python_class:
        module_name, _, attr = python_class.partition(":")
        module = importlib.import_module(module_name)
        found = getattr(module, attr, None)
        if not inspect.isclass(found):
            raise ValueError(f"{python_class}: {module_name} has no class {attr!r}")
        return found
    path = version_dir / MODEL_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} does not exist (or name an importable 'module:Class' as python_class)"
        )
    # A module name of its own per model version: two models' model.py never share a module.
    module_name = f"onnxmesh_models.{name.replace('-', '_').replace('.', '_')}.v{version_dir.name}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[module_name]
        raise
    classes = [
        c
        for c in vars(module).values()
        if inspect.isclass(c) and c.__module__ == module_name and callable(getattr(c, "predict", None))
    ]
    if python_class:
        chosen = [c for c in classes if c.__name__ == python_class]
        if not chosen:
            raise ValueError(f"{path}: no class {python_class!r} with a predict method")
        return chosen[0]
    if len(classes) != 1:
        names = ", ".join(c.__name__ for c in classes) or "none"
        raise ValueError(
            f"{path}: expected one class with a predict method, found {names} (name one as python_class)"
        )
    return classes[0]


class PythonModel(Model):
    """One version of a user's Python model; its signature is config.json's."""

    platform = PLATFORM

    def __init__(
        self, name: str, version: str, version_dir: Path, config: ModelConfig, executor: Executor
    ) -> None:
        super().__init__(name, version, executor, warmup=config.warmup)
        self.version_dir = version_dir
        self.config = config
        if not config.inputs or not config.outputs:
            raise ValueError(
                f"{version_dir.parent / 'config.json'}: a Python model declares its signature: "
                '"inputs" and "outputs", each [{"name", "datatype", "shape"}, ...]'
            )
        self.signature = ModelSignature(name, (version,), PLATFORM, config.inputs, config.outputs)
        self._dtypes = {spec.name: DATATYPE_TO_NUMPY[spec.datatype] for spec in config.outputs}
        self._instance: Any = None

    def load_sync(self) -> None:
        try:
            cls = find_class(self.name, self.version_dir, self.config.python_class)
            instance = cls()
            load = getattr(instance, "load", None)
            if callable(load):
                load(self.version_dir, dict(self.config.source))
        except SystemExit as exc:
            # User code that exits must not take the node down with it.
            raise RuntimeError(f"the model's code called exit({exc.code})") from exc
        except Exception:
            log.exception("python model failed to load", extra={"model": self.name, "version": self.version})
            raise
        self._instance = instance

    def predict(self, inputs: Mapping[str, np.ndarray], outputs: Sequence[str]) -> dict[str, np.ndarray]:
        assert self._instance is not None, "predict before load"
        try:
            answer = self._instance.predict(dict(inputs))
        except (ValueError, TypeError) as exc:
            raise InvalidInput(f"model '{self.name}': {truncate(str(exc), 500)}") from exc
        if not isinstance(answer, Mapping):
            raise MeshError(f"model '{self.name}': predict returned {type(answer).__name__}, not a dict")
        results = {}
        for name in outputs or self._dtypes:
            if name not in answer:
                raise MeshError(f"model '{self.name}': predict returned no output '{name}'")
            # Declared datatypes are what callers get: float64 arithmetic comes back as FP32 when so declared.
            results[name] = np.asarray(answer[name]).astype(self._dtypes[name], copy=False)
        return results
