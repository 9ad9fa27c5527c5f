"""`main()` of a model-serving node: scan a model directory, build servables, serve.

A node runs one runtime (`--runtime`): `onnx` serves `<model>/<version>/model.onnx` with
onnxruntime, `python` serves a user's class from `<model>/<version>/model.py`
(services.common.python_model). Both go through the same repository, batching and data plane.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from pathlib import Path

from services.common.batching.adaptive import BatchingModel
from services.common.model import LoadError, Model, Servable
from services.common.observability.logs import configure_logging
from services.common.onnx_model import OnnxModel
from services.common.python_model import PythonModel
from services.common.repository import ModelRepository, ModelVersionDir, scan_repository
from services.common.server import MeshServer
from services.common.settings import ServerSettings, parse_server_settings

log = logging.getLogger(__name__)

#: Builds the servable of one model version directory.
ServableFactory = Callable[[ModelVersionDir, ServerSettings, Executor], Servable]


def _batched(model: Model, entry: ModelVersionDir, settings: ServerSettings) -> Servable:
    """`model`, batched adaptively when its config asks for it."""
    if entry.config.max_batch_size > 1:
        return BatchingModel(model, entry.config, max_concurrent_batches=settings.inference_workers)
    return model


def onnx_servable(entry: ModelVersionDir, settings: ServerSettings, executor: Executor) -> Servable:
    """An ONNX model version; its signature comes from the graph, never from config.json."""
    if entry.config.inputs or entry.config.outputs or entry.config.python_class:
        raise ValueError(
            f"{entry.path.parent.parent / 'config.json'}: inputs, outputs and python_class are for "
            "the python runtime; an ONNX model's signature comes from its graph"
        )
    model = OnnxModel(
        entry.name,
        entry.version,
        entry.path,
        executor,
        threads=settings.ort_threads,
        warmup=entry.config.warmup,
    )
    return _batched(model, entry, settings)


def python_servable(entry: ModelVersionDir, settings: ServerSettings, executor: Executor) -> Servable:
    """A user's Python model version (its version directory is `entry.path`)."""
    return _batched(
        PythonModel(entry.name, entry.version, entry.path, entry.config, executor), entry, settings
    )


#: The runtimes a node can run: the factory of a version directory, and the file that makes a
#: directory a version (None: every numbered directory; a Python model may name an importable class).
RUNTIMES: dict[str, tuple[ServableFactory, str | None]] = {
    "onnx": (onnx_servable, "model.onnx"),
    "python": (python_servable, None),
}


def build_repository(
    settings: ServerSettings,
    executor: Executor,
    factory: ServableFactory | None = None,
    filename: str | None = "model.onnx",
) -> ModelRepository:
    """The servables of a model directory; a model whose config or servable cannot be built is
    recorded as failed (with its reason) rather than stopping the node."""
    if settings.model_dir is None:
        raise ValueError("no model directory given (--model-dir or ONNXMESH_MODEL_DIR)")
    if factory is None:
        factory, filename = RUNTIMES[settings.runtime]
    entries, failures = scan_repository(settings.model_dir, filename)
    if not entries and not failures:
        raise FileNotFoundError(f"no <model>/<version>/{filename or ''} under {settings.model_dir}")
    repository = ModelRepository()
    for failure in failures:
        log.error(
            "model cannot be served; serving the others",
            extra={"model": failure.name, "version": failure.version, "reason": failure.reason},
        )
        repository.fail(failure.name, failure.version, failure.reason)
    for entry in entries:
        try:
            servable = factory(entry, settings, executor)
        except (ValueError, TypeError, OSError) as exc:
            log.error(
                "model cannot be served; serving the others", extra={"model": entry.name, "reason": str(exc)}
            )
            repository.fail(entry.name, entry.version, str(exc))
            continue
        repository.add(servable, entry.config)
    return repository


#: The port a node listens on unless told otherwise (a container's, say; the launcher gives each its own).
DEFAULT_PORT = 8001


def main(
    service: str,
    *,
    port: int = DEFAULT_PORT,
    model_dir: Path | None = None,
    description: str = "Serve every model of a model directory over the Open Inference Protocol.",
    runtime: str = "onnx",
    argv: Sequence[str] | None = None,
) -> None:
    settings = parse_server_settings(
        service, argv, port=port, model_dir=model_dir, description=description, runtime=runtime
    )
    configure_logging(service, settings.log_level, settings.log_format)
    executor = ThreadPoolExecutor(settings.inference_workers, thread_name_prefix=f"{service}-infer")
    try:
        repository = build_repository(settings, executor)
        asyncio.run(MeshServer(settings, repository).run_until_signal())
    except (FileNotFoundError, ValueError, OSError, LoadError) as exc:
        log.error("cannot start: %s", exc)
        raise SystemExit(f"{service}: {exc}") from exc
    finally:
        executor.shutdown(wait=False, cancel_futures=True)


def cli(argv: Sequence[str] | None = None) -> None:
    """`python -m services.common.model_node --name NAME [--runtime onnx|python] --model-dir DIR ...`:
    any service of a mesh. `--name` (env ONNXMESH_NAME) names the node in logs and metrics."""
    names = argparse.ArgumentParser(add_help=False)
    names.add_argument("--name", default=os.environ.get("ONNXMESH_NAME", "model"))
    known, rest = names.parse_known_args(argv)
    main(known.name, argv=rest)


if __name__ == "__main__":
    cli()
