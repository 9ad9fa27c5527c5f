"""The one error tree of onnxmesh, each error carrying its gRPC status code.

    MeshError                      (INTERNAL; the message is never sent to clients)
    ├── InvalidInput               INVALID_ARGUMENT  the caller sent something wrong
    ├── NotFound                   NOT_FOUND         unknown model, version or graph
    ├── Unavailable                UNAVAILABLE       not ready, draining, or a peer is down (retryable)
    ├── DeadlineExceeded           DEADLINE_EXCEEDED the request's time budget ran out
    ├── ResourceExhausted          RESOURCE_EXHAUSTED a queue is full; shed load rather than wait
    └── Cancelled                  CANCELLED         the caller (or a peer on its behalf) gave up

Code anywhere raises these and tells them apart by class. ``code`` is the status *name*
(``"UNAVAILABLE"``), not a grpc object, so nothing inside the mesh imports grpc: the transport
edge (services.common.grpc.servicer, services.common.grpc.client) maps names to grpc status codes in one
place. Any other exception becomes INTERNAL with a fixed message and is logged in full.
"""

from __future__ import annotations

#: The most characters of client input (a name, an id) that an error message or log line repeats.
MAX_ECHO = 200
#: The longest status message a node sends: gRPC refuses trailers above its metadata limit.
MAX_MESSAGE = 2048
#: What an internal error answers, on every protocol: the details are in the server's log only.
INTERNAL_MESSAGE = "internal error; the server log has the details"


def truncate(text: str, limit: int = MAX_ECHO) -> str:
    """`text` cut to `limit` characters, saying how long it was: client input echoed in messages
    and logs stays small whatever the client sent."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}...({len(text)} characters)"


class MeshError(Exception):
    """Base of every error onnxmesh raises on purpose."""

    #: The gRPC status name the transport edge answers with.
    code: str = "INTERNAL"
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
    code = "INVALID_ARGUMENT"
    public = True


class NotFound(MeshError):
    code = "NOT_FOUND"
    public = True


class Unavailable(MeshError):
    code = "UNAVAILABLE"
    public = True


class DeadlineExceeded(MeshError):
    code = "DEADLINE_EXCEEDED"
    public = True


class ResourceExhausted(MeshError):
    code = "RESOURCE_EXHAUSTED"
    public = True


class Cancelled(MeshError):
    code = "CANCELLED"
    public = True


_BY_CODE: dict[str, type[MeshError]] = {
    cls.code: cls
    for cls in (InvalidInput, NotFound, Unavailable, DeadlineExceeded, ResourceExhausted, Cancelled)
}


def from_status(code: str, message: str) -> MeshError:
    """The MeshError for a status (by name) a downstream service returned, keeping its code.

    Codes without a class of their own (e.g. FAILED_PRECONDITION) keep their code on a
    public MeshError so that the orchestrator passes the downstream code through unchanged.
    """
    cls = _BY_CODE.get(code)
    if cls is not None:
        return cls(message)
    err = MeshError(message)
    err.code = code
    err.public = code != "INTERNAL"
    return err
