"""The dealer: a third process that hands out correlated randomness and never sees a share.

Protocol (CrypTen's trusted third party, Knott et al., "CrypTen", NeurIPS 2021, appendix):
1. At session start the dealer draws one seed per party and sends it to that party only.
2. For the k-th tuple of the session each party draws its shares of a, b (and, for party 1,
   of c) from a generator seeded with derive_seed(its seed, k); the dealer derives the same
   generators, so it knows a and b in the clear.
3. Party 0 asks for tuple k by public size and op; the dealer computes c = op(a, b) and
   returns c0 = c - c1 to party 0 alone. Party 1 never talks to the dealer after step 1.
Because tuple k depends only on (seeds, k, size, op), party 0 may ask for tuples before it
needs them (Prefetch: the offline phase), in any order. The math of step 3 is CrypTen's own
(`TTPServer`), run on generators this module owns.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import threading
import time
from dataclasses import dataclass, field

import grpc
import torch

from .crypten_compat import import_crypten
from .errors import new_error_id
from .tls import check_peer_role
from .proto import twinfer_pb2 as pb
from .wire import encode_framed

import_crypten()
from crypten.mpc.provider.ttp_provider import TTP_FUNCTIONS, TTPServer  # noqa: E402

log = logging.getLogger(__name__)

RANKS = {"server": 0, "client": 1}
# Ops a Beaver triple may be requested for: the linear layers twinfer runs.
TRIPLE_OPS = {"mul", "matmul", "conv1d", "conv2d", "conv_transpose1d", "conv_transpose2d"}
CHUNK_BYTES = 4 * 1024 * 1024
# Largest tuple the dealer makes (elements of one tensor): 1 GiB of int64, as the transport allows.
MAX_TUPLE_ELEMENTS = 2**27


def _seed() -> int:
    return int.from_bytes(os.urandom(8), "big") - 2**63


def derive_seed(seed: int, index: int) -> int:
    """The seed of a party's generator for the session's index-th tuple (a keyed hash)."""
    digest = hashlib.blake2b(index.to_bytes(8, "little"), key=seed.to_bytes(8, "little", signed=True), digest_size=8)
    return int.from_bytes(digest.digest(), "little", signed=True)


def tuple_generator(seed: int, index: int) -> torch.Generator:
    g = torch.Generator(device="cpu")
    g.manual_seed(derive_seed(seed, index))
    return g


class _TupleMath(TTPServer):
    """CrypTen's TTPServer arithmetic, for one tuple, without its torch.distributed set-up."""

    def __init__(self, seeds: list[int], index: int) -> None:  # noqa: super().__init__ would start a TTP loop
        self.device = "cpu"
        self.generators = [tuple_generator(s, index) for s in seeds]
        self.generators_cuda = [None] * len(seeds)


@dataclass
class DealerSession:
    session_id: str
    seeds: dict[int, int] = field(default_factory=lambda: {r: _seed() for r in RANKS.values()})
    seeded: set[int] = field(default_factory=set)
    closed: set[int] = field(default_factory=set)
    error: pb.Error | None = None
    bytes_sent: int = 0
    tuples: int = 0
    last_active: float = field(default_factory=time.monotonic)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def finished(self) -> bool:
        return self.error is not None or self.closed >= set(RANKS.values())


def _decode_args(function: str, args_json: str) -> tuple[list, dict]:
    """Validate a tuple request: a known function, integer sizes, a whitelisted op."""
    if function not in TTP_FUNCTIONS:
        raise ValueError(f"unknown tuple function '{function}' (known: {', '.join(TTP_FUNCTIONS)})")
    try:
        payload = json.loads(args_json or "{}")
        args, kwargs = list(payload.get("args", [])), dict(payload.get("kwargs", {}))
    except (ValueError, AttributeError, TypeError) as err:
        raise ValueError(f"malformed tuple request arguments: {err}") from None
    n_sizes = 2 if function in ("additive", "binary") else 1
    if len(args) < n_sizes:
        raise ValueError(f"'{function}' needs {n_sizes} sizes, got {len(args)} arguments")
    for size in args[:n_sizes]:
        if not (isinstance(size, list) and all(isinstance(d, int) and 0 <= d < 2**31 for d in size)):
            raise ValueError(f"tuple sizes must be lists of non-negative ints, got {size!r}")
        if math.prod(size) > MAX_TUPLE_ELEMENTS:
            raise ValueError(f"tuple size {size} exceeds the dealer's limit of {MAX_TUPLE_ELEMENTS} elements")
    if function == "additive":
        if len(args) < 3 or not isinstance(args[2], str) or args[2] not in TRIPLE_OPS:
            raise ValueError(f"'additive' op must be one of {sorted(TRIPLE_OPS)}, got {args[2:3]}")
        args = [torch.Size(args[0]), torch.Size(args[1]), *args[2:]]
    else:
        args = [torch.Size(a) for a in args[:n_sizes]] + args[n_sizes:]
    return args, kwargs


