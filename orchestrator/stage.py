"""The seam through which the engine calls one downstream service.

The engine knows nothing about gRPC: it calls a ``Stage`` per logical service name of the spec. The
real implementation speaks OIP over a long-lived channel; tests plug in fakes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol

import numpy as np

from services.common.types import InferResult, ModelSignature


class Stage(Protocol):
    """One downstream service (an OIP endpoint). Raises services.common.errors.MeshError subclasses."""

    async def infer(
        self,
        model: str,
        version: str,
        inputs: Mapping[str, np.ndarray],
        outputs: Sequence[str],
        *,
        timeout: float,
        request_id: str,
    ) -> InferResult:
        """Run ``model`` (``version`` "" = the service's default) on ``inputs``.

        ``outputs`` empty = all outputs; ``timeout`` in seconds for this one call.
        ``InferResult.model_version`` is the version that answered.
        """
        ...

    async def metadata(self, model: str, version: str) -> ModelSignature:
        """The model's signature (ModelMetadata)."""
        ...

    async def ready(self, model: str, version: str) -> bool:
        """Whether the model is ready to serve (ModelReady)."""
        ...
