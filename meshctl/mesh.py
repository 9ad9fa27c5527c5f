"""The mesh file: one YAML that declares a mesh's services and its graphs.

It is the orchestrator's graph spec grown by what it takes to run each service, so the graphs and
the services they call are written once (docs/your-own-mesh.md has a worked example):

    base_port: 8000                   # optional: orchestrator base+1, the services base+11, +21, ...
    images: {prefix: registry.example.com/team/, tag: "1.4"}   # optional: <prefix><service>:<tag>
                                      # (default: the mesh file's folder name as prefix, onnxmesh's version as tag)
    orchestrator: {replicas: 2}
    services:
      features:
        runtime: python               # onnx (model.onnx files) or python (model.py + config.json)
        model_dir: models/features    # relative to this file
        replicas: 1                   # local processes, or the Deployment's replicas
        resources: {requests: {cpu: 250m, memory: 256Mi}, limits: {cpu: "1", memory: 512Mi}}
        settings: {inference_workers: 4}   # node flags (services/common/settings.py)
        requirements: [pillow==11.3.0]     # extra pip packages of a Python service (its image)
        port: 9100                    # optional: the first replica's port, instead of the layout's
      legacy: {address: "10.0.0.7:8001"}   # a service the mesh only calls
    defaults: {timeout: 2.0}
    graphs: {...}                     # as in docs/graphs.md

`load_mesh` checks the file without touching a model: every problem (unknown runtime, missing
model directory, a graph naming a service the file does not declare, ports that collide, a
Python model without a signature...) is reported at once, each naming the file, the service and
the key. `check_models` (`onnxmesh check`) then loads every model and checks every graph against
their signatures, still without starting a node.
"""

from __future__ import annotations

import importlib.metadata
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import yaml

from orchestrator.spec import MeshSpec, SpecError, parse_spec
from services.common.settings import RUNTIME_NAMES, SETTINGS_FIELDS

#: The orchestrator's port is base + 1; the i-th service's is base + 11 + 10 i, its replicas above it.
DEFAULT_BASE_PORT = 8000
ORCHESTRATOR_OFFSET = 1
FIRST_SERVICE_OFFSET = 11
SERVICE_STRIDE = 10
#: A node's REST and metrics ports: its gRPC port plus these (8001 -> 8101, 8201).
HTTP_OFFSET = 100
METRICS_OFFSET = 200
#: The name the orchestrator goes by among the nodes.
ORCHESTRATOR = "orchestrator"

_TOP_KEYS = ("base_port", "images", "orchestrator", "services", "defaults", "graphs", "cache_store", "client")
_SERVICE_KEYS = ("runtime", "model_dir", "replicas", "resources", "settings", "requirements", "port")
_ORCHESTRATOR_KEYS = ("replicas", "resources", "settings", "port")
_RESOURCE_KINDS = ("requests", "limits")
_RESOURCE_KEYS = ("cpu", "memory")
#: Settings the mesh itself decides for every node: where it listens and what it serves.
_MESH_DECIDES = frozenset(
    {"host", "port", "http_port", "metrics_port", "health_port", "model_dir", "runtime", "reuse_port"}
)
_SETTINGS = {f.name: f for f in SETTINGS_FIELDS if f.name not in _MESH_DECIDES}
_QUANTITY = re.compile(r"\d+(\.\d+)?(m|k|Ki|M|Mi|G|Gi|T|Ti)?\Z")
_REQUIREMENT = re.compile(
    r"[A-Za-z0-9][A-Za-z0-9._\-\[\],]*\s*((==|>=|<=|~=|!=|<|>)\s*[A-Za-z0-9.*+!\-]+\s*,?\s*)*\Z"
)


def kubernetes_name(service: str) -> str:
    """The name of a service's Deployment, Service and image on Kubernetes (``model_a`` -> ``model-a``).

    Kubernetes names are DNS labels, which have no ``_``.
    """
    return service.replace("_", "-")


