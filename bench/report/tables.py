"""Markdown tables and number formats shared by the report's sections."""

from __future__ import annotations

from collections.abc import Iterable, Sequence


def num(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def ratio(value: float | None) -> str:
    # Three significant digits: mesh/floor ratios run from 0.00x to hundreds.
    return "-" if value is None else f"{value:.3g}x"


def ms(seconds: float | None, digits: int = 3) -> str:
    return "-" if seconds is None else f"{seconds * 1000.0:.{digits}f}"


def pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.0%}"


def table(headers: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)
