"""What the whole run shares: a summary of every skip, grouped by its reason.

A skip may only mean "this tool or server is not installed here" (tests/support.py: `tool`,
`server_missing`); the summary makes each one visible at the end of `make test`.
"""

from __future__ import annotations

from collections import Counter

import pytest


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    reasons: Counter[str] = Counter()
    for report in terminalreporter.stats.get("skipped", []):
        longrepr = report.longrepr
        reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
        reasons[reason.removeprefix("Skipped: ")] += 1
    terminalreporter.section("skipped, by reason")
    if not reasons:
        terminalreporter.write_line("nothing was skipped")
    for reason, count in reasons.most_common():
        terminalreporter.write_line(f"{count:>4}  {reason}")
