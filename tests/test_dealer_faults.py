"""The dealer under faults: one stopped (SIGSTOP) mid-session ends both parties within --timeout plus
3 s under one error id that names it; continued, it ends that session under the same id, without a
traceback, and a standing dealer logs its end at once; a session both parties left is ended, one
whose parties live is not; every party of a session exits with one code per cause.

The first tests run the core and the client in this process (over real gRPC), the others real
`twinfer party` and `twinfer dealer` processes, each fault injected once the session runs."""

from __future__ import annotations

import json
import os
import re
import signal
import threading
import time

import numpy as np
import pytest

from helpers.party_processes import Parties
from twinfer.deploy.launch.local import PartyCommand
from twinfer.deploy.launch.wiring import new_session_id, party_command
from twinfer.deploy.serve.processes import standing_command
from twinfer.parties.dealer.client import DealerClient
from twinfer.parties.dealer.core import LEFT_AFTER_MIN_S, RESUME_GRACE_S, DealerCore, dealer_lost_id
from twinfer.parties.dealer.service import add_dealer_servicer
from twinfer.parties.errors import AuthError, PeerError, PeerTimeoutError
from twinfer.parties.metrics import Metrics
from twinfer.parties.wire.transport import TransportOptions, start_server

pytestmark = pytest.mark.timeout(240)

TIMEOUT_S = 3.0
DEADLINE_MARGIN_S = 3.0  # a party whose dealer goes silent exits within --timeout plus this
LOADED_MACHINE_S = 2.0  # what a loaded 2-core test machine adds to process exit (as in test_e2e_standalone)
RUNNING = "first correlation made"  # the dealer's log line (with -v) once a session's online phase has begun


def _error_id(text: str) -> str:
    match = re.findall(r"\[[a-z-]+ ([0-9a-f]{12})", text)
    assert match, f"no error id in: {text}"
    return match[-1]


# -- in one process: the core and the client ---------------------------------------------------------------


@pytest.fixture
def quick_dealer():
    ended = []
    core = DealerCore(idle_timeout_s=60.0, on_end=ended.append)  # its own deadline far away: not what ends a session here
    opts = TransportOptions(recv_timeout_s=1.0, connect_timeout_s=2.0)
    server, port = start_server([(core, add_dealer_servicer)], "127.0.0.1:0", opts)
    yield core, f"127.0.0.1:{port}", opts, ended
    server.stop(0)


