"""A hung branch never costs the request its deadline, and a hung hard step is always named.

model_b is frozen (SIGSTOP: its connection stays up, its health's last answer SERVING, it never
answers) while two loads with a 2 s client deadline run side by side: digits-parallel, whose
model_b branch is soft, must answer every request in time with the branch flagged; digits-serial,
whose model_b step is hard, must fail every request with DEADLINE_EXCEEDED naming the step,
sent by the orchestrator before the client's own deadline fired (a client-side expiry says only
"Deadline Exceeded").
"""

from __future__ import annotations

import signal

import pytest

from meshctl.launcher import LocalMesh
from tests.faults.conftest import IMAGES
from tests.faults.load import Load

pytestmark = pytest.mark.timeout(120)

# The orchestrator answers deadline_margin(DEADLINE) before the client's deadline: 2 s buys the
# largest margin it keeps (0.25 s; 0.15 s at 1 s), room for the answer to travel and for a stall
# of a loaded 2-core machine. Each client is mostly waiting on the frozen node meanwhile, so the
# load adds little.
DEADLINE = 2.0
REQUESTS = 16
CONCURRENCY = 4


def test_hung_model_b_soft_branch_answers_in_time_and_hard_step_is_named(
    mesh: LocalMesh, labels: dict[str, list[int]]
) -> None:
    target = mesh.address("orchestrator")
    soft = Load(
        target, "digits-parallel", IMAGES, concurrency=CONCURRENCY, timeout=DEADLINE, watch="step.logreg"
    )
    hard = Load(target, "digits-serial", IMAGES, concurrency=CONCURRENCY, timeout=DEADLINE)
    frozen = mesh.process("model_b")
    with soft, hard:
        soft.wait_for(100)
        hard.wait_for(100)
        soft.mark("during")
        hard.mark("during")
        frozen.signal(signal.SIGSTOP)
        try:
            soft.wait_for(REQUESTS, timeout=60.0)
            hard.wait_for(REQUESTS, timeout=60.0)
        finally:
            frozen.signal(signal.SIGCONT)
        soft.mark("after")
        hard.mark("after")
        soft.wait_for(100)
        hard.wait_for(100)
    soft.report("model_b frozen (SIGSTOP); its branch is soft")
    hard.report("model_b frozen (SIGSTOP); its step is hard")

    answered = soft.in_phase("during")
    assert len(answered) >= REQUESTS
    assert len(hard.in_phase("during")) >= REQUESTS
    # Every request answered; the ones that started while model_b was frozen say so.
    assert [o for o in answered if o.code != "OK"] == []
    flagged = [o for o in answered if o.detail.startswith("timeout")]
    assert len(flagged) >= REQUESTS - CONCURRENCY, [
        o.detail for o in answered
    ]  # the first few may beat the freeze
    failed = hard.in_phase("during")
    timed_out = [o for o in failed if o.code != "OK"]
    assert len(timed_out) >= REQUESTS - CONCURRENCY
    for outcome in timed_out:
        assert outcome.code == "DEADLINE_EXCEEDED", outcome
        assert "step 'head' (model_b/digits-head)" in outcome.detail, outcome
    for load in (soft, hard):  # thawed, the mesh answers everything again
        after = load.in_phase("after")
        assert len(after) >= 100 - CONCURRENCY and [o for o in after if o.code != "OK"] == []
