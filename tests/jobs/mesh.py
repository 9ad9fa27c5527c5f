"""The one place tests/jobs imports the local mesh launcher from (it is moving to meshctl.launcher)."""

from orchestrator.mesh import EPHEMERAL_PORTS, LocalMesh

__all__ = ["EPHEMERAL_PORTS", "LocalMesh"]
