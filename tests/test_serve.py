"""`twinfer serve` and `twinfer dealer` as standing processes under mutual TLS; clients come and go.

One dealer and one server (two workers) serve the module's tests in order: clients in sequence
and at once, refusals (busy, made-up id, replayed id, wrong role), the metrics page, then a drain
on SIGTERM. A second server is killed with SIGKILL under a running client.
"""

from __future__ import annotations

import os
import re
import secrets
import signal
import socket
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.helpers.stated import assert_within_stated_error
from twinfer import Client
from twinfer.deploy.serve.client import worker_address
from twinfer.deploy.serve.processes import alive, child_pids, metrics_url, standing_command, start_standing
from twinfer.parties.errors import AuthError, BusyError, PeerError, ProtocolError
from twinfer.parties.runtime.serving import SessionOpener
from twinfer.parties.runtime.session import ClientParty, PartyConfig, PartyReport
from twinfer.parties.wire.tls import TlsIdentity
from twinfer.parties.wire.transport import TransportOptions, open_channel
from twinfer.parties.runtime.session_spec import SessionSpec

pytestmark = pytest.mark.timeout(240)

TIMEOUT_S = 20.0
OPTIONS = TransportOptions(recv_timeout_s=TIMEOUT_S, connect_timeout_s=10.0)
COMMON = ("--timeout", str(TIMEOUT_S), "--connect-timeout", "10")


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    from twinfer.deploy.config.certs import make_certs

    return make_certs(tmp_path_factory.mktemp("serve-certs"))


@pytest.fixture(scope="module")
def dealer(tmp_path_factory, certs):
    party, address = start_standing("dealer", tmp_path_factory.mktemp("dealer"), "--tls", str(certs), "--metrics-port", "0", *COMMON)
    yield party, address
    party.stop(0)


def _serve(workdir, model, dealer_address, certs, *extra):
    return start_standing(
        "serve", workdir, "--model", str(model), "--dealer", dealer_address, "--tls", str(certs), *COMMON, *extra
    )


@pytest.fixture(scope="module")
def served(tmp_path_factory, onnx_files, dealer, certs):
    """A standing server with two workers, at most 4 sessions, metrics on a port of its choosing."""
    party, address = _serve(
        tmp_path_factory.mktemp("serve"), onnx_files["fashion_cnn"], dealer[1], certs,
        "--workers", "2", "--max-sessions", "4", "--metrics-port", "0", "--accept-timeout", "10", "--drain-timeout", "60",
    )  # fmt: skip
    yield party, address
    party.stop(0)


@pytest.fixture(scope="module")
def reference(fashion_cnn, fashion_test):
    images = fashion_test[0][:40]
    with torch.no_grad():
        return images, fashion_cnn(torch.from_numpy(images)).numpy()


def _client(address: str, dealer, certs) -> Client:
    """`from twinfer import Client`, as a user has it, on the module's dealer."""
    return Client(address, spec=SessionSpec(options=OPTIONS), dealer=dealer[1], tls=certs)


def _assert_plaintext(report: PartyReport | dict, expected: np.ndarray) -> None:
    """A client's report (or its JSON) equals plaintext within the error its session stated."""
    logits = np.asarray(report["logits"] if isinstance(report, dict) else report.logits)
    assert logits.shape == expected.shape
    assert_within_stated_error(logits, expected, report["encoding"] if isinstance(report, dict) else report.encoding)
    assert (logits.argmax(1) == expected.argmax(1)).all()


def _health(address: str, certs, service: str = "", role: str = "server") -> int:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    channel = open_channel(address, role="client", peer_role=role, options=OPTIONS, tls=TlsIdentity.from_dir(certs, "client"))
    try:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        return reply.status
    finally:
        channel.close()


def _metrics(party) -> dict[str, float]:
    text = urllib.request.urlopen(metrics_url(party), timeout=5).read().decode()
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    return values


RUNNING = 'twinfer_sessions_running{role="server"}'


def _wait_running(party, done, timeout_s: float = 30.0) -> None:
    """Until done(sessions running on the server), as its metrics page says."""
    deadline = time.monotonic() + timeout_s
    while not done(_metrics(party).get(RUNNING, 0)):
        assert time.monotonic() < deadline, f"sessions running: {_metrics(party).get(RUNNING)}"
        time.sleep(0.05)


