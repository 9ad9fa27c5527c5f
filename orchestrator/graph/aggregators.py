"""Ensemble aggregators: how the answers of an ensemble's successful branches become one answer.

Each aggregator works on two levels, kept side by side so they cannot drift apart:

- ``combine``: the runtime arithmetic over numpy arrays (one array per successful branch, in branch
  order), returning the aggregated tensors by name;
- ``output_specs``: the static counterpart over ``TensorSpec`` s, used when a graph is checked against
  the services' signatures and to compute the signature the orchestrator serves for the graph.

Both raise ``ValueError`` with a message meant for humans; the caller adds the ensemble's name.

The methods (see docs/graphs.md for the user-facing reference):

================  ===========================================================================
mean              element-wise mean of the branch tensors
weighted_mean     element-wise mean weighted by the spec's per-branch weights (re-normalised
                  over the branches that succeeded)
majority_vote     argmax per branch and row; the most voted label wins, ties go to the lowest
                  label; produces ``label`` (INT64) and ``probabilities`` (the vote shares)
concat            concatenation along the last axis, in branch order
max_confidence    per row, the row of the branch whose maximum value is highest (ties: the
                  earlier branch)
================  ===========================================================================
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import ClassVar

import numpy as np

from services.common.types import TensorSpec

#: Datatypes a mean can be taken of without changing the datatype.
FLOAT_DATATYPES = frozenset({"FP16", "FP32", "FP64"})
#: Datatypes with an order (argmax, max, comparisons).
NUMERIC_DATATYPES = FLOAT_DATATYPES | frozenset(
    {"UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64"}
)


def unify_shape(a: Sequence[int], b: Sequence[int]) -> tuple[int, ...] | None:
    """The most specific shape both ``a`` and ``b`` can take (-1 = any size), or None if none.

    Ranks must be equal; a fixed size meets -1 as itself, two different fixed sizes conflict.
    """
    if len(a) != len(b):
        return None
    out: list[int] = []
    for x, y in zip(a, b, strict=True):
        if x == y or y == -1:
            out.append(x)
        elif x == -1:
            out.append(y)
        else:
            return None
    return tuple(out)


def _unify_all(specs: Sequence[TensorSpec]) -> tuple[str, tuple[int, ...]]:
    datatype = specs[0].datatype
    shape: tuple[int, ...] | None = tuple(specs[0].shape)
    for spec in specs[1:]:
        if spec.datatype != datatype:
            raise ValueError(f"branches disagree on the datatype: {datatype} vs {spec.datatype}")
        assert shape is not None
        shape = unify_shape(shape, spec.shape)
        if shape is None:
            raise ValueError("branches disagree on the shape: " + ", ".join(s.describe() for s in specs))
    assert shape is not None
    return datatype, shape


def _same_shapes(arrays: Sequence[np.ndarray]) -> None:
    first = arrays[0].shape
    if any(a.shape != first for a in arrays[1:]):
        raise ValueError(
            "branches answered with different shapes: " + ", ".join(str(a.shape) for a in arrays)
        )


class Aggregator(ABC):
    """One aggregation method. Stateless; one shared instance per method."""

    name: ClassVar[str]

    def outputs(self, tensor: str) -> tuple[str, ...]:
        """The tensor names the ensemble produces when aggregating ``tensor``."""
        return (tensor,)

    @abstractmethod
    def combine(
        self, tensor: str, arrays: Sequence[np.ndarray], weights: Sequence[float]
    ) -> dict[str, np.ndarray]:
        """Aggregate one array per successful branch (branch order; ``weights`` aligned)."""

    @abstractmethod
    def output_specs(
        self, tensor: str, specs: Sequence[TensorSpec], *, fixed_branches: bool
    ) -> dict[str, TensorSpec]:
        """The specs of the produced tensors, given the branches' specs of ``tensor``.

        ``fixed_branches`` is False when fewer than all branches may take part at run time
        (soft branches or a quorum), which matters for aggregators whose shape depends on it.
        """


class _Elementwise(Aggregator):
    """Shared checks of the element-wise methods (same shape in, same spec out)."""

    datatypes: ClassVar[frozenset[str]] = FLOAT_DATATYPES

    def output_specs(
        self, tensor: str, specs: Sequence[TensorSpec], *, fixed_branches: bool
    ) -> dict[str, TensorSpec]:
        datatype, shape = _unify_all(specs)
        if datatype not in self.datatypes:
            raise ValueError(
                f"{self.name} needs a tensor of type {', '.join(sorted(self.datatypes))}; "
                f"'{tensor}' is {datatype}"
            )
        return {tensor: TensorSpec(tensor, datatype, shape)}


class Mean(_Elementwise):
    name = "mean"

    def combine(
        self, tensor: str, arrays: Sequence[np.ndarray], weights: Sequence[float]
    ) -> dict[str, np.ndarray]:
        if len(arrays) == 1:
            # One survivor: its answer is the mean; forward it without a copy.
            return {tensor: arrays[0]}
        _same_shapes(arrays)
        # Accumulate in float64 so the result doesn't depend on branch order, then keep the
        # branches' datatype (the signature promises it).
        mean = np.mean(np.stack(arrays), axis=0, dtype=np.float64)
        return {tensor: mean.astype(arrays[0].dtype, copy=False)}


class WeightedMean(_Elementwise):
    name = "weighted_mean"

    def combine(
        self, tensor: str, arrays: Sequence[np.ndarray], weights: Sequence[float]
    ) -> dict[str, np.ndarray]:
        _same_shapes(arrays)
        w = np.asarray(weights, dtype=np.float64)
        total = float(w.sum())
        if total <= 0.0:
            raise ValueError("every branch that answered has weight 0")
        mean = np.tensordot(w / total, np.stack(arrays).astype(np.float64, copy=False), axes=1)
        return {tensor: mean.astype(arrays[0].dtype, copy=False)}


class MajorityVote(Aggregator):
    name = "majority_vote"

    def outputs(self, tensor: str) -> tuple[str, ...]:
        return ("label", "probabilities")

    def combine(
        self, tensor: str, arrays: Sequence[np.ndarray], weights: Sequence[float]
    ) -> dict[str, np.ndarray]:
        _same_shapes(arrays)
        classes = np.arange(arrays[0].shape[-1])
        counts = np.zeros(arrays[0].shape, dtype=np.int64)
        for array in arrays:
            counts += np.argmax(array, axis=-1)[..., None] == classes
        # np.argmax returns the first maximum, so ties go to the lowest label.
        label = np.argmax(counts, axis=-1).astype(np.int64, copy=False)
        share_type = arrays[0].dtype if arrays[0].dtype.kind == "f" else np.dtype(np.float32)
        shares = (counts / len(arrays)).astype(share_type, copy=False)
        return {"label": label, "probabilities": shares}

    def output_specs(
        self, tensor: str, specs: Sequence[TensorSpec], *, fixed_branches: bool
    ) -> dict[str, TensorSpec]:
        datatype, shape = _unify_all(specs)
        if datatype not in NUMERIC_DATATYPES or not shape:
            raise ValueError(
                f"majority_vote needs a numeric tensor of rank >= 1 (scores per class on the "
                f"last axis); '{tensor}' is {datatype}{list(shape)}"
            )
        share_type = datatype if datatype in FLOAT_DATATYPES else "FP32"
        return {
            "label": TensorSpec("label", "INT64", shape[:-1]),
            "probabilities": TensorSpec("probabilities", share_type, shape),
        }


class Concat(Aggregator):
    name = "concat"

    def combine(
        self, tensor: str, arrays: Sequence[np.ndarray], weights: Sequence[float]
    ) -> dict[str, np.ndarray]:
        if len(arrays) == 1:
            return {tensor: arrays[0]}
        if len({a.shape[:-1] for a in arrays}) != 1:
            raise ValueError(
                "concat needs equal shapes but for the last axis, got "
                + ", ".join(str(a.shape) for a in arrays)
            )
        return {tensor: np.concatenate(arrays, axis=-1)}

    def output_specs(
        self, tensor: str, specs: Sequence[TensorSpec], *, fixed_branches: bool
    ) -> dict[str, TensorSpec]:
        if any(not s.shape for s in specs):
            raise ValueError(f"concat needs tensors of rank >= 1; '{tensor}' is a scalar")
        datatype, lead = _unify_all([TensorSpec(s.name, s.datatype, s.shape[:-1]) for s in specs])
        lasts = [s.shape[-1] for s in specs]
        # The width is only known when every branch always takes part and reports a fixed width.
        width = sum(lasts) if fixed_branches and -1 not in lasts else -1
        return {tensor: TensorSpec(tensor, datatype, (*lead, width))}


class MaxConfidence(_Elementwise):
    name = "max_confidence"
    datatypes = NUMERIC_DATATYPES

    def combine(
        self, tensor: str, arrays: Sequence[np.ndarray], weights: Sequence[float]
    ) -> dict[str, np.ndarray]:
        if len(arrays) == 1:
            return {tensor: arrays[0]}
        _same_shapes(arrays)
        stacked = np.stack(arrays)  # (branch, row..., class)
        # argmax over branches returns the first maximum: ties go to the earlier branch.
        best = np.argmax(stacked.max(axis=-1), axis=0)  # (row...)
        index = np.broadcast_to(best[None, ..., None], (1, *stacked.shape[1:]))
        return {tensor: np.take_along_axis(stacked, index, axis=0)[0]}


#: method name -> aggregator, in the order the docs list them.
AGGREGATORS: dict[str, Aggregator] = {
    agg.name: agg for agg in (Mean(), WeightedMean(), MajorityVote(), Concat(), MaxConfidence())
}
