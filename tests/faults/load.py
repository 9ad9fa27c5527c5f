"""Closed-loop load for the fault suite: real calls, every outcome recorded, figures per phase.

`Load` runs `concurrency` workers on an event loop of its own (a thread), each sending one
held-out image at a time to a graph through `OipClient` and recording when it started, when it
ended, its status code, and (for failures) the message or (for answers) one response parameter.
Phases are marked by name while it runs (`mark("during")`); `figures()` gives, per phase, the
requests sent, the failures by code and the p50/p99 latency, and `report()` prints them. Waits
are on outcomes (`wait_for(n)`: n more calls completed, or the test fails), never on the clock
alone; a worker dying of an unexpected exception fails the wait at once with that exception.
"""

from __future__ import annotations

import asyncio
import os
import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from services.common.errors import MeshError
from services.common.grpc.client import OipClient


@dataclass(frozen=True, slots=True)
class Outcome:
    start: float
    end: float
    code: str  # "OK" or the status name
    #: The error message, or the watched response parameter of an answer.
    detail: str
    #: The answer was not the label the calm mesh gives for the same image.
    wrong: bool = False
    #: Which of the load's channels carried the call.
    channel: int = 0


@dataclass
class Phase:
    name: str
    sent: int
    failed: dict[str, int]
    p50_ms: float
    p99_ms: float
    wrong: int = 0
    extra: dict[str, float] = field(default_factory=dict)

    def line(self) -> str:
        failed = ", ".join(f"{code} {n}" for code, n in sorted(self.failed.items())) or "none"
        return (
            f"{self.name:<8} sent {self.sent:>5}  failed: {failed:<32} p50 {self.p50_ms:7.1f} ms  "
            f"p99 {self.p99_ms:7.1f} ms  wrong {self.wrong}"
        )


#: Every figure line the scenarios printed, repeated in pytest's terminal summary (conftest.py),
#: so that `make test` shows them even though it captures the tests' output.
FIGURES: list[str] = []


def say(line: str) -> None:
    print(line)
    FIGURES.append(line)


