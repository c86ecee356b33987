"""The gRPC peer transport: frames, tags, deadlines, failures and limits, over real gRPC on 127.0.0.1."""

from __future__ import annotations

import pickle
import socket
import threading
import time
from collections.abc import Iterator

import numpy as np
import pytest

from twinfer.parties.errors import (
    FrameTooLargeError,
    InputError,
    ModelError,
    PeerError,
    PeerTimeoutError,
    ProtocolError,
    TwinferError,
)
from twinfer.parties.wire.transport import (
    MiB,
    GrpcTransport,
    PeerServicer,
    TransportOptions,
    _array_to_frames,
    add_peer_servicer,
    _frames_to_array,
    start_server,
)

# Short deadlines keep every failing path quick; close() waits at most recv_timeout_s for the peer.
FAST = TransportOptions(recv_timeout_s=2.0, connect_timeout_s=2.0)


class Pair:
    """A listening server with one accepted stream, and the dialer at the other end."""

    def __init__(self, server_opts: TransportOptions, client_opts: TransportOptions, session_id: str = "s1") -> None:
        self.servicer = PeerServicer()
        self.grpc_server, self.port = start_server(
            [(self.servicer, add_peer_servicer)], "127.0.0.1:0", server_opts
        )
        self.server = GrpcTransport(session_id=session_id, role="server", peer_role="client", options=server_opts)
        self.servicer.expect(self.server)
        self.client = GrpcTransport(session_id=session_id, role="client", peer_role="server", options=client_opts)
        self.client.dial(f"127.0.0.1:{self.port}")
        self.server.wait_accepted()

    def close(self) -> None:
        # The accepting end first: its close ends the stream, so the dialer's close does not wait.
        self.server.close()
        self.client.close()
        self.grpc_server.stop(0)


@pytest.fixture
def pair() -> Iterator[Pair]:
    p = Pair(FAST, FAST)
    yield p
    p.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- serialization ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "array",
    [
        np.array([-(2**63), -1, 0, 1, 2**63 - 1], dtype=np.int64),
        np.linspace(-3, 3, 24, dtype=np.float32).reshape(2, 3, 4),
        np.arange(256, dtype=np.uint8).reshape(16, 16),
        np.zeros((0,), dtype=np.int64),
        np.zeros((3, 0, 2), dtype=np.float32),
        np.array(-7, dtype=np.int64),
        np.array(2.5, dtype=np.float32),
        np.arange(12, dtype=np.int64).reshape(3, 4).T,  # not contiguous
    ],
    ids=["int64", "float32", "uint8", "empty", "empty-3d", "0d-int64", "0d-float32", "transposed"],
)
def test_frames_round_trip(array):
    frames = list(_array_to_frames("s", 3, "t", array, 1024))
    assert len(frames) == 1
    assert frames[0].chunk_count == 1 and frames[0].total_bytes == array.nbytes
    out = _frames_to_array(frames)
    assert out.dtype == array.dtype
    assert out.shape == array.shape
    np.testing.assert_array_equal(out, array)
    out[...] = 0  # the result owns writable memory
    assert out.flags.writeable


def test_frames_round_trip_many_chunks():
    array = np.arange(5000, dtype=np.int64).reshape(50, 100) * (2**40 + 1)
    frames = list(_array_to_frames("s", 9, "big", array, 1024))
    assert len(frames) == (array.nbytes + 1023) // 1024 == 40
    assert [f.chunk_index for f in frames] == list(range(40))
    assert all(f.chunk_count == 40 and f.seq == 9 and f.tag == "big" and f.session_id == "s" for f in frames)
    assert all(len(f.data) <= 1024 for f in frames)
    out = _frames_to_array(frames)
    assert out.dtype == np.int64 and out.shape == (50, 100)
    np.testing.assert_array_equal(out, array)


def test_frames_with_missing_bytes_are_rejected():
    frames = list(_array_to_frames("s", 1, "t", np.arange(512, dtype=np.int64), 1024))
    with pytest.raises(ProtocolError, match="carries 3072 bytes"):
        _frames_to_array(frames[:-1])


