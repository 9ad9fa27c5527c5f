"""One model step of a graph through its Stage: the seam the compiled plan calls its steps through.

`ModelStepCaller.call` makes a step's attempts (each one bounded by the step's timeout and the
request's deadline, less its margin), retries UNAVAILABLE with full-jitter backoff while the
shared `RetryBudget` pays for it, then records the step's status and version on the request and
reports it (`on_step`). The engine builds one caller and hands it to the plan; a request's steps
never go back into the engine.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable, Mapping

import numpy as np

from orchestrator.capture.record import Capture, make_record
from orchestrator.graph.plan import ModelNode, RequestState
from orchestrator.spec import ModelStep
from orchestrator.stages.retry_budget import RetryBudget
from services.common.errors import DeadlineExceeded, MeshError, Unavailable
from services.common.types import InferRequest, InferResult

logger = logging.getLogger(__name__)

#: Backoff before retry n (n = 1, 2, ...) is uniform in [0, min(RETRY_CAP, RETRY_BASE * 2**(n-1))].
RETRY_BASE = 0.025
RETRY_CAP = 0.5
#: A DeadlineExceeded this close to a call's deadline is that deadline's (clocks differ slightly).
DEADLINE_SLACK = 0.002

#: on_step(graph, step, service, model, version, status, seconds); status is ok, error, timeout or
#: cancelled; version is the one that answered (else the spec's, "" = default).
StepHook = Callable[[str, str, str, str, str, str, float], None]


class _Failed(Exception):
    """A model step failed: the error to raise and its ``step.<name>`` parameter value."""

    def __init__(self, error: MeshError, status: str) -> None:
        super().__init__(error.message)
        self.error = error
        self.status = status


def _reason(err: MeshError) -> str:
    # Response parameters reach the client: keep non-public messages out of them.
    return err.message if err.public else "internal error"


class ModelStepCaller:
    """Calls the model steps of every request: attempts, retries, status, version, report."""

    def __init__(
        self,
        clock: Callable[[], float],
        rng: random.Random,
        budget: RetryBudget,
        on_step: StepHook | None = None,
        on_capture: Callable[[Capture], object] | None = None,
    ) -> None:
        self._clock = clock
        self._rng = rng
        self._budget = budget
        self._on_step = on_step
        self._on_capture = on_capture

    async def call(
        self, node: ModelNode, run: RequestState, inputs: Mapping[str, np.ndarray]
    ) -> Mapping[str, np.ndarray]:
        """One model step: its attempts, then its status, version and on_step report."""
        step = node.step
        started = self._clock()
        try:
            try:
                result = await self._attempts(node, run, inputs)
            finally:
                run.spans.append((started, self._clock()))
            missing = [t for t in node.requested if t not in result.outputs]
            if missing:
                error = MeshError(f"{node.label} answered without the output(s) {', '.join(missing)}")
                raise _Failed(error, f"error: INTERNAL answered without {', '.join(missing)}")
        except _Failed as failed:
            run.status[step.name] = failed.status
            code = failed.error.code
            level = logging.INFO if code in ("INVALID_ARGUMENT", "NOT_FOUND") else logging.WARNING
            extra = {"graph": run.graph, "step": step.name, "code": code, "error": failed.error.message}
            logger.log(level, "step failed", extra=extra)
            kind = "timeout" if failed.status.startswith("timeout") else "error"
            self._report(run, step, step.version, kind, self._clock() - started)
            self._capture(run, step, step.version, inputs, None, code, started)
            raise failed.error from failed.__cause__
        except asyncio.CancelledError:
            self._report(run, step, step.version, "cancelled", self._clock() - started)
            raise
        run.status[step.name] = "ok"
        run.versions[step.name] = result.model_version
        version = result.model_version or step.version
        self._report(run, step, version, "ok", self._clock() - started)
        self._capture(run, step, version, inputs, result.outputs, "OK", started)
        return result.outputs

    async def _attempts(
        self, node: ModelNode, run: RequestState, inputs: Mapping[str, np.ndarray]
    ) -> InferResult:
        """Call the stage, retrying UNAVAILABLE within the deadline, retries and retry budget."""
        step = node.step
        self._budget.deposit()
        attempt = 1
        while True:
            left = run.deadline - self._clock() - run.margin
            timeout = min(step.timeout, left)
            if timeout <= 0:
                reason = "exceeded the deadline before it could be called"
                raise _Failed(DeadlineExceeded(f"{node.label} {reason}"), f"timeout: {reason}")
            limit = (
                f"exceeded its timeout of {step.timeout:g}s"
                if step.timeout < left
                else "exceeded the deadline"
            )
            deadline = self._clock() + timeout
            request = InferRequest(
                model=step.model,
                inputs=inputs,
                outputs=node.requested,
                version=step.version,
                request_id=run.request_id,
                deadline=deadline,
            )
            try:
                if node.keeps_deadline:
                    return await node.stage.call(request)
                # A stage that may not keep to the deadline is cut off at it.
                async with asyncio.timeout(timeout):
                    return await node.stage.call(request)
            except TimeoutError:
                raise _Failed(DeadlineExceeded(f"{node.label} {limit}"), f"timeout: {limit}") from None
            except MeshError as err:
                if isinstance(err, DeadlineExceeded) and self._clock() >= deadline - DEADLINE_SLACK:
                    # This call's own deadline ran out: said as the engine's timer would say it.
                    raise _Failed(DeadlineExceeded(f"{node.label} {limit}"), f"timeout: {limit}") from None
                if isinstance(err, DeadlineExceeded):
                    status = f"timeout: {limit}: {_reason(err)}"
                    raise _Failed(err.with_prefix(f"{node.label} {limit}"), status) from err
                after = f" (after {attempt} attempts)" if attempt > 1 else ""
                failed = _Failed(
                    err.with_prefix(f"{node.label}: {err.code}{after}"),
                    f"error: {err.code} {_reason(err)}{after}",
                )
                if not isinstance(err, Unavailable) or attempt > step.retries:
                    raise failed from err
                # Full jitter spreads the retries of concurrent requests apart.
                delay = self._rng.uniform(0.0, min(RETRY_CAP, RETRY_BASE * 2 ** (attempt - 1)))
                no_time = self._clock() + delay + run.margin >= run.deadline
                if no_time or not self._budget.try_spend():
                    raise failed from err
            await asyncio.sleep(delay)
            attempt += 1

    def _capture(
        self,
        run: RequestState,
        step: ModelStep,
        version: str,
        inputs: Mapping[str, np.ndarray],
        outputs: Mapping[str, np.ndarray] | None,
        code: str,
        started: float,
    ) -> None:
        spec = step.capture
        if spec is None or self._on_capture is None or self._rng.random() >= spec.rate:
            return
        try:
            self._on_capture(
                make_record(
                    spec,
                    inputs,
                    outputs,
                    graph=run.graph,
                    step=step.name,
                    service=step.service,
                    model=step.model,
                    version=version,
                    request_id=run.request_id,
                    latency=self._clock() - started,
                    status_code=code,
                )
            )
        except Exception:
            logger.exception("on_capture hook failed")

    def _report(self, run: RequestState, step: ModelStep, version: str, status: str, seconds: float) -> None:
        if self._on_step is None:
            return
        try:
            self._on_step(run.graph, step.name, step.service, step.model, version, status, seconds)
        except Exception:
            logger.exception("on_step hook failed")
