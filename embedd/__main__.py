"""`python -m embedd` is the same as the `embedd` command."""

import sys

from embedd.cli import main

sys.exit(main())
