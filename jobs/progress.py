"""Progress of a batch run: a tqdm bar on a terminal, plain lines in CI and logs.

Both show rows done of the total, rows/s and the ETA; the plain form writes one line every
`interval` seconds (and a last one at the end), so a log keeps a readable trace.
"""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO


class Progress:
    def __init__(
        self,
        label: str,
        total: int | None,
        *,
        mode: str = "auto",
        stream: TextIO | None = None,
        interval: float = 5.0,
    ) -> None:
        """`mode`: auto (a bar when `stream` is a terminal), bar, plain or off."""
        self.label = label
        self.total = total
        self.stream = stream or sys.stderr
        self.interval = interval
        self.done = 0
        self.failed = 0
        self._started = time.monotonic()
        self._last_line = self._started
        if mode == "auto":
            mode = "bar" if getattr(self.stream, "isatty", lambda: False)() else "plain"
        self.mode = mode
        self._bar: Any = None
        if mode == "bar":
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=label, unit="row", file=self.stream, dynamic_ncols=True)

    def update(self, rows: int, failed: int = 0) -> None:
        self.done += rows
        self.failed += failed
        if self._bar is not None:
            self._bar.update(rows)
            if failed:
                self._bar.set_postfix(failed=self.failed)
        elif self.mode == "plain":
            now = time.monotonic()
            if now - self._last_line >= self.interval:
                self._last_line = now
                self._line(now)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        elif self.mode == "plain" and self.done:
            self._line(time.monotonic())

    def _line(self, now: float) -> None:
        elapsed = max(now - self._started, 1e-9)
        rate = self.done / elapsed
        if self.total:
            eta = (self.total - self.done) / rate if rate > 0 else float("inf")
            where = f"{self.done}/{self.total} rows ({self.done / self.total:.0%})"
            eta_text = f", ETA {eta:.0f} s" if eta != float("inf") else ""
        else:
            where, eta_text = f"{self.done} rows", ""
        print(
            f"{self.label}: {where}, {rate:.0f} rows/s{eta_text}, {self.failed} failed",
            file=self.stream,
            flush=True,
        )
