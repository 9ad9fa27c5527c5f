"""Drift end to end: a reference from captured held-out digits, then held-out and distorted traffic
through real processes on 127.0.0.1; the orchestrator's gauge and `onnxmesh capture drift` agree
on which side of the threshold each lies."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import numpy as np
import yaml

from demo import digits
from jobs import cli as jobs_cli
from meshctl.launcher import EPHEMERAL_PORTS, LocalMesh
from tests.e2e.capture_support import count, send
from tests.support import ROOT, metric_total, until

HOLDOUT = digits.load_holdout()
THRESHOLD = 0.2  # the alert's (k8s/components/observability/prometheusrule.yaml)
GRAPH = "digits-serial"


def cli(*args: str) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert jobs_cli.main(["capture", *args]) == 0
    return out.getvalue()


def cli_psi(db: Path, tensor: str, reference: Path, window: int) -> float:
    line = cli(
        "drift",
        "--db",
        str(db),
        "--graph",
        GRAPH,
        "--tensor",
        tensor,
        "--reference",
        str(reference),
        "--window",
        str(window),
    )
    return float(line.split("PSI ")[1].split()[0])


def test_held_out_traffic_stays_under_the_threshold_and_inverted_images_cross_it(tmp_path: Path) -> None:
    spec = yaml.safe_load((ROOT / "demo/mesh.yaml").read_text())
    spec["graphs"][GRAPH]["capture"] = {"rate": 1.0}
    spec["graphs"][GRAPH]["drift"] = {
        "input.image": {"reference": "image.json", "window": 100},
        "output.label": {"reference": "label.json", "window": 150},
    }
    (tmp_path / "graphs.yaml").write_text(yaml.safe_dump(spec))
    db = tmp_path / "captures.sqlite"
    with LocalMesh(
        ports=EPHEMERAL_PORTS,
        graphs=tmp_path / "graphs.yaml",
        extra_args={"orchestrator": ["--metrics-port", "0"]},
        env={"ONNXMESH_CAPTURE_DB": str(db), "ONNXMESH_DRIFT_INTERVAL": "0.2"},
    ) as mesh:
        address = mesh.address("orchestrator")
        port = mesh.process("orchestrator").metrics_port
        assert port is not None

        def gauge(tensor: str) -> float:
            return metric_total(port, "onnxmesh_drift_psi", graph=GRAPH, tensor=tensor)

        # The reference: the first half of the held-out digits, captured.
        send(address, GRAPH, list(HOLDOUT.images[:180]), prefix="ref")
        until(lambda: count(db, GRAPH) == 180, "the reference window", timeout=30)
        for tensor, name in (("input.image", "image.json"), ("output.label", "label.json")):
            cli(
                "reference",
                "--db",
                str(db),
                "--graph",
                GRAPH,
                "--tensor",
                tensor,
                "--out",
                str(tmp_path / name),
            )

        # Live: the other half.
        send(address, GRAPH, list(HOLDOUT.images[180:]), prefix="live")
        until(lambda: count(db, GRAPH) == 360, "the live window", timeout=30)
        held_out = cli_psi(db, "input.image", tmp_path / "image.json", 100)
        assert held_out < THRESHOLD / 2, held_out
        until(lambda: 0 < gauge("input.image") < THRESHOLD, "the gauge of held-out traffic", timeout=30)

        # Distorted: the same digits inverted (ink <-> paper).
        inverted = [digits.PIXEL_MAX - image for image in HOLDOUT.images[180:330]]
        send(address, GRAPH, inverted, prefix="inverted")
        until(lambda: count(db, GRAPH) == 510, "the inverted window", timeout=30)
        assert cli_psi(db, "input.image", tmp_path / "image.json", 100) > THRESHOLD
        assert cli_psi(db, "output.label", tmp_path / "label.json", 150) > THRESHOLD
        until(lambda: gauge("input.image") > THRESHOLD, "the gauge to cross the threshold", timeout=30)
        until(lambda: gauge("output.label") > THRESHOLD, "the label gauge to cross the threshold", timeout=30)

        # Noisy: held-out digits with strong pixel noise cross it too.
        rng = np.random.default_rng(7)
        noisy = [
            np.clip(image.astype(np.int16) + rng.integers(-8, 9, image.shape), 0, digits.PIXEL_MAX).astype(
                np.uint8
            )
            for image in HOLDOUT.images[180:300]
        ]
        send(address, GRAPH, noisy, prefix="noisy")
        until(lambda: count(db, GRAPH) == 630, "the noisy window", timeout=30)
        assert cli_psi(db, "input.image", tmp_path / "image.json", 100) > THRESHOLD
