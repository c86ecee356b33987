"""The local launcher: the dealer, server and client of one session as three local processes.

A party runs either as a spawned Python process built from its PartyConfig (`SpawnedParty`;
`run_local_session` uses it: the benchmarks, `twinfer bench`, tests) or as a `twinfer party`
command (`PartyCommand`; kernel shaping runs these inside network namespaces, the end-to-end
tests one by one). `launch_local` starts them in order (wiring.start_parties), waits for each
listener's address and collects every report; the first party to fail has its error raised
at once, and every process is stopped, whatever happened.
"""

from __future__ import annotations

import multiprocessing as mp
import queue
import subprocess
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from twinfer.protocols.passes.encoding import SessionEncoding
from twinfer.parties.errors import PeerError, PeerTimeoutError, TwinferError
from twinfer.parties.runtime.session import CLIENT, DEALER, SERVER, PartyConfig, PartyReport
from twinfer.parties.runtime.session_spec import SessionSpec

from .wiring import (
    PartyExitError,
    last_json_line,
    new_session_id,
    party_config,
    party_failure,
    report_from_json,
    start_parties,
    wait_for_address,
)

POLL_S = 0.02


def _party_main(role: str, config: PartyConfig, payload: Any, out: mp.Queue) -> None:
    """A spawned party: its address once it listens (server, dealer), then its report or failure."""
    torch.set_num_threads(1)
    try:
        from twinfer.parties.runtime.session import ClientParty, DealerParty, ServerParty

        if role == CLIENT:
            inputs, batch = payload
            party = ClientParty(inputs, batch, config)
        elif role == DEALER:
            party = DealerParty(config)
        else:
            from twinfer.parties.runtime.model_file import parse_model

            graph, weights = parse_model(payload)
            party = ServerParty(graph, weights, config)
        if role != CLIENT:
            out.put(("address", party.address))
        out.put(("outcome", party.run()))
    except BaseException as err:  # the driver must hear of it, not wait for a report
        out.put(("outcome", party_failure(role, err)))


class SpawnedParty:
    """One party in a spawned Python process; `payload` is the model bytes (server) or (inputs, batch) (client)."""

    def __init__(self, ctx: Any, role: str, config: PartyConfig, payload: Any = None) -> None:
        self.role = role
        self._queue = ctx.Queue()
        self._process = ctx.Process(target=_party_main, args=(role, config, payload, self._queue))
        self._process.start()
        self._address: str | None = None
        self._outcome: PartyReport | TwinferError | None = None

    def _drain(self, timeout_s: float = 0.0) -> None:
        while self._outcome is None:
            try:
                kind, value = self._queue.get(timeout=timeout_s) if timeout_s else self._queue.get_nowait()
            except queue.Empty:
                return
            if kind == "address":
                self._address = value
            else:
                self._outcome = value

    def address(self) -> str | None:
        self._drain()
        return self._address

    def outcome(self) -> PartyReport | TwinferError | None:
        self._drain()
        if self._outcome is None and not self._process.is_alive():
            self._drain(timeout_s=1.0)  # what it sent just before it exited
            if self._outcome is None:
                code = self._process.exitcode
                self._outcome = PeerError(f"{self.role} process ended unexpectedly (exit code {code})", origin=self.role)
        return self._outcome

    def stop(self, grace_s: float) -> None:
        self._drain()  # a process that still has a message queued does not exit
        self._process.join(timeout=grace_s if self._process.is_alive() else 0)
        if self._process.is_alive():
            self._process.kill()
            self._process.join(timeout=10)


class PartyCommand:
    """One `twinfer party` process; stdout and stderr go to files in `workdir` (a pipe could fill up).

    A listener (server, dealer) is given an --address-file to announce where it listens.
    `popen` starts the command (e.g. inside a network namespace: KernelLink.run_in).
    """

    def __init__(
        self, role: str, argv: list[str], workdir: Path, *, listens: bool | None = None, popen: Callable[..., subprocess.Popen] = subprocess.Popen
    ) -> None:
        self.role = role
        tag = f"{role}-{uuid.uuid4().hex[:8]}"
        listens = role in (SERVER, DEALER) if listens is None else listens
        self.address_file = Path(workdir) / f"{tag}.addr" if listens else None
        self.stdout_path, self.stderr_path = Path(workdir) / f"{tag}.out", Path(workdir) / f"{tag}.err"
        if self.address_file is not None:
            argv = [*argv, "--address-file", str(self.address_file)]
        with open(self.stdout_path, "w") as out, open(self.stderr_path, "w") as err:
            self.proc = popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err)
        self._outcome: PartyReport | TwinferError | None = None

    def stdout(self) -> str:
        return self.stdout_path.read_text()

    def stderr(self) -> str:
        return self.stderr_path.read_text()

    def wait_address(self, timeout_s: float) -> str:
        """The address it listens on; LaunchError if it exits or stalls first."""
        return wait_for_address(self.proc, self.address_file, self.role, timeout_s, self.stderr_path)

    def address(self) -> str | None:
        if self.address_file is not None and self.address_file.exists():
            return self.address_file.read_text().strip()
        return None

    def outcome(self) -> PartyReport | TwinferError | None:
        if self._outcome is None and self.proc.poll() is not None:
            if self.proc.returncode != 0:
                self._outcome = PartyExitError.of(self.role, self.proc.returncode, self.stderr())
            else:
                report = last_json_line(self.stdout())
                self._outcome = report_from_json(report) if report else PartyExitError.of(self.role, 0, "printed no report")
        return self._outcome

    def finish(self, timeout_s: float = 120) -> tuple[int, dict | None, str]:
        """Wait for it to exit; its exit code, its JSON report (if any) and its stderr."""
        self.proc.wait(timeout=timeout_s)
        return self.proc.returncode, last_json_line(self.stdout()), self.stderr()

    def stop(self, grace_s: float) -> None:
        try:
            self.proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)


