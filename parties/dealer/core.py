"""The dealer without a transport: its sessions, the correlations it makes, who may ask, when a session ends.

At session start the dealer draws one seed per party and hands it to that party only; the
k-th correlation of the session is derived from (seeds, k), so a party that may compute its
share locally never asks again, and the others ask by public kind and size. What each kind
is, how its request is checked and its parts made, and who may ask for it, comes from the
backend that needs it (the correlation registry of `twinfer.protocols.backends`); the core
keeps the sessions. Because a correlation depends only on (seeds, k, kind, size), a party may
ask for it before it needs it (prefetch: the offline phase), in any order.

Which sessions exist is a policy: by default those the dealer was told to expect
(`open_session`); `OnDemand` opens one when a party names a fresh id (a standing dealer).

A session ends when
1. both parties closed it;
2. a party reports a failure: the session ends under that failure's error id;
3. both parties left without closing it (their keepalives stopped: they failed while the
   dealer could not hear them, e.g. while it was stopped), or
4. no party was heard from within the idle deadline (the accept deadline before any party
   took its seed).
Cases 3 and 4 end it under `dealer_lost_id(session)`, the id a party gives a dealer it lost,
so that every process of the session logs one id without hearing from the others. A dealer
that was itself stopped finds every party silent when it resumes: it judges none until the
requests they queued meanwhile have been served (RESUME_GRACE_S).

Nothing here knows gRPC: a refused request raises `DealerError`, whose `reason`
parties/dealer/service.py turns into a status code; a caller's identity (its certificate,
under mutual TLS) is an opaque string.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np

from twinfer.protocols.backends import backend_class, correlation_kind
from twinfer.protocols.backends.base import DealerSeeds
from twinfer.protocols.roles import DEALER, RANKS

from twinfer.parties.errors import PeerError, PeerTimeoutError, TwinferError

log = logging.getLogger(__name__)

SESSION_ID = re.compile(r"[0-9a-f]{32,}")  # 128 bits or more, as hex (wiring.new_session_id)
REMEMBERED_IDS = 100_000  # ids of ended sessions kept to refuse a replay (about 10 MB); older ones are random and never expected again
LINGER_S = 2.0  # an ended session is kept this long, so that the slower party's Close still finds it
KEEPALIVE_MAX_S = 5.0  # a party keeps its session alive at least this often (client.py: a quarter of its deadline, at most this)
LEFT_AFTER_BEATS = 3  # a party whose keepalive is this many of its periods late has left...
LEFT_AFTER_MIN_S = 2.0  # ...and at least this late
STALL_S = 1.0  # the dealer's own checks this late: it was stopped (or starved) meanwhile...
RESUME_GRACE_S = 1.0  # ...so it judges no party until the requests queued meanwhile have been served


def dealer_lost_id(session_id: str) -> str:
    """The error id of a session whose dealer was lost (stopped, gone, too slow): derived from the
    session id alone, so both parties and the dealer name it alike without hearing from each other."""
    return hashlib.sha256(f"dealer lost {session_id}".encode()).hexdigest()[:12]


class DealerError(Exception):
    """A request the dealer refuses; `reason` is one of the constants below."""

    UNKNOWN = "unknown"  # no such session (a wrong id)
    INVALID = "invalid"  # a malformed request: unknown role, protocol or kind, bad arguments
    DENIED = "denied"  # the caller may not ask this: another role's kind, another certificate
    EXISTS = "exists"  # a role asked for its seed twice: a reused session id
    SPENT = "spent"  # a session id that named a session that has ended
    BUSY = "busy"  # as many sessions open as the policy allows, or the dealer is draining
    ENDED = "ended"  # the session ended (by a party's failure, or the dealer's deadline)

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"dealer: {message}")
        self.reason = reason


def _seed() -> int:
    return int.from_bytes(os.urandom(8), "big") - 2**63


def _new_seeds() -> DealerSeeds:
    return DealerSeeds(torch={r: _seed() for r in RANKS.values()}, aes={r: os.urandom(16) for r in RANKS.values()}, dealer=os.urandom(16))


@dataclass
class DealerSession:
    """One session's seeds and what the dealer knows of its parties."""

    session_id: str
    seeds: DealerSeeds = field(default_factory=_new_seeds)
    protocols: dict[str, str] = field(default_factory=dict)  # role -> the protocol it named with its seed
    seeded: set[int] = field(default_factory=set)
    bound: dict[int, str | None] = field(default_factory=dict)  # rank -> identity (certificate) that took its seed
    closed: set[int] = field(default_factory=set)
    error: TwinferError | None = None
    bytes_sent: int = 0
    tuples: int = 0
    started: float = field(default_factory=time.monotonic)
    last_active: float = field(default_factory=time.monotonic)
    ended_at: float | None = None  # when it ended (monotonic)
    heard: dict[int, float] = field(default_factory=dict)  # rank -> when a request of it last arrived
    keepalive: dict[int, float] = field(default_factory=dict)  # rank -> its last keepalive
    beat: dict[int, float] = field(default_factory=dict)  # rank -> its keepalive period, as measured (longest gap)
    lock: threading.Lock = field(default_factory=threading.Lock)
    paired: dict[tuple, Future] = field(default_factory=dict)  # made once for several parties: parts not yet taken

    @property
    def finished(self) -> bool:
        return self.error is not None or self.closed >= set(RANKS.values())

    def left(self, now: float) -> bool:
        """Whether every party has closed it or, having taken its seed, stopped its keepalive."""
        for rank in RANKS.values():
            if rank in self.closed:
                continue
            if rank not in self.heard:
                return False  # never took its seed: not known to have come, let alone left
            # its own period once measured, else its peer's (the parties of a session share a deadline), else the longest
            period = self.beat.get(rank) or max(self.beat.values(), default=KEEPALIVE_MAX_S)
            if now - self.heard[rank] <= max(LEFT_AFTER_BEATS * period, LEFT_AFTER_MIN_S):
                return False
        return True


