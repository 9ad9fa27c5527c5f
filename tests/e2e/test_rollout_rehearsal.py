"""Rollouts rehearsed locally with traffic flowing: a rolling update and a canary weight change."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from meshctl.launcher import EPHEMERAL_PORTS, LocalMesh
from meshctl.rehearsal import Traffic, rehearse, versioned_copy
from tests.support import ROOT, metric_total, until


def test_rolling_update_loses_no_request_and_moves_to_the_new_version() -> None:
    result = rehearse(concurrency=4)
    assert result.requests_failed == 0, result.errors
    assert result.requests_sent >= 500
    assert result.share_new_version_at_end == 1.0
    print(result)


def canary_spec(stable: int, canary: int) -> str:
    spec = yaml.safe_load((ROOT / "demo/mesh.yaml").read_text())
    graph = spec["graphs"]["digits-serial"]
    mlp = graph["steps"][1]
    branch = {key: mlp[key] for key in ("service", "model", "inputs")}
    graph["steps"][1] = {
        "name": "mlp",
        "splitter": {
            "branches": [
                {"weight": stable, "name": "mlp-stable", "version": "1", **branch},
                {"weight": canary, "name": "mlp-canary", "version": "2", **branch},
            ]
        },
    }
    spec["graphs"] = {"digits-canary": graph}
    return yaml.safe_dump(spec)


def observed_canary_share(traffic: Traffic, requests: int) -> float:
    """Share of version 2 among the next `requests` answers (stable = version 1)."""
    start = len(traffic.report.versions)
    traffic.wait_for(requests)
    window = [v for _, v in traffic.report.versions[start:]]
    return sum(v == "2" for v in window) / len(window)


def test_canary_weights_change_by_config_without_restart_or_failures(tmp_path: Path) -> None:
    # model_a serves digits-mlp versions 1 and 2; the graph splits between them by weight.
    model_dir = versioned_copy(ROOT / "services/model_a/models", "digits-mlp", "2", tmp_path / "models")
    for item in (ROOT / "services/model_a/models/digits-mlp").iterdir():
        if item.name == "1":
            (model_dir / "digits-mlp" / "1").symlink_to(item)
    spec = tmp_path / "graphs.yaml"
    spec.write_text(canary_spec(90, 10))
    with LocalMesh(
        ports=EPHEMERAL_PORTS,
        graphs=spec,
        model_dirs={"model_a": model_dir},
        extra_args={"orchestrator": ["--reload-interval", "0.2", "--metrics-port", "0"]},
    ) as mesh:
        orchestrator = mesh.process("orchestrator")
        metrics_port = orchestrator.metrics_port
        assert metrics_port is not None

        def applied() -> float:
            return metric_total(metrics_port, "onnxmesh_spec_reloads_total", result="applied")

        target = mesh.address("orchestrator")
        with Traffic(target, "digits-canary", steps=["mlp-stable", "mlp-canary"], concurrency=4) as traffic:
            first = observed_canary_share(traffic, 600)
            reloads = applied()
            spec.write_text(canary_spec(50, 50))  # what `onnxmesh rollout canary` does to the ConfigMap
            until(lambda: applied() > reloads, "the orchestrator to apply the new weights")
            second = observed_canary_share(traffic, 600)
            report = traffic.stop()
        assert mesh.process("orchestrator").pid == orchestrator.pid  # no restart
    assert report.failed == 0, report.errors
    # Binomial standard deviation over 600 draws is about 0.012 at 10% and 0.02 at 50%.
    assert first == pytest.approx(0.10, abs=0.06), first
    assert second == pytest.approx(0.50, abs=0.10), second