class LocalParties:
    """The party processes of one session (SpawnedParty or PartyCommand), stopped on exit."""

    def __init__(self) -> None:
        self.parties: dict[str, Any] = {}

    def __enter__(self) -> LocalParties:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(grace_s=60 if exc is None else 2)

    def add(self, party: Any) -> Any:
        self.parties[party.role] = party
        return party

    def _raise_failure(self) -> None:
        """A party's failure, at once: the session ends on every party with it."""
        for party in self.parties.values():
            outcome = party.outcome()
            if isinstance(outcome, BaseException):
                raise outcome

    def wait_address(self, role: str, timeout_s: float) -> str:
        """The address `role` listens on, once it does; any party's failure meanwhile is raised."""
        deadline = time.monotonic() + timeout_s
        while True:
            self._raise_failure()
            address = self.parties[role].address()
            if address is not None:
                return address
            if time.monotonic() > deadline:
                raise PeerTimeoutError(f"no word from the party processes within {timeout_s:g} s")
            time.sleep(POLL_S)

    def collect(self, timeout_s: float) -> dict[str, PartyReport]:
        """Every party's report by role; `timeout_s` is the longest wait for the next one to finish."""
        reports: dict[str, PartyReport] = {}
        deadline = time.monotonic() + timeout_s
        while len(reports) < len(self.parties):
            self._raise_failure()
            for role, party in self.parties.items():
                if role not in reports and party.outcome() is not None:
                    reports[role] = party.outcome()
                    deadline = time.monotonic() + timeout_s
            if len(reports) < len(self.parties):
                if time.monotonic() > deadline:
                    raise PeerTimeoutError(f"no word from the party processes within {timeout_s:g} s")
                time.sleep(POLL_S)
        return reports

    def close(self, grace_s: float) -> None:
        for party in reversed(list(self.parties.values())):
            party.stop(grace_s)


def launch_local(
    start: Callable[..., Any],
    *,
    dealer: bool = True,
    client_view: Callable[[str], str] | None = None,
    listen_timeout_s: float = 120.0,
    timeout_s: float = 900.0,
) -> dict[str, PartyReport]:
    """One session of local party processes; every party's report by role.

    `start(role, **addresses)` starts one party (a SpawnedParty or PartyCommand) given the
    addresses wiring.start_parties hands it; each listener's address is awaited before the
    next party starts. The first failure is raised at once and every process stopped.
    """
    with LocalParties() as parties:

        def started(role: str, **addresses: str | None) -> str | None:
            parties.add(start(role, **addresses))
            return None if role == CLIENT else parties.wait_address(role, listen_timeout_s)

        start_parties(started, dealer=dealer, client_view=client_view)
        return parties.collect(timeout_s)


def run_local_session(
    onnx_bytes: bytes,
    inputs: np.ndarray,
    batch: int,
    spec: SessionSpec | None = None,
    *,
    timeout_s: float = 900.0,
    encoding: SessionEncoding | None = None,
    listen_timeout_s: float = 120.0,
) -> dict[str, PartyReport]:
    """Dealer, server and client in three spawned processes on loopback; reports by role.
    `encoding`: what a check of these inputs settled (inference.check_session), for the server to adopt;
    `listen_timeout_s`: how long the server may take to listen (its model check runs first)."""
    spec = spec or SessionSpec()
    ctx = mp.get_context("spawn")
    session = new_session_id()
    payloads = {DEALER: None, SERVER: onnx_bytes, CLIENT: (inputs, batch)}

    def spawn(role: str, **addresses: str | None) -> SpawnedParty:
        return SpawnedParty(ctx, role, party_config(role, session, spec, encoding=encoding, **addresses), payloads[role])

    return launch_local(spawn, timeout_s=timeout_s, listen_timeout_s=listen_timeout_s)
