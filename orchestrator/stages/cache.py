"""Response caches: a repeated request answered without any downstream call (opt-in, per graph or step).

    graph request --key--> lookup --hit, versions current--> the stored answer (no step runs)
                              | miss
                              v
                     the graph runs --no soft failure--> store (bounded, with a TTL) --> answer

A cache is declared in the spec (`cache:` on a graph or a model step, see docs/graphs.md). Its
key is the model (or graph), the version asked for, the outputs asked for and every input
tensor's name, datatype, shape and bytes (a BLAKE2b digest). What is never stored: errors (a
failed call raises past the cache), an answer of a graph where a soft step failed, and a step
answer whose parameters report a failed step. A hit is answered from the entry alone.

A new model version never serves an old answer: each entry records the version of every model
that answered, and is served only while those are the versions the services answer with now.
`Versions` learns them from every answer that reaches a cache and, every `REFRESH_S` seconds in
the background, from each cached model's ModelMetadata (the highest version a service holds is
the one it answers when asked for no version); an entry of any other version is a miss.

Stores sit behind one small interface (`Store`): `LocalStore` (default; each orchestrator
replica its own, least recently used first out, bounded in entries and bytes) and `RedisStore`
(`cache_store: redis://host:port/db` in the spec, or ONNXMESH_CACHE_STORE: every replica shares
the entries; Redis bounds its memory itself, `maxmemory` with `allkeys-lru`).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from orchestrator.spec import CacheSpec, GraphSpec, MeshSpec, ModelStep, SignatureKey
from orchestrator.stages.base import Stage, keeps_deadline
from services.common.errors import MeshError
from services.common.types import InferRequest, InferResult, ModelSignature

log = logging.getLogger(__name__)

#: Seconds between two ModelMetadata polls of the cached models' versions.
REFRESH_S = 1.0
STORE_VARIABLE = "ONNXMESH_CACHE_STORE"
#: The response parameter set on an answer that came from a cache (`cache` for a graph, `cache.<step>`).
HIT = "hit"
#: on_lookup(cache name, "hit" | "miss"): the metrics hook.
LookupHook = Callable[[str, str], None]
#: (service, model, version asked for) -> the version that answered.
Answered = tuple[tuple[SignatureKey, str], ...]


@dataclass(frozen=True, slots=True)
class Entry:
    """One stored answer: its outputs (read-only), who answered, its parameters, its expiry."""

    outputs: Mapping[str, np.ndarray]
    answered: Answered
    parameters: Mapping[str, str | int | float | bool]
    expires: float

    @property
    def nbytes(self) -> int:
        return sum(int(a.nbytes) for a in self.outputs.values())


class Store(Protocol):
    """Where entries live. `get` returns None for a missing or expired key."""

    async def get(self, key: bytes) -> Entry | None: ...

    async def put(self, key: bytes, entry: Entry) -> None: ...

    async def close(self) -> None: ...


class LocalStore:
    """In-process, least recently used first out, bounded in entries and in output bytes."""

    def __init__(self, entries: int, max_bytes: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_entries = entries
        self.max_bytes = max_bytes
        self.clock = clock
        self.bytes = 0
        self._entries: OrderedDict[bytes, Entry] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    async def get(self, key: bytes) -> Entry | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry.expires <= self.clock():
            self._drop(key)
            return None
        self._entries.move_to_end(key)
        return entry

    async def put(self, key: bytes, entry: Entry) -> None:
        size = entry.nbytes
        if size > self.max_bytes:
            return  # it would evict everything else and still not fit
        if key in self._entries:
            self._drop(key)
        self._entries[key] = entry
        self.bytes += size
        while len(self._entries) > self.max_entries or self.bytes > self.max_bytes:
            self._drop(next(iter(self._entries)))

    def _drop(self, key: bytes) -> None:
        self.bytes -= self._entries.pop(key).nbytes

    async def close(self) -> None:
        self._entries.clear()
        self.bytes = 0


class RedisStore:
    """Entries in Redis, shared by every orchestrator replica; Redis expires them (`PX`).

    An entry is one value: a JSON header line (outputs' names, dtypes and shapes, who answered,
    parameters) and the outputs' bytes. Redis bounds its own memory (`maxmemory`, `allkeys-lru`);
    an entry above `max_bytes` is not stored. Needs the `redis` extra (`pip install 'onnxmesh[redis]'`).
    """

    PREFIX = b"onnxmesh:cache:"

    def __init__(self, url: str, max_bytes: int, clock: Callable[[], float] = time.monotonic) -> None:
        import redis.asyncio  # the optional extra: imported only when a spec asks for Redis

        self.client = redis.asyncio.Redis.from_url(url)
        self.max_bytes = max_bytes
        self.clock = clock

    async def get(self, key: bytes) -> Entry | None:
        try:
            value = await self.client.get(self.PREFIX + key)
            ttl_ms = await self.client.pttl(self.PREFIX + key) if value is not None else -2
        except Exception as exc:  # the store being down is a miss, never a failed request
            log.warning("cache store unreachable: %s", exc)
            return None
        if value is None or ttl_ms < 0:
            return None
        data = value if isinstance(value, bytes) else str(value).encode("latin-1")
        return decode_entry(data, self.clock() + ttl_ms / 1000.0)

    async def put(self, key: bytes, entry: Entry) -> None:
        if entry.nbytes > self.max_bytes:
            return
        ttl_ms = int((entry.expires - self.clock()) * 1000)
        if ttl_ms <= 0:
            return
        try:
            await self.client.set(self.PREFIX + key, encode_entry(entry), px=ttl_ms)
        except Exception as exc:
            log.warning("cache store unreachable: %s", exc)

    async def close(self) -> None:
        await self.client.aclose()


def encode_entry(entry: Entry) -> bytes:
    """A header line (JSON) and the outputs' bytes, in header order."""
    header = {
        "outputs": [[name, a.dtype.str, list(a.shape)] for name, a in entry.outputs.items()],
        "answered": [[*key, version] for key, version in entry.answered],
        "parameters": dict(entry.parameters),
    }
    body = b"".join(np.ascontiguousarray(a).tobytes() for a in entry.outputs.values())
    return json.dumps(header).encode() + b"\n" + body


