"""Per model version counters behind Triton's ModelStatistics (and the REST `/stats`).

Plain numbers, cumulative since the node started, kept by the data plane for every request it
runs (whatever transport brought it):

    success / fail     requests answered / failed, and their time from model lookup to answer
    compute_input      lookup and validation, before the servable runs
    compute_infer      the servable's own time (for a graph: the whole graph run)
    compute_output     encoding the answer (and the classification extension)
    queue              waiting for an inference worker thread (models without adaptive
                       batching; a batching wait counts as compute_infer)
    inference_count    rows answered (the first dimension of each request's first input)
    execution_count    model runs: batches for a batching model, else requests

No locks: every update happens on the node's event loop.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field


@dataclass(slots=True)
class Duration:
    count: int = 0
    ns: int = 0

    def add(self, seconds: float) -> None:
        self.count += 1
        self.ns += int(seconds * 1e9)


@dataclass(slots=True)
class ModelStats:
    """One model version's counters; the names are Triton's."""

    name: str
    version: str
    last_inference_ms: int = 0
    inference_count: int = 0
    execution_count: int = 0
    success: Duration = field(default_factory=Duration)
    fail: Duration = field(default_factory=Duration)
    queue: Duration = field(default_factory=Duration)
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)

    def succeeded(self, rows: int, total: float, before: float, running: float, after: float) -> None:
        """Count one answered request: `total` seconds, of which `before` ran before the servable,
        `running` inside it and `after` encoding the answer."""
        self.last_inference_ms = int(time.time() * 1000)
        self.inference_count += rows
        self.execution_count += 1
        # Inline rather than four Duration.add calls: this runs on every request.
        success, compute_input = self.success, self.compute_input
        compute_infer, compute_output = self.compute_infer, self.compute_output
        success.count += 1
        success.ns += int(total * 1e9)
        compute_input.count += 1
        compute_input.ns += int(before * 1e9)
        compute_infer.count += 1
        compute_infer.ns += int(running * 1e9)
        compute_output.count += 1
        compute_output.ns += int(after * 1e9)

    def failed(self, total: float) -> None:
        self.last_inference_ms = int(time.time() * 1000)
        self.fail.add(total)


class Statistics:
    """The ModelStats of every model version a node has answered for, by (name, version)."""

    def __init__(self) -> None:
        self._stats: dict[tuple[str, str], ModelStats] = {}

    def of(self, name: str, version: str) -> ModelStats:
        key = (name, version)
        stats = self._stats.get(key)
        if stats is None:
            stats = self._stats[key] = ModelStats(name, version)
        return stats
