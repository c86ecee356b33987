"""The dealer: a third process that hands out correlated randomness and never sees a share.

At session start the dealer draws one seed per party and sends it to that party only; the
k-th correlation of the session is derived from (seeds, k), so a party that may compute its
share locally never asks again, and the others ask by public kind and size. What each kind
is, how its request is checked and its share made, and who may ask for it, comes from the
backend that needs it (the correlation registry of `twinfer.protocols.backends`); this module
only serves. Because a correlation depends only on (seeds, k, kind, size), a party may ask
for it before it needs it (Prefetch: the offline phase), in any order.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field

import grpc

from twinfer.protocols.backends import backend_class, correlation_kind
from twinfer.protocols.backends.base import DealerSeeds
from twinfer.protocols.roles import DEALER, RANKS

from twinfer.parties.errors import new_error_id
from twinfer.parties.wire.tls import check_peer_role, peer_cert_digest
from twinfer.parties.proto import twinfer_pb2 as pb
from twinfer.parties.wire.framing import correlation_to_frames

log = logging.getLogger(__name__)

CHUNK_BYTES = 4 * 1024 * 1024


def _seed() -> int:
    return int.from_bytes(os.urandom(8), "big") - 2**63


class _Paired:
    """A correlation made once for several parties: each takes its part, the first to ask makes it."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.parts: dict[str, dict] = {}
        self.error: Exception | None = None


@dataclass
class DealerSession:
    session_id: str
    seeds: DealerSeeds = field(
        default_factory=lambda: DealerSeeds(
            torch={r: _seed() for r in RANKS.values()}, aes={r: os.urandom(16) for r in RANKS.values()}, dealer=os.urandom(16)
        )
    )
    protocols: dict[str, str] = field(default_factory=dict)  # role -> the protocol it named with its seed
    seeded: set[int] = field(default_factory=set)
    bound: dict[int, str | None] = field(default_factory=dict)  # under TLS: rank -> digest of the certificate that took its seed
    closed: set[int] = field(default_factory=set)
    error: pb.Error | None = None
    bytes_sent: int = 0
    tuples: int = 0
    started: float = field(default_factory=time.monotonic)
    last_active: float = field(default_factory=time.monotonic)
    lock: threading.Lock = field(default_factory=threading.Lock)
    paired: dict[tuple, _Paired] = field(default_factory=dict)  # parts made but not yet taken

    @property
    def finished(self) -> bool:
        return self.error is not None or self.closed >= set(RANKS.values())


