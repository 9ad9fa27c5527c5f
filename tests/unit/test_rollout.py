"""`onnxmesh rollout` against an in-memory cluster (FakeCluster) and a fake clock: no API server."""

from __future__ import annotations

import copy
import json

import pytest

from meshctl.rollout.cli import build_parser
from meshctl.rollout.cluster import Obj
from meshctl.rollout.deployments import image_tag, rollout_state
from meshctl.rollout.errors import EXIT_FAILURE, EXIT_OK, EXIT_USAGE, RolloutError, UsageError
from meshctl.rollout.graphs import Branch, service_components
from meshctl.rollout.weights import parse_weights, set_splitter_weights, splitter_branches
from orchestrator.spec import parse_spec
from tests.unit.rollout_fakes import (
    REPO,
    SPEC,
    FakeClock,
    FakeCluster,
    changed_lines,
    done_status,
    make_deployment,
    mesh_cluster,
    never_ready,
    outage,
    pod,
    ready_after,
    run,
    weights_in,
)


@pytest.fixture
def cluster() -> FakeCluster:
    return mesh_cluster()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


# --------------------------------------------------------------------------------------------
# set-image


def test_set_image_patches_only_that_deployment_with_image_and_version_labels(
    cluster: FakeCluster, clock: FakeClock
) -> None:
    untouched = {n: copy.deepcopy(d) for n, d in cluster.deployments.items() if n != "model-a"}
    cluster.controller = ready_after(1)

    result = run(cluster, "set-image", "model-a", "onnxmesh/model-a:0.2.0", clock=clock)

    assert result.code == EXIT_OK, result.err
    assert [name for name, _ in cluster.patches] == ["model-a"]
    patch = cluster.patches[0][1]
    template = patch["spec"]["template"]
    assert template["spec"]["containers"] == [{"name": "model-a", "image": "onnxmesh/model-a:0.2.0"}]
    assert template["metadata"]["labels"] == {
        "onnxmesh.io/model-version": "0.2.0",
        "app.kubernetes.io/version": "0.2.0",
    }
    live = cluster.deployments["model-a"]
    assert live["spec"]["template"]["spec"]["containers"][0]["image"] == "onnxmesh/model-a:0.2.0"
    assert live["spec"]["template"]["metadata"]["labels"]["onnxmesh.io/model-version"] == "0.2.0"
    # The selector is immutable: never part of the patch.
    assert set(patch["spec"]) == {"template"}
    assert "kubernetes.io/change-cause" in patch["metadata"]["annotations"]
    for name, dep in untouched.items():
        assert cluster.deployments[name] == dep
    assert "rollout complete" in result.out


def test_set_image_waits_until_ready_after_a_few_polls(cluster: FakeCluster, clock: FakeClock) -> None:
    cluster.controller = ready_after(4)

    result = run(cluster, "set-image", "model-b", "onnxmesh/model-b:0.3.0", "--timeout", "60", clock=clock)

    assert result.code == EXIT_OK, result.err
    assert cluster.reads_since_patch["model-b"] == 4
    # Polled every 2 s: three sleeps between four reads, far from the timeout.
    assert clock.sleeps == [2.0, 2.0, 2.0]
    assert "1 of 2 replicas updated" in result.out
    assert result.out.strip().endswith("rollout complete")


def test_set_image_times_out_naming_the_pods_that_are_not_ready_and_how_to_undo(
    cluster: FakeCluster, clock: FakeClock
) -> None:
    cluster.controller = never_ready
    new = "onnxmesh/model-a:0.2.0"
    cluster.pods = [
        pod("model-a-old-1", "onnxmesh/model-a:0.1.0", ready=True),
        pod("model-a-old-2", "onnxmesh/model-a:0.1.0", ready=True),
        pod(
            "model-a-new-pull",
            new,
            ready=False,
            containerStatuses=[
                {
                    "name": "model-a",
                    "ready": False,
                    "restartCount": 0,
                    "state": {"waiting": {"reason": "ImagePullBackOff", "message": "Back-off pulling image"}},
                }
            ],
        ),
        pod(
            "model-a-new-probe",
            new,
            ready=False,
            containerStatuses=[
                {"name": "model-a", "ready": False, "restartCount": 0, "state": {"running": {}}}
            ],
        ),
    ]
    cluster.events["model-a-new-probe"] = [
        {"type": "Normal", "reason": "Started", "message": "Started container model-a"},
        {
            "type": "Warning",
            "reason": "Unhealthy",
            "message": 'Readiness probe failed: service unhealthy (responded with "NOT_SERVING")',
        },
    ]

    result = run(cluster, "set-image", "model-a", new, "--timeout", "30", clock=clock)

    assert result.code == EXIT_FAILURE
    assert sum(clock.sleeps) == pytest.approx(30.0)
    err = result.err
    assert "not complete after 30s" in err
    assert "model-a-new-pull" in err and "ImagePullBackOff" in err
    assert "model-a-new-probe" in err and "Readiness probe failed" in err
    assert "model-a-old-1" not in err  # ready pods are not blamed
    assert "kubectl -n onnxmesh rollout undo deployment/model-a" in err
    assert "onnxmesh rollout set-image model-a onnxmesh/model-a:0.1.0" in err


