"""The digits demo: its mesh file (mesh.yaml), its held-out data and the names only it knows.

Its model directories live in services/preprocess, services/model_a and services/model_b; the runtimes,
the orchestrator and the mesh tooling take everything from a mesh file and import nothing from here
(tests/unit/test_demo_names.py checks it). The benchmark, scripts/ and the tests are the demo's users.
"""

from pathlib import Path

#: The demo's mesh file: what `make run` starts and what k8s/base is rendered from.
MESH = Path(__file__).resolve().parent / "mesh.yaml"
