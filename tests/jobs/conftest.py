"""Fixtures of the jobs tests: the running mesh, a real PostgreSQL server, one database per test."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from meshctl.launcher import EPHEMERAL_PORTS, LocalMesh
from tests.jobs.support import Postgres, holdout, online_answers, postgres_bindir
from tests.support import server_missing

GRAPH = "digits-parallel"


@pytest.fixture(scope="session")
def mesh() -> Iterator[LocalMesh]:
    with LocalMesh(ports=EPHEMERAL_PORTS) as running:
        yield running


@pytest.fixture(scope="session")
def orchestrator(mesh: LocalMesh) -> str:
    return mesh.address("orchestrator")


@pytest.fixture(scope="session")
def online(orchestrator: str) -> tuple[np.ndarray, np.ndarray]:
    """The online answers (labels, probabilities) of digits-parallel for the 360 held-out digits."""
    images, _ = holdout()
    return online_answers(orchestrator, GRAPH, images)


@pytest.fixture(scope="session")
def postgres() -> Iterator[Postgres]:
    """A PostgreSQL server started for these tests. Only its absence skips (and fails as root);
    a server that is installed but does not start is an error of every test that needs it."""
    if postgres_bindir() is None:
        server_missing("PostgreSQL")
    server = Postgres.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh store: a SQLite file, or a new database on the real PostgreSQL server."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'jobs.sqlite'}"
    server: Postgres = request.getfixturevalue("postgres")
    return server.create_database()