def test_options_reject_bad_values():
    with pytest.raises(ValueError, match="chunk_bytes"):
        TransportOptions(chunk_bytes=100)
    with pytest.raises(ValueError, match="timeouts"):
        TransportOptions(recv_timeout_s=0)
    with pytest.raises(ValueError, match="timeouts"):
        TransportOptions(accept_timeout_s=0)
    assert TransportOptions(connect_timeout_s=3).accept_deadline_s == 3
    assert TransportOptions(connect_timeout_s=3, accept_timeout_s=30).accept_deadline_s == 30
    assert TransportOptions(chunk_bytes=1024).grpc_message_limit > 1024


# -- messages over gRPC -------------------------------------------------------------------------


def test_send_recv_both_directions(pair):
    x = np.arange(10, dtype=np.int64) - 5
    y = np.full((2, 3), 0.25, dtype=np.float32)
    pair.client.send("share", x)
    pair.server.send("reply", y)
    pair.client.send("scalar", np.array(42, dtype=np.int64))
    pair.client.send("nothing", np.zeros((0, 4), dtype=np.uint8))
    got_x = pair.server.recv("share")
    got_y = pair.client.recv("reply")
    got_scalar = pair.server.recv("scalar")
    got_empty = pair.server.recv("nothing")
    np.testing.assert_array_equal(got_x, x)
    assert got_x.dtype == np.int64
    np.testing.assert_array_equal(got_y, y)
    assert got_y.dtype == np.float32 and got_y.shape == (2, 3)
    assert got_scalar.shape == () and got_scalar == 42
    assert got_empty.shape == (0, 4) and got_empty.dtype == np.uint8
    # Many round trips keep their order and sequence numbers.
    for i in range(20):
        pair.server.send("ping", np.array([i], dtype=np.int64))
        assert pair.client.recv("ping")[0] == i
        pair.client.send("pong", np.array([-i], dtype=np.int64))
        assert pair.server.recv("pong")[0] == -i


def test_large_tensor_travels_in_chunks_with_default_options():
    p = Pair(TransportOptions(), TransportOptions())
    frames_seen: list[int] = []
    original = p.server._incoming.put

    def spy(item):
        if hasattr(item, "chunk_index"):
            frames_seen.append(item.chunk_index)
        original(item)

    p.server._incoming.put = spy
    try:
        rng = np.random.default_rng(0)
        big = rng.integers(-(2**63), 2**63 - 1, size=(3, 250_000), dtype=np.int64)  # 6 MB > 4 MiB
        assert big.nbytes > 4 * MiB
        p.client.send("big", big)
        got = p.server.recv("big")
        assert got.dtype == np.int64 and got.shape == big.shape
        np.testing.assert_array_equal(got, big)
        assert frames_seen == [0, 1]
        # and back
        p.server.send("big", got)
        np.testing.assert_array_equal(p.client.recv("big"), big)
    finally:
        p.close()


def test_unknown_session_is_named_to_the_dialer():
    servicer = PeerServicer()
    grpc_server, port = start_server([(servicer, add_peer_servicer)], "127.0.0.1:0", FAST)
    waiting = GrpcTransport(session_id="expected-session", role="server", peer_role="client", options=FAST)
    servicer.expect(waiting)
    stranger = GrpcTransport(session_id="other-session-42", role="client", peer_role="server", options=FAST)
    try:
        stranger.dial(f"127.0.0.1:{port}")
        start = time.monotonic()
        with pytest.raises((PeerError, ProtocolError)) as info:
            stranger.recv("anything")
        assert time.monotonic() - start < 1.5
        assert "other-session-42" in str(info.value)
        assert "unknown session" in str(info.value)
        assert "expected-session" not in str(info.value)  # valid session ids are never told to a stranger
    finally:
        stranger.close()
        waiting.close()
        grpc_server.stop(0)


def test_wrong_tag_names_both_tags(pair):
    pair.client.send("all_reduce", np.zeros(2, dtype=np.int64))
    with pytest.raises(ProtocolError) as info:
        pair.server.recv("broadcast")
    message = str(info.value)
    assert "'broadcast'" in message and "'all_reduce'" in message