def _wait(done, what: str, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not done():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


def _running_session(core, address: str, opts):
    """A session both parties' clients have joined and kept alive twice: (id, clients, its record)."""
    session_id = new_session_id()
    core.open_session(session_id)
    parties = [DealerClient(address, session_id=session_id, role=r, options=opts, metrics=Metrics()) for r in ("server", "client")]
    session = core._sessions[session_id]
    _wait(lambda: len(session.beat) == 2, "both parties keep the session alive")
    return session_id, parties, session


def test_a_session_both_parties_left_without_closing_is_ended_at_once_under_the_lost_dealer_id(quick_dealer):
    core, address, opts, ended = quick_dealer
    session_id, parties, session = _running_session(core, address, opts)
    for party in parties:  # both go away without a Close (a Close could not reach the dealer)
        party._stop.set()
        party._channel.close()
    gone = time.monotonic()
    finished = core.wait_finished(session_id, timeout_s=30.0)
    waited = time.monotonic() - gone
    assert finished.error.error_id == dealer_lost_id(session_id) and finished.error.origin == "dealer"
    assert finished.error.kind == "timeout" and "left it without closing it" in finished.error.message
    assert waited < max(LEFT_AFTER_MIN_S, 3 * max(session.beat.values())) + 1.0, waited  # not the 60 s idle deadline
    assert ended == [finished]  # reported once, as it ended


def test_a_dealer_that_was_stopped_itself_ends_no_session_whose_parties_still_live(quick_dealer):
    core, address, opts, ended = quick_dealer
    session_id, parties, session = _running_session(core, address, opts)
    with core._lock:  # as just after a SIGCONT: the dealer has not looked for a while, nor heard the parties
        core._checked -= 10.0
        for rank in session.heard:
            session.heard[rank] -= 10.0
    core.reap()
    assert not session.finished  # their keepalives queued meanwhile are served first
    resumed = time.monotonic()
    _wait(lambda: time.monotonic() - resumed > RESUME_GRACE_S + 0.5, "the grace passes")
    core.reap()
    assert not session.finished and not ended  # they live: the session goes on
    for party in parties:
        party.close()
    assert session.finished and session.error is None and ended == [session]


def test_a_wait_on_the_peer_that_runs_out_while_the_dealer_is_silent_is_the_dealers(quick_dealer):
    core, address, opts, _ = quick_dealer
    session_id = new_session_id()
    core.open_session(session_id)
    client = DealerClient(address, session_id=session_id, role="client", options=opts, metrics=Metrics())
    try:
        waited = PeerTimeoutError("no 'all_reduce' message from server within 1 s", origin="client")
        assert client.blame(waited) is waited  # the dealer answers: the peer is to blame
        from_peer = PeerError("server failed (peer): something", origin="server")
        refused = AuthError("refused", origin="client")
        client._answered -= 10 * opts.recv_timeout_s  # the dealer stopped answering (as a stopped process does)
        blamed = client.blame(waited)
        assert blamed.error_id == dealer_lost_id(session_id) and blamed.origin == "dealer" and blamed.kind == "timeout"
        assert "the dealer has not answered" in blamed.message and "no 'all_reduce' message from server" in blamed.message
        assert client.blame(from_peer) is from_peer and client.blame(refused) is refused  # not a wait of this party's
    finally:
        client.close()


def test_a_party_that_was_stopped_itself_does_not_blame_the_dealer(quick_dealer):
    core, address, opts, _ = quick_dealer
    session_id = new_session_id()
    core.open_session(session_id)
    client = DealerClient(address, session_id=session_id, role="client", options=opts, metrics=Metrics())
    try:
        client._stop.set()  # its keepalive and watch stop, as in a stopped process...
        _wait(lambda: not any(t.name == "twinfer-dealer-watch" and t.is_alive() for t in threading.enumerate()), "the watch stops")
        client._answered -= 10 * opts.recv_timeout_s  # ...where, just after a SIGCONT, the dealer has not been heard
        client._tick -= 10 * opts.recv_timeout_s  # for long, nor has the watch looked
        waited = PeerError("connection to server lost", origin="client")
        assert client.blame(waited) is waited and client.lost() is None
    finally:
        client.close()


# -- real processes ------------------------------------------------------------------------------------------


def _verbose(argv: list[str]) -> list[str]:
    """`twinfer -v ...`: the dealer logs when a session's first correlation is made."""
    at = argv.index("twinfer.deploy.cli") + 1
    return [*argv[:at], "-v", *argv[at:]]


def _wait_for(party: PartyCommand, text: str, timeout_s: float = 180.0) -> None:
    deadline = time.monotonic() + timeout_s
    while text not in party.stderr():
        assert party.proc.poll() is None, f"the {party.role} exited ({party.proc.returncode}): {party.stderr()[-2000:]}"
        assert time.monotonic() < deadline, f"no '{text}' from the {party.role} within {timeout_s:g} s"
        time.sleep(0.05)


def _session_ends(party: PartyCommand) -> list[dict]:
    return [json.loads(line) for line in party.stdout().splitlines() if line.startswith("{")]


@pytest.fixture
def parties(tmp_path):
    p = Parties(tmp_path, timeout=TIMEOUT_S)
    yield p
    dealer = p.started.get("dealer")
    if dealer is not None and dealer.proc.poll() is None:
        os.kill(dealer.proc.pid, signal.SIGCONT)  # a stopped process ignores the kill of close() until continued
    p.close()


def _start_dealer(parties: Parties, standing: bool) -> PartyCommand:
    if standing:  # its own deadline long (the default 60 s): what ends the session is not its deadline
        argv = standing_command("dealer", "--listen", "127.0.0.1:0", "--metrics-port", "0")
    else:
        argv = party_command("dealer", parties.session, timeout=parties.timeout, connect_timeout=parties.connect_timeout)
    dealer = parties.started["dealer"] = PartyCommand("dealer", _verbose(argv), parties.tmp, listens=True)
    dealer.wait_address(60)
    return dealer


@pytest.mark.parametrize("standing", [False, True], ids=["party-dealer", "standing-dealer"])
def test_a_stopped_dealer_ends_both_parties_within_the_deadline_under_one_id_that_names_it(parties, tmp_path, onnx_files, fashion_test, standing):
    dealer = _start_dealer(parties, standing)
    np.save(tmp_path / "x.npy", fashion_test[0][:400])
    server = parties.start_server(onnx_files["fashion_cnn"], "--dealer", dealer.address(), "--protocol", "crypten")
    parties.start_client(server, tmp_path / "x.npy", "--dealer", dealer.address(), "--protocol", "crypten", "--batch", "1")
    _wait_for(dealer, RUNNING)  # the session is running: the online phase has begun
    assert parties.procs["client"].poll() is None, "the client finished before the dealer was stopped"
    os.kill(dealer.proc.pid, signal.SIGSTOP)  # alive, but silent: no error, no closed connection
    stopped_at = time.monotonic()
    took = {}
    try:
        while len(took) < 2 and time.monotonic() - stopped_at < 60:
            for role in ("server", "client"):
                if role not in took and parties.procs[role].poll() is not None:
                    took[role] = time.monotonic() - stopped_at
            time.sleep(0.02)
    finally:
        os.kill(dealer.proc.pid, signal.SIGCONT)
    continued_at = time.monotonic()
    lost = dealer_lost_id(parties.session)
    for role in ("server", "client"):
        code, _, err = parties.finish(role, timeout=10)
        last = err.strip().splitlines()[-1]
        assert code == 5 and _error_id(last) == lost and " at dealer]" in last, err[-1500:]
        assert "Traceback" not in err
        assert took[role] < TIMEOUT_S + DEADLINE_MARGIN_S + LOADED_MACHINE_S, took

    # Continued, the dealer ends the session under the same id, at once, and no traceback.
    if standing:
        _wait(lambda: _session_ends(dealer), "the standing dealer logs the session's end", timeout_s=30)
        logged = time.monotonic() - continued_at
        (end,) = _session_ends(dealer)
        assert end["session"] == parties.session and end["error_id"] == lost and end["outcome"] == "timeout", end
        assert logged < LEFT_AFTER_MIN_S + 3.0, logged  # at once: not at its 60 s deadline, nor at a 30 s drain
        os.kill(dealer.proc.pid, signal.SIGTERM)
        code, err = dealer.proc.wait(timeout=30), dealer.stderr()
        assert code == 0 and time.monotonic() - continued_at < 10  # nothing left to drain
    else:
        code, _, err = parties.finish("dealer", timeout=30)
        logged = time.monotonic() - continued_at
        assert code == 5 and _error_id(err.strip().splitlines()[-1]) == lost, err[-1500:]
    assert "Traceback" not in err and "cannot schedule" not in err, err[-3000:]
    print(
        f"stopped dealer ({'standing' if standing else 'party'}): server exited after {took['server']:.1f} s, client after "
        f"{took['client']:.1f} s (timeout {TIMEOUT_S:g} s); continued, the dealer ended the session after {logged:.1f} s"
    )


def test_a_protocol_mismatch_ends_every_party_with_one_exit_code(parties, tmp_path, onnx_files):
    np.save(tmp_path / "x.npy", np.zeros((2, 1, 28, 28), np.float32))
    dealer = parties.start_dealer()
    server = parties.start_server(onnx_files["fashion_cnn"], "--dealer", dealer, "--protocol", "fss")
    parties.start_client(server, tmp_path / "x.npy", "--dealer", dealer, "--protocol", "crypten")
    outcomes = {role: parties.finish(role, timeout=60) for role in ("client", "server", "dealer")}
    codes = {role: code for role, (code, _, _) in outcomes.items()}
    lines = {role: err.strip().splitlines()[-1] for role, (_, _, err) in outcomes.items()}
    assert codes == {"client": 6, "server": 6, "dealer": 6}, lines
    assert len({_error_id(line) for line in lines.values()}) == 1, lines
    assert lines["dealer"].count("client failed (protocol)") == 1 and lines["dealer"] == lines["server"], lines
    assert not any("Traceback" in err for _, _, err in outcomes.values())