class MeshFileError(ValueError):
    """A mesh file with problems; `problems` lists every one, each naming file, service and key."""

    def __init__(self, problems: Sequence[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = list(problems)


@dataclass(frozen=True)
class Node:
    """One service the mesh runs (or the orchestrator): how many, where, with what."""

    name: str
    #: onnx, python, or orchestrator.
    runtime: str
    model_dir: Path | None
    replicas: int
    #: The first replica's gRPC port; replica i listens on port + i - 1.
    port: int
    #: {"requests": {"cpu": "250m", ...}, "limits": {...}}, as on a Kubernetes container.
    resources: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    #: Node flags as field name -> text (`inference_workers` -> "4").
    settings: Mapping[str, str] = field(default_factory=dict)
    requirements: tuple[str, ...] = ()
    #: True when the file gives the port (`port:`): it stays put when the layout moves.
    fixed_port: bool = False

    def flags(self) -> list[str]:
        """The settings as command-line flags (`--inference-workers 4`)."""
        return [arg for key, value in self.settings.items() for arg in (f"--{key.replace('_', '-')}", value)]


@dataclass(frozen=True)
class Images:
    """How the nodes' images are named: `<prefix><service, as a Kubernetes name>:<tag>`."""

    prefix: str
    #: The onnxmesh release by default: the runtime the images carry.
    tag: str = field(default_factory=lambda: _package_version())


def _package_version() -> str:
    try:
        return importlib.metadata.version("onnxmesh")
    except importlib.metadata.PackageNotFoundError:
        return "0.0.0"


@dataclass(frozen=True)
class Mesh:
    """A checked mesh file."""

    path: Path
    base_port: int
    #: The services the mesh runs, in the file's order (their start order).
    services: Mapping[str, Node]
    #: Services it only calls: name -> address.
    external: Mapping[str, str]
    orchestrator: Node
    #: The graphs, as the orchestrator reads them from the same file.
    spec: MeshSpec
    images: Images
    #: The mesh's own client conveniences (a Python file, meshctl/client.py), if it names one.
    client: Path | None = None

    @property
    def nodes(self) -> tuple[Node, ...]:
        """Every node the mesh runs, the orchestrator last (it calls the others)."""
        return (*self.services.values(), self.orchestrator)

    def node(self, name: str) -> Node:
        for node in self.nodes:
            if node.name == name:
                return node
        raise KeyError(f"{self.path}: no service {name!r}; services: {', '.join(n.name for n in self.nodes)}")

    def ports(self, base: int | None = None) -> dict[str, int]:
        """Each node's first gRPC port, laid out around `base` (the file's by default; 0: all free).
        Explicit `port:` keys stay where they are, except with base 0."""
        if base == 0:
            return {node.name: 0 for node in self.nodes}
        shift = 0 if base is None else base - self.base_port
        return {n.name: n.port if n.fixed_port else n.port + shift for n in self.nodes}

    def graph_names(self) -> list[str]:
        return list(self.spec.graphs)


class _Problems:
    """Collects problems, each prefixed with the file and the key path."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.items: list[str] = []

    def add(self, where: str, problem: str) -> None:
        self.items.append(f"{self.path}: {where}: {problem}" if where else f"{self.path}: {problem}")


def load_mesh(path: str | Path) -> Mesh:
    """Read and check a mesh file; MeshFileError lists every problem found."""
    path = Path(path).resolve()
    try:
        raw: Any = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise MeshFileError([f"{path}: cannot read the mesh file: {exc.strerror or exc}"]) from None
    except yaml.YAMLError as exc:
        raise MeshFileError([f"{path}: not valid YAML: {exc}"]) from None
    problems = _Problems(path)
    if not isinstance(raw, dict):
        raise MeshFileError([f"{path}: a mesh file is a mapping with services and graphs"])
    for key in raw:
        if key not in _TOP_KEYS:
            problems.add(str(key), f"unknown key; allowed: {', '.join(_TOP_KEYS)}")
    for key in ("services", "graphs"):
        if not isinstance(raw.get(key), dict) or not raw[key]:
            problems.add(key, "required: a mapping of names to their declarations")
    if problems.items:
        raise MeshFileError(problems.items)

    base = raw.get("base_port", DEFAULT_BASE_PORT)
    if not isinstance(base, int) or isinstance(base, bool) or not 1024 <= base <= 60000:
        problems.add("base_port", f"must be a port number from 1024 to 60000, got {base!r}")
        base = DEFAULT_BASE_PORT
    services: dict[str, Node] = {}
    external: dict[str, str] = {}
    for index, (name, body) in enumerate(raw["services"].items()):
        where = f"services.{name}"
        if not isinstance(body, dict):
            problems.add(where, "must be a mapping with runtime and model_dir (or an address)")
        elif "address" in body:
            if set(body) != {"address"} or not isinstance(body["address"], str):
                problems.add(
                    where, "a service the mesh only calls has an address (host:port) and nothing else"
                )
            else:
                external[str(name)] = body["address"]
        else:
            port = base + FIRST_SERVICE_OFFSET + SERVICE_STRIDE * index
            services[str(name)] = _service(str(name), body, port, path.parent, problems)
    orchestrator = _orchestrator(raw.get("orchestrator", {}), base + ORCHESTRATOR_OFFSET, problems)
    _check_ports([*services.values(), orchestrator], problems)
    images = _images(raw.get("images", {}), path.parent, problems)
    spec = _graphs(raw, problems)
    client = _client(raw.get("client"), path.parent, problems)
    if problems.items or spec is None:
        raise MeshFileError(problems.items)
    return Mesh(
        path, base, MappingProxyType(services), MappingProxyType(external), orchestrator, spec, images, client
    )


def _client(value: Any, folder: Path, problems: _Problems) -> Path | None:
    """`client: FILE.py`, relative to the mesh file: a Python file that exists."""
    if value is None:
        return None
    if not isinstance(value, str) or not value.endswith(".py"):
        problems.add("client", f"must name a Python file (FILE.py) relative to the mesh file, got {value!r}")
        return None
    path = (folder / value).resolve()
    if not path.is_file():
        problems.add("client", f"{path} is not a file")
        return None
    return path


_IMAGE_PREFIX = re.compile(r"([a-z0-9][a-z0-9._:-]*/)*\Z")
_IMAGE_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}\Z")


def _images(value: Any, folder: Path, problems: _Problems) -> Images:
    # By default the folder's name: two meshes never overwrite each other's images.
    default = re.sub(r"[^a-z0-9._-]+", "-", folder.name.lower()).strip("-._") or "mesh"
    if not isinstance(value, dict) or set(value) - {"prefix", "tag"}:
        problems.add("images", "must be a mapping with prefix (e.g. registry.example.com/team/) and tag")
        return Images(f"{default}/")
    images = Images(**{"prefix": f"{default}/", **{k: str(v) for k, v in value.items()}})
    if not _IMAGE_PREFIX.match(images.prefix):
        problems.add("images.prefix", f"not an image name prefix ending in '/': {images.prefix!r}")
    if not _IMAGE_TAG.match(images.tag):
        problems.add("images.tag", f"not an image tag: {images.tag!r}")
    return images


def _replicas(value: Any, where: str, problems: _Problems) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        problems.add(f"{where}.replicas", f"must be a whole number of at least 1, got {value!r}")
        return 1
    return value


def _resources(value: Any, where: str, problems: _Problems) -> dict[str, dict[str, str]]:
    """`{requests: {cpu, memory}, limits: {cpu, memory}}`, as a Kubernetes container has them."""
    at = f"{where}.resources"
    if not isinstance(value, dict):
        problems.add(at, "must be a mapping: {requests: {cpu: 250m, memory: 256Mi}, limits: {...}}")
        return {}
    out: dict[str, dict[str, str]] = {}
    for kind, amounts in value.items():
        if kind not in _RESOURCE_KINDS:
            problems.add(f"{at}.{kind}", f"unknown key; allowed: {', '.join(_RESOURCE_KINDS)}")
            continue
        if not isinstance(amounts, dict):
            problems.add(f"{at}.{kind}", "must be a mapping: {cpu: 250m, memory: 256Mi}")
            continue
        for key, quantity in amounts.items():
            if key not in _RESOURCE_KEYS:
                problems.add(f"{at}.{kind}.{key}", f"unknown resource; allowed: {', '.join(_RESOURCE_KEYS)}")
            elif not _QUANTITY.match(str(quantity)):
                problems.add(
                    f"{at}.{kind}.{key}", f"not a Kubernetes quantity (250m, 1, 256Mi): {quantity!r}"
                )
            else:
                out.setdefault(kind, {})[key] = str(quantity)
    return out


def _settings(value: Any, where: str, problems: _Problems) -> dict[str, str]:
    if not isinstance(value, dict):
        problems.add(f"{where}.settings", "must be a mapping of node settings, e.g. {inference_workers: 4}")
        return {}
    out = {}
    for key, setting in value.items():
        name = str(key).replace("-", "_")
        at = f"{where}.settings.{key}"
        if name in _MESH_DECIDES:
            problems.add(at, "the mesh sets this itself (ports, model directory, runtime)")
            continue
        if name not in _SETTINGS:
            problems.add(at, f"unknown setting; allowed: {', '.join(sorted(_SETTINGS))}")
            continue
        text = str(setting).lower() if isinstance(setting, bool) else str(setting)
        try:
            _SETTINGS[name].metadata["parse"](text)
        except (ValueError, TypeError) as exc:
            problems.add(at, f"bad value {setting!r}: {exc}")
            continue
        out[name] = text
    return out


def _port(value: Any, where: str, problems: _Problems) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int) or not 1024 <= value <= 65000:
        problems.add(f"{where}.port", f"must be a port number from 1024 to 65000, got {value!r}")
        return None
    return value


def _service(name: str, body: dict[str, Any], port: int, root: Path, problems: _Problems) -> Node:
    where = f"services.{name}"
    for key in body:
        if key not in _SERVICE_KEYS:
            problems.add(
                f"{where}.{key}", f"unknown key; allowed: {', '.join(_SERVICE_KEYS)} (or address alone)"
            )
    runtime = body.get("runtime")
    if runtime not in RUNTIME_NAMES:
        problems.add(f"{where}.runtime", f"unknown runtime {runtime!r}; one of {', '.join(RUNTIME_NAMES)}")
    model_dir = None
    if not isinstance(body.get("model_dir"), str):
        problems.add(
            f"{where}.model_dir", "required: the service's model directory, relative to the mesh file"
        )
    else:
        model_dir = (root / body["model_dir"]).resolve()
        if not model_dir.is_dir():
            problems.add(f"{where}.model_dir", f"model directory {model_dir} does not exist")
        elif runtime == "python":
            _python_signatures(model_dir, f"{where}.model_dir", problems)
    requirements = body.get("requirements", [])
    if not isinstance(requirements, list) or not all(
        isinstance(r, str) and _REQUIREMENT.match(r) for r in requirements
    ):
        problems.add(
            f"{where}.requirements",
            f"must be a list of pip requirements (name==version), got {requirements!r}",
        )
        requirements = []
    elif requirements and runtime != "python":
        problems.add(f"{where}.requirements", "extra pip requirements are for python services")
    if "port" in body:
        port = _port(body["port"], where, problems) or port
    return Node(
        name,
        str(runtime),
        model_dir,
        _replicas(body.get("replicas", 1), where, problems),
        port,
        _resources(body.get("resources", {}), where, problems),
        _settings(body.get("settings", {}), where, problems),
        tuple(requirements),
        "port" in body,
    )


def _python_signatures(model_dir: Path, where: str, problems: _Problems) -> None:
    """Every model of a Python service declares its signature in config.json (read, not imported)."""
    from services.common.repository import ModelConfig  # the runtime's own reader of config.json

    for model in sorted(p for p in model_dir.iterdir() if p.is_dir()):
        if not any(p.is_dir() and p.name.isdigit() for p in model.iterdir()):
            continue
        try:
            config = ModelConfig.load(model)
        except (ValueError, TypeError, OSError) as exc:
            problems.add(where, str(exc))
            continue
        if not config.inputs or not config.outputs:
            problems.add(
                where,
                f'Python model {model.name!r} has no signature: declare "inputs" and "outputs" in '
                f"{model / 'config.json'}",
            )


def _orchestrator(body: Any, port: int, problems: _Problems) -> Node:
    where = ORCHESTRATOR
    if not isinstance(body, dict):
        problems.add(where, "must be a mapping: {replicas, resources, settings, port}")
        body = {}
    for key in body:
        if key not in _ORCHESTRATOR_KEYS:
            problems.add(f"{where}.{key}", f"unknown key; allowed: {', '.join(_ORCHESTRATOR_KEYS)}")
    if "port" in body:
        port = _port(body["port"], where, problems) or port
    return Node(
        ORCHESTRATOR,
        ORCHESTRATOR,
        None,
        _replicas(body.get("replicas", 1), where, problems),
        port,
        _resources(body.get("resources", {}), where, problems),
        _settings(body.get("settings", {}), where, problems),
        fixed_port="port" in body,
    )


def _check_ports(nodes: Sequence[Node], problems: _Problems) -> None:
    """No two nodes may share a port: gRPC, REST (+100) or metrics (+200) of any replica."""
    taken: dict[int, str] = {}
    for node in nodes:
        where = ORCHESTRATOR if node.name == ORCHESTRATOR else f"services.{node.name}"
        clashes: set[str] = set()
        for offset, kind in ((0, "gRPC"), (HTTP_OFFSET, "REST"), (METRICS_OFFSET, "metrics")):
            for replica in range(node.replicas):
                port = node.port + offset + replica
                if port in taken and taken[port] not in clashes:
                    clashes.add(taken[port])
                    problems.add(
                        f"{where}.port",
                        f"port {port} ({kind}, replica {replica + 1}) is also {taken[port]}'s; "
                        "give one of them another port (or fewer replicas)",
                    )
                taken.setdefault(port, node.name)


def _graphs(raw: dict[str, Any], problems: _Problems) -> MeshSpec | None:
    """The graphs as the orchestrator parses them, each on its own so every bad graph is reported."""
    # The services by name only: their own problems are reported above, once.
    names = {name: {"address": "checked-elsewhere:1"} for name in raw["services"]}
    shared: dict[str, Any] = {"services": names}
    shared.update((key, raw[key]) for key in ("defaults", "cache_store") if key in raw)
    for name, body in raw["graphs"].items():
        try:
            parse_spec({**shared, "graphs": {name: body}})
        except SpecError as exc:
            problems.add(f"graphs.{name}", str(exc))
    if problems.items:
        return None
    try:
        return parse_spec(raw)  # what the orchestrator itself reads from this file
    except SpecError as exc:
        problems.add("", str(exc))
        return None