@dataclass
class OnDemand:
    """Policy of a standing dealer: a session opens when a party names a fresh id, up to `max_sessions` at once.

    A standing server (`twinfer serve`) makes a fresh 128-bit id for each client; the dealer
    learns it from the two parties themselves. An id names one session, once: after the
    session ends it is refused. While `draining` no session opens.
    """

    max_sessions: int
    draining: bool = False
    _ended: OrderedDict = field(default_factory=OrderedDict, repr=False)

    def __post_init__(self) -> None:
        if self.max_sessions < 1:
            raise ValueError(f"max_sessions must be at least 1, got {self.max_sessions}")

    def admit(self, session_id: str, open_now: int) -> None:
        """Raise DealerError unless a session `session_id` may open now."""
        if session_id in self._ended:
            raise DealerError(
                DealerError.SPENT,
                f"session '{session_id}' has ended; a session id admits its parties once (ask the server for a new session)",
            )
        if not SESSION_ID.fullmatch(session_id):
            raise DealerError(
                DealerError.INVALID, f"session id '{session_id[:40]}' is not a fresh 128-bit id (32 or more lowercase hex digits)"
            )
        if self.draining:
            raise DealerError(DealerError.BUSY, "busy: it is shutting down and opens no new session")
        if open_now >= self.max_sessions:
            raise DealerError(DealerError.BUSY, f"busy: {open_now} sessions open, the most it serves at once (--max-sessions)")

    def remember(self, session_id: str) -> None:
        self._ended[session_id] = None
        if len(self._ended) > REMEMBERED_IDS:
            self._ended.popitem(last=False)


