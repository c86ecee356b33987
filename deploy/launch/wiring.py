"""How the three parties of a session are configured, started in order and heard from.

Every launcher shares these pieces, whatever runs a party (a local process, a `twinfer party`
command, maybe inside a network namespace, or a Ray actor): the dealer starts first, then the
server, told the dealer's address, then the client, told both; a party's report travels as the
JSON `twinfer party --json` prints; a failure is reported as the error where it started.
"""

from __future__ import annotations

import dataclasses
import json
import re
import secrets
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from twinfer.parties.errors import PeerError, TwinferError
from twinfer.protocols.passes.encoding import SessionEncoding
from twinfer.parties.runtime.session import CLIENT, DEALER, SERVER, PartyConfig, PartyReport
from twinfer.parties.runtime.session_spec import SessionSpec
from twinfer.parties.wire.tls import TlsIdentity

ROLES = (DEALER, SERVER, CLIENT)  # the order the parties start in


class LaunchError(RuntimeError):
    """A party process did not come up: it exited, or stalled, before listening."""


SESSION_ID_BITS = 128  # a session id admits a party where there is no TLS: unguessable


def new_session_id() -> str:
    """A fresh session id: 128 random bits from the OS, as 32 hex digits."""
    return secrets.token_hex(SESSION_ID_BITS // 8)


def party_config(
    role: str,
    session_id: str,
    spec: SessionSpec,
    *,
    tls: dict[str, TlsIdentity] | None = None,
    dealer_address: str | None = None,
    server_address: str | None = None,
    encoding: SessionEncoding | None = None,
) -> PartyConfig:
    """One role's PartyConfig; `tls` holds every role's identity (or is None: no TLS), of which the
    role gets its own only. The declared input range and `encoding` (what the launcher's own check
    settled: the server adopts it, the client takes the server's bits) go to the server alone."""
    server = role == SERVER
    return PartyConfig(
        role=role, session_id=session_id, spec=spec if server else spec.replace(input_range=None), tls=tls[role] if tls else None,
        dealer_address=dealer_address, server_address=server_address, encoding=encoding if server else None,
    )  # fmt: skip


def start_parties(
    start: Callable[..., str | None], *, dealer: bool = True, client_view: Callable[[str], str] | None = None
) -> dict[str, str | None]:
    """Start the dealer (unless `dealer` is False), then the server, then the client.

    `start(role, **addresses)` starts one party, given `dealer_address` (server, client) and
    `server_address` (client), and returns the address it listens on (None for the client).
    `client_view` maps a listener's address to the one the client dials (a delay relay, say).
    Returns the dealer's and the server's addresses.
    """
    view = client_view or (lambda address: address)
    dealer_address = start(DEALER) if dealer else None
    server_address = start(SERVER, dealer_address=dealer_address)
    via_server = view(server_address)
    via_dealer = view(dealer_address) if dealer_address is not None else None
    start(CLIENT, server_address=via_server, dealer_address=via_dealer)
    return {DEALER: dealer_address, SERVER: server_address}


def party_command(
    role: str,
    session: str,
    *args: str,
    timeout: float | None = None,
    connect_timeout: float | None = None,
    accept_timeout: float | None = None,
    json_report: bool = True,
) -> list[str]:
    """The `twinfer party` command line of one party, run by this interpreter; flags left None keep their defaults."""
    argv = [sys.executable, "-m", "twinfer.deploy.cli", "party", "--role", role, "--session", session]
    for flag, value in (("--timeout", timeout), ("--connect-timeout", connect_timeout), ("--accept-timeout", accept_timeout)):
        if value is not None:
            argv += [flag, str(value)]
    return argv + (["--json"] if json_report else []) + list(args)


def wait_for_address(
    proc: subprocess.Popen,
    path: Path,
    what: str,
    timeout_s: float,
    log_file: Path | None = None,
    error: type[Exception] = LaunchError,
) -> str:
    """The address `proc` writes to `path` once it listens; `error` if it dies or stalls first."""
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        log = f": {log_file.read_text().strip()}" if log_file is not None and log_file.exists() else ""
        if proc.poll() is not None:
            raise error(f"{what} exited with code {proc.returncode} before listening{log}")
        if time.monotonic() > deadline:
            raise error(f"{what} did not listen within {timeout_s:g} s{log}")
        time.sleep(0.02)
    return path.read_text().strip()


def report_json(report: PartyReport, session_id: str) -> dict:
    """A report as `twinfer party --json` prints it: every field, the session id, logits as nested lists."""
    out = dataclasses.asdict(report) | {"session": session_id}
    out["logits"] = None if report.logits is None else report.logits.tolist()
    return out


def report_from_json(data: dict) -> PartyReport:
    """The PartyReport of what `report_json` wrote (unknown keys, such as the session, dropped)."""
    known = {f.name for f in dataclasses.fields(PartyReport)}
    fields = {k: v for k, v in data.items() if k in known}
    fields["logits"] = None if data.get("logits") is None else np.asarray(data["logits"])
    return PartyReport(**fields)


def last_json_line(text: str) -> dict | None:
    """The last JSON object a `twinfer party --json` process printed, or None."""
    lines = [line for line in text.splitlines() if line.startswith("{")]
    return json.loads(lines[-1]) if lines else None


def party_failure(role: str, err: BaseException) -> TwinferError:
    """What a party process hands back instead of its report: a picklable error."""
    if isinstance(err, TwinferError):
        return err
    return TwinferError(f"{role} process failed: {type(err).__name__}: {err}", origin=role)


def root_cause(errors: dict[str, BaseException]) -> TwinferError:
    """Of the errors the parties raised, the one where the failure started."""
    twinfer_errors = {role: e for role, e in errors.items() if isinstance(e, TwinferError)}
    for role, err in twinfer_errors.items():
        if err.origin == role:
            return err
    if twinfer_errors:
        return next(iter(twinfer_errors.values()))
    role, err = next(iter(errors.items()))
    return PeerError(f"{role} process ended unexpectedly: {err}", origin=role)


# `twinfer: error [kind id at origin] message`, as the CLI prints a TwinferError.
_PRINTED_ERROR = re.compile(r"^twinfer: error \[(?P<kind>[a-z-]+) (?P<id>[0-9a-f]+)(?: at (?P<origin>\w+))?\] (?P<message>.*)$", re.M)


class PartyExitError(TwinferError):
    """A `twinfer party` process that exited with a non-zero code: the error it printed, if any."""

    def __init__(self, message: str, *, error_id: str | None = None, origin: str = "") -> None:
        super().__init__(message, error_id=error_id, origin=origin)
        self.role, self.returncode, self.stderr = origin, None, ""

    @classmethod
    def of(cls, role: str, returncode: int, stderr: str) -> PartyExitError:
        printed = list(_PRINTED_ERROR.finditer(stderr))
        if printed:
            last = printed[-1]
            err = cls(last["message"], error_id=last["id"], origin=last["origin"] or role)
            err.kind = last["kind"]
        else:
            tail = stderr.strip()[-2000:]
            err = cls(f"{role} exited with code {returncode}" + (f": {tail}" if tail else ""), origin=role)
        err.role, err.returncode, err.stderr = role, returncode, stderr
        return err