def test_failed_canary_rollout_points_at_the_splitter_to_abort(
    cluster: FakeCluster, clock: FakeClock
) -> None:
    cluster.controller = never_ready

    result = run(
        cluster, "set-image", "model-a-canary", "onnxmesh/model-a:0.3.0", "--timeout", "10", clock=clock
    )

    assert result.code == EXIT_FAILURE
    assert "onnxmesh rollout abort digits-parallel mlp" in result.err


def test_progress_deadline_exceeded_fails_at_once(cluster: FakeCluster, clock: FakeClock) -> None:
    def deadline_exceeded(cluster: FakeCluster, name: str, reads: int) -> None:
        never_ready(cluster, name, reads)
        cluster.deployments[name]["status"]["conditions"] = [
            {
                "type": "Progressing",
                "status": "False",
                "reason": "ProgressDeadlineExceeded",
                "message": 'ReplicaSet "model-b-7c9" has timed out progressing.',
            }
        ]

    cluster.controller = deadline_exceeded

    result = run(cluster, "set-image", "model-b", "onnxmesh/model-b:0.2.0", "--timeout", "300", clock=clock)

    assert result.code == EXIT_FAILURE
    assert clock.sleeps == []
    assert "progress deadline exceeded" in result.err and "has timed out progressing" in result.err


@pytest.mark.parametrize(
    ("component", "image", "message"),
    [
        ("model-c", "onnxmesh/model-c:0.1.0", "no deployment 'model-c'"),
        ("model-a", "onnxmesh/model-a", "has no tag"),
        ("model-a", "onnxmesh/model-a:" + "x" * 70, "cannot be a label value"),
    ],
)
def test_set_image_usage_errors_patch_nothing(
    cluster: FakeCluster, component: str, image: str, message: str
) -> None:
    result = run(cluster, "set-image", component, image)

    assert result.code == EXIT_USAGE
    assert message in result.err
    assert cluster.patches == []


def test_set_image_warns_when_the_repository_changes(cluster: FakeCluster) -> None:
    cluster.controller = ready_after(1)

    result = run(cluster, "set-image", "model-a", "onnxmesh/model-b:0.2.0")

    assert result.code == EXIT_OK
    assert "different repository" in result.err


def test_image_tag_ignores_registry_ports_and_digests() -> None:
    assert image_tag("localhost:5001/onnxmesh/model-a:0.2.0") == "0.2.0"
    assert image_tag("onnxmesh/model-a:v2@sha256:" + "a" * 64) == "v2"
    with pytest.raises(UsageError):
        image_tag("localhost:5001/onnxmesh/model-a")


# --------------------------------------------------------------------------------------------
# rollout_state


@pytest.mark.parametrize(
    ("status", "done", "failed", "message"),
    [
        (done_status(3, 2), True, False, "complete"),
        (done_status(2, 2), False, False, "controller"),  # observedGeneration behind
        ({**done_status(3, 2), "updatedReplicas": 1}, False, False, "1 of 2 replicas updated"),
        ({**done_status(3, 2), "replicas": 3}, False, False, "1 old replica(s)"),
        ({**done_status(3, 2), "readyReplicas": 1}, False, False, "1 of 2 updated replicas ready"),
        ({**done_status(3, 2), "availableReplicas": 1}, False, False, "1 of 2 updated replicas available"),
        ({"observedGeneration": 3}, False, False, "0 of 2"),  # the API omits zero counts
    ],
)
def test_rollout_state(status: Obj, done: bool, failed: bool, message: str) -> None:
    dep = make_deployment("model-a", "onnxmesh/model-a:0.1.0")
    dep["status"] = status

    state = rollout_state(dep)

    assert (state.done, state.failed) == (done, failed)
    assert message in state.message


