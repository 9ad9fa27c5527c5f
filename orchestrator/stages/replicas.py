"""Every replica of one service as one Stage: picking, outlier ejection, fail-over and hedging.

A hung replica (a frozen process, a stuck pod) keeps its TCP connection and its last health
answer, so health checks and round robin keep sending to it; only call outcomes reveal it. So the
orchestrator resolves a service's target itself, keeps one long-lived health-checked client per
replica, and decides per call:

    call --> pick: two random replicas that are not ejected and not unreachable, the one with
      |      fewer calls in flight (a stalled replica holds its calls, so it loses every draw)
      v
    attempt on A ----------- answered within the hedge delay? --> done (A's latency recorded)
      |   UNAVAILABLE or RESOURCE_EXHAUSTED (A down, draining or shedding): fail over to B,
      |   paid from the budget
      |   no answer within the hedge delay (a high percentile of recent latencies):
      v   a hedge goes to B, paid from the budget
    the first good answer wins; the other call is cancelled. B answering first gives A a stall
    mark (a service slow on every replica marks none)

    outcomes --> a replica with `consecutive` stalls, timeouts or UNAVAILABLE in a row is ejected
                 for `base_ejection` x 2^(ejections - 1) (at most `max_ejection`), then let back in
                 on probation: its next failure ejects it again at once, a success clears it.
                 At most half of the replicas are ever ejected, and a lone replica never.

    draining --> a replica reporting NOT_SERVING (after SIGTERM) leaves the pick at once, and a
                 DNS name is resolved again at once (a rolling update's new pod is found now,
                 not at the next refresh). While no other replica serves, calls still go to the
                 draining one through a second client that ignores its health, until its port
                 closes: a lone replica's drain delay fails no call.

Inference is idempotent (a model call has no side effect), so running a request twice on two
replicas, or again on another, changes nothing but the load; the shared `RetryBudget` bounds that
load. Targets are what gRPC takes: `host:port` (one replica, resolved by gRPC), `ipv4:a:p,b:q` or
`ipv6:[a]:p,...` (a static list) and `dns:///name:port` (every address the name resolves to,
resolved again every `resolve_interval` seconds: a Kubernetes headless Service).
"""

from __future__ import annotations

import asyncio
import logging
import random
import socket
import time
from collections import deque
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from orchestrator.stages.retry_budget import RetryBudget
from services.common.errors import DeadlineExceeded, MeshError, ResourceExhausted, Unavailable
from services.common.types import InferRequest, InferResult, ModelSignature

log = logging.getLogger(__name__)


class Replica(Protocol):
    """One replica's client: a Stage that can also say whether its connection works."""

    async def call(self, request: InferRequest) -> InferResult: ...

    async def metadata(self, model: str, version: str) -> ModelSignature: ...

    async def is_ready(self, model: str, version: str) -> bool: ...

    @property
    def reachable(self) -> bool:
        """False while the connection is known to be down (refused, or health NOT_SERVING)."""
        ...

    async def close(self) -> None: ...


#: Builds the client of one replica from its single-address target.
Connect = Callable[[str], Replica]
#: The DNS name ("host:port") -> single-address targets.
Resolver = Callable[[str], Coroutine[Any, Any, list[str]]]
#: on_event(service, replica address, event): event is "hedged", "failover", "ejected" or "restored".
EventHook = Callable[[str, str, str], None]


@dataclass(frozen=True)
class OutlierPolicy:
    """When a replica is taken out of the pick, and when extra calls are made (see the module)."""

    #: Stalls, timeouts or UNAVAILABLE in a row that eject a replica.
    consecutive: int = 2
    base_ejection: float = 1.0
    max_ejection: float = 30.0
    #: At most this share of the replicas is ejected at once.
    max_ejected_share: float = 0.5
    #: The hedge delay is this quantile of recent successful latencies, within the bounds below.
    hedge_quantile: float = 0.95
    min_hedge_delay: float = 0.005
    max_hedge_delay: float = 1.0
    #: Latencies kept for the quantile, and how often (in samples) it is recomputed.
    window: int = 256
    recompute_every: int = 32


def parse_target(target: str) -> tuple[list[str], str | None]:
    """(static single-address targets, DNS name:port to resolve or None) of a gRPC target."""
    for scheme in ("ipv4:", "ipv6:"):
        if target.startswith(scheme):
            return [f"{scheme}{address}" for address in target[len(scheme) :].split(",") if address], None
    if target.startswith("dns:"):
        name = target[len("dns:") :]
        if name.startswith("//"):  # dns://[authority]/name:port
            name = name[2:].split("/", 1)[-1]
        return [], name
    return [target], None


