"""Log throttling: a flood of failed calls is one line per kind per interval."""

from __future__ import annotations

import logging

from services.common.observability.logs import Throttle


def record(msg: str, code: str | None, level: int = logging.WARNING) -> logging.LogRecord:
    rec = logging.LogRecord("onnxmesh.test", level, __file__, 1, msg, None, None)
    if code is not None:
        rec.code = code
    return rec


def test_one_line_per_kind_per_interval_then_the_count_left_out() -> None:
    now = [0.0]
    throttle = Throttle(interval=1.0, clock=lambda: now[0])
    assert throttle.filter(record("ModelInfer failed", "UNAVAILABLE"))
    assert not any(throttle.filter(record("ModelInfer failed", "UNAVAILABLE")) for _ in range(905))
    # Another kind (another code, another message) has its own budget.
    assert throttle.filter(record("ModelInfer failed", "NOT_FOUND"))
    assert throttle.filter(record("step failed", "UNAVAILABLE"))
    now[0] = 1.0
    again = record("ModelInfer failed", "UNAVAILABLE")
    assert throttle.filter(again) and getattr(again, "suppressed", 0) == 905
    assert throttle.filter(record("ModelInfer failed", "UNAVAILABLE")) is False


def test_errors_and_lines_that_are_not_failed_calls_always_pass() -> None:
    throttle = Throttle(interval=60.0, clock=lambda: 0.0)
    assert all(throttle.filter(record("internal error", "INTERNAL", logging.ERROR)) for _ in range(3))
    assert all(throttle.filter(record("listening", None, logging.INFO)) for _ in range(3))