def percentile(values: Sequence[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


class Load:
    """`concurrency` closed-loop clients of `graph` at `target` (see the module docstring).

    `expected` maps an image index to the label the calm mesh answers (None: not checked);
    `watch` names a response parameter to keep for answers; `refused_pause` is how long a client
    waits after a RESOURCE_EXHAUSTED at most (at random), doubled for each refusal in a row up
    to 1 s: a client backing off as gRPC retry policies do.
    """

    def __init__(
        self,
        target: str,
        graph: str,
        images: np.ndarray,
        *,
        concurrency: int,
        timeout: float = 5.0,
        expected: Sequence[int] | None = None,
        watch: str = "",
        refused_pause: float = 0.0,
        channels: int = 4,
    ) -> None:
        self.target = target
        self.graph = graph
        self.images = images
        self.concurrency = concurrency
        self.timeout = timeout
        self.expected = expected
        self.watch = watch
        self.refused_pause = refused_pause
        self.channels = max(1, min(channels, concurrency))
        self.outcomes: list[Outcome] = []
        self.marks: list[tuple[str, float]] = []
        self._done = threading.Condition()
        self._error: BaseException | None = None
        self._stop = threading.Event()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name=f"load-{graph}", daemon=True)

    # -- driving ---------------------------------------------------------------------------------

    def __enter__(self) -> Load:
        self.mark("before")
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def mark(self, phase: str) -> None:
        """Calls started from now on belong to `phase`."""
        self.marks.append((phase, time.monotonic()))

    def wait_for(self, count: int, timeout: float = 30.0) -> int:
        """Block until `count` more calls completed, and return how many did; fail after `timeout`."""
        with self._done:
            start = len(self.outcomes)
        self.wait_until(lambda outcomes: len(outcomes) - start >= count, f"{count} more calls", timeout)
        return len(self.outcomes) - start

    def wait_until(
        self, condition: Callable[[Sequence[Outcome]], bool], what: str, timeout: float = 30.0
    ) -> None:
        """Block until `condition(outcomes)` holds; fail naming `what` after `timeout`, or at once
        with the exception that stopped the clients."""
        with self._done:
            met = self._done.wait_for(lambda: self._error is not None or condition(self.outcomes), timeout)
            if self._error is not None:
                raise AssertionError(f"the load on {self.graph} stopped: {self._error!r}") from self._error
            if not met:
                raise AssertionError(
                    f"timed out after {timeout:g} s waiting for {what} on {self.graph} "
                    f"({len(self.outcomes)} calls completed in all)"
                )

    def stop(self) -> list[Outcome]:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(self.timeout + 10.0)
        return self.outcomes

    # -- figures ---------------------------------------------------------------------------------

    def phase_of(self, outcome: Outcome) -> str:
        name = self.marks[0][0]
        for phase, at in self.marks:
            if outcome.start >= at:
                name = phase
        return name

    def in_phase(self, phase: str) -> list[Outcome]:
        return [o for o in self.outcomes if self.phase_of(o) == phase]

    def figures(self) -> list[Phase]:
        out = []
        for phase in dict.fromkeys(name for name, _ in self.marks):
            outcomes = self.in_phase(phase)
            ok = [1000 * (o.end - o.start) for o in outcomes if o.code == "OK"]
            failed = Counter(o.code for o in outcomes if o.code != "OK")
            wrong = sum(o.wrong for o in outcomes)
            out.append(
                Phase(phase, len(outcomes), dict(failed), percentile(ok, 50), percentile(ok, 99), wrong)
            )
        return out

    def report(self, title: str) -> list[Phase]:
        phases = self.figures()
        say(f"[faults] {title}: {self.graph}, c={self.concurrency}, client deadline {self.timeout:g}s")
        for phase in phases:
            say(f"[faults]   {phase.line()}")
        return phases

    # -- the clients -----------------------------------------------------------------------------

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self._main())
        except BaseException as exc:
            with self._done:  # wakes a waiter, which fails with it
                self._error = exc
                self._done.notify_all()
            raise
        finally:
            self._loop.close()

    async def _main(self) -> None:
        clients = [OipClient(self.target) for _ in range(self.channels)]
        try:
            # Each worker stops by itself once `stop()` is called.
            await asyncio.gather(*(self._worker(clients, i) for i in range(self.concurrency)))
        finally:
            await asyncio.gather(*(c.close() for c in clients))

    async def _worker(self, clients: Sequence[OipClient], seed: int) -> None:
        channel = seed % len(clients)
        client = clients[channel]
        rng = random.Random(seed)
        index = seed
        refusals = 0  # in a row
        while not self._stop.is_set():
            index = (index + 1) % len(self.images)
            start = time.monotonic()
            try:
                result = await client.infer(
                    self.graph, {"image": self.images[index : index + 1]}, timeout=self.timeout
                )
            except MeshError as err:
                self._record(Outcome(start, time.monotonic(), err.code, err.message, channel=channel))
                if err.code == "RESOURCE_EXHAUSTED" and self.refused_pause:
                    # Back off as a gRPC retry policy does: exponential, jittered, capped.
                    await asyncio.sleep(rng.uniform(0.0, min(1.0, self.refused_pause * 2**refusals)))
                    refusals += 1
                elif err.code == "UNAVAILABLE":
                    await asyncio.sleep(0.01)  # a node down: don't spin a core
                continue
            end = time.monotonic()
            refusals = 0
            label = int(result.outputs["label"][0])
            wrong = self.expected is not None and label != self.expected[index]
            detail = str(result.parameters.get(self.watch, "")) if self.watch else ""
            self._record(Outcome(start, end, "OK", detail, wrong, channel))

    def _record(self, outcome: Outcome) -> None:
        with self._done:
            self.outcomes.append(outcome)
            self._done.notify_all()


def reference_labels(target: str, graph: str, images: np.ndarray) -> list[int]:
    """The label the calm mesh answers for each image (one batched call)."""

    async def call() -> list[int]:
        async with OipClient(target) as client:
            result = await client.infer(graph, {"image": images}, timeout=10.0)
        return [int(x) for x in result.outputs["label"]]

    return asyncio.run(call())


def process_figures(pid: int) -> dict[str, float]:
    """RSS (MiB), threads and open fds of a process, from /proc."""
    lines = Path(f"/proc/{pid}/status").read_text(encoding="utf-8").splitlines()
    status = dict(line.split(":", 1) for line in lines if ":" in line)
    return {
        "rss_mib": int(status["VmRSS"].split()[0]) / 1024,
        "threads": int(status["Threads"]),
        "fds": len(os.listdir(f"/proc/{pid}/fd")),
    }


def main() -> None:
    """`python -m tests.faults.load TARGET GRAPH CONCURRENCY COUNT [REFUSED_PAUSE]`: run a load
    in a process of its own until COUNT calls completed; print one JSON line of latencies in ms
    by code and the span of the calls (the overload scenario spreads its clients this way, so
    that no client's own event loop is the bottleneck)."""
    import json
    import sys

    from demo import digits

    target, graph, concurrency, count = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    pause = float(sys.argv[5]) if len(sys.argv) > 5 else 0.0
    images = digits.load_holdout().images[:64]
    with Load(target, graph, images, concurrency=concurrency, refused_pause=pause, channels=8) as load:
        load.wait_for(count, timeout=120.0)
    by_code: dict[str, list[float]] = {}
    for o in load.outcomes:
        by_code.setdefault(o.code, []).append(round(1000 * (o.end - o.start), 2))
    # The monotonic clock is the machine's: the parent compares spans across processes.
    span = [min(o.start for o in load.outcomes), max(o.end for o in load.outcomes)]
    print(json.dumps({"latencies_ms": by_code, "span": span}))


if __name__ == "__main__":
    main()