def test_recv_deadline():
    opts = TransportOptions(recv_timeout_s=0.5, connect_timeout_s=2.0)
    p = Pair(opts, opts)
    try:
        start = time.monotonic()
        with pytest.raises(PeerTimeoutError) as info:
            p.server.recv("never")
        elapsed = time.monotonic() - start
        assert 0.4 < elapsed < 2.0
        assert "'never'" in str(info.value) and "0.5 s" in str(info.value)
    finally:
        p.close()


def test_wait_accepted_has_a_deadline():
    opts = TransportOptions(recv_timeout_s=1.0, connect_timeout_s=0.3)
    lonely = GrpcTransport(session_id="nobody-dials", role="server", peer_role="client", options=opts)
    start = time.monotonic()
    with pytest.raises(PeerTimeoutError, match="nobody-dials"):
        lonely.wait_accepted()
    assert time.monotonic() - start < 1.5


def test_dial_where_nothing_listens():
    opts = TransportOptions(recv_timeout_s=1.0, connect_timeout_s=0.5)
    t = GrpcTransport(session_id="s", role="client", peer_role="server", options=opts)
    port = _free_port()
    start = time.monotonic()
    with pytest.raises(PeerError) as info:
        t.dial(f"127.0.0.1:{port}")
    assert time.monotonic() - start < opts.connect_timeout_s + 1.0
    assert "not reachable" in str(info.value) and str(port) in str(info.value)


@pytest.mark.parametrize(
    "failing,error_type", [("server", PeerError), ("client", PeerError), ("client", InputError)]
)
def test_fail_reaches_the_peer_with_the_same_error_id(pair, failing, error_type):
    me, peer = (pair.server, pair.client) if failing == "server" else (pair.client, pair.server)
    error = error_type("input has 3 channels, the model wants 1", origin=failing)
    done = threading.Thread(target=me.fail, args=(error,))
    done.start()  # the dialer's close waits (bounded) for the peer to end its side
    start = time.monotonic()
    with pytest.raises(TwinferError) as info:
        peer.recv("next")
    if error_type is PeerError:
        assert isinstance(info.value, PeerError)
    assert time.monotonic() - start < 1.5
    assert info.value.error_id == error.error_id
    assert info.value.origin == failing
    assert "3 channels" in str(info.value)
    peer.close()
    done.join(timeout=5)
    assert not done.is_alive()
    with pytest.raises(PeerError, match="closed"):
        me.send("late", np.zeros(1))


def test_sender_refuses_a_tensor_over_max_tensor_bytes():
    opts = TransportOptions(recv_timeout_s=1.0, connect_timeout_s=2.0, max_tensor_bytes=1000)
    p = Pair(FAST, opts)
    try:
        with pytest.raises(FrameTooLargeError, match="max_tensor_bytes=1000"):
            p.client.send("big", np.zeros(126, dtype=np.int64))  # 1008 bytes
        assert p.client.metrics.total().messages_sent == 0
        # nothing was sent, so the stream is still usable and in sequence
        p.client.send("ok", np.zeros(125, dtype=np.int64))
        assert p.server.recv("ok").shape == (125,)
    finally:
        p.close()


def test_receiver_refuses_an_announced_tensor_over_max_tensor_bytes():
    p = Pair(TransportOptions(recv_timeout_s=1.0, max_tensor_bytes=4096), FAST)
    try:
        p.client.send("big", np.zeros(1024, dtype=np.int64))
        with pytest.raises(FrameTooLargeError, match="8192 bytes"):
            p.server.recv("big")
    finally:
        p.close()


SMALL = TransportOptions(recv_timeout_s=2.0, connect_timeout_s=2.0, chunk_bytes=1024)
LARGE = TransportOptions(recv_timeout_s=2.0, connect_timeout_s=2.0, chunk_bytes=1 * MiB)


def _assert_too_large(transport: GrpcTransport) -> None:
    start = time.monotonic()
    with pytest.raises((FrameTooLargeError, PeerError)) as info:
        transport.recv("x")
    assert time.monotonic() - start < 1.5
    assert isinstance(info.value, FrameTooLargeError) or "larger than" in str(info.value)


def _last_error(transport: GrpcTransport) -> Exception | None:
    ended = transport._ended
    return None if ended is None else ended.error


