"""Standing processes seen from outside: their command lines, their children, their memory (Linux /proc).

For the tests and the soak benchmark, which start `twinfer dealer` and `twinfer serve` as a
user would and check that nothing is left behind.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from twinfer.parties.errors import TwinferError

from ..launch.local import PartyCommand


def standing_command(command: str, *args: str) -> list[str]:
    """The command line of `twinfer dealer|serve|query ARGS`, run by this interpreter."""
    return [sys.executable, "-m", "twinfer.deploy.cli", command, *args]


def start_standing(command: str, workdir: Path, *args: str, timeout_s: float = 180.0) -> tuple[PartyCommand, str]:
    """Start `twinfer dealer|serve ARGS` listening on a port it picks; the process and its address."""
    party = PartyCommand(command, standing_command(command, "--listen", "127.0.0.1:0", *args), workdir, listens=True)
    try:
        return party, party.wait_address(timeout_s)
    except BaseException:
        party.stop(0)
        raise


def metrics_url(party: PartyCommand) -> str | None:
    """The metrics page a standing process printed it serves, if any."""
    for line in party.stdout().splitlines():
        if line.startswith("metrics on "):
            return line.split()[-1]
    return None


def child_pids(pid: int) -> list[int]:
    """The live processes whose parent is `pid`."""
    children = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # it exited meanwhile
        fields = stat.rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
        if int(fields[1]) == pid and fields[0] != "Z":
            children.append(int(entry.name))
    return children


def alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie does not)."""
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def rss_bytes(pid: int) -> int:
    """Resident memory of `pid` (VmRSS)."""
    for line in (Path("/proc") / str(pid) / "status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise TwinferError(f"process {pid} reports no resident memory")


def thread_count(pid: int) -> int:
    return len(os.listdir(Path("/proc") / str(pid) / "task"))
