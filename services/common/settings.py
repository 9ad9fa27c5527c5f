"""Settings shared by every node, from command-line flags with environment fallbacks.

Each setting is declared once, as a field of `ServerSettings` whose metadata holds its help
text and its parser (`option(...)`); the argument parser, the environment names and the
settings object are all derived from those fields. Every flag `--some-name` can also be set as
`ONNXMESH_SOME_NAME`; a flag wins over the environment, which wins over the default. Settings
are read in `main()` and passed down, never parsed at import time.

A node changes a field's default for itself (`server_parser(port=..., model_dir=...)`) and
adds flags of its own with `add_option` (the orchestrator's `--graphs`, for instance), which
follow the same flag > environment > default rule.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

ENV_PREFIX = "ONNXMESH_"
#: The runtimes a model node can run (services.common.model_node.RUNTIMES).
RUNTIME_NAMES = ("onnx", "python")
#: Set by a launcher (meshctl/process.py) to its pid: its nodes stop when it dies
#: (`services.common.server.follow_launcher`).
LAUNCHER_ENV = "ONNXMESH_LAUNCHER_PID"
MIB = 1024 * 1024


def option(help: str, parse: Callable[[str], Any] = str) -> dict[str, Any]:
    """The metadata that makes a `ServerSettings` field a flag: its help and how to parse its text."""
    return {"help": help, "parse": parse}


def positive_int(text: str) -> int:
    """An argparse type: an integer of at least 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def non_negative_int(text: str) -> int:
    """An argparse type: an integer of at least 0."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def _flag(text: str) -> bool:
    return text.lower() in ("1", "true", "yes", "on")


def _optional_int(text: str) -> int | None:
    return None if text in ("", "none", "off") else int(text)


def _runtime(text: str) -> str:
    if text not in RUNTIME_NAMES:
        raise argparse.ArgumentTypeError(f"must be one of {', '.join(RUNTIME_NAMES)}, got {text!r}")
    return text


def _optional_path(text: str) -> Path | None:
    return None if text in ("", "none", "off") else Path(text)


@dataclass(frozen=True)
class ServerSettings:
    """How one node listens and behaves; the same for every service and the orchestrator.

    Every field but `service` is a flag (`--max-message-mb` for `max_message_mb`).
    """

    service: str
    host: str = field(default="127.0.0.1", metadata=option("address to listen on (0.0.0.0 in a container)"))
    port: int = field(default=0, metadata=option("gRPC port; 0 picks a free port and prints it", int))
    metrics_port: int | None = field(
        default=None, metadata=option("Prometheus /metrics port; unset = off", _optional_int)
    )
    http_port: int | None = field(
        default=None, metadata=option("KServe v2 REST port; 0 picks a free port; unset = off", _optional_int)
    )
    model_dir: Path | None = field(
        default=None, metadata=option("model repository: <model>/<version>/model.onnx", Path)
    )
    runtime: str = field(
        default="onnx",
        metadata=option(
            "what serves the model directory: onnx (model.onnx files) or python (model.py)", _runtime
        ),
    )
    ort_threads: int = field(
        default=1, metadata=option("onnxruntime intra-op threads per session (match the CPU limit)", int)
    )
    inference_workers: int = field(default=2, metadata=option("threads running inference concurrently", int))
    max_message_mb: int = field(
        default=64, metadata=option("largest gRPC message sent or received, MiB", int)
    )
    max_concurrent_rpcs: int | None = field(
        default=None, metadata=option("above this, RESOURCE_EXHAUSTED (load shed)", _optional_int)
    )
    max_inflight: str = field(
        default="adaptive",
        metadata=option(
            "inference calls run at once before RESOURCE_EXHAUSTED: adaptive (a gradient limit), a number, or off"
        ),
    )
    max_loop_lag: float = field(
        default=0.005,
        metadata=option(
            "seconds the event loop may lag (calls waiting before any handler) before new inference "
            "calls are refused at once, undecoded, as are calls over --max-inflight; 0 = off (the "
            "data plane refuses those after decoding)",
            float,
        ),
    )
    acceptors: int = field(
        default=8,
        metadata=option(
            "gRPC servers sharing the port in this process: each takes in one call per event-loop "
            "turn, so more keep calls from queueing inside gRPC, out of admission's sight",
            int,
        ),
    )
    max_connection_age: float = field(
        default=300.0,
        metadata=option("seconds before clients are asked to reconnect (re-resolve DNS)", float),
    )
    grace: float = field(default=10.0, metadata=option("seconds to drain in-flight calls on SIGTERM", float))
    drain_delay: float = field(
        default=0.5,
        metadata=option(
            "seconds between NOT_SERVING and closing the port on SIGTERM, so health-checking clients move away",
            float,
        ),
    )
    log_level: str = field(default="INFO", metadata=option("DEBUG, INFO, WARNING or ERROR", str.upper))
    log_format: str = field(default="json", metadata=option("json (one object per line) or text"))
    tls_cert: Path | None = field(
        default=None,
        metadata=option(
            "PEM certificate chain: serve gRPC over TLS (re-read when it changes)", _optional_path
        ),
    )
    tls_key: Path | None = field(
        default=None, metadata=option("PEM private key of --tls-cert", _optional_path)
    )
    tls_ca: Path | None = field(
        default=None,
        metadata=option(
            "PEM CA bundle: verify peers against it (mTLS: client certificates required, and the "
            "certificates of the services this node calls)",
            _optional_path,
        ),
    )
    tls_require_client_cert: bool = field(
        default=True,
        metadata=option(
            "with --tls-ca, refuse callers without a client certificate (0: ask none; callers show tokens)",
            _flag,
        ),
    )
    health_port: int | None = field(
        default=None,
        metadata=option(
            "plaintext port serving grpc.health.v1 only (Kubernetes probes when TLS is on); 0 picks one; unset = off",
            _optional_int,
        ),
    )
    token_file: Path | None = field(
        default=None,
        metadata=option(
            "bearer tokens accepted, one per line: every RPC but health needs one (re-read when it changes)",
            _optional_path,
        ),
    )
    reuse_port: bool = field(
        default=False,
        metadata=option("share the port with a newer process (SO_REUSEPORT) for hand-overs", _flag),
    )

    @property
    def max_message_bytes(self) -> int:
        return self.max_message_mb * MIB

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


#: The fields of ServerSettings that are flags, in declaration (and --help) order.
SETTINGS_FIELDS = tuple(f for f in fields(ServerSettings) if "parse" in f.metadata)
#: The flags only a process serving models (OIP, REST) has; the jobs service and workers do not.
MODEL_SERVING_FIELDS = frozenset(
    {"http_port", "model_dir", "runtime", "ort_threads", "inference_workers", "max_inflight"}
)


def env_name(name: str) -> str:
    """`ONNXMESH_SOME_NAME` for the flag `some-name` (or the field `some_name`)."""
    return ENV_PREFIX + name.upper().replace("-", "_")


def add_option(
    parser: argparse.ArgumentParser,
    name: str,
    conv: Callable[[str], Any],
    default: Any,
    help: str,
    *,
    environ: Mapping[str, str] = os.environ,
) -> None:
    """Add `--name` whose default comes from ONNXMESH_NAME, then from `default`."""
    env = environ.get(env_name(name))
    value = conv(env) if env is not None else default
    parser.add_argument(
        f"--{name}", type=conv, default=value, help=f"{help} (env {env_name(name)}; default: {default})"
    )


def server_parser(
    service: str,
    *,
    port: int,
    model_dir: Path | None = None,
    description: str,
    serves_models: bool = True,
    defaults: Mapping[str, Any] | None = None,
    prog: str | None = None,
    environ: Mapping[str, str] = os.environ,
) -> argparse.ArgumentParser:
    """The argument parser every gRPC process starts from: one flag per settings field (without
    the model-serving ones unless `serves_models`), with this process's `port`, `model_dir` and
    other `defaults`; a process may add flags of its own with `add_option`."""
    parser = argparse.ArgumentParser(prog=prog or f"python -m {service}", description=description)
    chosen: dict[str, Any] = {"port": port, "model_dir": model_dir, **(defaults or {})}
    for f in SETTINGS_FIELDS:
        if not serves_models and f.name in MODEL_SERVING_FIELDS:
            continue
        flag = f.name.replace("_", "-")
        add_option(
            parser,
            flag,
            f.metadata["parse"],
            chosen.get(f.name, f.default),
            f.metadata["help"],
            environ=environ,
        )
    return parser


def settings_from_args(service: str, args: argparse.Namespace) -> ServerSettings:
    """The settings of `service` from arguments parsed by a `server_parser` (extra flags ignored,
    missing ones at their defaults)."""
    given = {f.name: getattr(args, f.name) for f in SETTINGS_FIELDS if hasattr(args, f.name)}
    return ServerSettings(service, **given)


def parse_server_settings(
    service: str,
    argv: Sequence[str] | None,
    *,
    port: int,
    model_dir: Path | None,
    description: str,
    runtime: str = "onnx",
) -> ServerSettings:
    parser = server_parser(
        service, port=port, model_dir=model_dir, description=description, defaults={"runtime": runtime}
    )
    return settings_from_args(service, parser.parse_args(argv))
