"""Drift: a tensor's live distribution against a reference, as a population stability index.

A ``Reference`` is the distribution of one captured tensor (``input.<name>`` / ``output.<name>``)
over a window of records or a file of values (e.g. the training split): categorical when the
values are integers of at most ``MAX_CATEGORIES`` distinct values (labels, 4-bit pixels), else
``BINS`` bins at the reference's quantiles. Every element of the tensor counts (an image's
pixels, every class probability). ``psi`` compares the newest records' values with it:

    PSI = sum over bins of (live share - reference share) * ln(live share / reference share)

(shares floored at ``FLOOR`` so an empty bin costs a bounded amount). Usual reading: < 0.1 no
shift, 0.1-0.2 a moderate one, > 0.2 a significant one (the alert's threshold).

``DriftMonitor`` runs in the orchestrator off the request path: one thread that every
``interval`` seconds reads each watched tensor's last ``window`` records from the capture store
and reports the PSI (the ``onnxmesh_drift_psi{graph,tensor}`` gauge).
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from orchestrator.capture.record import Capture
from orchestrator.spec import MeshSpec

logger = logging.getLogger(__name__)

BINS = 10
MAX_CATEGORIES = 20
FLOOR = 1e-4


@dataclass(frozen=True)
class Reference:
    """A tensor's reference distribution: ``categorical`` (``points`` are the categories) or
    ``binned`` (``points`` are the inner bin edges); ``shares`` sum to 1."""

    tensor: str
    kind: str
    points: tuple[float, ...]
    shares: tuple[float, ...]

    @classmethod
    def of(cls, tensor: str, values: np.ndarray) -> Reference:
        values = np.asarray(values, dtype=np.float64).ravel()
        if values.size == 0:
            raise ValueError(f"no values of {tensor} to build a reference from")
        categories = np.unique(values)
        if categories.size <= MAX_CATEGORIES and np.all(categories == np.round(categories)):
            counts = np.array([np.count_nonzero(values == c) for c in categories])
            return cls(
                tensor, "categorical", tuple(categories.tolist()), tuple((counts / values.size).tolist())
            )
        edges = np.unique(np.quantile(values, np.linspace(0, 1, BINS + 1)[1:-1]))
        counts = np.bincount(np.searchsorted(edges, values, side="right"), minlength=edges.size + 1)
        return cls(tensor, "binned", tuple(edges.tolist()), tuple((counts / values.size).tolist()))

    def shares_of(self, values: np.ndarray) -> np.ndarray:
        """The live values' shares in this reference's bins (values outside every category: none)."""
        values = np.asarray(values, dtype=np.float64).ravel()
        points = np.asarray(self.points)
        if self.kind == "categorical":
            counts = [np.count_nonzero(values == c) for c in points]
        else:
            counts = np.bincount(
                np.searchsorted(points, values, side="right"), minlength=points.size + 1
            ).tolist()
        return np.asarray(counts, dtype=np.float64) / max(values.size, 1)

    def to_json(self) -> str:
        return json.dumps(
            {"tensor": self.tensor, "kind": self.kind, "points": self.points, "shares": self.shares}
        )

    @classmethod
    def load(cls, path: Path) -> Reference:
        raw = json.loads(path.read_text())
        if raw.get("kind") not in ("categorical", "binned") or len(raw["shares"]) < 1:
            raise ValueError(f"{path}: not a drift reference (kind categorical or binned, shares)")
        return cls(str(raw["tensor"]), raw["kind"], tuple(raw["points"]), tuple(raw["shares"]))


def psi(reference: Reference, values: np.ndarray) -> float:
    """The population stability index of ``values`` against ``reference``."""
    expected = np.maximum(np.asarray(reference.shares), FLOOR)
    actual = np.maximum(reference.shares_of(values), FLOOR)
    return float(np.sum((actual - expected) * np.log(actual / expected)))


def values_of(records: Iterable[Capture], tensor: str) -> np.ndarray:
    """Every element of ``tensor`` over the records that hold it, as one flat array."""
    parts = [np.asarray(r.tensors[tensor], dtype=np.float64).ravel() for r in records if tensor in r.tensors]
    return np.concatenate(parts) if parts else np.empty(0)


#: on_psi(graph, tensor, psi)
PsiHook = Callable[[str, str, float], None]


class DriftMonitor:
    """Every ``interval`` seconds, the PSI of each ``drift:`` tensor of the current spec over its
    window of captured records. ``store`` (opened in the thread) has ``latest_captures``."""

    def __init__(
        self,
        open_store: Callable[[], Any],
        spec: Callable[[], MeshSpec | None],
        base: Path,
        on_psi: PsiHook,
        *,
        interval: float = 15.0,
    ) -> None:
        self._open_store = open_store
        self._spec = spec
        self._base = base
        self._on_psi = on_psi
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="drift-monitor", daemon=True)

    def start(self) -> DriftMonitor:
        self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()
        self._thread.join(self._interval + 5)

    def _loop(self) -> None:
        store = None
        while not self._stop.wait(self._interval):
            try:
                store = store or self._open_store()
                self.evaluate(store)
            except Exception:
                logger.exception("drift evaluation failed")

    def evaluate(self, store: Any) -> None:
        spec = self._spec()
        for graph in spec.graphs.values() if spec is not None else ():
            for drift in graph.drift:
                try:
                    reference = Reference.load(self._base / drift.reference)
                except (OSError, ValueError, KeyError) as exc:
                    logger.warning(
                        "drift reference unreadable", extra={"graph": graph.name, "error": str(exc)}
                    )
                    continue
                records: Sequence[Capture] = store.latest_captures(graph.name, drift.window)
                values = values_of(records, drift.tensor)
                if values.size:
                    self._on_psi(graph.name, drift.tensor, psi(reference, values))
