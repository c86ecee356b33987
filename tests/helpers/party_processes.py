"""Start real `twinfer party` processes on loopback, as a user would on separate machines.

One by one, so that a test can give each its own flags, kill one, or read each exit code; the
command lines and processes are the launcher's (twinfer.deploy.launch).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from twinfer.deploy.launch.local import PartyCommand
from twinfer.deploy.launch.wiring import new_session_id, party_command

from .audit import audited_command


@dataclass
class Parties:
    """The processes of one session; every one is killed on exit, whatever happened."""

    tmp: Path
    session: str = field(default_factory=new_session_id)
    timeout: float = 20.0
    connect_timeout: float = 15.0
    accept_timeout: float = 60.0
    started: dict[str, PartyCommand] = field(default_factory=dict)

    @property
    def procs(self) -> dict[str, subprocess.Popen]:
        return {role: party.proc for role, party in self.started.items()}

    def _start(self, role: str, *args: str, session: str | None = None, audit: Path | None = None) -> PartyCommand:
        argv = party_command(
            role, session or self.session, *args,
            timeout=self.timeout, connect_timeout=self.connect_timeout, accept_timeout=self.accept_timeout,
        )  # fmt: skip
        if audit is not None:  # record what the process opens and reveals (tests/helpers/audit.py)
            argv = audited_command(argv, audit)
        self.started[role] = PartyCommand(role, argv, self.tmp)
        return self.started[role]

    def start_dealer(self) -> str:
        return self._start("dealer").wait_address(60)

    def start_server(self, model: Path, *extra: str, audit: Path | None = None) -> str:
        return self._start("server", "--model", str(model), *extra, audit=audit).wait_address(60)

    def start_client(self, server: str, inputs: Path, *extra: str, session: str | None = None, audit: Path | None = None) -> subprocess.Popen:
        return self._start("client", "--server", server, "--input", str(inputs), *extra, session=session, audit=audit).proc

    def finish(self, role: str, timeout: float = 120) -> tuple[int, dict | None, str]:
        """Wait for `role` to exit; its exit code, its JSON report (if any) and its stderr."""
        return self.started[role].finish(timeout)

    def wait_connected(self, role: str, address: str, timeout_s: float = 60.0) -> None:
        """Until `role`'s process holds an established TCP connection to `address` (host:port): its
        session is under way. A fault injected after this hits a running session, whatever the load."""
        port = int(address.rsplit(":", 1)[1])
        deadline = time.monotonic() + timeout_s
        while not _connected(self.procs[role].pid, port):
            assert self.procs[role].poll() is None, f"the {role} exited ({self.procs[role].returncode}) before it connected to {address}"
            assert time.monotonic() < deadline, f"the {role} did not connect to {address} within {timeout_s:g} s"
            time.sleep(0.05)

    def kill(self, role: str) -> None:
        os.kill(self.procs[role].pid, signal.SIGKILL)

    def close(self) -> None:
        for party in self.started.values():
            party.stop(0)


def _connected(pid: int, port: int) -> bool:
    """Whether process `pid` has an established TCP connection to remote `port` (from /proc: Linux)."""
    try:
        inodes = {os.readlink(f"/proc/{pid}/fd/{fd}")[8:-1] for fd in os.listdir(f"/proc/{pid}/fd")}
    except OSError:
        return False
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = open(table).read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            remote_port, state, inode = int(fields[2].rsplit(":", 1)[1], 16), fields[3], fields[9]
            if remote_port == port and state == "01" and inode in inodes:
                return True
    return False
