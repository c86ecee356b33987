"""One party process serving several sessions at once, one thread per session.

The server and the dealer keep one listener for all their sessions; the peer stream and the
dealer's calls carry the session id, which keeps sessions apart. CrypTen's process-wide state
(communicator, pseudo-random generators, dealer link) is per thread (protocols/backends/crypten/patches.py,
ttp.py), so the sessions of one process never share randomness or messages.
All sessions of a host share one configuration (provider, TLS, timeouts): only the session
id differs.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

from twinfer.protocols.ir.graph import Graph

from twinfer.parties.errors import PeerError, PeerTimeoutError, ProtocolError, TwinferError
from twinfer.parties.runtime.session import (
    CLIENT, DEALER, SERVER, ClientParty, DealerParty, PartyConfig, PartyListener, PartyReport, ServerParty, server_graph,
)  # fmt: skip

log = logging.getLogger(__name__)

MAX_SESSIONS = 64


class _Host:
    """Sessions by id, each run in a worker thread; results collected with a deadline.

    The server and the dealer also hold the one listener all their sessions share.
    """

    role: str

    def __init__(self, template: PartyConfig, max_sessions: int = 16) -> None:
        if template.role != self.role:
            raise ValueError(f"{type(self).__name__} needs a {self.role} configuration, got a {template.role}'s")
        if not 1 <= max_sessions <= MAX_SESSIONS:
            raise ValueError(f"max_sessions must be between 1 and {MAX_SESSIONS}, got {max_sessions}")
        self.template = template
        self._pool = ThreadPoolExecutor(max_workers=max_sessions, thread_name_prefix=f"twinfer-{template.role}")
        self._futures: dict[str, Future] = {}
        self._used: set[str] = set()  # every session id this host opened, finished or not
        self._on_end: Callable[[str, PartyReport | TwinferError], None] | None = None
        self._lock = threading.Lock()
        listener = self.role != CLIENT
        self.listener = PartyListener(self.role, template.listen, template.spec.options, template.tls, template.spec.insecure) if listener else None
        self.address = self.listener.address if self.listener is not None else None

    def config(self, session_id: str) -> PartyConfig:
        return dataclasses.replace(self.template, session_id=session_id)

    def _reserve(self, session_id: str) -> None:
        """Refuse an id this host has opened before: a session id names one session, once."""
        with self._lock:
            if session_id in self._used:
                state = "is already open" if session_id in self._futures else "was used before"
                raise ProtocolError(
                    f"session '{session_id}' {state} on this {self.template.role}: every session needs a fresh id",
                    origin=self.template.role,
                )
            self._used.add(session_id)

    def on_end(self, callback: Callable[[str, PartyReport | TwinferError], None]) -> None:
        """Hand each session's outcome to `callback` as it ends, and forget the session then
        (a standing service: nobody calls wait, and a finished session must not be kept)."""
        self._on_end = callback

    def _submit(self, session_id: str, fn, *args) -> None:
        with self._lock:
            future = self._futures[session_id] = self._pool.submit(fn, *args)
        if self._on_end is not None:  # outside the lock: a future already done runs the callback here
            future.add_done_callback(lambda f: self._ended(session_id, f))

    def _ended(self, session_id: str, future: Future) -> None:
        try:
            outcome = future.result()
        except TwinferError as err:
            outcome = err
        except BaseException as err:  # noqa: BLE001 - a cancelled or crashed session is still an outcome
            outcome = TwinferError(f"session ended unexpectedly: {err!r}", origin=self.template.role)
        with self._lock:
            self._futures.pop(session_id, None)
            self._forget(session_id)
        self._on_end(session_id, outcome)

    def session_ids(self) -> list[str]:
        with self._lock:
            return list(self._futures)

    def wait(self, timeout_s: float, session_ids: list[str] | None = None) -> dict[str, PartyReport | TwinferError]:
        """Each session's report (all, or those named), or the error it ended with; a session still
        running at the deadline times out. Finished sessions are forgotten."""
        deadline = time.monotonic() + timeout_s
        results: dict[str, PartyReport | TwinferError] = {}
        with self._lock:
            futures = {sid: self._futures[sid] for sid in (session_ids or list(self._futures)) if sid in self._futures}
        for session_id in session_ids or []:
            if session_id not in futures:
                results[session_id] = PeerError(f"no session '{session_id}' on this {self.template.role}", origin=self.template.role)
        for session_id, future in futures.items():
            try:
                results[session_id] = future.result(timeout=max(0.0, deadline - time.monotonic()))
            except TwinferError as err:
                results[session_id] = err
            except TimeoutError:
                results[session_id] = PeerTimeoutError(
                    f"session {session_id} did not finish within {timeout_s:g} s", origin=self.template.role
                )
                continue
            with self._lock:
                self._futures.pop(session_id, None)
                self._forget(session_id)
        return results

    def _forget(self, session_id: str) -> None:
        """Drop what the host keeps of a finished session."""

    def close(self, grace_s: float = 1.0) -> None:
        """Stop the sessions' threads and the listener, letting replies in flight finish for `grace_s`."""
        self._pool.shutdown(wait=False, cancel_futures=True)
        if self.listener is not None:
            self.listener.close(grace=grace_s)


class ServerHost(_Host):
    """The server: one listener, one model, any number of concurrent sessions."""

    role = SERVER

    def __init__(self, graph: Graph, weights: dict[str, np.ndarray], template: PartyConfig, max_sessions: int = 16) -> None:
        graph.check_weights(weights)
        graph, encoding = server_graph(graph, weights, template)  # refused here, before listening, if it cannot be encoded
        super().__init__(template, max_sessions)
        self.graph, self.weights, self.encoding = graph, weights, encoding

    def open(self, session_id: str) -> ServerParty:
        """Expect a client for `session_id` from now on and serve it in its own thread."""
        self._reserve(session_id)
        party = ServerParty(self.graph, self.weights, self.config(session_id), listener=self.listener, encoding=self.encoding)
        self._submit(session_id, party.run)
        return party


class DealerHost(_Host):
    """The dealer: one listener serving the correlated randomness of many sessions."""

    role = DEALER

    def open(self, session_id: str, timeout_s: float = 3600.0) -> None:
        self._reserve(session_id)
        party = DealerParty(self.config(session_id), listener=self.listener)
        self._submit(session_id, party.run, timeout_s)


class ClientHost(_Host):
    """The client: runs several sessions against one server at once, each with its own input."""

    role = CLIENT

    def __init__(self, template: PartyConfig, max_sessions: int = 16) -> None:
        super().__init__(template, max_sessions)
        self.parties: dict[str, ClientParty] = {}

    def open(self, session_id: str, inputs: np.ndarray, batch_size: int) -> None:
        self._reserve(session_id)
        party = ClientParty(inputs, batch_size, self.config(session_id))
        self.parties[session_id] = party
        self._submit(session_id, party.run)

    def _forget(self, session_id: str) -> None:
        self.parties.pop(session_id, None)

    def progress(self) -> tuple[int, int]:
        """Samples inferred so far and samples in all, over the sessions still held."""
        with self._lock:
            parties = list(self.parties.values())
        return sum(sum(p.report.batch_sizes) for p in parties), sum(len(p.inputs) for p in parties)