async def resolve(name: str) -> list[str]:
    """The single-address targets `name` ("host:port") resolves to, in a stable order."""
    host, _, port = name.rpartition(":")
    if not host or not port.isdigit():
        raise Unavailable(f"cannot resolve {name!r}: expected host:port")
    host = host.strip("[]")
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
    except OSError as exc:
        raise Unavailable(f"cannot resolve {host!r}: {exc}") from exc
    out = []
    for family, _, _, _, sockaddr in infos:
        ip = str(sockaddr[0])
        out.append(f"ipv6:[{ip}]:{port}" if family == socket.AF_INET6 else f"ipv4:{ip}:{port}")
    return sorted(dict.fromkeys(out))


class _State:
    """What the picker knows of one replica."""

    def __init__(self, address: str, client: Replica) -> None:
        self.address = address
        self.client = client
        self.in_flight = 0
        self.failures = 0  # in a row
        self.ejections = 0  # in a row, for the back-off
        self.ejected_until = 0.0
        self.probation = False
        self.serving = True  # as last seen: a change to NOT_SERVING re-resolves the name
        #: A client that ignores health, for calls while it drains and no other replica serves.
        self.draining_client: Replica | None = None

    async def close(self) -> None:
        clients = [self.client] if self.draining_client is None else [self.client, self.draining_client]
        await asyncio.gather(*(c.close() for c in clients), return_exceptions=True)


