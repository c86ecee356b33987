"""`python -m twinfer.deploy.cli`: the `twinfer` command, run by this interpreter."""

import sys

from .cli import main

sys.exit(main())
