"""`python -m orchestrator`: serve the graphs of a spec as OIP models (see services/common/settings.py)."""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from orchestrator.node import Orchestrator
from orchestrator.spec import SpecError
from orchestrator.stages.coalescing import DEFAULT_IN_FLIGHT
from services.common.grpc.security import ClientSecurity, SecurityError, TlsFiles
from services.common.observability.logs import configure_logging
from services.common.observability.metrics import ServerMetrics
from services.common.repository import ModelRepository
from services.common.server import MeshServer
from services.common.settings import add_option, server_parser, settings_from_args

log = logging.getLogger("orchestrator")
ORCHESTRATOR = "orchestrator"
#: Where it listens unless told otherwise (a container's port; the launcher gives each its own).
DEFAULT_PORT = 8001


def main(argv: Sequence[str] | None = None) -> None:
    parser = server_parser(
        ORCHESTRATOR,
        port=DEFAULT_PORT,
        model_dir=None,
        description="Run the inference graphs of a spec over the mesh's services; each graph is served as a model.",
    )
    add_option(
        parser,
        "graphs",
        Path,
        None,
        "graph spec or mesh file (YAML), required; watched and reloaded on change",
    )
    add_option(parser, "reload-interval", float, 2.0, "seconds between checks of the graph spec file")
    add_option(
        parser,
        "coalesce",
        int,
        DEFAULT_IN_FLIGHT,
        "the most calls per step in flight before concurrent requests are stacked into one downstream call; "
        "under load the limit falls to 1 (0 = never stack)",
    )
    args = parser.parse_args(argv)
    if args.graphs is None:
        parser.error("no graph spec: give --graphs FILE (or ONNXMESH_GRAPHS), a spec or a mesh file")
    settings = settings_from_args("orchestrator", args)
    configure_logging("orchestrator", settings.log_level, settings.log_format)
    repository = ModelRepository()
    metrics = ServerMetrics("orchestrator")
    try:
        app = Orchestrator(
            args.graphs,
            repository,
            metrics,
            reload_interval=args.reload_interval,
            coalesce_in_flight=args.coalesce,
            client_security=ClientSecurity(TlsFiles.of(settings.tls_cert, settings.tls_key, settings.tls_ca)),
        )
    except SecurityError as exc:
        sys.exit(f"orchestrator: {exc}")
    except (SpecError, OSError) as exc:
        log.error("invalid graph spec: %s", exc)
        sys.exit(f"orchestrator: invalid graph spec {args.graphs}: {exc}")
    server = MeshServer(settings, repository, metrics=metrics, loader=app.load, closer=app.close)
    try:
        asyncio.run(server.run_until_signal())
    except OSError as exc:
        sys.exit(f"orchestrator: {exc}")
    except SpecError as exc:
        log.error("graph spec does not match the services: %s", exc)
        sys.exit(f"orchestrator: graph spec {args.graphs} does not match the services: {exc}")


if __name__ == "__main__":
    main()
