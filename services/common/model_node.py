"""`main()` of a model-serving node: scan a model directory, build servables, serve.

model_a, model_b and preprocess differ only in their defaults and in the factory that
turns one `<model>/<version>/` directory into a servable.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from pathlib import Path

from services.common.batching.adaptive import BatchingModel
from services.common.model import LoadError, Servable
from services.common.observability.logs import configure_logging
from services.common.onnx_model import OnnxModel
from services.common.repository import ModelRepository, ModelVersionDir, scan_repository
from services.common.server import MeshServer
from services.common.settings import ServerSettings, parse_server_settings

log = logging.getLogger(__name__)

#: Builds the servable of one model version directory.
ServableFactory = Callable[[ModelVersionDir, ServerSettings, Executor], Servable]


def onnx_servable(entry: ModelVersionDir, settings: ServerSettings, executor: Executor) -> Servable:
    """An ONNX model version, batched adaptively when its config asks for it."""
    model = OnnxModel(
        entry.name,
        entry.version,
        entry.path,
        executor,
        threads=settings.ort_threads,
        warmup=entry.config.warmup,
    )
    if entry.config.max_batch_size > 1:
        return BatchingModel(model, entry.config, max_concurrent_batches=settings.inference_workers)
    return model


def build_repository(
    settings: ServerSettings,
    executor: Executor,
    factory: ServableFactory = onnx_servable,
    filename: str = "model.onnx",
) -> ModelRepository:
    """The servables of a model directory; a model whose config or servable cannot be built is
    recorded as failed (with its reason) rather than stopping the node."""
    if settings.model_dir is None:
        raise ValueError("no model directory given (--model-dir or ONNXMESH_MODEL_DIR)")
    entries, failures = scan_repository(settings.model_dir, filename)
    if not entries and not failures:
        raise FileNotFoundError(f"no <model>/<version>/{filename} under {settings.model_dir}")
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


def main(
    service: str,
    *,
    port: int,
    model_dir: Path,
    description: str,
    factory: ServableFactory = onnx_servable,
    filename: str = "model.onnx",
    argv: Sequence[str] | None = None,
) -> None:
    settings = parse_server_settings(service, argv, port=port, model_dir=model_dir, description=description)
    configure_logging(service, settings.log_level, settings.log_format)
    executor = ThreadPoolExecutor(settings.inference_workers, thread_name_prefix=f"{service}-infer")
    try:
        repository = build_repository(settings, executor, factory, filename)
        asyncio.run(MeshServer(settings, repository).run_until_signal())
    except (FileNotFoundError, ValueError, OSError, LoadError) as exc:
        log.error("cannot start: %s", exc)
        raise SystemExit(f"{service}: {exc}") from exc
    finally:
        executor.shutdown(wait=False, cancel_futures=True)
