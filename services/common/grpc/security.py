"""Transport security of every node: mTLS credentials re-read on change, and bearer tokens.

Server side, `server_credentials` serves the certificate in `--tls-cert`/`--tls-key` and, with
`--tls-ca`, requires and verifies client certificates. gRPC asks the fetcher for the current
configuration on every new handshake: a file rotated in place (a Kubernetes Secret update, a
cert-manager renewal) is used by the next connection, with no restart, while connections already
open keep theirs. Client side, `ClientSecurity` builds channel credentials from the same files;
`OipClient` asks it whether they changed and opens a new channel beside the old one, which
finishes its calls before it closes. The client checks the server's name against the target's
host (or `server_name`).

`TokenInterceptor` requires `authorization: Bearer <token>` on every RPC but grpc.health.v1,
compared in constant time with every accepted token; a missing or wrong one gets
UNAUTHENTICATED with a fixed message. Tokens are never logged, nor used as metric labels.
"""

from __future__ import annotations

import hmac
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

log = logging.getLogger(__name__)

AUTH_HEADER = "authorization"
UNAUTHENTICATED_MESSAGE = "missing or invalid bearer token: send 'authorization: Bearer <token>'"
HEALTH_PREFIX = "/grpc.health.v1.Health/"
#: How often a client looks at its certificate files' modification times.
CHECK_INTERVAL_S = 1.0


class SecurityError(OSError):
    """A TLS or token setting that cannot be used (missing file, half a key pair)."""


def _read(path: Path, what: str, pem: str | None = None) -> bytes:
    # The path only, never the contents, in every message: a key must not reach a log line.
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise SecurityError(f"cannot read the {what} {path}: {exc.strerror}") from None
    # Checked here: gRPC reports a certificate and key swapped only as a port it failed to bind.
    # "PRIVATE KEY-----" ends PKCS#8, RSA and EC keys alike.
    if pem is not None and f"{pem}-----".encode() not in data:
        raise SecurityError(f"the {what} {path} holds no PEM {pem.lower()}")
    return data


def _stamp(paths: Sequence[Path]) -> tuple[tuple[int, int], ...]:
    stamps = []
    for path in paths:
        try:
            st = path.stat()
            stamps.append((st.st_mtime_ns, st.st_ino))
        except OSError:
            stamps.append((0, 0))
    return tuple(stamps)


@dataclass(frozen=True)
class TlsFiles:
    """A certificate chain and its key (PEM), and the CA bundle that peers must chain to."""

    cert: Path
    key: Path
    ca: Path | None = None

    @classmethod
    def of(cls, cert: Path | None, key: Path | None, ca: Path | None) -> TlsFiles | None:
        """The files of the `--tls-*` settings; None when TLS is off; an error for half a pair."""
        if cert is None and key is None:
            if ca is not None:
                raise SecurityError("--tls-ca needs --tls-cert and --tls-key as well")
            return None
        if cert is None or key is None:
            raise SecurityError("--tls-cert and --tls-key go together: give both or neither")
        return cls(cert, key, ca)

    @property
    def paths(self) -> tuple[Path, ...]:
        return (self.cert, self.key) + ((self.ca,) if self.ca is not None else ())

    def stamp(self) -> tuple[tuple[int, int], ...]:
        """Changes whenever any of the files is replaced or rewritten."""
        return _stamp(self.paths)

    def load(self) -> tuple[bytes, bytes, bytes | None]:
        """(chain, key, ca), read now."""
        ca = _read(self.ca, "TLS CA bundle", "CERTIFICATE") if self.ca is not None else None
        return (
            _read(self.cert, "TLS certificate", "CERTIFICATE"),
            _read(self.key, "TLS key", "PRIVATE KEY"),
            ca,
        )


def server_credentials(files: TlsFiles, *, require_client_cert: bool = True) -> grpc.ServerCredentials:
    """Credentials whose certificates are re-read on the first handshake after a file changes.

    With a CA, client certificates are verified against it (and required unless
    `require_client_cert` is False); a read that fails keeps the previous certificates."""

    def configuration() -> Any:
        chain, key, ca = files.load()
        return grpc.ssl_server_certificate_configuration([(key, chain)], root_certificates=ca)

    state = {"stamp": files.stamp()}
    initial = configuration()

    def fetch() -> Any:
        stamp = files.stamp()
        if stamp == state["stamp"]:
            return None  # unchanged: gRPC keeps the current configuration
        try:
            fresh = configuration()
        except SecurityError as exc:
            log.warning("TLS files unreadable, keeping the previous ones", extra={"reason": str(exc)})
            return None
        state["stamp"] = stamp
        log.info("TLS certificates reloaded", extra={"cert": str(files.cert)})
        return fresh

    return grpc.dynamic_ssl_server_credentials(
        initial, fetch, require_client_authentication=files.ca is not None and require_client_cert
    )


