"""The Grafana dashboard, the alerting rules and their Kubernetes component, checked as data.

Every PromQL expression is parsed with a real PromQL parser and may only select series the
nodes register (their registries are built here exactly as a node builds them); the rules pass
`promtool check rules`; the component renders with `kubectl kustomize` on top of the base and
its PodMonitor selects the nodes' pods by their metrics port. The end-to-end test of tracing
checks the same expressions against what four real processes expose, labels included.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import promql_parser
import pytest
import yaml

from orchestrator.node import OrchestratorMetrics
from services.common.observability.metrics import ServerMetrics
from tests.support import (
    COMPONENT,
    ROOT,
    RULES,
    dashboard,
    expressions,
    kustomize,
    rule_groups,
    selectors,
    tool,
)

SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}


def registered_series() -> set[str]:
    """Every series name an orchestrator's registry (which holds every node's series) can expose."""
    base = ServerMetrics("orchestrator")
    OrchestratorMetrics(base)
    names = set()
    for family in base.registry.collect():
        for suffix in SUFFIXES.get(family.type, ("",)):
            names.add(family.name + suffix)
        names.update(sample.name for sample in family.samples)  # process_* and friends
    return names


def test_the_dashboard_is_a_grafana_dashboard() -> None:
    board = dashboard()
    assert board["uid"] == "onnxmesh" and board["schemaVersion"] >= 36
    ids = [panel["id"] for panel in board["panels"]]
    assert len(ids) == len(set(ids))
    titles = {panel["title"] for panel in board["panels"]}
    for wanted in (
        "Request rate by graph",
        "Errors by code",
        "Latency p50 / p99 by graph",
        "Step latency p50 / p99",
        "Orchestrator's own time p50 / p99",
        "Batch size (rows per predict)",
        "Batching queue depth",
        "CPU per node",
        "Memory per node",
    ):
        assert wanted in titles
    for panel in board["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["description"] and panel["fieldConfig"]["defaults"]["unit"], panel["title"]
        assert panel["targets"] and panel["datasource"]["uid"] == "${datasource}", panel["title"]
    variables = {v["name"] for v in board["templating"]["list"]}
    assert variables == {"datasource", "graph"}


def test_every_expression_parses_and_selects_registered_series() -> None:
    known = registered_series()
    checked = 0
    for where, expr in expressions():
        for name, _ in selectors(expr):
            assert name in known, f"{where} selects {name}, which no node exports"
            checked += 1
    assert checked >= 25


def test_a_wrong_metric_name_would_be_caught() -> None:
    assert selectors('sum by (model) (rate(onnxmesh_request_total{code="OK"}[$__rate_interval]))') == [
        ("onnxmesh_request_total", {"code", "model"})
    ]
    assert "onnxmesh_request_total" not in registered_series()
    with pytest.raises(ValueError, match="parenthesis"):
        promql_parser.parse("sum by (model (rate(onnxmesh_requests_total[5m]))")


def test_the_alerts_say_what_and_how_bad() -> None:
    alerts = [rule for group in rule_groups() for rule in group["rules"]]
    assert {a["alert"] for a in alerts} >= {
        "OnnxmeshHighErrorRatio",
        "OnnxmeshHighLatencyP99",
        "OnnxmeshNodeNotReady",
    }
    for alert in alerts:
        assert re.fullmatch(r"\d+m", alert["for"]), alert["alert"]
        assert alert["labels"]["severity"] in ("warning", "critical")
        assert alert["annotations"]["summary"] and alert["annotations"]["description"]


def test_the_rules_pass_promtool(tmp_path: Path) -> None:
    rules = tmp_path / "onnxmesh.rules.yml"
    rules.write_text(yaml.safe_dump(yaml.safe_load(RULES.read_text())["spec"]))
    checked = subprocess.run(
        [tool("promtool", "make promtool"), "check", "rules", str(rules)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "SUCCESS: 5 rules found" in checked.stdout


def test_the_component_renders_on_the_base(tmp_path: Path) -> None:
    overlay = tmp_path / "overlay"
    overlay.mkdir()
    base = os.path.relpath(ROOT / "k8s/base", overlay)
    component = os.path.relpath(COMPONENT, overlay)
    (overlay / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                "resources": [base],
                "components": [component],
            }
        )
    )
    objects = kustomize(overlay)
    by_kind: dict[str, list[dict[str, Any]]] = {}
    for obj in objects:
        by_kind.setdefault(obj["kind"], []).append(obj)
    (board,) = [c for c in by_kind["ConfigMap"] if c["metadata"]["name"] == "onnxmesh-dashboard"]
    assert board["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert board["metadata"]["namespace"] == "onnxmesh"
    assert json.loads(board["data"]["onnxmesh.json"]) == dashboard()
    (monitor,) = by_kind["PodMonitor"]
    (rule,) = by_kind["PrometheusRule"]
    assert rule["metadata"]["namespace"] == monitor["metadata"]["namespace"] == "onnxmesh"
    # The PodMonitor selects every node's pods, and each of them names the port it scrapes.
    (selected,) = monitor["spec"]["selector"]["matchExpressions"]
    port = monitor["spec"]["podMetricsEndpoints"][0]["port"]
    deployments = [d for d in by_kind["Deployment"] if d["metadata"]["name"] in selected["values"]]
    assert {d["metadata"]["name"] for d in deployments} == set(selected["values"])
    for deployment in deployments:
        template = deployment["spec"]["template"]
        assert template["metadata"]["labels"]["app.kubernetes.io/name"] in selected["values"]
        ports = {p["name"] for c in template["spec"]["containers"] for p in c.get("ports", ())}
        assert port in ports, deployment["metadata"]["name"]


def test_the_drift_alert_fires_in_promtools_rule_test(tmp_path: Path) -> None:
    rules = tmp_path / "onnxmesh.rules.yml"
    rules.write_text(yaml.safe_dump(yaml.safe_load(RULES.read_text())["spec"]))
    series = 'onnxmesh_drift_psi{namespace="onnxmesh",pod="o-1",graph="digits-serial",tensor="%s"}'
    test = {
        "rule_files": [rules.name],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                # input.image drifts from minute 10 on; output.label stays under the threshold.
                "input_series": [
                    {"series": series % "input.image", "values": "0.05x9 0.6x30"},
                    {"series": series % "output.label", "values": "0.05x40"},
                ],
                "alert_rule_test": [
                    {"eval_time": "20m", "alertname": "OnnxmeshDrift", "exp_alerts": []},  # not yet 15m
                    {
                        "eval_time": "30m",
                        "alertname": "OnnxmeshDrift",
                        "exp_alerts": [
                            {
                                "exp_labels": {
                                    "severity": "warning",
                                    "namespace": "onnxmesh",
                                    "graph": "digits-serial",
                                    "tensor": "input.image",
                                },
                                "exp_annotations": {
                                    "summary": "digits-serial input.image: drift PSI 0.60",
                                    "description": yaml.safe_load(RULES.read_text())["spec"]["groups"][0][
                                        "rules"
                                    ][-1]["annotations"]["description"]
                                    .replace("{{ $labels.graph }}", "digits-serial")
                                    .replace("{{ $labels.tensor }}", "input.image"),
                                },
                            }
                        ],
                    },
                ],
            }
        ],
    }
    (tmp_path / "drift.test.yml").write_text(yaml.safe_dump(test))
    done = subprocess.run(
        [tool("promtool", "make promtool"), "test", "rules", "drift.test.yml"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr
