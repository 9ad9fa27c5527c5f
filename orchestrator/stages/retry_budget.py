"""The retry budget: one token bucket per orchestrator that every extra call is paid from.

Retries (the engine's, on UNAVAILABLE), fail-overs and hedges (the replica sets') all spend from
the same bucket, so together they stay near a fixed share of the traffic however a service
misbehaves: a slow or failing service never gets a storm of extra calls.
"""

from __future__ import annotations

import time
from collections.abc import Callable


class RetryBudget:
    """A token bucket that bounds extra calls across all requests, so an outage is no retry storm.

    Every first attempt deposits ``ratio`` tokens and an extra call (a retry, a fail-over or a
    hedge) costs one, so extra calls stay near ``ratio`` of the traffic; ``min_per_second`` tokens
    also trickle in per second so that a quiet orchestrator can still retry. The balance never
    exceeds ``capacity``. Starts with one second's reserve.
    """

    def __init__(
        self,
        *,
        ratio: float = 0.1,
        min_per_second: float = 10.0,
        capacity: float = 100.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._ratio = ratio
        self._rate = min_per_second
        self._capacity = capacity
        self._clock = clock
        self._tokens = min(capacity, min_per_second)
        self._last = clock()

    def _refill(self) -> None:
        now = self._clock()
        self._tokens = min(self._capacity, self._tokens + (now - self._last) * self._rate)
        self._last = now

    def deposit(self) -> None:
        """Account for one first attempt (on every request's path: refills inline)."""
        now = self._clock()
        tokens = self._tokens + (now - self._last) * self._rate + self._ratio
        self._tokens = min(self._capacity, tokens)
        self._last = now

    def try_spend(self) -> bool:
        """Take the token for one extra call; False (don't make it) when the budget is empty."""
        self._refill()
        if self._tokens < 1.0:
            return False
        self._tokens -= 1.0
        return True
