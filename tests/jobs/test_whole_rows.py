"""Batch over a graph that takes one request per row (no sockets: a fake client in the mesh's
place): each row is sent alone and its answer, of its own length, is stored whole."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np

from jobs.batch import BatchConfig, BatchRunner, rows_first
from jobs.store import OK, Store
from services.common.types import InferRequest, InferResult, ModelSignature, TensorSpec

SIGNATURE = ModelSignature(
    "lines",
    ("1",),
    "ensemble",
    (TensorSpec("image", "BYTES", (1,)),),
    (TensorSpec("texts", "BYTES", (-1,)), TensorSpec("lengths", "INT32", (-1,))),
)


class FakeLinesClient:
    """Answers one text per line of the image's bytes: as many as the row has."""

    def __init__(self) -> None:
        self.requests: list[InferRequest] = []

    async def metadata(self, model: str, version: str = "", *, timeout: float | None = 5.0) -> ModelSignature:
        return SIGNATURE

    async def call(self, request: InferRequest) -> InferResult:
        self.requests.append(request)
        (data,) = request.inputs["image"]
        lines = data.splitlines()
        return InferResult(
            {
                "texts": np.array(lines, dtype=object),
                "lengths": np.array([len(line) for line in lines], dtype=np.int32),
            },
            model_version="1",
        )


def test_rows_first_is_told_by_the_inputs_first_dimension() -> None:
    assert rows_first([TensorSpec("x", "FP32", (-1, 64))])
    assert not rows_first(SIGNATURE.inputs)
    assert not rows_first([TensorSpec("x", "FP32", (-1, 4)), TensorSpec("k", "INT64", (1,))])


def test_each_row_is_one_request_and_its_outputs_are_stored_whole(tmp_path: Path) -> None:
    folder = tmp_path / "scans"
    folder.mkdir()
    pages = {"a.png": b"one\ntwo\nthree", "b.png": b"", "c.jpg": b"caf\xc3\xa9\n\xff"}
    for name, data in pages.items():
        (folder / name).write_bytes(data)
    client = FakeLinesClient()
    config = BatchConfig("lines", folder, rows_per_request=128, progress="off")
    with Store(f"sqlite:///{tmp_path / 'p.db'}") as store:
        summary = asyncio.run(BatchRunner(config, client, store).run())
        stored = {p.row_key: (p.status, p.outputs) for p in store.read_predictions("scans", "lines")}
    assert (summary.predicted, summary.failed, summary.requests) == (3, 0, 3)
    assert all(r.inputs["image"].shape == (1,) for r in client.requests)
    assert stored == {
        "a.png": (OK, {"texts": ["one", "two", "three"], "lengths": [3, 3, 5]}),
        "b.png": (OK, {"texts": [], "lengths": []}),
        "c.jpg": (OK, {"texts": ["café", "\ufffd"], "lengths": [5, 1]}),
    }