@dataclass
class ClientSecurity:
    """How a client reaches a secured node: TLS files (None = plaintext) and a bearer token.

    `server_name` overrides the name checked in the server's certificate (default: the
    target's host)."""

    tls: TlsFiles | None = None
    token: str | None = None
    server_name: str | None = None
    #: TLS without a client certificate: only the CA to verify the server with (when `tls` is None).
    ca: Path | None = None
    _stamp: tuple[tuple[int, int], ...] = field(default=(), repr=False)
    _checked_at: float = field(default=0.0, repr=False)

    def __repr__(self) -> str:  # never the token
        return f"ClientSecurity(tls={self.tls!r}, ca={self.ca!r}, token={'set' if self.token else None})"

    @property
    def _paths(self) -> tuple[Path, ...]:
        return self.tls.paths if self.tls is not None else ((self.ca,) if self.ca is not None else ())

    def channel_credentials(self) -> grpc.ChannelCredentials | None:
        """Credentials from the files as they are now; None for plaintext."""
        if not self._paths:
            return None
        self._stamp = _stamp(self._paths)
        self._checked_at = time.monotonic()
        if self.tls is None:
            assert self.ca is not None
            return grpc.ssl_channel_credentials(
                root_certificates=_read(self.ca, "TLS CA bundle", "CERTIFICATE")
            )
        chain, key, ca = self.tls.load()
        return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=chain)

    def changed(self) -> bool:
        """True when the files changed since the credentials were last built (checked at most
        once per CHECK_INTERVAL_S, so it costs nothing per call)."""
        if not self._paths:
            return False
        now = time.monotonic()
        if now - self._checked_at < CHECK_INTERVAL_S:
            return False
        self._checked_at = now
        return _stamp(self._paths) != self._stamp

    def options(self) -> list[tuple[str, object]]:
        if self._paths and self.server_name:
            return [("grpc.ssl_target_name_override", self.server_name)]
        return []

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        return ((AUTH_HEADER, f"Bearer {self.token}"),) if self.token else ()

    def copy(self) -> ClientSecurity:
        """The same settings with a change watch of its own (one per channel)."""
        return ClientSecurity(self.tls, self.token, self.server_name, self.ca)


def read_tokens(path: Path) -> tuple[bytes, ...]:
    """The accepted tokens: one per line of `path` (blank lines and `#` comments skipped)."""
    lines = _read(path, "token file").decode("utf-8", "replace").splitlines()
    tokens = tuple(t.strip().encode() for t in lines if t.strip() and not t.lstrip().startswith("#"))
    if not tokens:
        raise SecurityError(f"the token file {path} holds no token")
    return tokens


def read_token(path: Path) -> str:
    """A client's token: the first one of a token file."""
    return read_tokens(path)[0].decode()


def token_matches(presented: bytes, accepted: Sequence[bytes]) -> bool:
    """Constant-time: every accepted token is compared, whichever matches."""
    found = False
    for token in accepted:
        found |= hmac.compare_digest(presented, token)
    return found


class TokenInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Refuses every RPC but health without an accepted bearer token.

    The token file is re-read when it changes (checked at most once per second), so tokens
    rotate with no restart: add the new one, move clients, then remove the old one."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._tokens = read_tokens(path)
        self._stamp = _stamp([path])
        self._checked_at = time.monotonic()

    def tokens(self) -> tuple[bytes, ...]:
        now = time.monotonic()
        if now - self._checked_at >= CHECK_INTERVAL_S:
            self._checked_at = now
            stamp = _stamp([self.path])
            if stamp != self._stamp:
                try:
                    self._tokens = read_tokens(self.path)
                    self._stamp = stamp
                    log.info("tokens reloaded", extra={"count": len(self._tokens)})
                except SecurityError as exc:
                    log.warning(
                        "token file unusable, keeping the previous tokens", extra={"reason": str(exc)}
                    )
        return self._tokens

    def allowed(self, metadata: Sequence[tuple[str, str | bytes]] | None) -> bool:
        for key, value in metadata or ():
            if key == AUTH_HEADER:
                text = value if isinstance(value, str) else value.decode("latin-1")
                scheme, _, token = text.partition(" ")
                return scheme.lower() == "bearer" and token_matches(token.strip().encode(), self.tokens())
        return False

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        method = details.method or ""
        if handler is None or method.startswith(HEALTH_PREFIX) or self.allowed(details.invocation_metadata):
            return handler
        log.warning("unauthenticated call refused", extra={"code": "UNAUTHENTICATED", "method": method[:200]})
        return _refusal(handler)


def _refusal(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A handler of the same shape as `handler` that answers UNAUTHENTICATED."""

    async def deny(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, UNAUTHENTICATED_MESSAGE)

    async def deny_stream(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, UNAUTHENTICATED_MESSAGE)
        yield  # pragma: no cover - makes this an async generator

    ser, de = handler.response_serializer, handler.request_deserializer
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(deny_stream, de, ser)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(deny, de, ser)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(deny_stream, de, ser)
    return grpc.unary_unary_rpc_method_handler(deny, de, ser)


def environ_security(environ: Mapping[str, str]) -> ClientSecurity:
    """A tool's client security from ONNXMESH_TLS_CERT/KEY/CA, ONNXMESH_TLS_SERVER_NAME and
    ONNXMESH_TOKEN_FILE (the same variables the nodes read), read when the tool starts; the CA
    alone means TLS without a client certificate."""

    def path(name: str) -> Path | None:
        value = environ.get(name)
        if not value:
            return None
        # Resolved now, so a relative path names the same file wherever the tool runs next.
        resolved = Path(value).expanduser().absolute()
        if not resolved.is_file():
            where = "" if Path(value).expanduser().is_absolute() else f" (relative to {Path.cwd()})"
            raise SecurityError(f"{name}={value}: no such file{where}; give the file's absolute path")
        return resolved

    cert, key, ca = path("ONNXMESH_TLS_CERT"), path("ONNXMESH_TLS_KEY"), path("ONNXMESH_TLS_CA")
    # A CA alone is TLS without a client certificate (a caller of an orchestrator that wants tokens).
    tls = TlsFiles.of(cert, key, ca) if cert or key else None
    token_file = path("ONNXMESH_TOKEN_FILE")
    token = read_token(token_file) if token_file is not None else None
    server_name = environ.get("ONNXMESH_TLS_SERVER_NAME") or None
    return ClientSecurity(tls, token, server_name, ca if tls is None else None)
