"""Operator tooling for the mesh, apart from the graph node (`orchestrator/`) and the services.

- `meshctl.launcher`: every node as a local process (`make run`, the e2e tests, the benchmark).
- `meshctl.cli`: the `onnxmesh` command (predict, models, health, rollout).
- `meshctl.rollout`: per-model rollouts and canary weights on Kubernetes (the `k8s` extra).
- `meshctl.rehearsal`: a rolling update rehearsed on local processes (`make rehearse`).
"""

import os

# Before grpc is first imported: its core logs at INFO otherwise (e.g. every failed TLS handshake),
# beside the tools' own one-line diagnosis of the same failure.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
