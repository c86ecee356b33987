"""Tensor transport between two parties: one long-lived bidirectional gRPC stream per pair.

Every frame carries the session id, a sequence number that advances in program order, and a
tag naming what the receiver expects; anything else is rejected with a clear error. Every
receive has a deadline. Tensors larger than the chunk size travel as several frames.
"""

from __future__ import annotations

import abc
import logging
import math
import queue
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass

import grpc
import numpy as np

from twinfer.parties.errors import (
    AuthError,
    FrameTooLargeError,
    LocalError,
    PeerError,
    PeerTimeoutError,
    ProtocolError,
    TwinferError,
    error_from_wire,
)
from twinfer.parties.metrics import Metrics
from twinfer.parties.wire.network_profile import LinkShaper, NetworkProfile
from twinfer.parties.proto import twinfer_pb2 as pb
from twinfer.parties.wire.tls import TlsIdentity, channel_options, check_peer_role, handshake_hint
from twinfer.parties.wire.framing import Framed, encode_framed, framed_decoder, join_payloads

log = logging.getLogger(__name__)

MiB = 1024 * 1024
FAIL_GRACE_S = 0.5  # after a failure, how long the dialing end waits for the peer to take its error frame


@dataclass(frozen=True)
class TransportOptions:
    """Deadlines and size limits of one party's links."""

    recv_timeout_s: float = 60.0
    connect_timeout_s: float = 10.0
    # How long a listening party waits for its peer to dial in; None: connect_timeout_s. A
    # person starting parties on two machines by hand needs longer than a dial takes.
    accept_timeout_s: float | None = None
    chunk_bytes: int = 4 * MiB
    max_tensor_bytes: int = 1024 * MiB
    network: NetworkProfile | None = None  # shapes client <-> server, each direction
    dealer_network: NetworkProfile | None = None  # shapes the dealer's link to each party

    def __post_init__(self) -> None:
        accept_bad = self.accept_timeout_s is not None and self.accept_timeout_s <= 0
        if self.recv_timeout_s <= 0 or self.connect_timeout_s <= 0 or accept_bad:
            raise ValueError("timeouts must be positive seconds")
        if not 1024 <= self.chunk_bytes <= 64 * MiB:
            raise ValueError(f"chunk_bytes must be between 1 KiB and 64 MiB, got {self.chunk_bytes}")

    @property
    def accept_deadline_s(self) -> float:
        return self.accept_timeout_s if self.accept_timeout_s is not None else self.connect_timeout_s

    @property
    def grpc_message_limit(self) -> int:
        """Largest gRPC message either end accepts: one chunk plus the frame's header."""
        return self.chunk_bytes + 64 * 1024

    def grpc_options(self) -> list[tuple[str, int]]:
        limit = self.grpc_message_limit
        return [
            ("grpc.max_send_message_length", limit),
            ("grpc.max_receive_message_length", limit),
            # Two servers must never share a port by accident.
            ("grpc.so_reuseport", 0),
        ]


class Transport(abc.ABC):
    """What the communicator needs from a link to the peer."""

    role: str
    peer_role: str
    session_id: str
    metrics: Metrics

    @abc.abstractmethod
    def send(self, tag: str, array: np.ndarray) -> None:
        """Queue `array` for the peer under `tag`; returns without waiting for delivery."""

    @abc.abstractmethod
    def recv(self, tag: str) -> np.ndarray:
        """The peer's next message, which must carry `tag`; raises after the deadline."""

    @abc.abstractmethod
    def fail(self, error: TwinferError) -> None:
        """Tell the peer this party failed with `error`, then close."""

    @abc.abstractmethod
    def close(self) -> None:
        """End the stream after everything queued has been sent."""


class _End:
    """Marks the end of the incoming stream, with the reason."""

    def __init__(self, reason: str, error: Exception | None = None) -> None:
        self.reason = reason
        self.error = error


WireFrame = Framed  # a Frame header and its payload


def encode_frame(frame: WireFrame) -> bytes:
    return encode_framed(frame.header, frame.data)


decode_frame = framed_decoder(pb.Frame)


def _array_to_frames(
    session_id: str, seq: int, tag: str, array: np.ndarray, chunk_bytes: int
) -> Iterator[WireFrame]:
    array = np.asarray(array, order="C")  # ascontiguousarray would turn a 0-d array into shape (1,)
    view = memoryview(array).cast("B") if array.size else memoryview(b"")
    total = view.nbytes
    count = max(1, math.ceil(total / chunk_bytes))
    for index in range(count):
        header = pb.Frame(
            session_id=session_id,
            seq=seq,
            tag=tag,
            dtype=array.dtype.str,
            shape=array.shape,
            chunk_index=index,
            chunk_count=count,
            total_bytes=total,
        )
        # A view of the caller's array; send() encodes (copies) it before returning.
        yield WireFrame(header, view[index * chunk_bytes : (index + 1) * chunk_bytes])