def test_rollout_state_paused_is_a_failure() -> None:
    dep = make_deployment("model-a", "onnxmesh/model-a:0.1.0")
    dep["spec"]["paused"] = True
    assert rollout_state(dep).failed


# --------------------------------------------------------------------------------------------
# canary, promote, abort


def test_canary_edits_exactly_the_weights_in_the_configmap(cluster: FakeCluster) -> None:
    result = run(cluster, "canary", "digits-parallel", "mlp", "--weights", "mlp-stable=75,mlp-canary=25")

    assert result.code == EXIT_OK, result.err
    [(name, body)] = cluster.replaced
    assert name == "onnxmesh-graphs"
    # Optimistic concurrency: the write carries the resourceVersion that was read.
    assert body["metadata"]["resourceVersion"] == "41"
    after = cluster.graphs_text()
    assert changed_lines(SPEC, after) == [
        "-            - {weight: 90, name: mlp-stable, service: model_a, model: digits-mlp,"
        " inputs: {features: pre.features}}",
        "-            - {weight: 10, name: mlp-canary, service: model_a_canary, model: digits-mlp,"
        " inputs: {features: pre.features}}",
        "+            - {weight: 75, name: mlp-stable, service: model_a, model: digits-mlp,"
        " inputs: {features: pre.features}}",
        "+            - {weight: 25, name: mlp-canary, service: model_a_canary, model: digits-mlp,"
        " inputs: {features: pre.features}}",
    ]
    assert "# Graph spec of the test mesh." in after and "# stable first" in after
    assert "mlp-canary: 10 -> 25 (25%)" in result.out


def test_canary_accepts_stable_and_canary_for_the_two_branches(cluster: FakeCluster) -> None:
    result = run(cluster, "canary", "digits-parallel", "mlp", "--weights", "stable=95,canary=5")

    assert result.code == EXIT_OK, result.err
    assert weights_in(cluster.graphs_text()) == {"mlp-stable": 95, "mlp-canary": 5}


def test_canary_sets_only_the_branches_given(cluster: FakeCluster) -> None:
    result = run(cluster, "canary", "digits-parallel", "mlp", "--weights", "mlp-canary=30")

    assert result.code == EXIT_OK, result.err
    assert weights_in(cluster.graphs_text()) == {"mlp-stable": 90, "mlp-canary": 30}


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["digits-parallel", "mlp", "--weights", "mlp-next=10"], "no branch 'mlp-next'"),
        (["digits-parallel", "mlp", "--weights", "mlp-stable=ninety"], "must be an integer"),
        (["digits-parallel", "mlp", "--weights", "mlp-stable=-1"], "must be an integer >= 0"),
        (["digits-parallel", "mlp", "--weights", "mlp-stable=0,mlp-canary=0"], "at least one weight"),
        (["digits-parallel", "mlp", "--weights", "mlp-stable"], "BRANCH=WEIGHT"),
        (["digits-parallel", "mlp", "--weights", "stable=1,mlp-stable=2"], "given twice"),
        (["digits-parallel", "shadowed", "--weights", "stable=1"], "not a splitter"),
        (["digits-parallel", "nope", "--weights", "stable=1"], "has no step 'nope'"),
        (["digits-nope", "mlp", "--weights", "stable=1"], "no graph 'digits-nope'"),
    ],
)
def test_canary_rejects_bad_requests_and_writes_nothing(
    cluster: FakeCluster, argv: list[str], message: str
) -> None:
    result = run(cluster, "canary", *argv)

    assert result.code == EXIT_USAGE
    assert message in result.err
    assert cluster.replaced == []
    assert cluster.graphs_text() == SPEC


def test_canary_retries_on_a_concurrent_edit_and_keeps_it(cluster: FakeCluster) -> None:
    def someone_else_edits(fake: FakeCluster) -> None:
        cm = fake.config_maps["onnxmesh-graphs"]
        cm["data"]["graphs.yaml"] = cm["data"]["graphs.yaml"].replace("timeout: 5.0", "timeout: 7.5")
        cm["metadata"]["resourceVersion"] = "42"

    cluster.before_replace = someone_else_edits

    result = run(cluster, "canary", "digits-parallel", "mlp", "--weights", "stable=50,canary=50")

    assert result.code == EXIT_OK, result.err
    [(_, body)] = cluster.replaced
    assert body["metadata"]["resourceVersion"] == "42"
    after = cluster.graphs_text()
    assert "timeout: 7.5" in after
    assert weights_in(after) == {"mlp-stable": 50, "mlp-canary": 50}