def decode_entry(value: bytes, expires: float) -> Entry:
    head, _, body = value.partition(b"\n")
    header = json.loads(head)
    outputs: dict[str, np.ndarray] = {}
    offset = 0
    for name, dtype_str, shape in header["outputs"]:
        dtype = np.dtype(dtype_str)
        count = int(np.prod(shape)) if shape else 1
        outputs[name] = np.frombuffer(body, dtype, count, offset).reshape(shape)
        offset += count * dtype.itemsize
    answered = tuple(((s, m, v), version) for s, m, v, version in header["answered"])
    return Entry(outputs, answered, header["parameters"], expires)


def request_key(model: str, version: str, outputs: Iterable[str], inputs: Mapping[str, np.ndarray]) -> bytes:
    """The cache key: model, version, outputs asked for, and every input's name, dtype, shape, bytes."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(json.dumps([model, version, list(outputs)]).encode())
    for name in sorted(inputs):
        array = inputs[name]
        digest.update(f"\0{name}\0{array.dtype.str}\0{array.shape}\0".encode())
        if array.dtype == np.object_:
            for item in array.reshape(-1):
                data = item.encode() if isinstance(item, str) else bytes(item)
                digest.update(len(data).to_bytes(4, "little") + data)
        else:
            digest.update(np.ascontiguousarray(array).data)
    return digest.digest()


def _frozen(outputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Copies nobody can write to: every hit hands out the same arrays."""
    out = {}
    for name, array in outputs.items():
        copy = np.array(array, copy=True)
        copy.setflags(write=False)
        out[name] = copy
    return out


def _version_order(version: str) -> tuple[int, int | str]:
    return (0, int(version)) if version.isdigit() else (1, version)


def default_version(signature: ModelSignature) -> str:
    """The version a service answers when asked for none: the highest it holds."""
    return max(signature.versions, key=_version_order) if signature.versions else ""


class Versions:
    """The version each cached model answers with now, per (service, model, version asked for)."""

    def __init__(self, stages: Mapping[str, Stage], keys: Iterable[SignatureKey], clock: Callable[[], float]):
        self.stages = stages
        self.keys = tuple(dict.fromkeys(keys))
        self.clock = clock
        self.current: dict[SignatureKey, str] = {}
        self._checked = -float("inf")
        self._refresh: asyncio.Task[None] | None = None

    def observe(self, key: SignatureKey, version: str) -> None:
        """An answer came from `version`: from now on, that is the version to serve."""
        if version:
            self.current[key] = version

    def valid(self, answered: Answered) -> bool:
        return all(self.current.get(key) == version for key, version in answered)

    def maybe_refresh(self) -> None:
        """Poll the cached models' metadata in the background, at most every REFRESH_S seconds."""
        now = self.clock()
        if now - self._checked < REFRESH_S or (self._refresh is not None and not self._refresh.done()):
            return
        self._checked = now
        self._refresh = asyncio.get_running_loop().create_task(self.refresh())

    async def refresh(self) -> None:
        for key in self.keys:
            service, model, version = key
            if version:
                self.current[key] = version  # pinned in the spec: the key itself says it
                continue
            try:
                self.observe(key, default_version(await self.stages[service].metadata(model, version)))
            except MeshError as err:
                log.debug("cannot refresh the version of %s/%s: %s", service, model, err.message)

    async def close(self) -> None:
        if self._refresh is not None and not self._refresh.done():
            self._refresh.cancel()
            await asyncio.gather(self._refresh, return_exceptions=True)


