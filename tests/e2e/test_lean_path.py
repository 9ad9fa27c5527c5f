"""The lean path stays lean: an unused feature adds no Python call per request, and a request
costs about the project calls it costs today.

`bench.probes.calls` runs the local mesh (real processes on 127.0.0.1, every node under cProfile,
stopped by LocalMesh) twice, with LOW and then HIGH sequential requests, and counts each node's
calls per request as the difference: start-up, warm-up and shutdown cancel out. Call counts
barely move with the machine's load, so the budgets below hold anywhere: what runs by the clock
(the loop-lag watcher, health checks) adds a fraction of a call per request and the coalescing
stage a longer path now and then, hence the margins (`BUDGET`).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from bench.probes.calls import POINTS, Count, count

pytestmark = pytest.mark.timeout(240)

LOW, HIGH = 20, 80
MODEL_NODE, ORCHESTRATOR = "services.common.model_node", "orchestrator"
#: The modules of features these requests do not use (no tracing, no Triton parameters or shared
#: memory, no dynamic batching on model_a, no tokens, no capture, no cache in digits-serial): no
#: function of theirs may run per request.
UNUSED = {
    "tracing": (
        "services/common/observability/tracing.py",
        "services/common/grpc/traced.py",
        "orchestrator/graph/step_spans.py",
    ),
    "Triton parameters and shared memory": (
        "services/common/triton/params.py",
        "services/common/triton/shared_memory.py",
    ),
    "dynamic batching": ("services/common/batching/adaptive.py",),
    "TLS and bearer tokens": ("services/common/grpc/security.py",),
    "capture": ("orchestrator/capture/",),
    "the response cache": ("orchestrator/stages/cache.py",),
}
#: Project calls per request, measured with `python -m bench.probes.calls --low 20 --high 80`:
#: model_a direct 27.1 on model_a (margin: the loop-lag timer and health checks, which run by
#: the clock, not per request); digits-serial 188-217 on the orchestrator, whose coalescing
#: stage takes a longer path (~25 calls) when a lane looks loaded, which depends on timing even
#: for sequential requests. A change that adds calls to every request moves these on purpose.
BUDGET = {("model_a direct", MODEL_NODE): 31.0, ("digits-serial", ORCHESTRATOR): 235.0}


@pytest.fixture(scope="module")
def counts() -> Iterator[list[Count]]:
    yield [c for point in POINTS for c in count(point, LOW, HIGH)]


def test_an_unused_feature_adds_no_call_per_request(counts: list[Count]) -> None:
    assert {(c.point, c.node) for c in counts} >= set(BUDGET), "a node the requests reach was not counted"
    for c in counts:
        for feature, modules in UNUSED.items():
            called = {name: calls for name, calls in c.functions.items() if name.startswith(modules)}
            assert not called, (
                f"{c.point}, {c.node}: {feature} is not used, yet per request it calls {called}"
            )


def test_a_request_stays_within_its_call_budget(counts: list[Count]) -> None:
    for c in counts:
        budget = BUDGET.get((c.point, c.node))
        if budget is not None:
            assert c.project_calls <= budget, (
                f"{c.point}, {c.node}: {c.project_calls} project calls per request, budget {budget}; "
                f"per function: {c.functions}"
            )
