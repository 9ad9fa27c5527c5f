"""Load shedding: a bound on the inference calls a node runs at once, fixed or adaptive.

    call --> in flight < limit? -- no --> ResourceExhausted at once (nothing queued, nothing run)
               | yes
               v
             run; on success its latency is a sample for the adaptive limit

Every node has one (`--max-inflight`, in the data plane): the orchestrator and the model
services alike, so overload is refused where it lands instead of queueing without end. Queueing
is what the adaptive limit watches: most of it happens before a handler runs (inside gRPC, while
the event loop is busy), where no counter sees it, but it shows in the latency of the calls
that do run, which share that loop. The limit follows a gradient, as in Netflix's
concurrency-limits (Gradient2), against the lowest latency of the last two windows:

    gradient  = clamp(tolerance * baseline / recent latency, 0.5, 1)
    new limit = limit * gradient + sqrt(limit)          (smoothed; within [min_limit, max_limit])

Latency near the baseline lets the limit grow by about its square root per sample while it is
used; latency above `tolerance` x the baseline shrinks it, at most by half. `min_limit` keeps
the concurrency a node needs to be efficient at all (pipelining across the mesh's processes)
from ever being refused.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Protocol

from services.common.errors import ResourceExhausted, truncate


class Limit(Protocol):
    """How many calls may run at once (read per call: a plain attribute, not computed); told the
    latency of each call that succeeded."""

    @property
    def limit(self) -> int: ...

    def sample(self, seconds: float, in_flight: int) -> None: ...


class FixedLimit:
    """A configured maximum."""

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"a concurrency limit must be at least 1, got {limit}")
        self.limit = limit

    def sample(self, seconds: float, in_flight: int) -> None:
        pass


class AdaptiveLimit:
    """The gradient limit of the module docstring. `clock` (seconds) times the baseline windows."""

    def __init__(
        self,
        *,
        initial: int = 64,
        min_limit: int = 32,
        max_limit: int = 1024,
        tolerance: float = 4.0,
        smoothing: float = 0.2,
        window: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not 1 <= min_limit <= max_limit:
            raise ValueError(f"need 1 <= min_limit <= max_limit, got {min_limit}, {max_limit}")
        self._limit = float(min(max_limit, max(min_limit, initial)))
        #: The limit in force: `_limit` (smoothed, fractional) rounded down, kept as it changes.
        self.limit = int(self._limit)
        self.min_limit = min_limit
        self.max_limit = max_limit
        self._tolerance = tolerance
        self._smoothing = smoothing
        self._window = window
        self._clock = clock
        self._recent: float | None = None
        self._window_start = clock()
        self._current_min = math.inf
        self._previous_min = math.inf

    @property
    def baseline(self) -> float:
        """The lowest latency of this window and the previous one (the no-queue latency)."""
        return min(self._current_min, self._previous_min)

    def sample(self, seconds: float, in_flight: int) -> None:
        recent = self._recent
        # A short moving average (about ten samples): one slow call is no trend.
        self._recent = recent = seconds if recent is None else recent + 0.1 * (seconds - recent)
        now = self._clock()
        if now - self._window_start > self._window:
            self._previous_min, self._current_min = self._current_min, math.inf
            self._window_start = now
        if seconds < self._current_min:
            self._current_min = seconds
        baseline = min(self._current_min, self._previous_min)
        gradient = 1.0 if recent <= 0.0 else max(0.5, min(1.0, self._tolerance * baseline / recent))
        limit = self._limit
        if gradient == 1.0 and in_flight < limit / 2:
            return  # not queueing, but not using the limit either: no reason to raise it
        target = limit * gradient + math.sqrt(limit)
        limit += self._smoothing * (target - limit)
        self._limit = min(float(self.max_limit), max(float(self.min_limit), limit))
        self.limit = int(self._limit)


class ConcurrencyLimiter:
    """Admits a call while fewer than `limit.limit` run; `release` it when it is over."""

    def __init__(self, limit: Limit, *, node: str = "this node") -> None:
        #: What sets the limit (read directly on the hot paths: `limit` is one call more).
        self.policy = limit
        self.node = node
        self.in_flight = 0
        #: Calls refused since the start (for tests and metrics).
        self.refused = 0

    @property
    def limit(self) -> int:
        return self.policy.limit

    def try_acquire(self) -> bool:
        if self.in_flight >= self.policy.limit:
            self.refused += 1
            return False
        self.in_flight += 1
        return True

    def release(self, seconds: float, ok: bool) -> None:
        """A call admitted by `try_acquire` is over; its latency counts only if it succeeded
        (a refused or invalid call returns quickly and says nothing of queueing)."""
        if ok:
            self.policy.sample(seconds, self.in_flight)
        self.in_flight -= 1

    def refusal(self, model: str) -> ResourceExhausted:
        return ResourceExhausted(
            f"{self.node} is overloaded ({self.in_flight} inference calls in flight, limit "
            f"{self.policy.limit}); '{truncate(model)}' was not run: retry later or on another replica"
        )


def limiter_from_setting(setting: str, node: str) -> ConcurrencyLimiter | None:
    """The limiter `--max-inflight` asks for: "adaptive", a number (a fixed maximum) or "off"."""
    text = setting.strip().lower()
    if text in ("off", "none", "0", ""):
        return None
    if text == "adaptive":
        return ConcurrencyLimiter(AdaptiveLimit(), node=node)
    try:
        return ConcurrencyLimiter(FixedLimit(int(text)), node=node)
    except ValueError:
        raise ValueError(
            f"--max-inflight: expected 'adaptive', a positive number or 'off', got {setting!r}"
        ) from None