def _frames_to_array(frames: list[WireFrame]) -> np.ndarray:
    head = frames[0]
    dtype, shape = np.dtype(head.dtype), tuple(head.shape)
    received = sum(len(f.data) for f in frames)
    array = join_payloads(frames, dtype, shape) if received == head.total_bytes else None
    if array is None:
        expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        raise ProtocolError(
            f"message {head.seq} '{head.tag}' carries {received} bytes, but dtype {dtype} and shape {shape} need {expected}"
        )
    return array


class GrpcTransport(Transport):
    """One end of the peer stream; the same class serves the dialing and the accepting end."""

    def __init__(
        self,
        *,
        session_id: str,
        role: str,
        peer_role: str,
        options: TransportOptions | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.session_id = session_id
        self.role = role
        self.peer_role = peer_role
        self.options = options or TransportOptions()
        self.metrics = metrics or Metrics()
        self._outgoing: queue.Queue[tuple[float, bytes] | None] = queue.Queue()  # (arrival time, frame)
        self._shaper = LinkShaper(self.options.network)
        self._incoming: queue.Queue[WireFrame | _End] = queue.Queue()
        self._send_seq = 0
        self._recv_seq = 0
        self._connected = threading.Event()
        self._peer_gone = threading.Event()  # the incoming stream has ended
        self._ended: _End | None = None
        self._closed = False
        self._channel: grpc.Channel | None = None
        self._reader: threading.Thread | None = None
        self.peer_address: str | None = None  # the accepting end: where the peer dialed from (for logs)

    # -- establishing the stream -------------------------------------------------------

    def dial(self, address: str, tls: TlsIdentity | None = None) -> None:
        """Open the stream to the peer listening at `address` (over mutual TLS when `tls` is given)."""
        self._channel = open_channel(address, role=self.role, peer_role=self.peer_role, options=self.options, tls=tls)
        self._put(encode_frame(WireFrame(pb.Frame(session_id=self.session_id, tag="hello", seq=0))))
        exchange = self._channel.stream_stream(
            EXCHANGE_METHOD, request_serializer=None, response_deserializer=decode_frame
        )
        responses = exchange(self._drain_outgoing())
        self._start_reader(responses)
        self._connected.set()

    def wait_accepted(self) -> None:
        """Block until the peer has dialed in (the accepting end)."""
        if not self._connected.wait(self.options.accept_deadline_s):
            raise PeerTimeoutError(
                f"{self.peer_role} did not connect within {self.options.accept_deadline_s:g} s "
                f"for session {self.session_id}",
                origin=self.role,
            )

    def _attach(self, requests: Iterator[WireFrame], context: grpc.ServicerContext | None = None) -> Iterator[bytes]:
        """Called by the servicer once the peer's hello named this session."""
        self._start_reader(requests, context)
        self._connected.set()
        return self._drain_outgoing()

    def _start_reader(self, frames: Iterator[WireFrame], context: grpc.ServicerContext | None = None) -> None:
        self._reader = threading.Thread(
            target=self._read, args=(frames, context), name=f"twinfer-read-{self.role}", daemon=True
        )
        self._reader.start()

    def _read(self, frames: Iterator[WireFrame], context: grpc.ServicerContext | None = None) -> None:
        try:
            for frame in frames:
                self._incoming.put(frame)
            if context is not None and _was_cancelled(context):
                # gRPC sometimes ends a cancelled call's requests as if the peer had closed them.
                self._incoming.put(_End(self._cancelled_reason()))
            else:
                self._incoming.put(_End(f"{self.peer_role} closed the stream"))
        except grpc.RpcError as err:
            code = err.code() if hasattr(err, "code") else None
            if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
                # gRPC's detail names the end that refused it ("CLIENT: ..." or "SERVER: ..."):
                # on the dialing end it may be this party's frame that the peer refused.
                self._incoming.put(
                    _End(
                        f"a frame larger than the gRPC message limit was refused on the stream with "
                        f"{self.peer_role} ({err.details()}); this party accepts at most "
                        f"{self.options.grpc_message_limit} bytes",
                        FrameTooLargeError("frame too large", origin=self.role),
                    )
                )
            elif hasattr(err, "details"):
                self._incoming.put(_End(f"connection to {self.peer_role} lost: {err.details()}"))
            else:
                # The accepting end gets a bare RpcError that does not say why the stream was cancelled.
                self._incoming.put(_End(self._cancelled_reason()))
        except Exception as err:  # a reader thread must always leave an end marker
            self._incoming.put(_End(f"reading from {self.peer_role} failed: {err!r}"))
        finally:
            self._peer_gone.set()

    def _cancelled_reason(self) -> str:
        return (
            f"connection to {self.peer_role} lost: the stream was cancelled ({self.peer_role} went away, "
            "or sent a frame larger than the gRPC message limit of this party's server)"
        )

    def _put(self, frame: bytes) -> None:
        self._outgoing.put((self._shaper.arrival_time(len(frame)), frame))

    def _drain_outgoing(self) -> Iterator[bytes]:
        while True:
            try:
                item = self._outgoing.get(timeout=1.0)
            except queue.Empty:
                if self._peer_gone.is_set():
                    return  # never keep a gRPC thread (and interpreter exit) waiting on a dead stream
                continue
            if item is None:
                return
            arrival, frame = item
            LinkShaper.hold_until(arrival)  # network shaping: no-op on an unshaped link
            yield frame

    # -- messages ------------------------------------------------------------------------

    def send(self, tag: str, array: np.ndarray) -> None:
        if self._closed:
            raise PeerError(f"send '{tag}' after the stream to {self.peer_role} was closed", origin=self.role)
        if self._ended is not None:
            raise PeerError(self._ended.reason, origin=self.role)
        nbytes = array.nbytes
        if nbytes > self.options.max_tensor_bytes:
            raise FrameTooLargeError(
                f"message '{tag}' of {nbytes} bytes exceeds max_tensor_bytes="
                f"{self.options.max_tensor_bytes}",
                origin=self.role,
            )
        self._send_seq += 1
        for frame in _array_to_frames(self.session_id, self._send_seq, tag, array, self.options.chunk_bytes):
            self._put(encode_frame(frame))  # copies now: the caller may reuse its array
        self.metrics.count_send(nbytes)

    def recv(self, tag: str) -> np.ndarray:
        start = time.perf_counter()
        deadline = time.monotonic() + self.options.recv_timeout_s
        self._recv_seq += 1
        frames = [self._next_frame(tag, deadline)]
        head = frames[0]
        if head.total_bytes > self.options.max_tensor_bytes:
            raise FrameTooLargeError(
                f"{self.peer_role} announced message '{head.tag}' of {head.total_bytes} bytes, "
                f"over max_tensor_bytes={self.options.max_tensor_bytes}",
                origin=self.role,
            )
        while len(frames) < max(head.chunk_count, 1):
            frame = self._next_frame(tag, deadline)
            if frame.chunk_index != len(frames):
                raise ProtocolError(
                    f"chunk {frame.chunk_index} of message {head.seq} arrived out of order", origin=self.role
                )
            frames.append(frame)
        array = _frames_to_array(frames)
        self.metrics.count_receive(array.nbytes, time.perf_counter() - start)
        return array

    def _next_frame(self, tag: str, deadline: float) -> WireFrame:
        if self._ended is not None:
            raise PeerError(self._ended.reason, origin=self.role)
        remaining = deadline - time.monotonic()
        try:
            item = self._incoming.get(timeout=max(remaining, 0.0))
        except queue.Empty:
            raise PeerTimeoutError(
                f"no '{tag}' message from {self.peer_role} within {self.options.recv_timeout_s:g} s "
                f"(session {self.session_id}, message {self._recv_seq})",
                origin=self.role,
            ) from None
        if isinstance(item, _End):
            self._ended = item
            if item.error is not None and isinstance(item.error, FrameTooLargeError):
                raise FrameTooLargeError(item.reason, origin=self.role)
            raise PeerError(item.reason, origin=self.role)
        return self._check(item, tag)

    def _check(self, frame: WireFrame, tag: str) -> WireFrame:
        if frame.HasField("error"):
            e = frame.error
            raise error_from_wire(e.kind, e.message, e.error_id, e.origin)
        if frame.session_id != self.session_id:
            raise ProtocolError(
                f"frame for session '{frame.session_id}' arrived on session '{self.session_id}'",
                origin=self.role,
            )
        if frame.seq != self._recv_seq:
            raise ProtocolError(
                f"expected message {self._recv_seq} from {self.peer_role}, got {frame.seq} ('{frame.tag}')",
                origin=self.role,
            )
        if frame.tag != tag:
            raise ProtocolError(
                f"expected '{tag}' from {self.peer_role}, got '{frame.tag}' (message {frame.seq}): "
                "the parties are running different programs",
                origin=self.role,
            )
        if len(frame.data) > self.options.chunk_bytes:
            raise FrameTooLargeError(
                f"chunk of {len(frame.data)} bytes over chunk_bytes={self.options.chunk_bytes}", origin=self.role
            )
        return frame

    # -- ending ---------------------------------------------------------------------------

    def fail(self, error: TwinferError) -> None:
        if self._closed:
            return
        if self._connected.is_set() and self._ended is None:
            self._put(
                encode_frame(
                    WireFrame(
                        pb.Frame(
                            session_id=self.session_id,
                            error=pb.Error(
                                error_id=error.error_id,
                                kind=error.kind,
                                message=error.message,
                                origin=error.origin or self.role,
                            ),
                        )
                    )
                )
            )
        self.close(grace_s=FAIL_GRACE_S)

    def close(self, grace_s: float = 5.0) -> None:
        """End the stream; the dialing end waits up to `grace_s` for the peer to finish its side."""
        if self._closed:
            return
        self._closed = True
        self._outgoing.put(None)
        if self._channel is not None:
            # Let the peer finish its side so queued frames are delivered before the channel goes.
            # After a failure only briefly: a peer that stopped answering must not hold this party
            # past its deadline (a silent peer ends a session within the timeout plus FAIL_GRACE_S).
            if self._reader is not None:
                self._reader.join(timeout=min(grace_s, self.options.recv_timeout_s))
            self._channel.close()


def _was_cancelled(context: grpc.ServicerContext, wait_s: float = 0.2) -> bool:
    """Whether the call ended by cancellation; after a clean half-close it stays active."""
    deadline = time.monotonic() + wait_s
    while context.is_active():  # the cancellation may land just after the last request
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


class PeerServicer:
    """Accepts peer streams and hands each to the transport waiting for its session id.

    With `peer_roles` set (mutual TLS), a stream is accepted only from a dialer whose
    certificate names one of those roles; any other is refused before its session is looked up.
    """

    def __init__(self, peer_roles: tuple[str, ...] | None = None, role: str = "listener") -> None:
        self._waiting: dict[str, GrpcTransport] = {}
        self._lock = threading.Lock()
        self.peer_roles = peer_roles
        self.role = role

    def expect(self, transport: GrpcTransport) -> None:
        """Route the next stream whose hello names `transport.session_id` to `transport`."""
        with self._lock:
            if transport.session_id in self._waiting:
                raise ProtocolError(
                    f"session '{transport.session_id}' is already expected on this {self.role}: every session needs its own id",
                    origin=self.role,
                )
            self._waiting[transport.session_id] = transport

    def forget(self, session_id: str) -> None:
        """Stop expecting `session_id` (its session ended before the peer dialed in): a late dial is refused."""
        with self._lock:
            self._waiting.pop(session_id, None)

    def Exchange(self, request_iterator, context):  # noqa: N802 (gRPC's name)
        if self.peer_roles is not None:
            refused = check_peer_role(context, self.peer_roles, self.role)
            if refused is not None:
                log.warning("%s", refused)
                error = pb.Error(error_id="", kind="auth", message=refused, origin=self.role)
                yield encode_frame(WireFrame(pb.Frame(error=error)))
                return
        try:
            hello = next(request_iterator)
        except (StopIteration, grpc.RpcError):
            return
        with self._lock:
            transport = self._waiting.pop(hello.session_id, None) if hello.tag == "hello" else None
        if transport is None:
            log.warning("rejected a stream for unknown session %r", hello.session_id)
            refusal = pb.Error(
                error_id="",
                kind="protocol",
                # Valid session ids are not listed: without TLS they are what admits a peer.
                message=f"unknown session '{hello.session_id}': this party serves no such session",
                origin="listener",
            )
            yield encode_frame(WireFrame(pb.Frame(session_id=hello.session_id, error=refusal)))
            return
        transport.peer_address = context.peer()
        log.info("session %s: %s connected", hello.session_id, transport.peer_role)
        yield from transport._attach(request_iterator, context)


EXCHANGE_METHOD = "/twinfer.Peer/Exchange"


def add_peer_servicer(servicer: PeerServicer, server: grpc.Server) -> None:
    """Register the Peer service with twinfer's frame codec (see encode_frame)."""
    handler = grpc.stream_stream_rpc_method_handler(
        servicer.Exchange, request_deserializer=decode_frame, response_serializer=None
    )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("twinfer.Peer", {"Exchange": handler}),))


