"""A starting orchestrator knows its graphs before the services answer: calls get UNAVAILABLE
(retry), never NOT_FOUND (which a client would take as final)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest

from orchestrator.node import Orchestrator
from services.common.dataplane import DataPlane
from services.common.errors import Unavailable
from services.common.observability.metrics import ServerMetrics
from services.common.repository import ModelRepository
from services.common.types import InferRequest

GRAPHS = Path(__file__).resolve().parents[2] / "demo" / "mesh.yaml"


def test_graphs_are_unavailable_until_loaded() -> None:
    repository = ModelRepository()
    metrics = ServerMetrics("orchestrator")
    Orchestrator(GRAPHS, repository, metrics)
    dataplane = DataPlane(repository, metrics)
    request = InferRequest("digits-serial", {"image": np.zeros((1, 8, 8), np.uint8)})
    with pytest.raises(Unavailable, match="digits-serial"):
        asyncio.run(dataplane.infer(request))
    with pytest.raises(Unavailable, match="still loading"):
        dataplane.model_metadata("digits-parallel")
    assert not dataplane.model_ready("digits-cascade")