def _wait_gone(pids: list[int], timeout_s: float = 10.0) -> list[int]:
    """The processes of `pids` still alive after up to `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while any(alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    return [pid for pid in pids if alive(pid)]


class Background:
    """fn(*args) for each args of `calls`, each in its own thread: the result or the exception, and when it ended."""

    def __init__(self, fn, calls: list[tuple]) -> None:
        self.results: list[object] = [None] * len(calls)
        self.ended: list[float | None] = [None] * len(calls)
        self.threads = [threading.Thread(target=self._run, args=(i, fn, args)) for i, args in enumerate(calls)]
        for thread in self.threads:
            thread.start()

    def _run(self, i: int, fn, args: tuple) -> None:
        try:
            self.results[i] = fn(*args)
        except Exception as err:  # noqa: BLE001 - the test looks at it
            self.results[i] = err
        self.ended[i] = time.monotonic()

    def running(self) -> bool:
        return any(t.is_alive() for t in self.threads)

    def join(self, timeout_s: float = 120.0) -> list[object]:
        deadline = time.monotonic() + timeout_s
        for thread in self.threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        assert not self.running(), f"still running after {timeout_s:g} s"
        return self.results


def _infer(address: str, dealer, certs, images: np.ndarray, batch_size: int | None = None) -> PartyReport:
    """One session of a fresh Client: its report (logits, the encoding its server stated)."""
    with _client(address, dealer, certs) as client:
        return client.session(images, batch_size=batch_size)


def _session_lines(party) -> list[dict]:
    import json

    return [json.loads(line) for line in party.stdout().splitlines() if line.startswith('{"event": "session_end"')]


def test_health_reports_serving_on_server_and_dealer(served, dealer, certs):
    from grpc_health.v1 import health_pb2

    assert _health(served[1], certs) == health_pb2.HealthCheckResponse.SERVING
    assert _health(served[1], certs, "twinfer.Serve") == health_pb2.HealthCheckResponse.SERVING
    assert _health(dealer[1], certs, "twinfer.Dealer", role="dealer") == health_pb2.HealthCheckResponse.SERVING


def test_ten_clients_in_sequence_each_equal_to_plaintext(served, dealer, certs, reference):
    images, expected = reference
    with _client(served[1], dealer, certs) as client:
        sessions = set()
        for i in range(10):
            _assert_plaintext(client.session(images[2 * i : 2 * i + 2]), expected[2 * i : 2 * i + 2])
            sessions.add(client.last_session)
    assert len(sessions) == 10 and all(re.fullmatch(r"[0-9a-f]{32}", s) for s in sessions)  # 128 bits, fresh each time


def test_four_clients_at_once_each_equal_to_plaintext(served, dealer, certs, reference):
    images, expected = reference
    _wait_running(served[0], lambda n: n == 0)  # the last session of the sequence has been counted
    results = Background(_infer, [(served[1], dealer, certs, images[4 * i : 4 * i + 4], 2) for i in range(4)]).join()
    for i, report in enumerate(results):
        assert not isinstance(report, Exception), report
        _assert_plaintext(report, expected[4 * i : 4 * i + 4])
    ends = _session_lines(served[0])
    assert {e["peer"] is not None for e in ends[-4:]} == {True}


def test_twinfer_query_from_the_command_line(served, dealer, certs, reference, tmp_path):
    import json

    images, expected = reference
    np.save(tmp_path / "x.npy", images[:2])
    out = tmp_path / "logits.npy"
    query = subprocess.run(
        standing_command("query", "--server", served[1], "--dealer", dealer[1], "--input", str(tmp_path / "x.npy"),
                         "--tls", str(certs), "--output", str(out), "--json", *COMMON),
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert query.returncode == 0, query.stderr
    report = json.loads(query.stdout.strip().splitlines()[-1])
    assert re.fullmatch(r"[0-9a-f]{32}", report["session"]) and report["role"] == "client"
    _assert_plaintext(report | {"logits": np.load(out)}, expected[:2])


def test_past_max_sessions_is_busy_and_made_up_or_replayed_ids_are_refused(served, dealer, certs, reference, tmp_path):
    images, expected = reference
    client_tls = TlsIdentity.from_dir(certs, "client")
    _wait_running(served[0], lambda n: n == 0)
    opener = SessionOpener(served[1], options=OPTIONS, tls=client_tls)
    try:
        tickets = [opener.open() for _ in range(4)]  # held, not yet dialed: the four running sessions
        assert len({t.port for t in tickets}) == 2  # spread over both workers
        with pytest.raises(BusyError, match=r"busy: 4 sessions running.*--max-sessions 4"):
            opener.open()
        np.save(tmp_path / "x.npy", images[:2])
        query = subprocess.run(
            standing_command("query", "--server", served[1], "--dealer", dealer[1], "--input", str(tmp_path / "x.npy"), "--tls", str(certs)),
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert query.returncode == 8, query.stderr
        assert "busy" in query.stderr and "Traceback" not in query.stderr

        def party(session_id: str, port: int) -> ClientParty:
            config = PartyConfig(spec=SessionSpec(options=OPTIONS), role="client", session_id=session_id, server_address=worker_address(served[1], port), dealer_address=dealer[1], tls=client_tls)  # fmt: skip
            return ClientParty(images[:2], 2, config)

        # Three tickets dialed at once (before --accept-timeout), each an ordinary session.
        for report in Background(lambda t: party(t.session_id, t.port).run(), [(t,) for t in tickets[:3]]).join():
            assert not isinstance(report, Exception), report
            _assert_plaintext(report, expected[:2])
        with pytest.raises(ProtocolError, match=tickets[0].session_id):  # replayed: the dealer and the worker refuse it
            party(tickets[0].session_id, tickets[0].port).run()
        made_up = secrets.token_hex(16)
        with pytest.raises(ProtocolError, match=rf"unknown session '{made_up}'"):
            party(made_up, tickets[1].port).run()
        # The last ticket is abandoned: its worker gives up after --accept-timeout and takes new sessions.
        _wait_running(served[0], lambda n: n == 0)
    finally:
        opener.close()
    # Only a client's certificate may open a session.
    wrong = SessionOpener(served[1], options=OPTIONS, tls=TlsIdentity.from_dir(certs, "dealer"))
    try:
        with pytest.raises(PeerError, match="certificate names role 'dealer', expected client"):
            wrong.open()
    finally:
        wrong.close()


def test_metrics_and_the_log_count_what_ran(served):
    m = _metrics(served[0])
    # 10 in sequence, 4 at once, 1 query, 4 tickets (three run, one abandoned); a replayed id opens no session
    assert m['twinfer_sessions_started_total{role="server"}'] == 19
    assert m['twinfer_sessions_finished_total{role="server"}'] == 18
    assert m['twinfer_sessions_failed_total{kind="timeout",role="server"}'] == 1
    assert m['twinfer_sessions_refused_total{reason="busy",role="server"}'] == 2
    assert m['twinfer_samples_total{role="server"}'] == 10 * 2 + 4 * 4 + 2 + 3 * 2
    assert m['twinfer_inference_latency_seconds_count{role="server"}'] == 18
    assert m['twinfer_rounds_total{role="server"}'] > 0 and m['twinfer_bytes_online_total{role="server"}'] > 0
    ends = _session_lines(served[0])
    assert len(ends) == 19 and sum(e["outcome"] == "ok" for e in ends) == 18
    assert {"session", "role", "peer", "latency_s", "rounds", "bytes_online", "outcome"} <= set(ends[0])


def test_a_query_beyond_what_the_served_model_holds_is_refused_before_sharing(served, dealer, certs, reference, tmp_path):
    """The model declares no input range: the server holds the widest its checks accept and says so at
    the handshake; a query of inputs beyond it exits 4 naming that range, and its session is logged
    as an input error; the session log of a good one carries the error its server stated."""
    import json

    images, expected = reference
    _assert_plaintext(_infer(served[1], dealer, certs, images[:2]), expected[:2])
    np.save(tmp_path / "big.npy", images[:2] * 1e4)
    query = subprocess.run(
        standing_command("query", "--server", served[1], "--dealer", dealer[1], "--input", str(tmp_path / "big.npy"),
                         "--tls", str(certs), *COMMON),
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert query.returncode == 4, query.stderr
    assert "what the server's model holds at 16 fractional bits" in query.stderr and "Traceback" not in query.stderr
    _wait_running(served[0], lambda n: n == 0)  # both sessions have ended and been logged
    ok = [e for e in _session_lines(served[0]) if e["outcome"] == "ok"]
    assert ok and all(e["stated_error"] > 0 and e["fraction_bits"] == 16 for e in ok)
    assert json.dumps(ok[-1])  # the log line is plain JSON


def test_sigterm_drains_a_running_session_then_exits_zero(served, dealer, certs, reference):
    from grpc_health.v1 import health_pb2

    images, expected = reference
    party, address = served
    workers = child_pids(party.proc.pid)
    assert len(workers) >= 2
    session = Background(_infer, [(served[1], dealer, certs, images, 2)])  # 20 batches: seconds
    _wait_running(party, lambda n: n >= 1)
    os.kill(party.proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + 5
    while _health(address, certs) != health_pb2.HealthCheckResponse.NOT_SERVING:
        assert time.monotonic() < deadline, "health still SERVING after SIGTERM"
        time.sleep(0.05)
    assert party.proc.poll() is None and session.running()  # draining: the session runs on
    with _client(served[1], dealer, certs) as late, pytest.raises(BusyError, match="shutting down"):
        late.infer(images[:2])
    (report,) = session.join()
    assert not isinstance(report, Exception), report
    _assert_plaintext(report, expected)
    assert party.proc.wait(timeout=60) == 0, party.stderr()
    assert _wait_gone(workers) == []  # no worker (nor multiprocessing helper) left behind


def _worker_pids(pid: int) -> list[int]:
    """The worker processes of a server (its children but multiprocessing's resource tracker)."""
    return [c for c in child_pids(pid) if b"resource_tracker" not in (Path("/proc") / str(c) / "cmdline").read_bytes()]


def test_a_dead_worker_is_replaced_and_sigkill_of_the_server_ends_its_client(tmp_path, onnx_files, dealer, certs, reference):
    images, expected = reference
    with socket.socket() as probe:  # a free port for the one worker (--worker-ports)
        probe.bind(("127.0.0.1", 0))
        worker_port = probe.getsockname()[1]
    party, address = _serve(tmp_path, onnx_files["fashion_cnn"], dealer[1], certs, "--workers", "1", "--worker-ports", str(worker_port))
    try:
        socket.create_connection(("127.0.0.1", worker_port), timeout=5).close()
        (first,) = _worker_pids(party.proc.pid)
        os.kill(first, signal.SIGKILL)
        deadline = time.monotonic() + 90
        while True:  # busy until its replacement listens
            try:
                report = _infer(address, dealer, certs, images[:2])
                break
            except BusyError:
                assert time.monotonic() < deadline, "the dead worker was not replaced"
                time.sleep(0.5)
        _assert_plaintext(report, expected[:2])
        assert first not in _worker_pids(party.proc.pid) and len(_worker_pids(party.proc.pid)) == 1
        socket.create_connection(("127.0.0.1", worker_port), timeout=5).close()  # the replacement took the same port
        workers = child_pids(party.proc.pid)
        session = Background(_infer, [(address, dealer, certs, images, 2)])
        time.sleep(1.5)  # inside the session
        os.kill(party.proc.pid, signal.SIGKILL)
        killed = time.monotonic()
        (err,) = session.join(TIMEOUT_S + 10)
        assert isinstance(err, PeerError) and not isinstance(err, AuthError), err
        assert "connection to server lost" in str(err) and session.ended[0] - killed < TIMEOUT_S + 5
        assert _wait_gone(workers) == []  # the workers followed their main process
    finally:
        party.stop(0)


def test_dealer_counts_its_sessions_then_drains_on_sigterm_and_exits_zero(dealer):
    party, _ = dealer
    time.sleep(2.5)  # a finished session is forgotten (and counted) shortly after its parties closed it
    m = _metrics(party)
    # 19 sessions ran to the end on the first server (one while it drained), 1 more on the second
    assert m['twinfer_sessions_finished_total{role="dealer"}'] >= 20
    failed = {k: v for k, v in m.items() if k.startswith("twinfer_sessions_failed_total")}
    assert sum(failed.values()) >= 3, failed  # the made-up id, the abandoned ticket, the client of the killed server
    assert m['twinfer_bytes_offline_total{role="dealer"}'] > 0
    os.kill(party.proc.pid, signal.SIGTERM)
    assert party.proc.wait(timeout=30) == 0, party.stderr()
    lines = _session_lines(party)
    assert lines and {e["role"] for e in lines} == {"dealer"}
    assert any(e["outcome"] == "ok" and e["bytes_offline"] > 0 for e in lines)