def start_server(
    servicers: list[tuple[object, callable]],
    listen: str,
    options: TransportOptions,
    tls: TlsIdentity | None = None,
) -> tuple[grpc.Server, int]:
    """Start a gRPC server on `listen` ('host:port', port 0 picks one) and return it and its port.

    With `tls`, the server presents that certificate and requires one signed by the same CA
    from every dialer (mutual TLS); which roles it accepts is each servicer's check.
    """
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=32), options=options.grpc_options())
    for servicer, add in servicers:
        add(servicer, server)
    try:
        if tls is None:
            port = server.add_insecure_port(listen)
        else:
            port = server.add_secure_port(listen, tls.server_credentials())
    except RuntimeError as err:  # gRPC raises on an address it cannot bind
        raise LocalError(f"cannot listen on {listen} (in use, or not an address of this machine): {err}") from None
    if port == 0:
        raise LocalError(f"cannot listen on {listen} (in use, or not an address of this machine)")
    server.start()
    return server, port


def open_channel(
    address: str, *, role: str, peer_role: str, options: TransportOptions, tls: TlsIdentity | None = None
) -> grpc.Channel:
    """A channel to `peer_role` at `address`, connected within the connect deadline.

    With `tls`, this party presents its certificate and the handshake succeeds only if the
    listener's certificate is signed by the same CA and names `peer_role`; a refused handshake
    is an AuthError that says which check failed.
    """
    opts = options.grpc_options()
    if tls is None:
        channel = grpc.insecure_channel(address, options=opts)
    else:
        channel = grpc.secure_channel(address, tls.channel_credentials(), options=opts + channel_options(peer_role))
    try:
        _wait_ready(channel, address, role=role, peer_role=peer_role, options=options, secure=tls is not None)
    except BaseException:
        channel.close()
        raise
    return channel