class DealerCore:
    """The sessions of one dealer process, whatever serves them.

    `policy`: OnDemand for a standing dealer, else sessions must be opened in advance.
    `bind_roles`: a role of a session belongs to the caller identity that took its seed (under
    mutual TLS the identity is the certificate); without it nothing is authenticated and the
    session id is what admits a party. `on_end(session)` is called once, as each session ends.
    """

    def __init__(
        self,
        policy: OnDemand | None = None,
        *,
        idle_timeout_s: float = 600.0,
        accept_timeout_s: float | None = None,
        bind_roles: bool = False,
        on_end: Callable[[DealerSession], None] | None = None,
    ) -> None:
        self.policy = policy
        self.idle_timeout_s = idle_timeout_s
        # before any party has taken its seed, a session waits as a listener waits for its peer to dial in
        self.accept_timeout_s = max(idle_timeout_s, accept_timeout_s or 0.0)
        self.bind_roles = bind_roles
        self.on_end = on_end
        self._sessions: dict[str, DealerSession] = {}
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._stop = threading.Event()
        self._reaper: threading.Thread | None = None
        self._checked = time.monotonic()  # the last look at the sessions (reap, wait_finished)
        self._judge_after = 0.0  # after a stall of the dealer: no party is judged silent before this

    # -- sessions ---------------------------------------------------------------------------------

    def open_session(self, session_id: str) -> None:
        with self._lock:
            self._sessions.setdefault(session_id, DealerSession(session_id))

    def open_count(self) -> int:
        with self._lock:
            return len(self._sessions)

    def _session(self, session_id: str, role: str | None = None, create: bool = False) -> DealerSession:
        """The running session of `session_id` (`create`: the caller asks for its seed, and the policy may open it)."""
        with self._lock:
            session = self._sessions.get(session_id)
            if session is None and create and self.policy is not None:
                self.policy.admit(session_id, len(self._sessions))
                session = self._sessions[session_id] = DealerSession(session_id)
                log.info("session %s opened on demand", session_id)
        if session is None:
            raise DealerError(DealerError.UNKNOWN, f"unknown session '{session_id}'")
        e = session.error
        if e is not None:
            raise DealerError(
                DealerError.ENDED, f"session '{session_id}' ended by a failure at {e.origin} [error {e.error_id}]: {e.message}"
            )
        now = time.monotonic()
        session.last_active = now
        if role in RANKS:
            session.heard[RANKS[role]] = now
        return session

    def _check_caller(self, session: DealerSession, role: str, caller: str | None) -> None:
        """With bound roles, only the identity that took a role's seed acts as that role."""
        if not self.bind_roles:
            return
        rank = RANKS.get(role, -1)
        with session.lock:
            bound, owner = rank in session.bound, session.bound.get(rank)
        if bound and owner != caller:
            log.warning("session %s: a second %s certificate was refused", session.session_id, role)
            raise DealerError(
                DealerError.DENIED,
                f"the {role} of session '{session.session_id}' is bound to the certificate that took its seed; "
                "this caller presents another one",
            )

    # -- what parties ask for ---------------------------------------------------------------------

    def seed(self, session_id: str, role: str, protocol: str, caller: str | None = None) -> tuple[int, bytes]:
        """This role's seed and (for backends that key AES-CTR streams) its 128-bit key, once per session."""
        session = self._session(session_id, role, create=True)
        rank = RANKS.get(role)
        if rank is None:
            raise DealerError(DealerError.INVALID, f"unknown role '{role}'")
        try:
            backend = backend_class(protocol)
        except ValueError as err:
            raise DealerError(DealerError.INVALID, str(err)) from None
        with session.lock:
            if rank in session.seeded:
                raise DealerError(
                    DealerError.EXISTS,
                    f"{role} already has its seed for session '{session_id}': an id admits each party once",
                )
            # A party on another protocol than its peer is refused by the peer at their handshake,
            # with one error for the whole session; here each role may ask only for its own kinds.
            session.protocols[role] = protocol
            session.seeded.add(rank)
            if self.bind_roles:
                session.bound[rank] = caller
            session.keepalive[rank] = time.monotonic()  # its keepalives start now (their period is measured from here)
            key = session.seeds.aes[rank] if backend.aes_seed else b""
            session.bytes_sent += 8 + len(key)
        log.info("session %s: seed sent to %s", session_id, role)
        return session.seeds.torch[rank], key

    def correlation(self, session_id: str, role: str, function: str, args_json: str, index: int, caller: str | None = None) -> dict[str, np.ndarray]:
        """The asking role's part of correlation `index` of kind `function` (named arrays)."""
        session = self._session(session_id, role)
        self._check_caller(session, role, caller)
        try:
            kind = correlation_kind(function)
            own = backend_class(session.protocols[role]) if role in session.protocols else None
            if own is not None and kind not in own.correlations:
                raise DealerError(
                    DealerError.INVALID, f"'{kind.name}' is not a correlation of protocol '{session.protocols[role]}', which the {role} named"
                )
            if role not in kind.requesters:
                raise DealerError(DealerError.DENIED, f"the {role} may not ask for '{kind.name}' (only {list(kind.requesters)})")
            args, kwargs = kind.decode(args_json)
        except ValueError as err:
            raise DealerError(DealerError.INVALID, str(err)) from None
        try:
            if kind.paired:
                arrays = self._take_paired(session, kind, index, args_json, role, args, kwargs)
            else:
                arrays = kind.make(session.seeds, index, role, args, kwargs)
        except (RuntimeError, TypeError, ValueError) as err:
            raise DealerError(DealerError.INVALID, f"cannot make '{function}': {err}") from None
        with session.lock:
            first = session.tuples == 0
            session.tuples += 1
            session.bytes_sent += sum(a.nbytes for a in arrays.values())
        if first:
            log.info("session %s: first correlation made, for the %s", session_id, role)
        return arrays

    def _take_paired(self, session: DealerSession, kind, index: int, args_json: str, role: str, args: list, kwargs: dict) -> dict:
        """This role's part of a paired correlation; made by the first requester, kept for the others."""
        key = (kind.name, index, args_json)
        with session.lock:
            entry = session.paired.get(key)
            maker = entry is None
            if maker:
                entry = session.paired[key] = Future()
        if maker:
            try:
                entry.set_result(kind.make(session.seeds, index, role, args, kwargs))
            except Exception as err:  # noqa: BLE001 - handed to every waiting requester
                entry.set_exception(err)
        try:
            parts = entry.result(timeout=self.idle_timeout_s)
        except TimeoutError:
            raise RuntimeError(f"correlation {index} was not made within {self.idle_timeout_s:g} s") from None
        except Exception as err:  # noqa: BLE001 - the maker's failure, for each requester
            raise ValueError(str(err)) from None
        with session.lock:
            part = parts.pop(role, None)
            if not parts:
                session.paired.pop(key, None)
        if part is None:
            raise ValueError(f"the {role} asked twice for correlation {index}")
        return part

    def keepalive(self, session_id: str, role: str, caller: str | None = None) -> None:
        """A party says it lives (every few seconds, even when it asks for nothing)."""
        session = self._session(session_id, role)
        self._check_caller(session, role, caller)
        rank = RANKS.get(role)
        if rank is None:
            return
        now = time.monotonic()
        with session.lock:
            last, beat = session.keepalive.get(rank), session.beat.get(rank)
            # The period grows with what is measured, but not by a gap the dealer itself caused: one
            # that spans a stop of the dealer (a keepalive that waited through it) is no period.
            if last is not None and (beat is None or now - last <= 2 * beat):
                session.beat[rank] = max(beat or 0.0, now - last)
            session.keepalive[rank] = now

    def close(self, session_id: str, role: str, error: TwinferError | None = None, caller: str | None = None) -> None:
        """`role` is done with the session, or failed with `error` (the session ends under its id)."""
        with self._lock:
            session = self._sessions.get(session_id)
        if session is None:
            raise DealerError(DealerError.UNKNOWN, f"unknown session '{session_id}'")
        self._check_caller(session, role, caller)
        with self._lock:
            if error is not None and session.error is None:
                session.error = error
            session.closed.add(RANKS.get(role, -1))
            ended = self._settle(session, time.monotonic())
            self._changed.notify_all()
        self._report(ended)

    # -- how sessions end -------------------------------------------------------------------------

    def _look(self, now: float) -> None:
        """Under the lock, before judging sessions: a dealer that was itself stopped (SIGSTOP) sees
        every party silent; their requests queued meanwhile are served first."""
        if now - self._checked > STALL_S:
            self._judge_after = now + RESUME_GRACE_S
        self._checked = now

    def _settle(self, session: DealerSession, now: float) -> list[DealerSession]:
        """Under the lock: end `session` if its parties left or went silent; [it] if it ended just now."""
        if session.ended_at is not None:
            return []
        if not session.finished and now >= self._judge_after:
            idle = now - session.last_active
            limit = self.idle_timeout_s if session.seeded else self.accept_timeout_s
            with session.lock:
                left = session.left(now)
            if left:
                session.error = PeerTimeoutError(
                    f"the parties of session '{session.session_id}' left it without closing it: they stopped keeping it "
                    "alive, having lost the dealer (it was stopped, or unreachable)",
                    error_id=dealer_lost_id(session.session_id), origin=DEALER,
                )  # fmt: skip
            elif idle > limit:
                session.error = self._silence(session, idle)
        if not session.finished:
            return []
        session.ended_at = now
        session.paired.clear()  # parts nobody will take: a party that failed or stopped early
        e = session.error
        if e is None:
            log.info("session %s ended", session.session_id)
        else:
            log.warning("session %s failed at %s [error %s]: %s", session.session_id, e.origin, e.error_id, e.message)
        return [session]

    @staticmethod
    def _silence(session: DealerSession, idle: float) -> TwinferError:
        return PeerTimeoutError(
            f"no request for {idle:.0f} s; the dealer ends the session", error_id=dealer_lost_id(session.session_id), origin=DEALER
        )

    def _report(self, ended: list[DealerSession]) -> None:
        if self.on_end is not None:
            for session in ended:
                self.on_end(session)

    def stats(self, session_id: str) -> dict:
        with self._lock:
            s = self._sessions[session_id]
            return {"bytes_sent": s.bytes_sent, "tuples": s.tuples, "finished": s.finished}

    def wait_finished(self, session_id: str, timeout_s: float) -> DealerSession:
        """Block until `session_id` ends (see the module's docstring), or `timeout_s` passes (then it ends with a timeout)."""
        deadline = time.monotonic() + timeout_s
        ended: list[DealerSession] = []
        with self._lock:
            while True:
                session = self._sessions[session_id]
                now = time.monotonic()
                self._look(now)
                ended = self._settle(session, now)
                if session.finished:
                    break
                if now > deadline:
                    session.error = self._silence(session, now - session.last_active)
                    ended = self._settle(session, now)
                    break
                self._changed.wait(timeout=0.25)
        self._report(ended)
        return session

    def reap(self) -> list[DealerSession]:
        """End the sessions whose parties left or went silent; forget those ended LINGER_S ago. Returns those forgotten."""
        now = time.monotonic()
        ended, gone = [], []
        with self._lock:
            self._look(now)
            for session_id, session in list(self._sessions.items()):
                ended += self._settle(session, now)
                if session.ended_at is not None and now - session.ended_at >= LINGER_S:
                    del self._sessions[session_id]
                    if self.policy is not None:
                        self.policy.remember(session_id)
                    gone.append(session)
            self._changed.notify_all()
        self._report(ended)
        return gone

    def start(self, period_s: float = 0.5) -> None:
        """Reap in a background thread every `period_s` until stop()."""

        def loop() -> None:
            while not self._stop.wait(period_s):
                self.reap()

        self._reaper = threading.Thread(target=loop, name="twinfer-dealer-reaper", daemon=True)
        self._reaper.start()

    def stop(self) -> None:
        """Stop reaping; end (and report) the sessions still running: the dealer goes, and their
        parties, finding it gone, name it under the same id."""
        self._stop.set()
        if self._reaper is not None:
            self._reaper.join(timeout=5)
        now = time.monotonic()
        ended = []
        with self._lock:
            for session in self._sessions.values():
                if not session.finished:
                    session.error = PeerError(
                        "the dealer stopped while the session ran", error_id=dealer_lost_id(session.session_id), origin=DEALER
                    )
                ended += self._settle(session, now)
            self._changed.notify_all()
        self._report(ended)
