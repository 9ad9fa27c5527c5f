"""``SpecError`` and ``_At``, the location every one of its messages starts with.

Shared by the parser and both checkers; on its own so that the parser can run the scope checks
without the checkers importing the parser.
"""

from __future__ import annotations

from dataclasses import dataclass


class SpecError(Exception):
    """The spec is invalid. The message says where, what is wrong and what was expected."""


@dataclass(frozen=True)
class _At:
    """Where something is in the spec; renders the prefix of every SpecError."""

    graph: str | None
    path: str
    step: str | None = None

    def key(self, key: str) -> _At:
        return _At(self.graph, f"{self.path}.{key}" if self.path else key, self.step)

    def index(self, i: int) -> _At:
        return _At(self.graph, f"{self.path}[{i}]", self.step)

    def named(self, step: str) -> _At:
        return _At(self.graph, self.path, step)

    def error(self, problem: str) -> SpecError:
        where = [f"graph {self.graph!r}"] if self.graph is not None else []
        if self.path:
            where.append(f"at {self.path}" if self.graph is not None else self.path)
        if self.step is not None:
            where.append(f"(step {self.step!r})")
        return SpecError(f"{' '.join(where) or 'spec'}: {problem}")
