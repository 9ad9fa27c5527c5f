"""`python -m bench.targets.all_in_one`: every step of every graph in ONE gRPC server process.

This is the "one server does everything" baseline that the mesh replaces, built from the mesh's
own pieces so that the comparison measures only the network hops and the process split:

- the same model classes on the same files (`bench.models`; no batching),
- the same `Engine` running the same graph spec (the demo mesh file's by default), its
  services mapped to `InProcessStage`s that call each service's own `DataPlane` directly (the
  lookup, readiness, validation and metrics a model service does, with no codec, no channel,
  no copy), wrapped like the orchestrator wraps its gRPC stages (`CoalescingStage`, same
  `--coalesce` default), so both stack concurrent calls of a step the same way,
- served as OIP models by the same `MeshServer` and its `DataPlane` (health, reflection,
  validation, metrics, drain), graphs and the individual models alike.

It prints `all_in_one listening on HOST:PORT` and `all_in_one ready on HOST:PORT` like every
node, so launchers read its port the same way (`--port 0` picks a free one).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Mapping, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from pathlib import Path

from bench.models import DEFAULT_DIRS, local_repositories, model_dirs, service_dir
from orchestrator.graph.engine import Engine
from orchestrator.node import GraphServable
from orchestrator.spec import MeshSpec, SignatureKey, SpecError, load_spec, validate_against_signatures
from orchestrator.stages.base import Stage
from orchestrator.stages.coalescing import DEFAULT_IN_FLIGHT, CoalescingStage
from services.common.dataplane import DataPlane
from services.common.errors import MeshError, NotFound
from services.common.model import Servable
from services.common.observability.logs import configure_logging
from services.common.observability.metrics import ServerMetrics
from services.common.repository import ModelRepository
from services.common.server import MeshServer
from services.common.settings import ServerSettings, add_option, server_parser, settings_from_args
from services.common.types import InferRequest, InferResult, ModelSignature

SERVICE = "all_in_one"
#: The orchestrator's `--coalesce` default; the env var is shared too.
COALESCE_IN_FLIGHT = DEFAULT_IN_FLIGHT
DEFAULT_GRAPHS = Path(__file__).resolve().parents[2] / "demo" / "mesh.yaml"
log = logging.getLogger(SERVICE)


class InProcessStage:
    """A `Stage` over one service's data plane: the engine calls it directly, in-process.

    The data plane is the one a model service would run (lookup, readiness, validation, its own
    request metrics), so only the network hop and the codec differ from the mesh.
    """

    def __init__(self, service: str, dataplane: DataPlane) -> None:
        self.service = service
        self.dataplane = dataplane

    async def call(self, request: InferRequest) -> InferResult:
        return await self.dataplane.infer(request)

    async def metadata(self, model: str, version: str) -> ModelSignature:
        try:
            return self.dataplane.model_metadata(model, version).signature
        except MeshError as err:
            raise err.with_prefix(self.service) from None

    async def is_ready(self, model: str, version: str) -> bool:
        try:
            return self.dataplane.model_ready(model, version)
        except NotFound:
            return False


class AllInOne:
    """Loads every service's models, checks the spec against them, then serves models and graphs."""

    def __init__(
        self,
        spec: MeshSpec,
        services: Mapping[str, ModelRepository],
        served: ModelRepository,
        *,
        coalesce_in_flight: int = COALESCE_IN_FLIGHT,
    ) -> None:
        unknown = sorted(set(spec.services) - set(services))
        if unknown:
            raise ValueError(f"the spec names service(s) {', '.join(unknown)} with no model directory")
        self.spec = spec
        self.services = dict(services)
        self.served = served
        self.coalesce_in_flight = coalesce_in_flight
        self.engine: Engine | None = None

    def models(self) -> list[Servable]:
        """Every model of every service; a model name may belong to one service only."""
        seen: dict[str, str] = {}
        out: list[Servable] = []
        for service, repository in self.services.items():
            for servable in repository.all():
                owner = seen.setdefault(servable.name, service)
                if owner != service:
                    raise ValueError(f"model '{servable.name}' is in both {owner} and {service}")
                out.append(servable)
        return out

    async def load(self) -> None:
        """MeshServer's loader: models first, then the engine over them; SERVING afterwards."""
        models = self.models()
        await asyncio.gather(*(servable.load() for servable in models))
        stages = {name: self.stage(name, repo) for name, repo in self.services.items()}
        signatures: dict[SignatureKey, ModelSignature] = {}
        for key in self.spec.model_keys():
            service, model, version = key
            signatures[key] = await stages[service].metadata(model, version)
        graph_signatures = validate_against_signatures(self.spec, signatures)
        self.engine = Engine(self.spec, stages)
        # The orchestrator's own graph servable: only the network hops differ from the mesh.
        graphs = [GraphServable(name, sig, self.engine) for name, sig in graph_signatures.items()]
        self.served.replace([*models, *graphs])
        log.info("graphs active", extra={"graphs": sorted(graph_signatures)})

    def stage(self, service: str, repository: ModelRepository) -> Stage:
        """The in-process stage of one service, wrapped as the orchestrator wraps its gRPC stages.

        Each service gets a data plane of its own, as each node of the mesh has (its request
        metrics on a registry of their own, not exported: the server's are the baseline's).
        """
        dataplane = DataPlane(repository, ServerMetrics(service), server_name=f"onnxmesh-{service}")
        stage: Stage = InProcessStage(service, dataplane)
        if self.coalesce_in_flight > 0:
            stage = CoalescingStage(stage, max_in_flight=self.coalesce_in_flight)
        return stage

    async def close(self) -> None:
        if self.engine is not None:
            await self.engine.aclose()


