"""Start real `twinfer party` processes on loopback, as a user would on separate machines."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Parties:
    """The processes of one session; every one is killed on exit, whatever happened."""

    tmp: Path
    session: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    timeout: float = 20.0
    connect_timeout: float = 15.0
    accept_timeout: float = 60.0
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    def _cmd(self, role: str, *args: str, session: str | None = None) -> list[str]:
        return [
            sys.executable, "-m", "twinfer.deploy.cli", "party", "--role", role,
            "--session", session or self.session, "--timeout", str(self.timeout), "--connect-timeout", str(self.connect_timeout),
            "--accept-timeout", str(self.accept_timeout), "--json", *args,
        ]  # fmt: skip

    def _spawn(self, role: str, cmd: list[str]) -> subprocess.Popen:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.procs[role] = proc
        return proc

    def _wait_address(self, role: str, path: Path) -> str:
        deadline = time.monotonic() + 60
        while not path.exists():
            if self.procs[role].poll() is not None:
                raise RuntimeError(f"{role} exited early: {self.procs[role].stderr.read()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{role} did not start listening")
            time.sleep(0.05)
        return path.read_text()

    def start_dealer(self) -> str:
        path = self.tmp / f"dealer-{self.session}.addr"
        self._spawn("dealer", self._cmd("dealer", "--address-file", str(path)))
        return self._wait_address("dealer", path)

    def start_server(self, model: Path, *extra: str) -> str:
        path = self.tmp / f"server-{self.session}.addr"
        self._spawn("server", self._cmd("server", "--model", str(model), "--address-file", str(path), *extra))
        return self._wait_address("server", path)

    def start_client(self, server: str, inputs: Path, *extra: str, session: str | None = None) -> subprocess.Popen:
        return self._spawn("client", self._cmd("client", "--server", server, "--input", str(inputs), *extra, session=session))

    def finish(self, role: str, timeout: float = 120) -> tuple[int, dict | None, str]:
        """Wait for `role` to exit; its exit code, its JSON report (if any) and its stderr."""
        out, err = self.procs[role].communicate(timeout=timeout)
        lines = [line for line in out.splitlines() if line.startswith("{")]
        return self.procs[role].returncode, (json.loads(lines[-1]) if lines else None), err

    def kill(self, role: str) -> None:
        os.kill(self.procs[role].pid, signal.SIGKILL)

    def close(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)
