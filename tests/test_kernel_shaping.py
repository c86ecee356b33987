"""Kernel shaping (namespaces + veth + tbf) and the delaying TCP relay, measured for real."""

from __future__ import annotations

import asyncio
import json
import os
import select
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from twinfer.deploy.netem.kernel_shaping import KernelLink, check_kernel_shaping_available, list_namespaces, tbf_args
from twinfer.deploy.netem.tcp_delay_relay import bound_address, split_address, start_relay
from twinfer.parties.wire.network_profile import parse_profile
from tests.helpers.stated import assert_within_stated_error

PROFILE = "rtt=40ms,bw=100mbit"
RTT_S, BANDWIDTH_BPS = 0.040, 100e6
RELAY_DELAY_S = 0.030
SERVER_PORT = 5001  # a fresh namespace has no other listener
PINGS, WARMUP, BULK_BYTES = 7, 3, 5_000_000

# Runs in the server namespace: one connection at a time; the first line says what to do.
SERVER_SCRIPT = r"""
import socket, sys, time
srv = socket.create_server((sys.argv[1], int(sys.argv[2])))
print("ready", flush=True)
while True:
    conn, _ = srv.accept()
    conn.settimeout(20)
    with conn:
        f = conn.makefile("rb", buffering=0)
        cmd, _, arg = f.readline().decode().strip().partition(" ")
        conn.sendall(b"ok\n")
        if cmd == "echo":
            while data := conn.recv(65536):
                conn.sendall(data)
        elif cmd == "up":
            left, first, t0 = int(arg), None, 0.0
            while left > 0:
                data = conn.recv(min(left, 1 << 20))
                if not data:
                    break
                now = time.perf_counter()
                if first is None:
                    first, t0 = len(data), now
                left -= len(data)
            conn.sendall(f"{int(arg) - left} {first} {now - t0}\n".encode())
        elif cmd == "down":
            conn.sendall(bytes(int(arg)))
"""

# Runs in the client namespace: pings through the relay, then bulk up and down; prints JSON.
CLIENT_SCRIPT = r"""
import json, socket, sys, time
host, port = sys.argv[1].rsplit(":", 1)
pings, warmup, bulk = int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])

def connect(cmd):
    s = socket.create_connection((host, int(port)), timeout=20)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    s.sendall(cmd.encode() + b"\n")
    assert s.recv(3) == b"ok\n"
    return s

def recv_exactly(s, n):
    buf = b""
    while len(buf) < n:
        data = s.recv(n - len(buf))
        assert data, "connection closed early"
        buf += data
    return buf

with connect("echo") as s:
    rtts = []
    for i in range(warmup + pings):
        t = time.perf_counter()
        s.sendall(b"x" * 64)
        recv_exactly(s, 64)
        rtts.append(time.perf_counter() - t)

with connect(f"up {bulk}") as s:
    s.sendall(bytes(bulk))
    got, first, elapsed = s.makefile("rb").readline().split()
    assert int(got) == bulk, got
    up_bps = (bulk - int(first)) * 8 / float(elapsed)

with connect(f"down {bulk}") as s:
    got, first = 0, None
    while got < bulk:
        data = s.recv(1 << 20)
        assert data, "connection closed early"
        now = time.perf_counter()
        if first is None:
            first, t0 = len(data), now
        got += len(data)
    down_bps = (bulk - first) * 8 / (now - t0)

print(json.dumps({"rtts": rtts[warmup:], "up_bps": up_bps, "down_bps": down_bps}))
"""


def _read_line(proc: subprocess.Popen, timeout: float) -> str:
    """One line of a child's stdout, or fail after `timeout` (a hung child must not hang the test)."""
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    assert ready, f"no output within {timeout} s"
    return proc.stdout.readline().decode().strip()


def _within(value: float, expected: float, tolerance: float) -> bool:
    return abs(value - expected) <= tolerance * expected


# ---------------------------------------------------------------- relay on loopback alone