def test_dialer_with_small_limit_refuses_a_large_chunk():
    p = Pair(LARGE, SMALL)
    try:
        p.server.send("x", np.zeros(512 * 1024, dtype=np.uint8))
        _assert_too_large(p.client)
        assert isinstance(_last_error(p.client), FrameTooLargeError)
    finally:
        p.close()


def test_listener_with_small_limit_refuses_a_large_chunk():
    p = Pair(SMALL, LARGE)  # the gRPC server itself runs with the 1 KiB chunk limit
    try:
        p.client.send("x", np.zeros(512 * 1024, dtype=np.uint8))
        _assert_too_large(p.server)
        # the sender learns too, and its error says a frame was too large rather than hanging
        _assert_too_large(p.client)
    finally:
        p.close()


def test_chunk_over_receivers_chunk_bytes_within_grpc_limit():
    # The listener's gRPC server accepts large messages but its transport expects 1 KiB chunks.
    servicer = PeerServicer()
    grpc_server, port = start_server([(servicer, add_peer_servicer)], "127.0.0.1:0", LARGE)
    server = GrpcTransport(session_id="s", role="server", peer_role="client", options=SMALL)
    servicer.expect(server)
    client = GrpcTransport(session_id="s", role="client", peer_role="server", options=LARGE)
    try:
        client.dial(f"127.0.0.1:{port}")
        server.wait_accepted()
        client.send("x", np.zeros(4096, dtype=np.uint8))
        with pytest.raises(FrameTooLargeError, match="chunk_bytes=1024"):
            server.recv("x")
    finally:
        server.close()
        client.close()
        grpc_server.stop(0)


def test_peer_closing_the_stream(pair):
    pair.server.close()
    start = time.monotonic()
    with pytest.raises(PeerError, match="server closed the stream"):
        pair.client.recv("next")
    assert time.monotonic() - start < 1.0
    # the end is remembered: later calls fail at once too
    with pytest.raises(PeerError):
        pair.client.recv("next")
    with pytest.raises(PeerError):
        pair.client.send("next", np.zeros(1))


def test_dialer_closing_the_stream(pair):
    closer = threading.Thread(target=pair.client.close)
    closer.start()
    start = time.monotonic()
    with pytest.raises(PeerError, match="client closed the stream"):
        pair.server.recv("next")
    assert time.monotonic() - start < 1.0
    pair.server.close()
    closer.join(timeout=5)
    assert not closer.is_alive()


def test_frames_queued_before_close_are_delivered(pair):
    pair.client.send("last", np.arange(3, dtype=np.int64))
    closer = threading.Thread(target=pair.client.close)
    closer.start()
    np.testing.assert_array_equal(pair.server.recv("last"), [0, 1, 2])
    with pytest.raises(PeerError, match="closed"):
        pair.server.recv("more")
    pair.server.close()
    closer.join(timeout=5)


def test_metrics_count_bytes_and_messages(pair):
    a = np.zeros((4, 5), dtype=np.int64)  # 160 bytes
    b = np.zeros(7, dtype=np.uint8)  # 7 bytes
    with pair.client.metrics.layer("conv1"):
        pair.client.send("a", a)
        pair.client.send("b", b)
    pair.server.send("c", np.zeros(3, dtype=np.float32))  # 12 bytes
    pair.server.recv("a")
    pair.server.recv("b")
    pair.client.recv("c")
    sent = pair.client.metrics.snapshot()
    assert sent["conv1"]["messages_sent"] == 2 and sent["conv1"]["bytes_sent"] == 167
    assert pair.client.metrics.total().bytes_received == 12
    server_total = pair.server.metrics.total()
    assert server_total.bytes_received == 167
    assert server_total.bytes_sent == 12 and server_total.messages_sent == 1


# -- errors ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cls", [TwinferError, PeerError, PeerTimeoutError, ProtocolError, FrameTooLargeError, ModelError, InputError]
)
def test_errors_keep_id_and_origin_through_pickle(cls):
    err = cls("something broke", error_id="abc123def456", origin="client")
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is cls
    assert back.error_id == "abc123def456"
    assert back.origin == "client"
    assert back.message == "something broke"
    assert back.kind == cls.kind
    assert str(back) == str(err)
    assert "abc123def456" in str(back)


def test_error_ids_are_fresh_by_default():
    assert PeerError("x").error_id != PeerError("x").error_id
