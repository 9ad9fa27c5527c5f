"""`onnxmesh rollout` through the real kubernetes client, its transport answered by the fake cluster:
the field manager on every write, an unreachable API ridden out, the kubeconfig flag."""

from __future__ import annotations

import io
import urllib.parse
from pathlib import Path

import pytest
import yaml

from meshctl.rollout.cli import build_parser, run_rollout
from meshctl.rollout.cluster import KubernetesClusterApi, Obj
from meshctl.rollout.errors import EXIT_FAILURE, EXIT_OK
from tests.unit.rollout_fakes import (
    NS,
    FakeClock,
    FakeCluster,
    client_over_fake,
    mesh_cluster,
    ready_after,
    weights_in,
)


@pytest.fixture
def cluster() -> FakeCluster:
    return mesh_cluster()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def test_every_write_is_made_as_field_manager_onnxmesh(cluster: FakeCluster, clock: FakeClock) -> None:
    cluster.controller = ready_after(2)
    wire = client_over_fake(cluster)
    api = KubernetesClusterApi(NS, api_client=wire)
    out, err = io.StringIO(), io.StringIO()

    for argv in (
        ["set-image", "model-a", "onnxmesh/model-a:0.2.0"],
        ["canary", "digits-parallel", "mlp", "--weights", "stable=50,canary=50"],
    ):
        code = run_rollout(build_parser().parse_args(argv), api=api, clock=clock, out=out, err=err)
        assert code == EXIT_OK, err.getvalue()

    writes = [(method, url) for method, url in wire.requests if method not in ("GET", "HEAD")]
    assert [method for method, _ in writes] == ["PATCH", "PUT"]
    for _, url in writes:
        assert urllib.parse.parse_qs(urllib.parse.urlsplit(url).query)["fieldManager"] == ["onnxmesh"]
    assert weights_in(cluster.graphs_text()) == {"mlp-stable": 50, "mlp-canary": 50}


def test_an_unreachable_api_through_the_real_client_is_ridden_out(
    cluster: FakeCluster, clock: FakeClock
) -> None:
    cluster.controller = ready_after(1)
    wire = client_over_fake(cluster)
    api = KubernetesClusterApi(NS, api_client=wire)
    # The patch goes through; then the server is away for three reads.
    original = cluster.patch_deployment

    def patch_then_go_away(name: str, patch: Obj) -> Obj:
        wire.down = 3
        return original(name, patch)

    cluster.patch_deployment = patch_then_go_away  # type: ignore[method-assign]
    out, err = io.StringIO(), io.StringIO()
    args = build_parser().parse_args(["set-image", "model-b", "onnxmesh/model-b:0.2.0", "--timeout", "120"])

    assert run_rollout(args, api=api, clock=clock, out=out, err=err) == EXIT_OK, err.getvalue()
    assert "cannot reach the Kubernetes API" in out.getvalue()
    assert clock.sleeps[:3] == [1.0, 2.0, 4.0]


def test_kubeconfig_flag_names_the_file_that_is_read(tmp_path: Path) -> None:
    args = build_parser().parse_args(["status", "--kubeconfig", str(tmp_path / "nope.yaml")])
    assert args.kubeconfig == str(tmp_path / "nope.yaml")
    err = io.StringIO()

    assert run_rollout(args, err=err, out=io.StringIO()) == EXIT_FAILURE
    assert f"cannot load kubeconfig {tmp_path / 'nope.yaml'}" in err.getvalue()

    kubeconfig = tmp_path / "config.yaml"
    kubeconfig.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "c", "cluster": {"server": "https://127.0.0.1:1"}}],
                "users": [{"name": "u", "user": {"token": "t"}}],
                "contexts": [{"name": "mine", "context": {"cluster": "c", "user": "u"}}],
                "current-context": "mine",
            }
        )
    )
    # Loads (nothing is called yet), and a context the file lacks is named in the error.
    KubernetesClusterApi(NS, None, str(kubeconfig))
    args = build_parser().parse_args(["status", "--kubeconfig", str(kubeconfig), "--context", "theirs"])
    err = io.StringIO()
    assert run_rollout(args, err=err, out=io.StringIO()) == EXIT_FAILURE
    assert f"cannot load kubeconfig {kubeconfig}" in err.getvalue() and "theirs" in err.getvalue()