def test_promote_then_abort(cluster: FakeCluster) -> None:
    promoted = run(cluster, "promote", "digits-parallel", "mlp")

    assert promoted.code == EXIT_OK, promoted.err
    assert weights_in(cluster.graphs_text()) == {"mlp-stable": 0, "mlp-canary": 100}
    # How to finish: the stable Deployment takes the canary's image, then traffic goes back.
    assert (
        "onnxmesh rollout set-image model-a onnxmesh/model-a:0.2.0 && onnxmesh rollout abort digits-parallel mlp"
        in promoted.out
    )

    aborted = run(cluster, "abort", "digits-parallel", "mlp")

    assert aborted.code == EXIT_OK, aborted.err
    assert weights_in(cluster.graphs_text()) == {"mlp-stable": 100, "mlp-canary": 0}
    assert len(cluster.replaced) == 2
    # Nothing but the two weight lines ever changed.
    assert len(changed_lines(SPEC, cluster.graphs_text())) == 4


def test_promote_needs_a_branch_when_there_are_three(cluster: FakeCluster) -> None:
    three = SPEC.replace(
        "            - {weight: 10, name: mlp-canary,",
        "            - {weight: 0, name: mlp-other, service: model_a_canary, model: digits-mlp,"
        " inputs: {features: pre.features}}\n            - {weight: 10, name: mlp-canary,",
    )
    cluster.config_maps["onnxmesh-graphs"]["data"]["graphs.yaml"] = three

    assert run(cluster, "promote", "digits-parallel", "mlp").code == EXIT_USAGE
    result = run(cluster, "promote", "digits-parallel", "mlp", "--branch", "mlp-other")

    assert result.code == EXIT_OK, result.err
    assert weights_in(cluster.graphs_text()) == {"mlp-stable": 0, "mlp-other": 100, "mlp-canary": 0}


def test_abort_when_already_stable_writes_nothing(cluster: FakeCluster) -> None:
    assert run(cluster, "abort", "digits-parallel", "mlp").code == EXIT_OK
    before = len(cluster.replaced)

    result = run(cluster, "abort", "digits-parallel", "mlp")

    assert result.code == EXIT_OK
    assert len(cluster.replaced) == before
    assert "unchanged" in result.out


def test_canary_refuses_a_spec_the_orchestrator_would_reject(cluster: FakeCluster) -> None:
    broken = SPEC.replace(
        "service: preprocess, model: digits-preprocess", "service: nowhere, model: digits-preprocess"
    )
    cluster.config_maps["onnxmesh-graphs"]["data"]["graphs.yaml"] = broken

    result = run(cluster, "canary", "digits-parallel", "mlp", "--weights", "stable=50,canary=50")

    assert result.code == EXIT_FAILURE
    assert "would reject" in result.err and "nowhere" in result.err
    assert cluster.replaced == []


def test_missing_configmap_is_a_failure(cluster: FakeCluster) -> None:
    del cluster.config_maps["onnxmesh-graphs"]

    result = run(cluster, "canary", "digits-parallel", "mlp", "--weights", "stable=1")

    assert result.code == EXIT_FAILURE
    assert "no ConfigMap onnxmesh/onnxmesh-graphs" in result.err


# --------------------------------------------------------------------------------------------
# Editing the spec text


def test_set_weights_keeps_block_style_and_comments_and_adds_a_missing_weight() -> None:
    text = """\
graphs:
  g:
    steps:
      - name: s  # the split
        splitter:
          branches:
            - name: a   # stable
              service: model_a
            - name: b
              weight: 3
              service: model_b
"""
    new = set_splitter_weights(text, "g", "s", {"a": 4, "b": 6})

    assert sorted(changed_lines(text, new)) == sorted(
        [
            "-            - name: a   # stable",
            "+            - weight: 4",
            "+              name: a   # stable",
            "-              weight: 3",
            "+              weight: 6",
        ]
    )
    assert weights_in(new, "g", "s") == {"a": 4, "b": 6}