class EchoServer:
    """Echoes each connection on loopback; closes a connection after echoing b'!close'."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.ended = threading.Semaphore(0)
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    def _echo(self, conn: socket.socket) -> None:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data)
                if data.endswith(b"!close"):
                    break
        self.ended.release()


@pytest.fixture(scope="module")
def echo_server():
    server = EchoServer()
    yield server
    server.sock.close()


@pytest.fixture(scope="module")
def relay(echo_server: EchoServer, tmp_path_factory: pytest.TempPathFactory):
    address_file = tmp_path_factory.mktemp("relay") / "relay.addr"
    argv = [sys.executable, "-m", "twinfer.deploy.netem.tcp_delay_relay", "--listen", "127.0.0.1:0",
            "--target", f"127.0.0.1:{echo_server.port}", "--one-way-delay", str(RELAY_DELAY_S),
            "--address-file", str(address_file)]  # fmt: skip
    proc = subprocess.Popen(argv, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 15
        while not address_file.exists():
            assert proc.poll() is None, f"relay exited: {proc.stderr.read().decode()}"
            assert time.monotonic() < deadline, "relay did not start"
            time.sleep(0.02)
        yield split_address(address_file.read_text())
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _connect(address: tuple[str, int]) -> socket.socket:
    s = socket.create_connection(address, timeout=10)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def _recv_exactly(s: socket.socket, n: int) -> bytes:
    chunks, got = [], 0
    while got < n:
        data = s.recv(min(n - got, 1 << 20))
        assert data, f"connection closed after {got} of {n} bytes"
        chunks.append(data)
        got += len(data)
    return b"".join(chunks)


def test_relay_delays_each_direction(relay):
    with _connect(relay) as s:
        rtts = []
        for _ in range(WARMUP + PINGS):
            t = time.perf_counter()
            s.sendall(b"ping")
            _recv_exactly(s, 4)
            rtts.append(time.perf_counter() - t)
    one_way = statistics.median(rtts[WARMUP:]) / 2
    print(f"relay on loopback: one-way {one_way * 1e3:.2f} ms")
    assert _within(one_way, RELAY_DELAY_S, 0.10), f"one-way {one_way * 1e3:.2f} ms, expected {RELAY_DELAY_S * 1e3} ms"


def test_relay_pipelines_chunks(relay):
    # A chunk sent while an earlier one is in flight waits for its own delay only (serialized
    # delays would bring it back after 2.5 delays instead of 2). Noise only adds: take the best try.
    seconds = [_second_chunk_round_trip(relay) for _ in range(3)]
    print(f"relay on loopback: chunk sent mid-flight came back after {min(seconds) * 1e3:.2f} ms (best of 3)")
    assert _within(min(seconds), 2 * RELAY_DELAY_S, 0.10), f"second chunk took {[f'{x * 1e3:.1f}' for x in seconds]} ms"


def _second_chunk_round_trip(address: tuple[str, int]) -> float:
    with _connect(address) as s:
        s.sendall(b"a")
        time.sleep(RELAY_DELAY_S / 2)
        t1 = time.perf_counter()
        s.sendall(b"b")
        assert _recv_exactly(s, 1) == b"a"
        assert _recv_exactly(s, 1) == b"b"
        return time.perf_counter() - t1


def test_relay_keeps_data_intact_both_ways(relay):
    payload = os.urandom(1 << 20)
    with _connect(relay) as s:
        sender = threading.Thread(target=s.sendall, args=(payload,))
        sender.start()  # the echo comes back while we send: read concurrently
        echoed = _recv_exactly(s, len(payload))
        sender.join(timeout=10)
    assert echoed == payload


def test_relay_propagates_close(relay, echo_server: EchoServer):
    with _connect(relay) as s:  # the server closes: the client reads the data, then EOF
        s.sendall(b"bye!close")
        assert _recv_exactly(s, 9) == b"bye!close"
        assert s.recv(1) == b""
    assert echo_server.ended.acquire(timeout=2)
    with _connect(relay) as s:  # the client closes: the server's side ends too
        s.sendall(b"x")
        _recv_exactly(s, 1)
    assert echo_server.ended.acquire(timeout=2), "the server side was not closed"


def test_relay_closes_client_when_target_refuses():
    dead = socket.create_server(("127.0.0.1", 0))
    dead_port = dead.getsockname()[1]
    dead.close()

    async def attempt() -> bytes:
        server = await start_relay("127.0.0.1:0", f"127.0.0.1:{dead_port}", 0.01)
        async with server:
            reader, writer = await asyncio.open_connection(*split_address(bound_address(server)))
            data = await asyncio.wait_for(reader.read(1), 5)
            writer.close()
            return data

    assert asyncio.run(attempt()) == b""


def test_tbf_args_burst_holds_a_few_milliseconds():
    args = tbf_args(100e6)
    assert args[:3] == ["tbf", "rate", "100000000bit"]
    assert int(args[args.index("burst") + 1]) >= 100e6 / 8 * 0.003
    assert int(tbf_args(1e6)[args.index("burst") + 1]) >= 16 * 1024  # at least a few full frames


# ---------------------------------------------------------------- namespaces, veth, tbf


@pytest.fixture(scope="module")
def kernel_ok() -> None:
    reason = check_kernel_shaping_available()
    if reason is not None:
        pytest.skip(reason)


def _measure_link() -> tuple[float, float, float]:
    """RTT, up and down throughput through a fresh KernelLink; its namespaces gone afterwards."""
    with KernelLink(PROFILE) as link:
        assert {link.server_ns, link.client_ns} <= set(list_namespaces())
        server = link.run_in(link.server_ns, [sys.executable, "-c", SERVER_SCRIPT, link.server_ip, str(SERVER_PORT)], stdout=subprocess.PIPE)
        assert _read_line(server, 10) == "ready"
        address = link.start_relay(SERVER_PORT)
        assert address.startswith(f"{link.client_ip}:")
        client = link.run_in(link.client_ns, [sys.executable, "-c", CLIENT_SCRIPT, address, str(PINGS), str(WARMUP), str(BULK_BYTES)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
        out, err = client.communicate(timeout=20)
        assert client.returncode == 0, err.decode()
    assert not {link.server_ns, link.client_ns} & set(list_namespaces())
    result = json.loads(out)
    return statistics.median(result["rtts"]), result["up_bps"], result["down_bps"]


def test_kernel_link_rtt_and_bandwidth(kernel_ok):
    # A busy 2-core machine only ever makes a run slower; a wrong shaper misses on every try.
    for attempt in range(3):
        rtt, up, down = _measure_link()
        print(f"kernel link: rtt {rtt * 1e3:.2f} ms, up {up / 1e6:.1f} Mbit/s, down {down / 1e6:.1f} Mbit/s")
        ok = _within(rtt, RTT_S, 0.10) and _within(up, BANDWIDTH_BPS, 0.15) and _within(down, BANDWIDTH_BPS, 0.15)
        if ok or attempt == 2:
            break
    assert _within(rtt, RTT_S, 0.10), f"rtt {rtt * 1e3:.2f} ms"
    assert _within(up, BANDWIDTH_BPS, 0.15), f"up {up / 1e6:.1f} Mbit/s"
    assert _within(down, BANDWIDTH_BPS, 0.15), f"down {down / 1e6:.1f} Mbit/s"


def test_kernel_link_removes_everything_after_an_error(kernel_ok):
    link = KernelLink(PROFILE)
    with pytest.raises(RuntimeError, match="body failed"):
        with link:
            assert Path(f"/var/run/netns/{link.server_ns}").exists()
            assert {link.server_ns, link.client_ns} <= set(list_namespaces())
            # A grandchild outlives its parent's termination; teardown must still end it.
            shell = link.run_in(link.server_ns, ["sh", "-c", "sleep 60 & echo $!; wait"], stdout=subprocess.PIPE)
            grandchild = int(_read_line(shell, 10))
            link.start_relay(SERVER_PORT)
            raise RuntimeError("body failed")
    assert not {link.server_ns, link.client_ns} & set(list_namespaces())
    assert shell.poll() is not None
    assert _gone(grandchild), f"process {grandchild} survived the link"


def _gone(pid: int) -> bool:
    """True when `pid` no longer runs (a zombie awaiting its reaper counts as gone)."""
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            return True
        if state in ("Z", "X"):
            return True
        time.sleep(0.05)
    return False


def test_kernel_link_cleans_up_when_setup_fails(kernel_ok, monkeypatch: pytest.MonkeyPatch):
    from twinfer.deploy.netem import kernel_shaping

    def fail(self, ns: str, veth: str, ip: str) -> None:
        raise kernel_shaping.ShapingError("tc failed on purpose")

    monkeypatch.setattr(KernelLink, "_configure_end", fail)
    link = KernelLink(PROFILE)
    with pytest.raises(kernel_shaping.ShapingError, match="on purpose"):
        with link:
            pass
    assert not {link.server_ns, link.client_ns} & set(list_namespaces())


def test_a_new_link_removes_namespaces_left_by_a_dead_run(kernel_ok):
    finished = subprocess.Popen(["true"])
    finished.wait()
    stale = f"tw-{finished.pid}-0badc0de-s"
    live = f"tw-{os.getpid()}-0badc0de-c"  # this process runs: its namespace stays
    for ns in (stale, live):
        subprocess.run(["ip", "netns", "add", ns], check=True)
    sleeper = subprocess.Popen(["ip", "netns", "exec", stale, "sleep", "60"])
    try:
        with KernelLink(PROFILE) as link:
            names = set(list_namespaces())
            assert stale not in names and live in names and link.server_ns in names
        assert sleeper.wait(timeout=5) != 0  # killed with its namespace
    finally:
        sleeper.kill()
        for ns in (stale, live):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


@pytest.mark.timeout(240)
def test_private_inference_across_namespaces(tmp_path, onnx_files, fashion_cnn, fashion_test):
    """Real `twinfer party` processes in two namespaces: correct, and never under the bound."""
    from twinfer.deploy.netem.kernel_shaping import run_kernel_shaped_session

    reason = check_kernel_shaping_available()
    if reason:
        pytest.skip(reason)
    images = fashion_test[0][:2]
    profile = parse_profile("rtt=10ms,bw=1gbit")
    before = set(list_namespaces())
    report = run_kernel_shaped_session(onnx_files["fashion_cnn"], images, 1, profile)
    assert set(list_namespaces()) == before
    with torch.no_grad():
        reference = fashion_cnn(torch.from_numpy(images)).numpy()
    assert_within_stated_error(report.logits, reference, report.encoding)
    rounds, sent, online = report.batch_rounds[-1], report.batch_bytes_sent[-1], report.batch_bytes_online[-1]
    assert report.batch_latency_s[-1] >= profile.lower_bound_s(rounds, max(sent, online - sent))
