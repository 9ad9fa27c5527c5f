"""``SpecError`` and ``_At``, the location every one of its messages starts with.

Shared by the parser and both checkers; on its own so that the parser can run the scope checks
without the checkers importing the parser.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

#: The most problems one SpecError lists (the rest are counted): a spec with a hundred broken
#: steps needs its first fixes, not a page of text.
MAX_REPORTED = 20


class SpecError(Exception):
    """The spec is invalid. The message says where, what is wrong and what was expected; with
    several problems (`problems`), one line each."""

    def __init__(self, message: str, problems: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.problems: tuple[str, ...] = tuple(problems) or (message,)

    @classmethod
    def of(cls, problems: Sequence[str]) -> SpecError:
        if len(problems) == 1:
            return cls(problems[0])
        shown = [f"  - {p}" for p in problems[:MAX_REPORTED]]
        if len(problems) > MAX_REPORTED:
            shown.append(f"  ... and {len(problems) - MAX_REPORTED} more")
        return cls(f"{len(problems)} problems:\n" + "\n".join(shown), problems)


class Problems:
    """The problems of independent parts of a spec (each service, graph, step of a list), so
    that one pass reports them all: `with problems.part(): ...` for each, then `check()`."""

    def __init__(self) -> None:
        self.found: list[str] = []

    @contextmanager
    def part(self) -> Iterator[None]:
        try:
            yield
        except SpecError as exc:
            self.found.extend(exc.problems)

    def check(self) -> None:
        """Raise one SpecError listing every problem found, if any."""
        if self.found:
            raise SpecError.of(self.found)


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
