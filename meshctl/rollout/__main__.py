"""`python -m meshctl.rollout SUBCOMMAND ...`: the rollout commands without the rest of the CLI."""

import sys

from meshctl.rollout.cli import main

if __name__ == "__main__":
    sys.exit(main())
