"""The pieces of `twinfer serve` on their own: the on-demand dealer over real gRPC, session records, options."""

from __future__ import annotations

import secrets
import subprocess
import sys
import time

import pytest

from twinfer.deploy.cli.cli import EXIT_BUSY, exit_code, main
from twinfer.parties.dealer.client import DealerClient
from twinfer.parties.dealer.core import DealerCore, OnDemand
from twinfer.parties.dealer.service import add_dealer_servicer
from twinfer.parties.errors import BusyError, PeerError, PeerTimeoutError, ProtocolError
from twinfer.parties.metrics import Metrics
from twinfer.parties.runtime.serving import SessionEnd
from twinfer.parties.runtime.session import PartyReport
from twinfer.parties.wire.transport import TransportOptions, start_server

pytestmark = pytest.mark.timeout(60)

OPTS = TransportOptions(recv_timeout_s=5.0, connect_timeout_s=2.0)


@pytest.fixture
def dealer():
    ended = []
    servicer = DealerCore(OnDemand(2), idle_timeout_s=0.5, on_end=ended.append)
    server, port = start_server([(servicer, add_dealer_servicer)], "127.0.0.1:0", OPTS)
    yield servicer, f"127.0.0.1:{port}", ended
    server.stop(0)


def _party(address: str, session_id: str, role: str) -> DealerClient:
    return DealerClient(address, session_id=session_id, role=role, options=OPTS, metrics=Metrics())


def test_a_session_opens_when_a_party_names_a_new_id_and_its_id_is_then_spent(dealer, monkeypatch):
    servicer, address, ended = dealer
    monkeypatch.setattr("twinfer.parties.dealer.core.LINGER_S", 0.0)
    session = secrets.token_hex(16)
    parties = [_party(address, session, role) for role in ("server", "client")]
    assert servicer.open_count() == 1
    for party in parties:
        party.close()
    time.sleep(0.05)
    assert [s.session_id for s in servicer.reap()] == [session] and servicer.open_count() == 0
    assert ended[0].error is None and ended[0].bytes_sent > 0
    with pytest.raises(ProtocolError, match=rf"session '{session}' has ended; a session id admits its parties once"):
        _party(address, session, "client")


def test_ids_that_are_not_128_random_bits_are_refused(dealer):
    _, address, _ = dealer
    with pytest.raises(PeerError, match="is not a fresh 128-bit id"):
        _party(address, "session-1", "server")


def test_past_max_sessions_a_party_is_told_the_dealer_is_busy(dealer):
    servicer, address, _ = dealer
    held = [_party(address, secrets.token_hex(16), "server") for _ in range(2)]
    try:
        with pytest.raises(PeerError, match=r"dealer: busy: 2 sessions open"):
            _party(address, secrets.token_hex(16), "server")
    finally:
        for party in held:
            party.close()


def test_a_silent_session_is_ended_and_forgotten(dealer, monkeypatch):
    servicer, address, ended = dealer
    monkeypatch.setattr("twinfer.parties.dealer.core.LINGER_S", 0.0)
    session = secrets.token_hex(16)
    party = _party(address, session, "server")
    party._stop.set()  # no keepalive: the party went silent
    time.sleep(0.6)
    servicer.reap()  # past the idle timeout: ended with a timeout
    time.sleep(0.05)
    servicer.reap()
    assert servicer.open_count() == 0 and ended and ended[-1].error.kind == "timeout"
    party.close()


def test_session_end_records_a_report_and_a_failure():
    report = PartyReport(role="server", pid=1, node="n", batch_latency_s=[0.5, 0.25], batch_sizes=[2, 2], batch_rounds=[10, 10])
    ok = SessionEnd.of("ab", "server", report, time.monotonic() - 1.0, "ipv4:127.0.0.1:5")
    assert (ok.outcome, ok.samples, ok.rounds, ok.inference_s) == ("ok", 4, 20, 0.75) and ok.latency_s >= 1.0
    failed = SessionEnd.of("cd", "server", PeerTimeoutError("no client"), time.monotonic(), None)
    assert failed.outcome == "timeout" and failed.error == "no client" and failed.error_id
    assert '"event": "session_end"' in failed.to_json()


def test_busy_has_its_own_exit_code():
    assert exit_code(BusyError("busy")) == EXIT_BUSY == 8


@pytest.mark.parametrize(
    "argv, message",
    [
        (["serve", "--model", "m.onnx", "--max-sessions", "0"], "--max-sessions: must be at least 1"),
        (["serve", "--model", "m.onnx"], "twinfer serve needs --dealer HOST:PORT"),
        (["serve", "--model", "m.onnx", "--dealer", "d:1", "--listen", "0.0.0.0:0"], "without TLS"),
    ],
)
def test_bad_serve_options_are_one_clear_error(argv, message, capsys):
    try:
        code = main(argv)
    except SystemExit as exit:  # argparse's own usage error
        code = exit.code
    assert code == 2 and message in capsys.readouterr().err


def test_a_query_without_a_server_is_one_clear_error(tmp_path):
    import numpy as np

    np.save(tmp_path / "x.npy", np.zeros((1, 1, 28, 28), dtype=np.float32))
    proc = subprocess.run(
        [sys.executable, "-m", "twinfer.deploy.cli", "query", "--server", "127.0.0.1:9", "--dealer", "127.0.0.1:9",
         "--input", str(tmp_path / "x.npy"), "--connect-timeout", "1"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 5 and "not reachable" in proc.stderr and "Traceback" not in proc.stderr


def test_twinfer_is_a_package_with_client_and_its_subpackages():
    code = "import twinfer, twinfer.parties.errors, twinfer.protocols.roles; from twinfer import Client; print(Client.__name__)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd="/")
    assert proc.returncode == 0 and proc.stdout.strip() == "Client", proc.stderr


def test_client_refuses_a_bad_input_before_it_opens_a_session():
    import numpy as np

    from twinfer import Client
    from twinfer.parties.errors import InputError

    with Client("127.0.0.1:9", dealer="127.0.0.1:9") as client:  # nothing listens there: never dialed
        with pytest.raises(InputError, match=r"a batch of samples \(N x \.\.\.\), got shape \(3,\)"):
            client.infer(np.zeros(3, dtype=np.float32))
        with pytest.raises(InputError, match="batch size must be at least 1"):
            client.infer(np.zeros((2, 3), dtype=np.float32), batch_size=-1)


def test_serve_names_a_dealer_that_is_not_there_before_it_starts_workers(onnx_files, capsys):
    code = main(["serve", "--model", str(onnx_files["fashion_cnn"]), "--dealer", "127.0.0.1:9", "--listen", "127.0.0.1:0", "--connect-timeout", "1"])
    err = capsys.readouterr().err
    assert code == 5 and "dealer at 127.0.0.1:9 is not reachable" in err, err
