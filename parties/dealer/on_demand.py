"""A standing dealer: sessions made on demand, when the first party names a new id.

A standing server (`twinfer serve`) makes a fresh 128-bit id for each client; the dealer
learns it from the two parties themselves, not in advance. The first Seed request naming an
unknown id opens its session; under mutual TLS each role of it is then bound to the
certificate that took its seed (DealerServicer._bound), so a third caller, even one holding
the id, cannot take a part of it. An id names one session, once: after the session ends it is
refused. Sessions are bounded in number, and a reaper ends those whose parties went silent,
then forgets every finished one, so memory does not grow with the sessions served.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable

import grpc

from twinfer.protocols.roles import DEALER

from twinfer.parties.dealer.service import DealerServicer, DealerSession
from twinfer.parties.errors import new_error_id
from twinfer.parties.proto import twinfer_pb2 as pb

log = logging.getLogger(__name__)

SESSION_ID = re.compile(r"[0-9a-f]{32,}")  # 128 bits or more, as hex (wiring.new_session_id)
REMEMBERED_IDS = 100_000  # ids of ended sessions kept to refuse a replay (about 10 MB); older ones are random and never expected again
LINGER_S = 2.0  # a finished session is kept this long, so that the slower party's Close still finds it


class OnDemandDealer(DealerServicer):
    """A DealerServicer that opens a session for each new id a party names, up to `max_sessions` at once."""

    def __init__(
        self,
        max_sessions: int,
        idle_timeout_s: float = 600.0,
        *,
        check_role_certs: bool = False,
        on_end: Callable[[DealerSession], None] | None = None,
    ) -> None:
        super().__init__(idle_timeout_s, check_role_certs=check_role_certs)
        if max_sessions < 1:
            raise ValueError(f"max_sessions must be at least 1, got {max_sessions}")
        self.max_sessions = max_sessions
        self.on_end = on_end
        self.draining = False  # set while the dealer stops: no new session, running ones finish
        self._ended: OrderedDict[str, None] = OrderedDict()
        self._stop = threading.Event()
        self._reaper: threading.Thread | None = None

    def _find(self, session_id: str, context: grpc.ServicerContext, create: bool) -> DealerSession | None:
        with self._lock:
            session = self._sessions.get(session_id)
            if session is not None or not create:
                return session
            if session_id in self._ended:
                context.abort(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"dealer: session '{session_id}' has ended; a session id admits its parties once (ask the server for a new session)",
                )
            if not SESSION_ID.fullmatch(session_id):
                context.abort(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"dealer: session id '{session_id[:40]}' is not a fresh 128-bit id (32 or more lowercase hex digits)",
                )
            if self.draining:
                context.abort(grpc.StatusCode.UNAVAILABLE, "dealer: busy: it is shutting down and opens no new session")
            if len(self._sessions) >= self.max_sessions:
                context.abort(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"dealer: busy: {len(self._sessions)} sessions open, the most it serves at once (--max-sessions)",
                )
            session = self._sessions[session_id] = DealerSession(session_id)
            log.info("session %s opened on demand", session_id)
            return session

    def open_count(self) -> int:
        with self._lock:
            return len(self._sessions)

    def reap(self) -> list[DealerSession]:
        """End sessions idle past the timeout; forget finished ones (after LINGER_S). Returns those forgotten."""
        now = time.monotonic()
        gone = []
        with self._lock:
            for session_id, session in list(self._sessions.items()):
                idle = now - session.last_active
                if not session.finished and idle > self.idle_timeout_s:
                    session.error = pb.Error(
                        error_id=new_error_id(), kind="timeout", origin=DEALER,
                        message=f"no request for {idle:.0f} s; the dealer ends the session",
                    )  # fmt: skip
                    log.warning("session %s: no request for %.0f s, ended", session_id, idle)
                if session.finished and idle > LINGER_S:
                    del self._sessions[session_id]
                    session.paired.clear()
                    self._ended[session_id] = None
                    if len(self._ended) > REMEMBERED_IDS:
                        self._ended.popitem(last=False)
                    gone.append(session)
            self._changed.notify_all()
        for session in gone:
            if self.on_end is not None:
                self.on_end(session)
        return gone

    def start(self, period_s: float = 0.5) -> None:
        """Reap in a background thread every `period_s` until stop()."""
        def loop() -> None:
            while not self._stop.wait(period_s):
                self.reap()

        self._reaper = threading.Thread(target=loop, name="twinfer-dealer-reaper", daemon=True)
        self._reaper.start()

    def stop(self) -> None:
        self._stop.set()
        if self._reaper is not None:
            self._reaper.join(timeout=5)
        self.reap()  # report what ended meanwhile