class ResponseCache:
    """One cached graph or step: its store, its TTL, and the version check of its entries."""

    def __init__(
        self, name: str, spec: CacheSpec, store: Store, versions: Versions, on_lookup: LookupHook | None
    ) -> None:
        self.name = name
        self.ttl = spec.ttl
        self.store = store
        self.versions = versions
        self.on_lookup = on_lookup
        self.hits = 0
        self.misses = 0

    async def lookup(self, key: bytes) -> Entry | None:
        self.versions.maybe_refresh()
        entry = await self.store.get(key)
        if entry is not None and not self.versions.valid(entry.answered):
            entry = None  # answered by a version that no longer answers
        if entry is None:
            self.misses += 1
        else:
            self.hits += 1
        if self.on_lookup is not None:
            self.on_lookup(self.name, "miss" if entry is None else HIT)
        return entry

    async def keep(
        self,
        key: bytes,
        outputs: Mapping[str, np.ndarray],
        answered: Answered,
        parameters: Mapping[str, str | int | float | bool],
    ) -> None:
        for model, version in answered:
            self.versions.observe(model, version)
        entry = Entry(_frozen(outputs), answered, dict(parameters), self.versions.clock() + self.ttl)
        await self.store.put(key, entry)


def failed_steps(parameters: Mapping[str, object]) -> bool:
    """Whether an answer's parameters report a step that failed or ran out of time."""
    return any(
        k.startswith("step.") and isinstance(v, str) and v.startswith(("error", "timeout"))
        for k, v in parameters.items()
    )


class CachedStage:
    """A model step's Stage with a response cache in front: a hit makes no downstream call."""

    def __init__(self, inner: Stage, cache: ResponseCache, key: SignatureKey) -> None:
        self.inner = inner
        self.cache = cache
        self.key = key
        self.keeps_deadline = keeps_deadline(inner)

    async def call(self, request: InferRequest) -> InferResult:
        key = request_key(request.model, request.version, request.outputs, request.inputs)
        entry = await self.cache.lookup(key)
        if entry is not None:
            return InferResult(
                dict(entry.outputs), request.model, entry.answered[0][1], dict(entry.parameters)
            )
        result = await self.inner.call(request)  # an error is raised past the cache, never kept
        if not failed_steps(result.parameters):
            await self.cache.keep(key, result.outputs, ((self.key, result.model_version),), result.parameters)
        return result

    async def metadata(self, model: str, version: str) -> ModelSignature:
        return await self.inner.metadata(model, version)

    async def is_ready(self, model: str, version: str) -> bool:
        return await self.inner.is_ready(model, version)


class ResponseCaches:
    """Every cache of one spec generation: the engine asks it for a graph's and a step's cache."""

    def __init__(
        self,
        spec: MeshSpec,
        stages: Mapping[str, Stage],
        *,
        store: str | None = None,
        on_lookup: LookupHook | None = None,
        clock: Callable[[], float] = time.monotonic,
        environ: Mapping[str, str] = os.environ,
    ) -> None:
        self.store_url = store or environ.get(STORE_VARIABLE) or spec.cache_store
        self.on_lookup = on_lookup
        self.clock = clock
        self.stages = stages
        keys = [
            (s.service, s.model, s.version)
            for g in spec.graphs.values()
            for s in g.model_steps()
            if g.cache is not None or s.cache is not None
        ]
        self.versions = Versions(stages, keys, clock)
        self._stores: list[Store] = []

    def _cache(self, name: str, spec: CacheSpec) -> ResponseCache:
        store: Store
        if self.store_url == "local":
            store = LocalStore(spec.entries, spec.bytes, self.clock)
        else:
            store = RedisStore(self.store_url, spec.bytes, self.clock)
        self._stores.append(store)
        return ResponseCache(name, spec, store, self.versions, self.on_lookup)

    def graph(self, graph: GraphSpec) -> GraphCache | None:
        if graph.cache is None:
            return None
        steps = {s.name: (s.service, s.model, s.version) for s in graph.model_steps()}
        return GraphCache(graph.name, self._cache(graph.name, graph.cache), steps)

    def stage(self, graph: str, step: ModelStep, stage: Stage) -> Stage:
        if step.cache is None:
            return stage
        cache = self._cache(f"{graph}/{step.name}", step.cache)
        return CachedStage(stage, cache, (step.service, step.model, step.version))

    async def close(self) -> None:
        await self.versions.close()
        for store in self._stores:
            await store.close()


class GraphCache:
    """The cache of whole requests of one graph (the engine's hook in `Engine.run`)."""

    def __init__(self, graph: str, cache: ResponseCache, steps: Mapping[str, SignatureKey]) -> None:
        self.graph = graph
        self.cache = cache
        self.steps = steps

    def key(self, inputs: Mapping[str, np.ndarray]) -> bytes:
        return request_key(self.graph, "", (), inputs)

    async def lookup(self, key: bytes) -> InferResult | None:
        entry = await self.cache.lookup(key)
        if entry is None:
            return None
        return InferResult(dict(entry.outputs), self.graph, parameters={**entry.parameters, "cache": HIT})

    async def keep(self, key: bytes, result: InferResult, versions: Mapping[str, str]) -> None:
        """Store an answer where no soft step failed; `versions`: model step -> version that answered."""
        answered = tuple((self.steps[step], version) for step, version in versions.items() if version)
        await self.cache.keep(key, result.outputs, answered, result.parameters)
