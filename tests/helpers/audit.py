"""Opt-in record of what a party process saw: files it opened and plaintexts it revealed.

Tests use it to check the roles: the client never opens the weights file nor holds the
weights, and the server never holds the output.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from .crypten_compat import import_crypten


class Audit:
    def __init__(self) -> None:
        self.opened: list[str] = []
        self.revealed: list[list] = []

    def install(self) -> "Audit":
        def on_event(event: str, args: tuple) -> None:
            if event == "open" and args and isinstance(args[0], (str, bytes, Path)):
                self.opened.append(str(args[0]))

        sys.addaudithook(on_event)
        mpc_tensor = import_crypten().mpc.MPCTensor
        original = mpc_tensor.get_plain_text

        def get_plain_text(tensor, dst=None):
            value = original(tensor, dst=dst)
            if value is not None:
                self.revealed.append(np.asarray(value).tolist())
            return value

        mpc_tensor.get_plain_text = get_plain_text
        return self

    def write(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps({"opened": self.opened, "revealed": self.revealed}))
