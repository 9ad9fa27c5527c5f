"""The span of each model step of a graph (tracing on only): `step <name>` around its call.

The engine wraps its step call with `traced` once, when it is built with tracing on; off, the
engine calls its steps directly and no span exists. A step's span is the client side of its
downstream calls: it covers every attempt (retries and their backoff included) and the wait
for a coalesced call, and each attempt's SERVER span on the service is its child.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import numpy as np

from services.common.observability import tracing
from services.common.types import rows_of

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
            "onnxmesh.rows": rows_of(inputs.values()),
        }
        span, token = tracing.start(f"step {spec.name}", attributes)
        code, message = "OK", ""
        try:
            return await call(node, run, inputs)
        except BaseException as exc:
            code, message = tracing.outcome(exc)
            raise
        finally:
            outcome = {"onnxmesh.status": run.status.get(spec.name, "cancelled")}
            version = run.versions.get(spec.name) or spec.version
            if version:
                outcome["onnxmesh.version"] = version
            tracing.finish(span, token, code, message, server=False, attributes=outcome)

    return step
