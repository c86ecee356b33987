"""A party's side of the dealer, for any backend: the seed, correlations by index, the offline-phase
prefetch, a keepalive, and telling a lost dealer from a slow peer.

It is the `CorrelationSource` backends declare (protocols/backends/channels.py); what CrypTen's
TTP provider calls on it is adapted in protocols/backends/crypten/ttp.py.
"""

from __future__ import annotations

import re
import threading
import time

import grpc
import numpy as np
import torch

from twinfer.protocols.roles import DEALER
from twinfer.protocols.backends.crypten.correlations import tuple_generator
from twinfer.protocols.backends import DEFAULT_PROTOCOL

from twinfer.parties.dealer.core import KEEPALIVE_MAX_S, dealer_lost_id
from twinfer.parties.errors import AuthError, BusyError, PeerError, PeerTimeoutError, ProtocolError, TwinferError
from twinfer.parties.metrics import Metrics
from twinfer.parties.wire.network_profile import LinkShaper
from twinfer.parties.proto import twinfer_pb2 as pb
from twinfer.parties.proto import twinfer_pb2_grpc as pb_grpc
from twinfer.parties.wire.tls import TlsIdentity
from twinfer.parties.wire.transport import TransportOptions, open_channel
from twinfer.parties.wire.framing import correlation_from_frames, framed_decoder


STALL_S = 1.0  # the watch's own ticks this late: this process was stopped or starved, and cannot judge the dealer's silence


def _nbytes(arrays: dict[str, np.ndarray]) -> int:
    return sum(a.nbytes for a in arrays.values())