class DealerServicer:
    """Serves seeds and tuples for the sessions it was told to expect."""

    def __init__(self, idle_timeout_s: float = 600.0, *, check_role_certs: bool = False, accept_timeout_s: float | None = None) -> None:
        # With mutual TLS: a caller's certificate must name the role it asks as, and only the
        # server (party 0) may ask for tuples.
        self.check_role_certs = check_role_certs
        self._sessions: dict[str, DealerSession] = {}
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self.idle_timeout_s = idle_timeout_s
        # before any party has taken its seed, a session waits as a listener waits for its peer to dial in
        self.accept_timeout_s = max(idle_timeout_s, accept_timeout_s or 0.0)

    def open_session(self, session_id: str) -> None:
        with self._lock:
            self._sessions.setdefault(session_id, DealerSession(session_id))

    def _authorize(self, context: grpc.ServicerContext, role: str) -> None:
        if not self.check_role_certs:
            return
        refused = check_peer_role(context, (role,), DEALER)
        if refused is not None:
            log.warning("%s", refused)
            context.abort(grpc.StatusCode.PERMISSION_DENIED, f"dealer: {refused}")

    def _bound(self, session: DealerSession, context: grpc.ServicerContext, role: str) -> None:
        """Under TLS, a role of a session belongs to the party that took its seed: any other
        certificate (even one naming the same role) is refused. Without TLS nothing is
        authenticated: the session id is what admits a party."""
        if not self.check_role_certs:
            return
        rank = RANKS.get(role, -1)
        with session.lock:
            bound, owner = rank in session.bound, session.bound.get(rank)
        if bound and owner != peer_cert_digest(context):
            log.warning("session %s: a second %s certificate was refused", session.session_id, role)
            context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"dealer: the {role} of session '{session.session_id}' is bound to the certificate that took its seed; "
                "this caller presents another one",
            )

    def _find(self, session_id: str, context: grpc.ServicerContext, create: bool) -> DealerSession | None:
        """The session of `session_id`, or None; `create`: the caller asks for its seed (a dealer
        that accepts sessions on demand makes one here: parties/dealer/on_demand.py)."""
        with self._lock:
            return self._sessions.get(session_id)

    def _session(self, session_id: str, context: grpc.ServicerContext, create: bool = False) -> DealerSession:
        session = self._find(session_id, context, create)
        if session is None:
            context.abort(grpc.StatusCode.NOT_FOUND, f"dealer: unknown session '{session_id}'")
        if session.error is not None:
            e = session.error
            context.abort(
                grpc.StatusCode.ABORTED,
                f"dealer: session '{session_id}' ended by a failure at {e.origin} "
                f"[error {e.error_id}]: {e.message}",
            )
        session.last_active = time.monotonic()
        return session

    def Seed(self, request, context):  # noqa: N802
        self._authorize(context, request.role)
        session = self._session(request.session_id, context, create=True)
        rank = RANKS.get(request.role)
        if rank is None:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"dealer: unknown role '{request.role}'")
        try:
            backend = backend_class(request.protocol)
        except ValueError as err:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"dealer: {err}")
        with session.lock:
            if rank in session.seeded:
                context.abort(
                    grpc.StatusCode.ALREADY_EXISTS,
                    f"dealer: {request.role} already has its seed for session '{session.session_id}': an id admits each party once",
                )
            # A party on another protocol than its peer is refused by the peer at their handshake,
            # with one error for the whole session; here each role may ask only for its own kinds.
            session.protocols[request.role] = request.protocol
            session.seeded.add(rank)
            if self.check_role_certs:
                session.bound[rank] = peer_cert_digest(context)
            reply = pb.SeedReply(seed=session.seeds.torch[rank], key=session.seeds.aes[rank] if backend.aes_seed else b"")
            session.bytes_sent += 8 + len(reply.key)
        log.info("session %s: seed sent to %s", session.session_id, request.role)
        return reply

    def _make(self, session: DealerSession, request: pb.TupleRequest, role: str, context) -> list[bytes]:
        """The asking party's part of one correlation (named arrays), as framed chunks."""
        try:
            kind = correlation_kind(request.function)
            own = backend_class(session.protocols[role]) if role in session.protocols else None
            if own is not None and kind not in own.correlations:
                context.abort(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"dealer: '{kind.name}' is not a correlation of protocol '{session.protocols[role]}', which the {role} named",
                )
            if role not in kind.requesters:
                context.abort(
                    grpc.StatusCode.PERMISSION_DENIED, f"dealer: the {role} may not ask for '{kind.name}' (only {list(kind.requesters)})"
                )
            args, kwargs = kind.decode(request.args_json)
        except ValueError as err:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"dealer: {err}")
        try:
            if kind.paired:
                arrays = self._take_paired(session, kind, request, role, args, kwargs)
            else:
                arrays = kind.make(session.seeds, request.index, role, args, kwargs)
        except (RuntimeError, TypeError, ValueError) as err:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"dealer: cannot make '{request.function}': {err}")
        frames = correlation_to_frames(request.index, arrays, CHUNK_BYTES)
        with session.lock:
            session.tuples += 1
            session.bytes_sent += sum(a.nbytes for a in arrays.values())
        return frames

    def _take_paired(self, session: DealerSession, kind, request, role: str, args: list, kwargs: dict) -> dict:
        """This role's part of a paired correlation; made by the first requester, kept for the others."""
        key = (kind.name, request.index, request.args_json)
        with session.lock:
            entry = session.paired.get(key)
            maker = entry is None
            if maker:
                entry = session.paired[key] = _Paired()
        if maker:
            try:
                entry.parts = kind.make(session.seeds, request.index, role, args, kwargs)
            except Exception as err:  # noqa: BLE001 - handed to every waiting requester
                entry.error = err
            entry.done.set()
        elif not entry.done.wait(self.idle_timeout_s):
            raise RuntimeError(f"correlation {request.index} was not made within {self.idle_timeout_s:g} s")
        if entry.error is not None:
            raise ValueError(str(entry.error))
        with session.lock:
            part = entry.parts.pop(role, None)
            if not entry.parts:
                session.paired.pop(key, None)
        if part is None:
            raise ValueError(f"the {role} asked twice for correlation {request.index}")
        return part

    def Tuple(self, request, context):  # noqa: N802
        self._authorize(context, request.role)
        session = self._session(request.session_id, context)
        self._bound(session, context, request.role)
        yield from self._make(session, request, request.role, context)

    def Prefetch(self, request, context):  # noqa: N802
        self._authorize(context, request.role)
        session = self._session(request.session_id, context)
        self._bound(session, context, request.role)
        for tuple_request in request.tuples:
            if not context.is_active() or session.error is not None:
                return  # the party went away or the session failed: stop making tuples
            session.last_active = time.monotonic()
            yield from self._make(session, tuple_request, request.role, context)

    def Close(self, request, context):  # noqa: N802
        self._authorize(context, request.role)
        with self._lock:
            session = self._sessions.get(request.session_id)
            if session is None:
                context.abort(grpc.StatusCode.NOT_FOUND, f"dealer: unknown session '{request.session_id}'")
        self._bound(session, context, request.role)
        with self._lock:
            if request.HasField("error") and session.error is None:
                session.error = request.error
                log.warning(
                    "session %s failed at %s [error %s]: %s",
                    request.session_id,
                    request.error.origin,
                    request.error.error_id,
                    request.error.message,
                )
            session.closed.add(RANKS.get(request.role, -1))
            if session.finished:
                session.paired.clear()  # parts nobody will take: a party that failed or stopped early
            self._changed.notify_all()
        return pb.CloseReply()

    def stats(self, session_id: str) -> dict:
        with self._lock:
            s = self._sessions[session_id]
            return {"bytes_sent": s.bytes_sent, "tuples": s.tuples, "finished": s.finished}

    def wait_finished(self, session_id: str, timeout_s: float) -> DealerSession:
        """Block until both parties closed `session_id`, one failed, or it sat idle too long."""
        deadline = time.monotonic() + timeout_s
        with self._lock:
            while True:
                session = self._sessions[session_id]
                if session.finished:
                    return session
                idle = time.monotonic() - session.last_active
                limit = self.idle_timeout_s if session.seeded else self.accept_timeout_s
                if idle > limit or time.monotonic() > deadline:
                    session.error = pb.Error(
                        error_id=new_error_id(),
                        kind="timeout",
                        message=f"no request for {idle:.0f} s; the dealer ends the session",
                        origin=DEALER,
                    )
                    return session
                self._changed.wait(timeout=1.0)


def add_dealer_servicer(servicer: DealerServicer, server: grpc.Server) -> None:
    """Register the Dealer service; tuple replies use twinfer's framing (parties/wire/framing.py)."""
    handlers = {
        "Seed": grpc.unary_unary_rpc_method_handler(
            servicer.Seed, request_deserializer=pb.SeedRequest.FromString, response_serializer=pb.SeedReply.SerializeToString
        ),
        "Tuple": grpc.unary_stream_rpc_method_handler(
            servicer.Tuple, request_deserializer=pb.TupleRequest.FromString, response_serializer=None
        ),
        "Prefetch": grpc.unary_stream_rpc_method_handler(
            servicer.Prefetch, request_deserializer=pb.PrefetchRequest.FromString, response_serializer=None
        ),
        "Close": grpc.unary_unary_rpc_method_handler(
            servicer.Close, request_deserializer=pb.CloseRequest.FromString, response_serializer=pb.CloseReply.SerializeToString
        ),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("twinfer.Dealer", handlers),))
