"""Structured logs: one JSON object per line, with the service name and the request id.

The request id lives in a context variable set by the servicer for each call, so every log
line written while serving that call carries it, across awaits, without passing it around.
"""

from __future__ import annotations

import contextvars
import json
import logging
import sys
import time
from collections.abc import Callable
from typing import Any

request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="")
#: The header (gRPC metadata or HTTP) a caller may send its request id in.
REQUEST_ID_HEADER = "x-request-id"

_RESERVED = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "service": self.service,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        request_id = request_id_var.get()
        if request_id:
            entry["request_id"] = request_id
        entry.update({k: v for k, v in vars(record).items() if k not in _RESERVED})
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class TextFormatter(logging.Formatter):
    """One line per record: the message, then its fields as key=value (a failure's code and
    reason, the graph, the step, the trace id), then the request id; a traceback follows."""

    def __init__(self, service: str) -> None:
        super().__init__(f"%(asctime)s %(levelname)s {service} %(name)s: %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:
        text = super().formatMessage(record)
        fields = [f"{k}={_text_value(v)}" for k, v in vars(record).items() if k not in _RESERVED]
        if fields:
            text = f"{text} {' '.join(fields)}"
        request_id = request_id_var.get()
        return f"{text} [request_id={request_id}]" if request_id else text


def _text_value(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    # Quoted when it would not read back as one word.
    return json.dumps(text) if not text or any(c.isspace() or c in '"=' for c in text) else text


class Throttle(logging.Filter):
    """At most one line per kind of failed call per `interval` seconds.

    A failed call is a record below ERROR with a `code` field (a refusal, a client's mistake, a
    step that failed); its kind is (logger, message, code). A node refusing thousands of calls a
    second while it drains, or a client looping on a bad request, would otherwise flood the log.
    The next line of a kind says how many were left out (`suppressed`). Errors always pass.
    """

    def __init__(self, interval: float = 1.0, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.interval = interval
        self._clock = clock
        self._kinds: dict[tuple[str, str, str], tuple[float, int]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        code = getattr(record, "code", None)
        if code is None or record.levelno >= logging.ERROR:
            return True
        kind = (record.name, str(record.msg), str(code))
        now = self._clock()
        last, suppressed = self._kinds.get(kind, (-self.interval, 0))
        if now - last < self.interval:
            self._kinds[kind] = (last, suppressed + 1)
            return False
        if len(self._kinds) >= _MAX_KINDS:  # kinds are few; never let them grow without bound
            self._kinds.clear()
        self._kinds[kind] = (now, 0)
        if suppressed:
            record.suppressed = suppressed
        return True


_MAX_KINDS = 1024


def configure_logging(service: str, level: str = "INFO", fmt: str = "json") -> None:
    """Send every log line to stderr in the chosen format (idempotent), failed calls throttled."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(service) if fmt == "json" else TextFormatter(service))
    handler.addFilter(Throttle())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