def _wait_ready(channel: grpc.Channel, address: str, *, role: str, peer_role: str, options: TransportOptions, secure: bool) -> None:
    """Wait for the channel to connect; a TLS refusal ends the wait at once, with its reason."""
    changed = threading.Condition()
    states: list[grpc.ChannelConnectivity] = []

    def on_change(state: grpc.ChannelConnectivity) -> None:
        with changed:
            states.append(state)
            changed.notify_all()

    deadline = time.monotonic() + options.connect_timeout_s
    channel.subscribe(on_change, try_to_connect=True)
    try:
        while True:
            with changed:
                changed.wait_for(lambda: states, timeout=max(0.0, deadline - time.monotonic()))
                seen, states[:] = list(states), []
            if grpc.ChannelConnectivity.READY in seen:
                return
            if grpc.ChannelConnectivity.TRANSIENT_FAILURE in seen or time.monotonic() >= deadline:
                refused = _connect_failure(channel, options, secure)
                if refused is not None and secure:
                    raise AuthError(f"TLS connection to {peer_role} at {address} failed: {refused}", origin=role)
                if refused is not None:
                    raise AuthError(
                        f"{peer_role} at {address} closed the connection at once: it probably requires mutual TLS "
                        f"(start this party with --tls) ({refused})",
                        origin=role,
                    )
            if time.monotonic() >= deadline:
                raise PeerError(
                    f"{peer_role} at {address} is not reachable (no connection within {options.connect_timeout_s:g} s)",
                    origin=role,
                )
    finally:
        channel.unsubscribe(on_change)


_TLS_MARKERS = ("tls", "ssl", "handshake", "hostname", "socket closed", "certificate")


def _connect_failure(channel: grpc.Channel, options: TransportOptions, secure: bool) -> str | None:
    """Why a channel did not connect, if TLS is to blame (a failed handshake, or a TLS-only
    listener hanging up on a plaintext dialer); None if nothing answers at all."""
    probe = channel.unary_unary("/twinfer.Probe/Connect", request_serializer=None, response_deserializer=None)
    try:
        probe(b"", timeout=min(1.0, options.connect_timeout_s), wait_for_ready=False)
    except grpc.RpcError as err:
        details = err.details() or ""
        if secure and any(marker in details.lower() for marker in _TLS_MARKERS):
            return f"{handshake_hint(details)} (gRPC: {details})"
        if not secure and "socket closed" in details.lower():
            return f"gRPC: {details}"
    return None
