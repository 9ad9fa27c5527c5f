"""Fixtures shared by the unit tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.unit.mesh_fakes import build_folder


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """A temporary folder holding a Python and an ONNX model directory (tests.unit.mesh_fakes)."""
    return build_folder(tmp_path / "mesh")
