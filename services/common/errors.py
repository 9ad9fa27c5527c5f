"""The one error tree of onnxmesh, each error carrying its gRPC status code.

    MeshError                      (INTERNAL; the message is never sent to clients)
    ├── InvalidInput               INVALID_ARGUMENT  the caller sent something wrong
    ├── NotFound                   NOT_FOUND         unknown model, version or graph
    ├── Unavailable                UNAVAILABLE       not ready, draining, or a peer is down (retryable)
    ├── DeadlineExceeded           DEADLINE_EXCEEDED the request's time budget ran out
    └── ResourceExhausted          RESOURCE_EXHAUSTED a queue is full; shed load rather than wait

Code anywhere raises these; the transport edge (services.common.servicer) maps them to a status
in one place. Any other exception becomes INTERNAL with a fixed message and is logged in full.
"""

from __future__ import annotations

import grpc


class MeshError(Exception):
    """Base of every error onnxmesh raises on purpose."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL
    #: True when the message is safe and useful to show the client.
    public: bool = False

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def with_prefix(self, prefix: str) -> MeshError:
        """The same error (same class and code) with context in front, e.g. the step name."""
        err = type(self)(f"{prefix}: {self.message}")
        err.code = self.code
        err.public = self.public
        return err


class InvalidInput(MeshError):
    code = grpc.StatusCode.INVALID_ARGUMENT
    public = True


class NotFound(MeshError):
    code = grpc.StatusCode.NOT_FOUND
    public = True


class Unavailable(MeshError):
    code = grpc.StatusCode.UNAVAILABLE
    public = True


class DeadlineExceeded(MeshError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED
    public = True


class ResourceExhausted(MeshError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    public = True


_BY_CODE: dict[grpc.StatusCode, type[MeshError]] = {
    cls.code: cls for cls in (InvalidInput, NotFound, Unavailable, DeadlineExceeded, ResourceExhausted)
}


def from_status(code: grpc.StatusCode, message: str) -> MeshError:
    """The MeshError for a status a downstream service returned, keeping its code.

    Codes without a class of their own (e.g. FAILED_PRECONDITION) keep their code on a
    public MeshError so that the orchestrator passes the downstream code through unchanged.
    """
    cls = _BY_CODE.get(code)
    if cls is not None:
        return cls(message)
    err = MeshError(message)
    err.code = code
    err.public = code != grpc.StatusCode.INTERNAL
    return err