def build_parser() -> argparse.ArgumentParser:
    parser = server_parser(SERVICE, port=8000, model_dir=None, description=__doc__.splitlines()[0])
    add_option(parser, "graphs", Path, DEFAULT_GRAPHS, "graph spec (YAML) whose services run in-process")
    add_option(
        parser,
        "coalesce",
        int,
        COALESCE_IN_FLIGHT,
        "calls per step in flight before concurrent requests are stacked into one call (0 = off), as the "
        "orchestrator's flag",
    )
    parser.add_argument(
        "--service-dir",
        type=service_dir,
        action="append",
        default=[],
        metavar="SERVICE=PATH",
        help=f"model directory of one service of the spec (repeatable; defaults: {', '.join(DEFAULT_DIRS)} "
        "read their own services/<name>/models)",
    )
    return parser


def build(
    spec: MeshSpec,
    dirs: Mapping[str, Path],
    settings: ServerSettings,
    executor: Executor,
    *,
    coalesce_in_flight: int = COALESCE_IN_FLIGHT,
) -> tuple[MeshServer, AllInOne]:
    """The server and its app: models of the spec's services only, one executor for all of them."""
    wanted = {service: path for service, path in model_dirs(dirs).items() if service in spec.services}
    served = ModelRepository()
    repositories = local_repositories(wanted, settings, executor)
    app = AllInOne(spec, repositories, served, coalesce_in_flight=coalesce_in_flight)
    return MeshServer(settings, served, loader=app.load, closer=app.close), app


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    settings = settings_from_args(SERVICE, args)
    configure_logging(SERVICE, settings.log_level, settings.log_format)
    # One pool for every model, the size each mesh node uses: the same settings, one process.
    executor = ThreadPoolExecutor(settings.inference_workers, thread_name_prefix=f"{SERVICE}-infer")
    try:
        spec = load_spec(args.graphs)
        server, _ = build(spec, dict(args.service_dir), settings, executor, coalesce_in_flight=args.coalesce)
        asyncio.run(server.run_until_signal())
    except (SpecError, MeshError, FileNotFoundError, ValueError, OSError) as exc:
        log.error("cannot start: %s", exc)
        sys.exit(f"{SERVICE}: {exc}")
    finally:
        executor.shutdown(wait=False, cancel_futures=True)


if __name__ == "__main__":
    main()
