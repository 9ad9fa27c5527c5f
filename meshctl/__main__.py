"""`python -m meshctl`: the `onnxmesh` command."""

import sys

from meshctl.cli import main

if __name__ == "__main__":
    sys.exit(main())
