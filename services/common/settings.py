"""Settings shared by every node, from command-line flags with environment fallbacks.

Every flag `--some-name` can also be set as `ONNXMESH_SOME_NAME`; a flag wins over the
environment, which wins over the default. Settings are read in `main()` and passed down,
never parsed at import time.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ENV_PREFIX = "ONNXMESH_"
MIB = 1024 * 1024


@dataclass(frozen=True)
class ServerSettings:
    """How one node listens and behaves; the same for every service and the orchestrator."""

    service: str
    host: str = "127.0.0.1"
    port: int = 0
    metrics_port: int | None = None
    model_dir: Path | None = None
    ort_threads: int = 1
    inference_workers: int = 2
    max_message_mb: int = 64
    max_concurrent_rpcs: int | None = None
    max_connection_age: float = 300.0
    grace: float = 10.0
    drain_delay: float = 0.5
    log_level: str = "INFO"
    log_format: str = "json"
    reuse_port: bool = False

    @property
    def max_message_bytes(self) -> int:
        return self.max_message_mb * MIB

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


def _env(name: str) -> str | None:
    return os.environ.get(ENV_PREFIX + name.upper().replace("-", "_"))


def add_option(
    parser: argparse.ArgumentParser, name: str, conv: Callable[[str], Any], default: Any, help: str
) -> None:
    """Add `--name` whose default comes from ONNXMESH_NAME, then from `default`."""
    env = _env(name)
    value = conv(env) if env is not None else default
    env_name = ENV_PREFIX + name.upper().replace("-", "_")
    parser.add_argument(
        f"--{name}", type=conv, default=value, help=f"{help} (env {env_name}; default: {default})"
    )


def _flag(text: str) -> bool:
    return text.lower() in ("1", "true", "yes", "on")


def _optional_int(text: str) -> int | None:
    return None if text in ("", "none", "off") else int(text)


def server_parser(
    service: str, *, port: int, model_dir: Path | None, description: str
) -> argparse.ArgumentParser:
    """The argument parser every node starts from; nodes may add flags of their own."""
    parser = argparse.ArgumentParser(prog=f"python -m {service}", description=description)
    add_option(parser, "host", str, "127.0.0.1", "address to listen on (0.0.0.0 in a container)")
    add_option(parser, "port", int, port, "gRPC port; 0 picks a free port and prints it")
    add_option(parser, "metrics-port", _optional_int, None, "Prometheus /metrics port; unset = off")
    add_option(parser, "model-dir", Path, model_dir, "model repository: <model>/<version>/model.onnx")
    add_option(
        parser, "ort-threads", int, 1, "onnxruntime intra-op threads per session (match the CPU limit)"
    )
    add_option(parser, "inference-workers", int, 2, "threads running inference concurrently")
    add_option(parser, "max-message-mb", int, 64, "largest gRPC message sent or received, MiB")
    add_option(
        parser, "max-concurrent-rpcs", _optional_int, None, "above this, RESOURCE_EXHAUSTED (load shed)"
    )
    add_option(
        parser,
        "max-connection-age",
        float,
        300.0,
        "seconds before clients are asked to reconnect (re-resolve DNS)",
    )
    add_option(parser, "grace", float, 10.0, "seconds to drain in-flight calls on SIGTERM")
    add_option(
        parser,
        "drain-delay",
        float,
        0.5,
        "seconds between NOT_SERVING and closing the port on SIGTERM, so health-checking clients move away",
    )
    add_option(parser, "log-level", str, "INFO", "DEBUG, INFO, WARNING or ERROR")
    add_option(parser, "log-format", str, "json", "json (one object per line) or text")
    add_option(
        parser,
        "reuse-port",
        _flag,
        False,
        "share the port with a newer process (SO_REUSEPORT) for hand-overs",
    )
    return parser


def settings_from_args(service: str, args: argparse.Namespace) -> ServerSettings:
    return ServerSettings(
        service=service,
        host=args.host,
        port=args.port,
        metrics_port=args.metrics_port,
        model_dir=args.model_dir,
        ort_threads=args.ort_threads,
        inference_workers=args.inference_workers,
        max_message_mb=args.max_message_mb,
        max_concurrent_rpcs=args.max_concurrent_rpcs,
        max_connection_age=args.max_connection_age,
        grace=args.grace,
        drain_delay=args.drain_delay,
        log_level=args.log_level.upper(),
        log_format=args.log_format,
        reuse_port=args.reuse_port,
    )


def parse_server_settings(
    service: str, argv: Sequence[str] | None, *, port: int, model_dir: Path | None, description: str
) -> ServerSettings:
    parser = server_parser(service, port=port, model_dir=model_dir, description=description)
    return settings_from_args(service, parser.parse_args(argv))