def test_set_weights_finds_a_splitter_nested_in_another_step() -> None:
    text = """\
graphs:
  g:
    steps:
      - name: fan
        ensemble:
          branches:
            - name: inner
              splitter:
                branches:
                  - {name: x, weight: 1, service: model_a}
                  - {name: y, weight: 1, service: model_a_canary}
"""
    new = set_splitter_weights(text, "g", "inner", {"y": 0})

    assert weights_in(new, "g", "inner") == {"x": 1, "y": 0}


def test_parse_weights() -> None:
    assert parse_weights(" a=1 , b=0") == {"a": 1, "b": 0}
    for bad in ("", "a", "=1", "a=1.5", "a=1,a=2"):
        with pytest.raises(UsageError):
            parse_weights(bad)


def test_splitter_branches_reports_services() -> None:
    assert splitter_branches(SPEC, "digits-parallel", "mlp") == [
        Branch("mlp-stable", 90, "model_a"),
        Branch("mlp-canary", 10, "model_a_canary"),
    ]


def test_invalid_spec_is_a_failure_not_a_usage_error() -> None:
    with pytest.raises(RolloutError) as caught:
        set_splitter_weights("graphs: [unclosed", "g", "s", {"a": 1})
    assert not isinstance(caught.value, UsageError)


# --------------------------------------------------------------------------------------------
# status


def test_status_reports_versions_replicas_graphs_and_weights(cluster: FakeCluster) -> None:
    never_ready(cluster, "model-b", 0)

    result = run(cluster, "status")

    assert result.code == EXIT_OK, result.err
    rows = {line.split()[0]: line.split() for line in result.out.splitlines()[1:6]}
    assert set(rows) == {"preprocess", "model-a", "model-a-canary", "model-b", "orchestrator"}
    assert rows["model-a-canary"][1:5] == ["onnxmesh/model-a:0.2.0", "0.2.0", "1/1", "1"]
    assert rows["model-a"][1:4] == ["onnxmesh/model-a:0.1.0", "0.1.0", "2/2"]
    assert rows["model-a"][-1] == "complete"
    assert " ".join(rows["model-b"][6:]) == "1 of 2 replicas updated"
    assert "  model-a (model_a): digits-parallel, digits-serial" in result.out
    assert "  model-a-canary (model_a_canary): digits-parallel" in result.out
    assert (
        "digits-parallel/mlp: mlp-stable=90 (90%) -> model-a, mlp-canary=10 (10%) -> model-a-canary"
        in result.out
    )
    assert "digits-parallel/shadowed: model-b answers, model-b-canary shadows" in result.out


def test_status_json(cluster: FakeCluster) -> None:
    result = run(cluster, "status", "-o", "json")

    data = json.loads(result.out)
    assert [c["name"] for c in data["components"]] == [
        "model-a",
        "model-a-canary",
        "model-b",
        "orchestrator",
        "preprocess",
    ]
    assert data["splitters"][0]["branches"][1] == {
        "name": "mlp-canary",
        "weight": 10,
        "service": "model_a_canary",
    }
    assert data["service_components"]["model_b_canary"] == "model-b-canary"  # no env: by convention


def test_status_without_a_graph_spec_still_lists_deployments(cluster: FakeCluster) -> None:
    del cluster.config_maps["onnxmesh-graphs"]

    result = run(cluster, "status")

    assert result.code == EXIT_OK
    assert "model-a-canary" in result.out
    assert "note: graph spec unavailable" in result.out


def test_status_of_a_spec_the_orchestrator_rejects_says_why(cluster: FakeCluster) -> None:
    cluster.config_maps["onnxmesh-graphs"]["data"]["graphs.yaml"] = SPEC.replace(
        "service: model_b, model: digits-head", "service: nowhere, model: digits-head"
    )

    result = run(cluster, "status")

    assert result.code == EXIT_OK
    assert "model-a-canary" in result.out and "SPLITTERS" not in result.out
    assert "note: graph spec unavailable: the orchestrator rejects the spec" in result.out
    assert "nowhere" in result.out


def test_service_components_reads_the_orchestrator_environment(cluster: FakeCluster) -> None:
    mapping = service_components(parse_spec(SPEC), cluster.deployments["orchestrator"])

    assert mapping == {
        "preprocess": "preprocess",
        "model_a": "model-a",
        "model_b": "model-b",
        "model_a_canary": "model-a-canary",
        "model_b_canary": "model-b-canary",
    }


