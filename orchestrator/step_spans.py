"""The span of each model step of a graph (tracing on only): `step <name>` around its call.

The engine wraps its step call with `traced` once, when it is built with tracing on; off, the
engine calls its steps directly and no span exists. A step's span covers all its attempts
(retries included) and the wait for a coalesced call; the CLIENT span of each downstream call
is its child.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import numpy as np

from services.common import tracing
from services.common.errors import MeshError

#: The engine's step call: (compiled model step, the request's run, the step's inputs) -> outputs.
StepCall = Callable[[Any, Any, Mapping[str, np.ndarray]], Awaitable[Mapping[str, np.ndarray]]]


def traced(call: StepCall) -> StepCall:
    """`call` with a span per step: graph, step, service, model, rows; then the version that
    answered, the step's status (as in the response parameters) and its code."""

    async def step(node: Any, run: Any, inputs: Mapping[str, np.ndarray]) -> Mapping[str, np.ndarray]:
        spec = node.step
        attributes = {
            "onnxmesh.graph": run.graph,
            "onnxmesh.step": spec.name,
            "onnxmesh.service": spec.service,
            "onnxmesh.model": spec.model,
            "onnxmesh.rows": tracing.rows_of(inputs),
        }
        with tracing.span(f"step {spec.name}", attributes) as span:
            try:
                outputs = await call(node, run, inputs)
            except MeshError as err:
                tracing.set_code(
                    span, err.code, err.message if err.public else "internal error", server=False
                )
                raise
            except asyncio.CancelledError:
                tracing.set_code(span, "CANCELLED", "the request was cancelled", server=False)
                raise
            finally:
                span.set_attribute("onnxmesh.status", run.status.get(spec.name, "cancelled"))
                version = run.versions.get(spec.name) or spec.version
                if version:
                    span.set_attribute("onnxmesh.version", version)
            tracing.set_code(span, "OK", server=False)
            return outputs

    return step
