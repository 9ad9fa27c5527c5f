"""The seam through which the engine calls one downstream service.

The engine knows nothing about gRPC: it calls a ``Stage`` per logical service name of the spec.
The real one is the mesh's OIP client itself (``services.common.grpc.client.OipClient``, one
long-lived channel per address); ``CoalescingStage`` wraps one; tests plug in fakes.

A stage that answers by ``request.deadline`` on its own (every gRPC call carries it) says so with
a true ``keeps_deadline`` attribute; the engine then arms no timer of its own around the call.
Any other stage (an in-process one, a fake) is cut off by the engine at the deadline.
"""

from __future__ import annotations

from typing import Protocol

from services.common.types import InferRequest, InferResult, ModelSignature


class Stage(Protocol):
    """One downstream service (an OIP endpoint). Raises services.common.errors.MeshError subclasses."""

    async def call(self, request: InferRequest) -> InferResult:
        """Run ``request.model`` (``version`` "" = the service's default) on its inputs before its
        deadline. ``outputs`` empty = all outputs. ``InferResult.model_version`` is the version
        that answered."""
        ...

    async def metadata(self, model: str, version: str) -> ModelSignature:
        """The model's signature (ModelMetadata)."""
        ...

    async def is_ready(self, model: str, version: str) -> bool:
        """Whether the model is ready to serve (ModelReady); False when the service can't say."""
        ...


def keeps_deadline(stage: object) -> bool:
    """Whether ``stage`` answers (or fails with DeadlineExceeded) by ``request.deadline`` itself."""
    return bool(getattr(stage, "keeps_deadline", False))