# --------------------------------------------------------------------------------------------
# Command line


def test_command_lines_parse() -> None:
    args = build_parser().parse_args(["canary", "g", "s", "--weights", "stable=9,canary=1", "-n", "mesh"])

    assert (args.rollout_command, args.graph, args.step, args.namespace) == ("canary", "g", "s", "mesh")
    assert (args.configmap, args.graphs_key, args.orchestrator) == (
        "onnxmesh-graphs",
        "graphs.yaml",
        "orchestrator",
    )


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["canary", "g", "s"],  # --weights is required
        ["set-image", "model-a"],
        ["set-image", "model-a", "onnxmesh/model-a:1", "--timeout", "0"],
        ["status", "-o", "yaml"],
    ],
)
def test_bad_command_lines_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        build_parser().parse_args(argv)
    assert caught.value.code == EXIT_USAGE


# --------------------------------------------------------------------------------------------
# A short API outage during the wait


def test_the_wait_rides_out_a_short_api_outage_with_back_off(cluster: FakeCluster, clock: FakeClock) -> None:
    cluster.controller = outage(range(1, 5))  # four reads fail: the API server restarts

    result = run(cluster, "set-image", "model-a", "onnxmesh/model-a:0.2.0", "--timeout", "120", clock=clock)

    assert result.code == EXIT_OK, result.err
    assert clock.sleeps == [1.0, 2.0, 4.0, 8.0]
    assert "does not answer" in result.out and "answers again (after 15s)" in result.out
    assert result.out.strip().endswith("rollout complete")


def test_an_outage_longer_than_the_timeout_fails_saying_the_rollout_goes_on(
    cluster: FakeCluster, clock: FakeClock
) -> None:
    cluster.controller = outage(range(1, 1000), status=503)

    result = run(cluster, "set-image", "model-a", "onnxmesh/model-a:0.2.0", "--timeout", "30", clock=clock)

    assert result.code == EXIT_FAILURE
    assert sum(clock.sleeps) == pytest.approx(30.0)
    assert "not complete after 30s" in result.err and "has not answered for the last 30s" in result.err
    assert "kubectl -n onnxmesh rollout status deployment/model-a" in result.err


def test_an_api_refusal_during_the_wait_is_not_retried(cluster: FakeCluster, clock: FakeClock) -> None:
    cluster.controller = outage(range(1, 1000), status=403)

    result = run(cluster, "set-image", "model-a", "onnxmesh/model-a:0.2.0", clock=clock)

    assert result.code == EXIT_FAILURE
    assert clock.sleeps == []


# --------------------------------------------------------------------------------------------
# Hints that name what exists


def test_set_image_of_an_unknown_deployment_names_the_ones_there_and_the_likely_one(
    cluster: FakeCluster,
) -> None:
    result = run(cluster, "set-image", "model_a", "onnxmesh/model-a:0.2.0")

    assert result.code == EXIT_USAGE
    assert "no deployment 'model_a' in namespace onnxmesh; did you mean 'model-a'?" in result.err
    assert "(Deployments: model-a, model-a-canary, model-b, orchestrator, preprocess)" in result.err
    assert cluster.patches == []


def test_canary_on_a_spec_without_splitters_says_which_overlay_has_them(cluster: FakeCluster) -> None:
    # The spec the dev and production overlays deploy.
    cluster.config_maps["onnxmesh-graphs"]["data"]["graphs.yaml"] = (
        REPO / "k8s/base/graphs.yaml"
    ).read_text()

    result = run(cluster, "canary", "digits-serial", "mlp", "--weights", "stable=90,canary=10")

    assert result.code == EXIT_USAGE
    assert "step 'mlp' of graph 'digits-serial' is not a splitter" in result.err
    assert "kubectl apply -k k8s/overlays/dev-canary" in result.err
    assert cluster.replaced == []


def test_canary_with_a_typo_lists_the_steps_and_the_splitters_not_the_inputs(cluster: FakeCluster) -> None:
    result = run(cluster, "canary", "digits-parallel", "mpl", "--weights", "stable=1")

    assert result.code == EXIT_USAGE
    steps = result.err.split("its steps: ", 1)[1].split(")", 1)[0].split(", ")
    assert steps == ["head", "head-next", "mlp", "mlp-canary", "mlp-stable", "pre", "shadowed"]
    assert "splitter steps in the spec: digits-parallel/mlp" in result.err
