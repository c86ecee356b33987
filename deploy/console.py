"""The one way twinfer makes a rich Console: tables printed to a pipe or a log stay whole.

Here, not in deploy/cli/, because deploy/bench/ prints tables too and deploy/cli/ imports
deploy/bench/ (tests/test_imports.py forbids the cycle); deploy/cli/report.py re-exports it.
"""

from __future__ import annotations

import sys
from typing import IO

from rich.console import Console

# Columns of a Console that writes to something other than a terminal. rich's default there is 80,
# and it cuts every cell of a wider table to fit (`crypt…`, `eleme…`, `late…`). Tables and text are
# not padded to this width: a line is as long as what it holds, so a table keeps its natural width.
PIPE_WIDTH = 1000


def new_console(stderr: bool = False, file: IO[str] | None = None) -> Console:
    """A Console on stdout (stderr with `stderr=True`, or `file`). On a terminal it takes the
    terminal's width; on a pipe, a file or a log (or when the terminal cannot be told) it is
    PIPE_WIDTH columns wide, whatever COLUMNS or FORCE_COLOR say, so that no table is cut."""
    stream = file if file is not None else (sys.stderr if stderr else sys.stdout)
    try:
        tty = bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        tty = False
    return Console(stderr=stderr, file=file, width=None if tty else PIPE_WIDTH)
