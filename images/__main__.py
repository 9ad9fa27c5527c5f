"""`python3 -m images` (`make images`): see images/cli.py."""

import sys

from images.cli import main

sys.exit(main())
