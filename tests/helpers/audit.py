"""Opt-in record of what a party process saw: files it opened and plaintexts it revealed (on
CrypTen's tensors and on the fss backends alike).

Tests use it to check the roles: the client never opens the weights file nor holds the
weights, and the server never holds the output. `audited_command` runs a `twinfer` command
line under it: `python tests/helpers/audit.py LOG ARGS...` records while `twinfer ARGS` runs
and writes LOG (JSON) when it ends.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from twinfer.protocols.backends.crypten.patches import load_crypten


class Audit:
    def __init__(self) -> None:
        self.opened: list[str] = []
        self.revealed: list[list] = []

    def install(self) -> "Audit":
        def on_event(event: str, args: tuple) -> None:
            if event == "open" and args and isinstance(args[0], (str, bytes, Path)):
                self.opened.append(str(args[0]))

        sys.addaudithook(on_event)
        mpc_tensor = load_crypten().mpc.MPCTensor
        original = mpc_tensor.get_plain_text

        def get_plain_text(tensor, dst=None):
            value = original(tensor, dst=dst)
            if value is not None:
                self.revealed.append(np.asarray(value).tolist())
            return value

        mpc_tensor.get_plain_text = get_plain_text
        raw = mpc_tensor.reveal  # the ring elements, which the crypten backend decodes itself

        def reveal(tensor, dst=None):
            value = raw(tensor, dst=dst)
            if value is not None:
                self.revealed.append((value.double() / tensor.encoder.scale).tolist())
            return value

        mpc_tensor.reveal = reveal
        from twinfer.protocols.backends.fss.backend import FssBackend  # fss and fss-compact decode their own reveals

        fss_reveal = FssBackend.reveal

        def fss(backend, x, dst):
            value = fss_reveal(backend, x, dst)
            if value is not None:
                self.revealed.append(np.asarray(value, dtype=np.float64).tolist())
            return value

        FssBackend.reveal = fss
        return self

    def write(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps({"opened": self.opened, "revealed": self.revealed}))


def audited_command(argv: list[str], log: str | Path) -> list[str]:
    """`argv`, a `python -m twinfer.deploy.cli ARGS` command line, run under an Audit that writes `log`."""
    if argv[1:3] != ["-m", "twinfer.deploy.cli"]:
        raise ValueError(f"not a `python -m twinfer.deploy.cli` command: {argv[:3]}")
    return [argv[0], str(Path(__file__).resolve()), str(log), *argv[3:]]


if __name__ == "__main__":
    from twinfer.deploy.cli.cli import main

    audit = Audit().install()
    try:
        code = main(sys.argv[2:])
    finally:
        audit.write(sys.argv[1])
    sys.exit(code)