class DealerServicer:
    """Serves seeds and tuples for the sessions it was told to expect."""

    def __init__(self, idle_timeout_s: float = 600.0, *, check_role_certs: bool = False) -> None:
        # With mutual TLS: a caller's certificate must name the role it asks as, and only the
        # server (party 0) may ask for tuples.
        self.check_role_certs = check_role_certs
        self._sessions: dict[str, DealerSession] = {}
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self.idle_timeout_s = idle_timeout_s

    def open_session(self, session_id: str) -> None:
        with self._lock:
            self._sessions.setdefault(session_id, DealerSession(session_id))

    def _authorize(self, context: grpc.ServicerContext, role: str) -> None:
        if not self.check_role_certs:
            return
        refused = check_peer_role(context, (role,), "dealer")
        if refused is not None:
            log.warning("%s", refused)
            context.abort(grpc.StatusCode.PERMISSION_DENIED, f"dealer: {refused}")

    def _session(self, session_id: str, context: grpc.ServicerContext) -> DealerSession:
        with self._lock:
            session = self._sessions.get(session_id)
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
        session = self._session(request.session_id, context)
        rank = RANKS.get(request.role)
        if rank is None:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"dealer: unknown role '{request.role}'")
        with session.lock:
            if rank in session.seeded:
                context.abort(grpc.StatusCode.ALREADY_EXISTS, f"dealer: {request.role} already has its seed")
            session.seeded.add(rank)
            session.bytes_sent += 8
        log.info("session %s: seed sent to %s", session.session_id, request.role)
        return pb.SeedReply(seed=session.seeds[rank])

    def _make(self, session: DealerSession, request: pb.TupleRequest, context) -> list[bytes]:
        """Party 0's share of one tuple, as framed chunks."""
        try:
            args, kwargs = _decode_args(request.function, request.args_json)
        except ValueError as err:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"dealer: {err}")
        math_ = _TupleMath([session.seeds[0], session.seeds[1]], request.index)
        try:
            share = getattr(math_, request.function)(*args, **kwargs)
        except (RuntimeError, TypeError, ValueError) as err:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"dealer: cannot make '{request.function}': {err}")
        array = share.contiguous().numpy()
        view = memoryview(array).cast("B") if array.size else memoryview(b"")
        with session.lock:
            session.tuples += 1
            session.bytes_sent += view.nbytes
        count = max(1, math.ceil(view.nbytes / CHUNK_BYTES))
        return [
            encode_framed(
                pb.TupleReply(shape=list(share.shape), chunk_index=i, chunk_count=count, index=request.index),
                view[i * CHUNK_BYTES : (i + 1) * CHUNK_BYTES],
            )
            for i in range(count)
        ]

    def Tuple(self, request, context):  # noqa: N802
        self._authorize(context, "server")
        session = self._session(request.session_id, context)
        yield from self._make(session, request, context)

    def Prefetch(self, request, context):  # noqa: N802
        self._authorize(context, "server")
        session = self._session(request.session_id, context)
        for tuple_request in request.tuples:
            if not context.is_active() or session.error is not None:
                return  # the party went away or the session failed: stop making tuples
            session.last_active = time.monotonic()
            yield from self._make(session, tuple_request, context)

    def Close(self, request, context):  # noqa: N802
        self._authorize(context, request.role)
        with self._lock:
            session = self._sessions.get(request.session_id)
            if session is None:
                context.abort(grpc.StatusCode.NOT_FOUND, f"dealer: unknown session '{request.session_id}'")
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
                if idle > self.idle_timeout_s or time.monotonic() > deadline:
                    session.error = pb.Error(
                        error_id=new_error_id(),
                        kind="timeout",
                        message=f"no request for {idle:.0f} s; the dealer ends the session",
                        origin="dealer",
                    )
                    return session
                self._changed.wait(timeout=1.0)


def add_dealer_servicer(servicer: DealerServicer, server: grpc.Server) -> None:
    """Register the Dealer service; tuple replies use twinfer's framing (parties/wire.py)."""
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
