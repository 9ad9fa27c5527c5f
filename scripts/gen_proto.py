"""Generate the gRPC stubs: proto/<package>/*.proto -> proto/gen/<package>/*_pb2{,_grpc}.py(i).

``make proto`` and the image build (Dockerfile) both run this, so the stubs are made one way.
The stubs live under proto/gen/ (importable as ``proto.gen.<package>``), apart from hand-written
code, never edited and never committed. Needs grpcio-tools (the ``proto`` extra; ``dev`` has it).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

PROTO = Path(__file__).resolve().parent.parent / "proto"
GEN = PROTO / "gen"


def main() -> int:
    sources = sorted(p for p in PROTO.glob("*/*.proto") if GEN not in p.parents)
    if not sources:
        print(f"no .proto files under {PROTO}/<package>/", file=sys.stderr)
        return 1
    shutil.rmtree(GEN, ignore_errors=True)
    packages = sorted({p.parent.name for p in sources})
    for package in ("", *packages):
        (GEN / package).mkdir(parents=True, exist_ok=True)
        (GEN / package / "__init__.py").touch()
    # `-Iproto/gen=proto` makes the generated imports read `proto.gen.<package>...`.
    command = [
        sys.executable,
        "-m",
        "grpc_tools.protoc",
        "-Iproto/gen=proto",
        "--python_out=.",
        "--pyi_out=.",
        "--grpc_python_out=.",
        *(f"proto/gen/{p.relative_to(PROTO)}" for p in sources),
    ]
    return subprocess.run(command, cwd=PROTO.parent, check=False).returncode


if __name__ == "__main__":
    sys.exit(main())
