"""The `onnxmesh` CLI against a real node (in-process server on 127.0.0.1:0): `models` lists what
RepositoryIndex says, failed models with their reason; `health` never prints an empty message."""

from __future__ import annotations

import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from meshctl import cli
from services.common.model_node import build_repository
from services.common.settings import ServerSettings
from tests.support import ROOT, ServerThread


def test_models_and_health_against_a_node(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    shutil.copytree(ROOT / "services/model_b/models/digits-logreg", tmp_path / "digits-logreg")
    (tmp_path / "broken/1").mkdir(parents=True)
    (tmp_path / "broken/1/model.onnx").write_bytes(b"junk")
    with ThreadPoolExecutor(2) as executor:
        repository = build_repository(ServerSettings(service="test", model_dir=tmp_path), executor)
        server = ServerThread(repository)
        try:
            server.start()
            assert cli.main(["models", "--target", server.address]) == 0
            out = capsys.readouterr().out
            assert "digits-logreg  versions: 1  platform: onnxruntime_onnx" in out
            assert "broken  version 1: UNAVAILABLE (cannot load:" in out
            assert cli.main(["health", "--target", server.address, "--service", "nope"]) == 1
            out = capsys.readouterr().out
            assert "NOT_FOUND: no health status for service 'nope'" in out
            assert cli.main(["health", "--target", server.address]) == 0
        finally:
            server.stop()
