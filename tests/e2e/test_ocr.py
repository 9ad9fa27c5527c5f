"""The OCR example (examples/ocr) end to end: its mesh file checked and rendered, its mesh up as
real processes on 127.0.0.1 (free ports, always stopped), and its answers compared with the
reference pipeline, RapidOCR() in this process, on images rendered here with Pillow's default
scalable font.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import sqlite3
import struct
import sys
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import kubernetes_validate
import numpy as np
import pytest
import yaml

from bench.ocr import page
from proto.gen.inference import grpc_predict_v2_pb2 as pb
from services.common.errors import InvalidInput
from services.common.grpc.client import OipClient
from tests.e2e.ocr_support import EXAMPLE, fetch_models
from tests.e2e.tutorial import Mesh, run
from tests.support import K8S_VERSION, stub, until

# The reference pipeline: the dev extra installs it wherever its wheel supports the Python
# (before 3.13), so there a missing one is a broken set-up and fails; past that it is not installable.
if sys.version_info >= (3, 13):
    pytest.skip("rapidocr-onnxruntime 1.4.4 has no wheel for Python 3.13+", allow_module_level=True)
from rapidocr_onnxruntime import RapidOCR

SERVICES = ("decode", "detect", "boxes", "angle", "rotate", "recognize", "ctc")
#: Boxes are whole pixels on both sides; a pixel or two of rounding apart is the same box.
BOX_PIXELS = 3.0


IMAGES = {
    "sizes": page(
        [
            ("Invoice 2026-12-07", 18),
            ("Total due: 1,234.50 EUR", 28),
            ("Mesh reads pages", 40),
            ("PP-OCRv4", 56),
        ]
    ),
    "jpeg": page([("Quality control passed", 30), ("Batch 42 of 96", 30)], fmt="JPEG"),
    "upside-down": page([("Turned upside down", 36), ("Second line here", 36)], angle=180),
    "tilted": page([("A slightly tilted line", 32)], size=(640, 160), angle=7),
    "blank": page([]),
    "large": page([("A large page", 72), ("with lines far apart", 64)], size=(2600, 1700)),
}

WORDS = [
    "alpha",
    "bravo",
    "charlie",
    "delta",
    "echo",
    "foxtrot",
    "golf",
    "hotel",
    "india",
    "juliet",
    "kilo",
    "lima",
    "mike",
    "november",
    "oscar",
    "papa",
]


@pytest.fixture(scope="module")
def models() -> None:
    fetch_models()


@pytest.fixture(scope="module")
def reference(models: None) -> Any:
    return RapidOCR()


@pytest.fixture(scope="module")
def mesh(models: None) -> Iterator[Mesh]:
    running = Mesh(EXAMPLE)
    try:
        running.ready()
        yield running
    finally:
        running.stop()
    assert running.proc.returncode == 0


def ocr(address: str, images: list[bytes], graph: str = "ocr") -> list[dict[str, Any]]:
    """Each image through a graph (`ocr` unless said), all at once."""

    async def main() -> list[dict[str, Any]]:
        async with OipClient(address) as client:
            results = await asyncio.gather(
                *(
                    client.infer(graph, {"image": np.array([data], dtype=object)}, timeout=120)
                    for data in images
                )
            )
        return [{**r.outputs, "parameters": r.parameters} for r in results]

    return asyncio.run(main())


def expected(reference: Any, data: bytes) -> tuple[list[str], np.ndarray, np.ndarray]:
    found, _ = reference(data)
    found = found or []
    return (
        [text for _, text, _ in found],
        np.array([box for box, _, _ in found], dtype=np.float32).reshape(-1, 4, 2),
        np.array([score for _, _, score in found], dtype=np.float32),
    )


def test_the_mesh_file_passes_check(models: None) -> None:
    checked = run(EXAMPLE, "onnxmesh", "check", "mesh.yaml")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert (
        "graph ocr: ok  (image BYTES[1]) -> (texts BYTES[-1], boxes FP32[-1, 4, 2], scores FP32[-1])"
        in checked.stdout
    )


def test_its_manifests_render_and_validate_strictly(tmp_path: Path) -> None:
    rendered = run(EXAMPLE, "onnxmesh", "k8s", "mesh.yaml", "--out", str(tmp_path))
    assert rendered.returncode == 0, rendered.stderr
    kinds = []
    for path in sorted(tmp_path.glob("*.yaml")):
        if path.name in ("kustomization.yaml", "graphs.yaml"):
            continue
        for obj in yaml.safe_load_all(path.read_text()):
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
            kinds.append((obj["kind"], obj["metadata"]["name"]))
    for name in (*SERVICES, "orchestrator"):
        assert ("Deployment", name) in kinds and ("Service", name) in kinds


@pytest.mark.parametrize("name", list(IMAGES))
def test_texts_and_boxes_equal_the_reference(name: str, mesh: Mesh, reference: Any) -> None:
    (answer,) = ocr(mesh.orchestrator, [IMAGES[name]])
    texts, boxes, scores = expected(reference, IMAGES[name])
    assert [t.decode() for t in answer["texts"]] == texts
    np.testing.assert_allclose(answer["boxes"], boxes, atol=BOX_PIXELS)
    np.testing.assert_allclose(answer["scores"], scores, atol=0.02)
    if name == "blank":
        assert texts == [] and answer["boxes"].shape == (0, 4, 2)
    else:
        assert texts, f"the reference reads nothing on {name!r}: the image does not test anything"
    parameters = answer["parameters"]
    assert all(parameters[f"step.{step}"] == "ok" for step in ("pre", "det", "lines", "rec", "text"))


def test_a_non_image_is_invalid_argument_naming_the_input(mesh: Mesh) -> None:
    with pytest.raises(InvalidInput) as info:
        ocr(mesh.orchestrator, [b"%PDF-1.7 certainly not a picture"])
    assert "'image'" in str(info.value) and "not a PNG or JPEG image" in str(info.value)


def model_calls(address: str, model: str) -> tuple[int, int]:
    """A model's (requests, model calls) so far, from its node's Triton statistics."""
    with stub(address) as api:
        (stats,) = api.ModelStatistics(pb.ModelStatisticsRequest(name=model)).model_stats
    return stats.inference_count, stats.execution_count


def endpoint(mesh: Mesh, service: str) -> tuple[str, int]:
    """A service's first replica: its gRPC address and pid, from `onnxmesh up`'s table."""
    pattern = re.compile(rf"\s*{service}-1\s+grpc (\S+)\s.*pid (\d+)")
    ((address, pid),) = (m.groups() for line in mesh.seen if (m := pattern.match(line)))
    return address, int(pid)


def test_concurrent_pages_each_get_their_own_lines_when_batched_together(mesh: Mesh, reference: Any) -> None:
    # Pages of one to four short lines (so their lines have the recognizer's one width and can
    # share a call), each page's lines its own words.
    pages = [
        page([(WORDS[(2 * i + j) % len(WORDS)] + f" {i}{j}", 30) for j in range(i % 4 + 1)], size=(420, 320))
        for i in range(8)
    ]
    wanted = [expected(reference, data)[0] for data in pages]
    assert len({tuple(t) for t in wanted}) == len(pages) and all(wanted)
    recognizer, recognizer_pid = endpoint(mesh, "recognize")
    rotate, _ = endpoint(mesh, "rotate")
    before = model_calls(recognizer, "ppocr-rec")
    turned = model_calls(rotate, "ocr-rotate")[0]
    # The recognizer is held (SIGSTOP) until every page has gone through the step before it, so
    # that their lines wait for it together, whatever the machine's speed; then it goes on.
    os.kill(recognizer_pid, signal.SIGSTOP)
    try:
        with ThreadPoolExecutor(1) as pool:
            answering = pool.submit(ocr, mesh.orchestrator, pages)
            deadline = time.monotonic() + 120
            while model_calls(rotate, "ocr-rotate")[0] < turned + len(pages) and time.monotonic() < deadline:
                time.sleep(0.05)  # poll interval of the wait for every page to reach the held step
            os.kill(recognizer_pid, signal.SIGCONT)
            answers = answering.result(timeout=180)
    finally:
        os.kill(recognizer_pid, signal.SIGCONT)
    for answer, texts in zip(answers, wanted, strict=True):
        assert [t.decode() for t in answer["texts"]] == texts
    calls = model_calls(recognizer, "ppocr-rec")[1] - before[1]
    assert calls < len(pages), f"the recognizer read {len(pages)} pages in {calls} calls: none shared"


def test_a_stock_tritonclient_reads_the_rendered_line(mesh: Mesh) -> None:
    # tritonclient registers the same protobuf package as our stubs: its own process, as a user's.
    called = run(EXAMPLE, sys.executable, "client.py", mesh.orchestrator)
    assert called.returncode == 0, called.stderr
    assert called.stdout.startswith("'Hello from the mesh'  score 0.9"), called.stdout


def test_rest_with_the_binary_data_extension_reads_a_page(mesh: Mesh, reference: Any) -> None:
    (rest,) = (
        m[1] for line in mesh.seen if (m := re.match(r"\s*orchestrator-1\s+grpc \S+\s+rest (\S+)", line))
    )
    data = IMAGES["sizes"]
    # A BYTES element in binary: its length (4 bytes, little-endian), then its bytes.
    blob = struct.pack("<I", len(data)) + data
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "image",
                    "datatype": "BYTES",
                    "shape": [1],
                    "parameters": {"binary_data_size": len(blob)},
                }
            ]
        }
    ).encode()
    request = urllib.request.Request(
        f"http://{rest}/v2/models/ocr/infer",
        header + blob,
        {"Inference-Header-Content-Length": str(len(header)), "Content-Type": "application/octet-stream"},
    )
    with urllib.request.urlopen(request, timeout=120) as response:
        outputs = {o["name"]: o for o in json.loads(response.read())["outputs"]}
    texts, boxes, _ = expected(reference, data)
    assert outputs["texts"]["data"] == texts
    np.testing.assert_allclose(np.reshape(outputs["boxes"]["data"], (-1, 4, 2)), boxes, atol=BOX_PIXELS)


def test_batch_over_a_folder_of_pages_stores_the_online_answers(mesh: Mesh, tmp_path: Path) -> None:
    # One dataset row = one request (the graph's input is BYTES [1]); each page's lines, however
    # many, are stored whole as its row's outputs.
    folder = tmp_path / "pages"
    (folder / "scans").mkdir(parents=True)
    files = {
        "a.png": IMAGES["sizes"],
        "b.jpg": IMAGES["jpeg"],
        "blank.png": IMAGES["blank"],
        "scans/c.png": IMAGES["upside-down"],
    }
    for name, data in files.items():
        (folder / name).write_bytes(data)
    (folder / "notes.txt").write_text("not a row")
    db = tmp_path / "ocr.db"
    command = ("onnxmesh", "batch", "ocr", str(folder), "--db", str(db), "--target", mesh.orchestrator)
    batched = run(EXAMPLE, *command, "--progress", "off", "--timeout", "120")
    assert batched.returncode == 0, batched.stdout + batched.stderr
    assert "predicted now:     4 in 4 requests" in batched.stdout, batched.stdout
    online = dict(zip(files, ocr(mesh.orchestrator, list(files.values())), strict=True))
    with sqlite3.connect(db) as conn:
        stored = {
            key: (status, json.loads(outputs))
            for key, status, outputs in conn.execute(
                "SELECT row_key, status, outputs FROM predictions WHERE dataset = 'pages' AND graph = 'ocr'"
            )
        }
    assert sorted(stored) == sorted(files)
    for name, answer in online.items():
        status, outputs = stored[name]
        assert status == "ok"
        assert outputs["texts"] == [t.decode() for t in answer["texts"]]
        np.testing.assert_allclose(np.reshape(outputs["boxes"], (-1, 4, 2)), answer["boxes"], atol=BOX_PIXELS)
        np.testing.assert_allclose(outputs["scores"], answer["scores"], atol=0.02)
    assert stored["blank.png"][1] == {"texts": [], "boxes": [], "scores": []}
    again = run(EXAMPLE, *command, "--progress", "off")
    assert again.returncode == 0 and "already predicted: 4" in again.stdout, again.stdout


def test_the_angle_check_graph_answers_as_ocr_while_its_shadow_reads_the_lines_as_cut(
    mesh: Mesh, reference: Any
) -> None:
    data = IMAGES["upside-down"]
    recognizer, _ = endpoint(mesh, "recognize")
    start = model_calls(recognizer, "ppocr-rec")[0]
    (plain,) = ocr(mesh.orchestrator, [data])
    once = model_calls(recognizer, "ppocr-rec")[0] - start
    (checked,) = ocr(mesh.orchestrator, [data], "ocr-angle-check")
    assert [t.decode() for t in checked["texts"]] == [t.decode() for t in plain["texts"]]
    assert [t.decode() for t in checked["texts"]] == expected(reference, data)[0]
    np.testing.assert_allclose(checked["boxes"], plain["boxes"], atol=BOX_PIXELS)
    assert checked["parameters"]["step.angle"] == checked["parameters"]["step.turn"] == "ok"
    # The shadow (the lines as cut out) reaches the recognizer too, though the answer never waits
    # for it: the recognizer serves the page twice.
    until(
        lambda: model_calls(recognizer, "ppocr-rec")[0] - start >= 3 * once,
        "the recognizer to serve the shadow's call",
    )


def test_without_the_angle_step_the_texts_still_come_back_flagged(mesh: Mesh, reference: Any) -> None:
    # Last in this module: it takes the angle service down for good (the mesh runs without restarts).
    _, pid = endpoint(mesh, "angle")
    os.kill(pid, signal.SIGKILL)
    (answer,) = ocr(mesh.orchestrator, [IMAGES["sizes"]])
    assert [t.decode() for t in answer["texts"]] == expected(reference, IMAGES["sizes"])[0]
    parameters = answer["parameters"]
    assert parameters["step.angle"].startswith("error: UNAVAILABLE")
    assert parameters["step.turn"].startswith("skipped")
    assert parameters["step.rec"] == parameters["step.text"] == "ok"