class DealerClient:
    """Talks to the dealer for one session: this party's seeds, and its part of correlations.

    Correlation k of the session derives from (seeds, k), so a party can have the dealer make
    its parts ahead of use: the request sequence of a batch depends only on the public graph
    and batch size, so each party records its own on the first batch of each size and has
    them prefetched for the next ones (a party that asks for nothing, such as CrypTen's party
    1, prefetches nothing). A prefetched part is used only if its request matches the one the
    backend actually makes; otherwise it is fetched on demand.

    A live dealer answers every call within the deadline, and the keepalive every few seconds.
    One that does not (stopped, gone) is this session's failure under `dealer_lost_id`, the id
    the other party and the dealer give it too; a wait on the peer that runs out while the dealer
    is silent is the dealer's failure as well (`blame`): the peer is most likely waiting for it.
    """

    def __init__(
        self,
        address: str,
        *,
        session_id: str,
        role: str,
        options: TransportOptions,
        metrics: Metrics,
        prefetch: bool = True,
        prefetch_ahead: bool = False,
        tls: TlsIdentity | None = None,
        protocol: str = DEFAULT_PROTOCOL,
    ) -> None:
        self.session_id = session_id
        self.role = role
        self.options = options
        self.metrics = metrics
        self.prefetch_enabled = prefetch
        # Ahead: the next batch's parts are fetched between batches, and a batch starts only once
        # they are here, so no dealer work or key traffic runs beside the online phase.
        self.prefetch_ahead = prefetch_ahead
        self._downlink = LinkShaper(options.dealer_network)  # dealer -> this party
        self._half_rtt = options.dealer_network.rtt_s / 2 if options.dealer_network else 0.0
        self._channel = open_channel(address, role=role, peer_role=DEALER, options=options, tls=tls)
        self._stub = pb_grpc.DealerStub(self._channel)
        decode = framed_decoder(pb.TupleReply)
        self._tuple = self._channel.unary_stream(
            "/twinfer.Dealer/Tuple", request_serializer=pb.TupleRequest.SerializeToString, response_deserializer=decode
        )
        self._prefetch = self._channel.unary_stream(
            "/twinfer.Dealer/Prefetch", request_serializer=pb.PrefetchRequest.SerializeToString, response_deserializer=decode
        )
        self._closed = False
        self._lost: TwinferError | None = None  # set once a call found the dealer gone or silent
        self._answered = time.monotonic()  # when the dealer last answered anything
        self._tick = time.monotonic()  # the watch's last look (see _watch)
        try:
            reply = self._call(self._stub.Seed, pb.SeedRequest(session_id=session_id, role=role, protocol=protocol))
        except BaseException:
            self._channel.close()  # an open channel left to the garbage collector can hang interpreter exit
            raise
        self._seed = reply.seed
        self.key = reply.key  # 128-bit AES-CTR seed, for backends that ask for one (else empty)
        metrics.count_offline(8 + len(reply.key))
        self._index = 0  # tuples drawn so far in this session
        # batch size -> (indices one batch takes, its requests: (index offset in the batch, kind, arguments))
        self._plans: dict[int, tuple[int, list[tuple[int, str, str]]]] = {}
        self._recording: list[tuple[int, str, str]] | None = None
        self._batch_start = 0
        self._ready: dict[int, tuple[tuple[str, str], dict[str, np.ndarray]]] = {}
        self._expected: set[int] = set()
        self._arrived = threading.Condition()
        self._launched: set[int] = set()  # first indices of the batches whose prefetch has begun
        self.prefetched_used = 0
        self.fetched_on_demand = 0
        # While this party lives, the dealer hears from it, even when a batch asks for nothing:
        # the dealer ends a session on its own only when no party of it is left.
        self._stop = threading.Event()
        self._calls: set = set()  # on-demand calls in flight, cancelled if the dealer is lost meanwhile
        threading.Thread(target=self._keepalive, name="twinfer-dealer-keepalive", daemon=True).start()
        threading.Thread(target=self._watch, name="twinfer-dealer-watch", daemon=True).start()

    @property
    def keepalive_period_s(self) -> float:
        return max(0.2, min(KEEPALIVE_MAX_S, self.options.recv_timeout_s / 4))

    def _keepalive(self) -> None:
        request = pb.PrefetchRequest(session_id=self.session_id, tuples=[], role=self.role)
        while not self._stop.wait(self.keepalive_period_s):
            try:
                for _ in self._prefetch(request, timeout=self.options.recv_timeout_s):
                    pass
                self._heard()
            except grpc.RpcError as err:
                if err.code() not in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
                    self._heard()  # it answered, if with a refusal: the next real request reports it
            except ValueError:
                return  # the channel was closed under it

    def _watch(self) -> None:
        """A dealer that answers nothing, not even a keepalive, for a whole deadline is lost: wake
        whatever waits on it then (a call begun after it stopped would wait a deadline more)."""
        timeout = self.options.recv_timeout_s
        while not self._stop.wait(min(0.25, self.keepalive_period_s)):
            now = time.monotonic()
            if now - self._tick > STALL_S:  # this process itself was stopped: what the dealer did meanwhile is unknown
                self._answered = max(self._answered, now)
            self._tick = now
            silent = now - self._answered
            if silent > timeout:
                self._lost_error(f"the dealer has not answered for {silent:.1f} s (deadline {timeout:g} s)")
                with self._arrived:
                    self._arrived.notify_all()
                for call in list(self._calls):
                    call.cancel()
                return

    def _heard(self) -> None:
        self._answered = time.monotonic()

    def _lost_error(self, message: str, timeout: bool = True) -> TwinferError:
        """The dealer is gone or silent: both parties may see it at once, each before hearing from the
        other, so the id is derived from the session, the same on both (and on the dealer)."""
        cls = PeerTimeoutError if timeout else PeerError
        self._lost = self._lost or cls(message, error_id=dealer_lost_id(self.session_id), origin=DEALER)
        return self._lost

    def _error(self, err: grpc.RpcError) -> TwinferError:
        code = err.code()
        if self._lost is not None and code in (grpc.StatusCode.CANCELLED, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE):
            return self._lost  # cancelled by _watch, or another call found it gone first
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return self._lost_error(f"the dealer did not answer within {self.options.recv_timeout_s:g} s")
        detail = err.details() or f"dealer call failed: {code.name}"
        if code == grpc.StatusCode.PERMISSION_DENIED:  # mutual TLS: this party's certificate was refused
            return AuthError(detail, origin=DEALER)
        if code == grpc.StatusCode.NOT_FOUND:  # a session the dealer does not know: wrong session id
            return ProtocolError(detail, origin=DEALER)
        if code in (grpc.StatusCode.ALREADY_EXISTS, grpc.StatusCode.FAILED_PRECONDITION):
            return ProtocolError(detail, origin=DEALER)  # a reused session id or role; another protocol
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED:  # a standing dealer at --max-sessions, or draining
            return BusyError(detail, origin=DEALER)
        # A session ended by a party's failure keeps that failure's id ("[error <id>]").
        shared = re.search(r"\[error ([^\]\s]+)\]", detail)
        if shared is None and code == grpc.StatusCode.UNAVAILABLE:
            return self._lost_error(f"the dealer is unreachable: {detail}", timeout=False)
        return PeerError(detail, error_id=shared.group(1) if shared else None, origin=DEALER)

    def _call(self, method, request):
        sent = time.monotonic()
        try:
            reply = method(request, timeout=self.options.recv_timeout_s)
        except grpc.RpcError as err:
            raise self._error(err) from None
        self._heard()
        LinkShaper.hold_until(self._downlink.arrival_time(reply.ByteSize(), now=sent + self._half_rtt))
        return reply

    # -- a lost dealer --------------------------------------------------------------------------

    def lost(self) -> TwinferError | None:
        """The dealer's failure, if a call found it gone or it has not answered for half the deadline
        (a live dealer answers each keepalive, every quarter of the deadline at most)."""
        if self._lost is not None:
            return self._lost
        now = time.monotonic()
        if now - self._tick > STALL_S:
            return None  # this party was stopped itself (its watch has not looked since): it cannot tell
        silent = now - self._answered
        if silent > max(self.options.recv_timeout_s / 2, 2 * self.keepalive_period_s):
            return self._lost_error(f"the dealer has not answered for {silent:.1f} s (deadline {self.options.recv_timeout_s:g} s)")
        return None

    def blame(self, error: TwinferError) -> TwinferError:
        """The failure this party reports: a wait on its peer that ran out or broke while the dealer was
        silent is the dealer's (the peer was most likely waiting for the dealer), under the dealer's id."""
        own_wait = isinstance(error, PeerError) and not isinstance(error, (AuthError, BusyError)) and error.origin == self.role
        lost = self.lost() if own_wait else None
        if lost is None:
            return error
        blamed = type(lost)(f"{lost.message}; meanwhile {error.message}", error_id=lost.error_id, origin=DEALER)
        blamed.__cause__ = error
        return blamed

    # -- batches and the offline phase -------------------------------------------------------

    def begin_batch(self, batch_size: int, next_batch_size: int | None = None) -> None:
        """Prefetch this batch's parts if a batch of this size ran before (else record them), and,
        when the next batch has the same size, the next batch's too, so the dealer makes them
        while this batch runs and the next one finds them ready."""
        if not self.prefetch_enabled:
            return
        self._batch_start = self._index
        plan = self._plans.get(batch_size)
        if plan is None:
            self._recording = []
            return
        self._recording = None
        span, entries = plan
        self._prefetch_batch(self._index, entries)
        if next_batch_size == batch_size and not self.prefetch_ahead:
            self._prefetch_batch(self._index + span, entries)

    def _prefetch_batch(self, start: int, entries: list[tuple[int, str, str]]) -> None:
        if not entries or start in self._launched:  # nothing to ask for (a party that derives all), or asked already
            return
        self._launched.add(start)
        requests = [
            pb.TupleRequest(session_id=self.session_id, function=f, args_json=a, index=start + offset, role=self.role)
            for offset, f, a in entries
        ]
        with self._arrived:
            self._expected.update(r.index for r in requests)
        threading.Thread(
            target=self._receive_prefetched, args=(requests, {r.index: (r.function, r.args_json) for r in requests}),
            name="twinfer-prefetch", daemon=True,
        ).start()

    def end_batch(self, batch_size: int, next_batch_size: int | None = None) -> None:
        """Drop what this batch left unused; ahead: fetch the next batch's parts and wait for them."""
        if self._recording is not None:
            self._plans[batch_size] = (self._index - self._batch_start, self._recording)
            self._recording = None
        with self._arrived:  # parts of this batch prefetched but never asked for are dropped; the next batch's stay
            for index in [i for i in self._ready if i < self._index]:
                del self._ready[index]
            self._expected = {i for i in self._expected if i >= self._index}
        plan = self._plans.get(next_batch_size) if self.prefetch_enabled and self.prefetch_ahead else None
        if plan is not None:
            self._prefetch_batch(self._index, plan[1])
            self._wait_prefetched()

    def _wait_prefetched(self) -> None:
        """Until every prefetch under way has arrived or ended (what did not arrive is fetched on demand)."""
        with self._arrived:
            self._await(lambda: bool(self._expected - self._ready.keys()), "the next batch's correlations")

    def _await(self, pending, what: str) -> None:
        """Under `_arrived`, while `pending()`: past the deadline, or once the dealer has answered
        nothing (not even a keepalive) for as long, the dealer is lost."""
        timeout = self.options.recv_timeout_s
        deadline = time.monotonic() + timeout
        while pending():
            if self._lost is not None:
                raise self._lost
            now = time.monotonic()
            silent = now - self._answered if now - self._tick <= STALL_S else 0.0  # not while this party itself stalled
            if now >= deadline or silent > timeout:
                raise self._lost_error(f"the dealer did not deliver {what} within {timeout:g} s (no answer from it for {silent:.1f} s)")
            self._arrived.wait(timeout=min(deadline - now, self.keepalive_period_s))

    def _receive_prefetched(self, requests: list[pb.TupleRequest], keys: dict[int, tuple[str, str]]) -> None:
        parts: dict[int, list] = {}
        sent = time.monotonic()
        try:
            stream = self._prefetch(
                pb.PrefetchRequest(session_id=self.session_id, tuples=requests, role=self.role),
                timeout=self.options.recv_timeout_s * max(1, len(requests)),
            )
            for reply in stream:
                self._heard()
                chunks = parts.setdefault(reply.index, [])
                chunks.append(reply)
                # On a shaped dealer link the stream arrives at the link's pace.
                LinkShaper.hold_until(self._downlink.arrival_time(len(reply.data), now=sent + self._half_rtt))
                if len(chunks) == reply.chunk_count:
                    tensor = correlation_from_frames(parts.pop(reply.index))
                    self.metrics.count_offline(_nbytes(tensor))
                    with self._arrived:
                        if reply.index in self._expected:
                            self._ready[reply.index] = (keys[reply.index], tensor)
                        self._arrived.notify_all()
        except (grpc.RpcError, TwinferError):
            pass  # what did not arrive is fetched on demand, which reports what went wrong
        finally:
            with self._arrived:
                # Whatever of this prefetch did not arrive is fetched on demand. Only its own
                # indices: the next batch's prefetch may already have begun.
                self._expected.difference_update(keys)
                self._arrived.notify_all()

    def _take_prefetched(self, index: int, key: tuple[str, str]) -> dict[str, np.ndarray] | None:
        with self._arrived:
            self._await(lambda: index in self._expected and index not in self._ready, f"prefetched correlation {index}")
            entry = self._ready.pop(index, None)
            self._expected.discard(index)
        if entry is None or entry[0] != key:
            return None
        return entry[1]

    # -- the correlation source ------------------------------------------------------------------

    def generator(self, index: int) -> torch.Generator:
        """This party's CrypTen generator of correlation `index` (the dealer derives the same)."""
        return tuple_generator(self._seed, index)

    def next_index(self) -> int:
        """The session index of the next correlation this party draws (in program order)."""
        index, self._index = self._index, self._index + 1
        return index

    def request(self, kind: str, args_json: str, index: int) -> dict[str, np.ndarray]:
        """This party's part of correlation `index`: prefetched if it matches, else fetched now."""
        key = (kind, args_json)
        if self._recording is not None:
            self._recording.append((index - self._batch_start, kind, args_json))
        start = time.perf_counter()
        arrays = self._take_prefetched(index, key)
        if arrays is not None:
            self.prefetched_used += 1
        else:
            self.fetched_on_demand += 1
            request = pb.TupleRequest(session_id=self.session_id, function=kind, args_json=args_json, index=index, role=self.role)
            sent = time.monotonic()
            call = self._tuple(request, timeout=self.options.recv_timeout_s)
            self._calls.add(call)
            try:
                frames = list(call)
            except grpc.RpcError as err:
                raise self._error(err) from None
            finally:
                self._calls.discard(call)
            self._heard()
            if any(f.index != index for f in frames):
                raise ProtocolError(f"dealer answered a request for correlation {index} with {sorted({f.index for f in frames})}", origin=DEALER)
            arrays = correlation_from_frames(frames)
            LinkShaper.hold_until(self._downlink.arrival_time(_nbytes(arrays), now=sent + self._half_rtt))
            self.metrics.count_offline(_nbytes(arrays))
        self.metrics.count_dealer_wait(time.perf_counter() - start)
        return arrays

    def close(self, error: TwinferError | None = None) -> None:
        """Tell the dealer this party is done (or failed, with the shared error id)."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        request = pb.CloseRequest(session_id=self.session_id, role=self.role)
        if error is not None:
            request.error.CopyFrom(
                pb.Error(error_id=error.error_id, kind=error.kind, message=error.message, origin=error.origin or self.role)
            )
        try:
            # A dealer that stopped answering is not waited for (it ends the session under the same
            # id once it finds both parties gone: core.py).
            if self.lost() is None:
                self._stub.Close(request, timeout=min(5.0, self.options.recv_timeout_s))
        except grpc.RpcError:
            pass  # the dealer may already be gone; closing is best effort
        finally:
            self._channel.close()