class ReplicaSet:
    """A Stage over every replica of `target` (see the module docstring).

    `connect` builds one replica's client (the orchestrator: a health-checked `OipClient`);
    `connect_draining` one that ignores health, for a draining replica when no other serves
    (None: a draining replica gets no calls); `resolver` resolves a DNS target (a seam for tests);
    `budget` pays for fail-overs and hedges (share the engine's); `clock` and `rng` are seams
    for tests; `on_event` is a metric hook, called on the event loop.
    """

    def __init__(
        self,
        target: str,
        connect: Connect,
        *,
        service: str = "",
        budget: RetryBudget | None = None,
        policy: OutlierPolicy | None = None,
        resolve_interval: float = 10.0,
        connect_draining: Connect | None = None,
        resolver: Resolver = resolve,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
        on_event: EventHook | None = None,
        keeps_deadline: bool = False,
    ) -> None:
        """`keeps_deadline`: the replicas' clients answer by `request.deadline` themselves (gRPC
        clients do), and so does the set (see `orchestrator.stages.base`)."""
        self.target = target
        self.keeps_deadline = keeps_deadline
        self.service = service or target
        self._connect = connect
        self._connect_draining = connect_draining
        self._resolver = resolver
        self._budget = budget if budget is not None else RetryBudget(clock=clock)
        self.policy = policy or OutlierPolicy()
        self._resolve_interval = resolve_interval
        self._clock = clock
        self._rng = rng or random.Random()
        self._on_event = on_event
        static, self._dns_name = parse_target(target)
        self._replicas: list[_State] = []
        self._resolved_at = -float("inf")
        self._resolving: asyncio.Task[None] | None = None
        self._closing: set[asyncio.Task[None]] = set()
        if static:
            self._set_addresses(static)
        self._latencies: deque[float] = deque(maxlen=self.policy.window)
        self._since_recompute = 0
        self._hedge_delay = self.policy.max_hedge_delay  # until there are samples
        #: Counters for tests and metrics.
        self.hedges = 0
        self.failovers = 0
        self.ejections = 0

    # -- what tests and metrics read --------------------------------------------------------------

    @property
    def addresses(self) -> list[str]:
        return [r.address for r in self._replicas]

    def ejected(self) -> list[str]:
        now = self._clock()
        return [r.address for r in self._replicas if r.ejected_until > now]

    # -- the Stage protocol -----------------------------------------------------------------------

    async def call(self, request: InferRequest) -> InferResult:
        # A static address list needs no resolving: skip the coroutine on the hot path.
        replicas = self._replicas if self._dns_name is None and self._replicas else await self._current()
        first = self._pick(replicas, ())
        if len(replicas) < 2:
            return await self._attempt(first, request)
        attempts = {_start(self._attempt(first, request)): first}
        try:
            return await self._race(attempts, request, replicas)
        finally:
            for task in attempts:
                task.cancel()  # the losers: a hedge that lost, or everything if we are cancelled

    async def metadata(self, model: str, version: str) -> ModelSignature:
        error: MeshError = Unavailable(f"{self.target}: no replica")
        for replica in self._by_preference(await self._current()):
            try:
                return await replica.client.metadata(model, version)
            except Unavailable as err:
                error = err
        raise error

    async def is_ready(self, model: str, version: str) -> bool:
        try:
            replicas = await self._current()
        except MeshError:
            return False
        states = await asyncio.gather(*(r.client.is_ready(model, version) for r in replicas))
        return any(states)

    async def close(self) -> None:
        if self._resolving is not None:
            self._resolving.cancel()
        for task in self._closing:
            task.cancel()  # closes at once
        await asyncio.gather(*self._closing, return_exceptions=True)
        await asyncio.gather(*(r.close() for r in self._replicas))

    # -- one call -------------------------------------------------------------------------------

    async def _race(
        self, attempts: dict[asyncio.Task[InferResult], _State], request: InferRequest, replicas: list[_State]
    ) -> InferResult:
        """Wait for the first good answer; hedge once on a stall, fail over once on UNAVAILABLE."""
        extra_made = False
        stalled: _State | None = None
        errors: list[MeshError] = []
        pending = set(attempts)
        wait: float | None = self._hedge_window(request)
        while pending:
            done, pending = await asyncio.wait(pending, timeout=wait, return_when=asyncio.FIRST_COMPLETED)
            if not done:  # the first attempt stalled
                wait = None
                extra_made = True
                if self._extra(attempts, request, replicas, "hedged"):
                    (stalled,) = (r for t, r in attempts.items() if t in pending)
                    pending = {t for t in attempts if not t.done()}
                continue
            for task in done:
                error = task.exception()
                if error is None:
                    if stalled is not None and attempts[task] is not stalled:
                        # Another replica answered first: the stall was the replica's, not the
                        # service's (a service slow everywhere ejects nobody).
                        self._failed(stalled, "a stall another replica answered first")
                    return task.result()
                if not isinstance(error, MeshError):
                    raise error
                errors.append(error)
                if isinstance(error, (Unavailable, ResourceExhausted)) and not extra_made:
                    extra_made = True
                    if self._extra(attempts, request, replicas, "failover"):
                        wait = None
                        pending |= {t for t in attempts if not t.done()}
        raise errors[0]

    def _hedge_window(self, request: InferRequest) -> float | None:
        """How long the first attempt may take before a hedge; None = no hedge (no time for one)."""
        delay = self._hedge_delay
        if request.deadline is not None and request.deadline - self._clock() < 2 * delay:
            return None
        return delay

    def _extra(
        self,
        attempts: dict[asyncio.Task[InferResult], _State],
        request: InferRequest,
        replicas: list[_State],
        kind: str,
    ) -> bool:
        """Start one more attempt on another replica if there is one and the budget pays for it."""
        used = tuple(attempts.values())
        if all(r in used for r in replicas) or not self._budget.try_spend():
            return False
        replica = self._pick(replicas, used)
        attempts[_start(self._attempt(replica, request))] = replica
        if kind == "hedged":
            self.hedges += 1
        else:
            self.failovers += 1
        self._event(replica, kind)
        return True

    async def _attempt(self, replica: _State, request: InferRequest) -> InferResult:
        started = self._clock()
        replica.in_flight += 1
        try:
            result = await self._call(replica, request)
        except (Unavailable, DeadlineExceeded) as err:
            self._failed(replica, err.code)
            raise
        finally:
            replica.in_flight -= 1
        self._succeeded(replica, self._clock() - started)
        return result

    # -- outcomes -------------------------------------------------------------------------------

    def _succeeded(self, replica: _State, seconds: float) -> None:
        if replica.failures or replica.probation:
            if replica.probation:
                self._event(replica, "restored")
            replica.failures = 0
            replica.ejections = 0
            replica.probation = False
        self._latencies.append(seconds)
        self._since_recompute += 1
        if self._since_recompute >= self.policy.recompute_every:
            self._since_recompute = 0
            ordered = sorted(self._latencies)
            quantile = ordered[min(len(ordered) - 1, int(self.policy.hedge_quantile * len(ordered)))]
            self._hedge_delay = min(self.policy.max_hedge_delay, max(self.policy.min_hedge_delay, quantile))

    def _failed(self, replica: _State, why: str) -> None:
        now = self._clock()
        if replica.ejected_until > now:
            return
        replica.failures += 1
        if replica.failures < self.policy.consecutive and not replica.probation:
            return
        ejected = sum(1 for r in self._replicas if r.ejected_until > now)
        if ejected + 1 > int(len(self._replicas) * self.policy.max_ejected_share):
            return  # never eject more than allowed (a lone replica never)
        replica.ejections += 1
        period = min(self.policy.max_ejection, self.policy.base_ejection * 2 ** (replica.ejections - 1))
        replica.ejected_until = now + period
        replica.probation = True
        replica.failures = 0
        self.ejections += 1
        log.warning(
            "replica %s of %s ejected for %.1fs after %s (%d in a row)",
            replica.address,
            self.service,
            period,
            why,
            self.policy.consecutive,
        )
        self._event(replica, "ejected")

    def _event(self, replica: _State, event: str) -> None:
        if self._on_event is None:
            return
        try:
            self._on_event(self.service, replica.address, event)
        except Exception:
            log.exception("replica event hook failed")

    # -- picking --------------------------------------------------------------------------------

    def _pick(self, replicas: list[_State], exclude: Sequence[_State]) -> _State:
        """Power of two choices by calls in flight, among the best class of replicas available."""
        if len(replicas) == 1:  # one replica (one pod, or a Service's virtual IP): nothing to choose
            return replicas[0]
        now = self._clock()
        others = [r for r in replicas if r not in exclude] or replicas
        reachable = [r for r in others if r.client.reachable]
        # An ejected replica that is reachable beats one that is known to be down.
        pool = [r for r in reachable if r.ejected_until <= now] or reachable or others
        if len(pool) == 1:
            return pool[0]
        a, b = self._rng.sample(pool, 2)
        return a if a.in_flight <= b.in_flight else b

    async def _call(self, replica: _State, request: InferRequest) -> InferResult:
        client = self._client_for(replica)
        try:
            return await client.call(request)
        except Unavailable:
            if client is not replica.client or client.reachable or self._connect_draining is None:
                raise
            # It turned NOT_SERVING under this call (a health-checked channel fails it at once):
            # once more, on a replica that serves now (a re-resolved name may have one), else
            # through its draining client.
            others = [r for r in self._replicas if r is not replica and r.client.reachable]
            again = self._pick(others, ()).client if others else self._client_for(replica)
            return await again.call(request)

    def _client_for(self, replica: _State) -> Replica:
        """The replica's client; its draining client while it reports NOT_SERVING and no other
        replica serves. A change to NOT_SERVING resolves a DNS name again at once."""
        client = replica.client
        serving = client.reachable
        if serving != replica.serving:
            replica.serving = serving
            if not serving and self._dns_name is not None:
                self._resolve_soon()
        if serving or self._connect_draining is None:
            return client
        if any(r.client.reachable for r in self._replicas if r is not replica):
            return client  # another replica serves: this call was a fail-over or a hedge
        if replica.draining_client is None:
            replica.draining_client = self._connect_draining(replica.address)
        return replica.draining_client

    def _resolve_soon(self) -> None:
        if self._resolving is None or self._resolving.done():
            self._resolving = asyncio.ensure_future(self._resolve())

    def _by_preference(self, replicas: list[_State]) -> list[_State]:
        now = self._clock()
        return sorted(replicas, key=lambda r: (not r.client.reachable, r.ejected_until > now))

    async def _current(self) -> list[_State]:
        """The replicas to pick from; resolves the DNS name first if it never was."""
        if self._dns_name is not None and self._clock() - self._resolved_at > self._resolve_interval:
            if not self._replicas:
                await self._resolve()
            else:
                self._resolve_soon()
        if not self._replicas:
            raise Unavailable(f"{self.target}: no replica resolved")
        return self._replicas

    async def _resolve(self) -> None:
        assert self._dns_name is not None
        self._resolved_at = self._clock()
        try:
            addresses = await self._resolver(self._dns_name)
        except Unavailable as err:
            if not self._replicas:
                raise
            log.warning("%s; keeping %d known replicas", err.message, len(self._replicas))
            return
        if addresses:
            self._set_addresses(addresses)

    def _set_addresses(self, addresses: Sequence[str]) -> None:
        known = {r.address: r for r in self._replicas}
        kept = [known.pop(a) if a in known else _State(a, self._connect(a)) for a in addresses]
        self._replicas = kept
        for gone in known.values():
            task = asyncio.ensure_future(_close_later(gone))
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)
        if len(kept) > 1 or known:
            log.info("%s: replicas %s", self.service, ", ".join(addresses))


def _start(attempt: Coroutine[Any, Any, InferResult]) -> asyncio.Task[InferResult]:
    task = asyncio.ensure_future(attempt)
    # A loser may fail after the race is decided: its outcome is recorded, never "not retrieved".
    task.add_done_callback(lambda t: t.cancelled() or t.exception())
    return task


async def _close_later(replica: _State, grace: float = 30.0) -> None:
    """Close a replica that left the name's answers once its calls are over (each is bounded by
    its step's timeout)."""
    try:
        await asyncio.sleep(grace)
    finally:
        await replica.close()
