"""`twinfer serve`'s main process: the front door, the pool of workers, and the bookkeeping.

The front door is a gRPC server with two services: Serve/Open (parties/runtime/serving.py) and
grpc.health.v1. Open makes a fresh 128-bit id, gives it to the worker with the most room, and
returns the id and that worker's port; past --max-sessions running sessions it refuses with
"busy". Every session's end comes back from its worker and is counted (metrics.py) and logged
(one JSON line). Draining refuses new sessions, reports NOT_SERVING, and waits for the running
ones. A worker that dies is replaced; its sessions are counted as failed.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import queue
import threading
from typing import Any

from twinfer.parties.errors import BusyError, PeerError, TwinferError
from twinfer.parties.runtime.model_file import parse_model
from twinfer.parties.runtime.serving import Draining, FrontDoor, SessionEnd, Ticket, add_front_door
from twinfer.parties.runtime.host import MAX_SESSIONS
from twinfer.parties.runtime.session import DEALER, SERVER, PartyConfig, check_listen, server_graph
from twinfer.parties.wire.transport import open_channel, start_server

from ..launch.wiring import new_session_id
from .lifecycle import Health, SessionLog, wait_until
from .metrics import ServeMetrics
from .workers import Worker, spawn_context

log = logging.getLogger(__name__)


def default_workers() -> int:
    """One worker per core."""
    return max(1, os.cpu_count() or 1)


class StandingServer:
    """A server that keeps running: sessions on demand in a pool of worker processes.

    `template`: the server's PartyConfig for every session (dealer address, TLS, protocol,
    timeouts; its listen address names the host the workers listen on, at ports they pick).
    """

    def __init__(
        self,
        model: bytes,
        template: PartyConfig,
        *,
        listen: str,
        workers: int | None = None,
        max_sessions: int | None = None,
        metrics_port: int | None = None,
        metrics_host: str = "127.0.0.1",
        session_log: SessionLog | None = None,
        worker_port_base: int | None = None,
    ) -> None:
        """`worker_port_base`: worker i listens on that port + i (for a firewall); else on ports they pick."""
        workers = default_workers() if workers is None else workers
        max_sessions = 4 * workers if max_sessions is None else max_sessions
        if workers < 1:
            raise ValueError(f"--workers must be at least 1, got {workers}")
        if not 1 <= max_sessions <= MAX_SESSIONS * workers:
            raise ValueError(f"--max-sessions must be between 1 and {MAX_SESSIONS * workers} for {workers} worker(s), got {max_sessions}")
        check_listen(listen, template.tls, template.spec.insecure, SERVER)
        graph, weights = parse_model(model)
        _, encoding = server_graph(graph, weights, template)  # a model this encoding cannot serve is refused before any worker starts
        log.info("serving at %s", encoding.describe())
        if worker_port_base is not None and not 1 <= worker_port_base <= 65535 - workers + 1:
            raise ValueError(f"--worker-ports must leave room for {workers} port(s) below 65536, got {worker_port_base}")
        self.model, self.template, self.listen = model, template, listen
        self.worker_port_base = worker_port_base
        self.n_workers, self.max_sessions = workers, max_sessions
        self.capacity = min(MAX_SESSIONS, math.ceil(max_sessions / workers))
        self.metrics = ServeMetrics(SERVER)
        self.metrics_port, self.metrics_host = metrics_port, metrics_host
        self.log = session_log or SessionLog()
        self.health = Health("twinfer.Serve")
        self.workers: list[Worker] = []
        self._sessions: dict[str, Worker] = {}  # running session id -> its worker
        self._lock = threading.Lock()
        self._draining = False
        self._stopped = threading.Event()
        self._closing = False  # workers are being stopped: none is replaced
        self._failure: BaseException | None = None
        self._ctx = spawn_context()
        self._events: Any = None
        self._server = None
        self._threads: list[threading.Thread] = []
        self.address: str | None = None

    # -- starting ----------------------------------------------------------------------------

    def _new_worker(self, index: int) -> Worker:
        host = self.listen.rsplit(":", 1)[0]
        port = self.worker_port_base + index if self.worker_port_base is not None else 0
        template = dataclasses.replace(self.template, listen=f"{host}:{port}")
        return Worker(self._ctx, index, self.model, template, self.capacity, self._events)

    def start(self) -> str:
        """Start the workers (all at once), then the front door and the metrics page; the front door's address."""
        if self.template.dealer_address:  # a dealer that is not there is named now, not in every session's error
            open_channel(
                self.template.dealer_address, role=SERVER, peer_role=DEALER, options=self.template.spec.options, tls=self.template.tls
            ).close()
        self._events = self._ctx.Queue()
        try:
            self.workers = [self._new_worker(i) for i in range(self.n_workers)]
            for worker in self.workers:
                worker.wait_ready()
            front = FrontDoor(self.open_session, check_role_certs=self.template.tls is not None)
            self._server, port = start_server(
                [(front, add_front_door), self.health.pair], self.listen, self.template.spec.options, self.template.tls
            )
            if self.metrics_port is not None:
                self.metrics_port = self.metrics.serve(self.metrics_port, self.metrics_host)
        except BaseException:
            self.close()
            raise
        self.address = f"{self.listen.rsplit(':', 1)[0]}:{port}"
        thread = threading.Thread(target=self._collect, name="twinfer-serve-events", daemon=True)
        thread.start()
        self._threads.append(thread)
        log.info("serving on %s with %d worker(s), at most %d sessions", self.address, self.n_workers, self.max_sessions)
        return self.address

    # -- sessions -----------------------------------------------------------------------------

    def open_session(self, peer: str = "") -> Ticket:
        """A new session on the worker with the most room; BusyError past --max-sessions, Draining when stopping."""
        with self._lock:
            if self._draining:
                self.metrics.refused("draining")
                raise Draining("busy: the server is shutting down and opens no new session; try another server", origin=SERVER)
            room = [w for w in self.workers if w.port is not None and w.alive() and len(w.running) < w.capacity]
            if len(self._sessions) >= self.max_sessions or not room:
                self.metrics.refused("busy")
                full = len(self._sessions) >= self.max_sessions
                raise BusyError(
                    f"busy: {len(self._sessions)} sessions running, the most this server runs at once (--max-sessions "
                    f"{self.max_sessions}); try again later" if full else
                    f"busy: no worker has room ({len(self._sessions)} sessions running; a worker is restarting); try again later",
                    origin=SERVER,
                )  # fmt: skip
            worker = min(room, key=lambda w: len(w.running))
            port = int(worker.port)  # read under the lock: a worker found dead loses its port
            session_id = new_session_id()
            worker.running.add(session_id)
            self._sessions[session_id] = worker
            self.metrics.running.set(len(self._sessions))
        try:
            worker.open(session_id)
        except TwinferError as err:
            self._settle(session_id)
            worker.process.join(0.5)
            if isinstance(err, PeerError) and not worker.alive():  # it died just now: _collect replaces it
                self.metrics.refused("busy")
                raise BusyError(f"busy: worker {worker.index} exited; another is starting, try again", origin=SERVER) from None
            raise
        self.metrics.started.inc()
        log.info("session %s opened on worker %d for %s", session_id, worker.index, peer)
        return Ticket(session_id, port)

    def _settle(self, session_id: str) -> Worker | None:
        """Forget a session that ended (or never began); its worker, if it was running."""
        with self._lock:
            worker = self._sessions.pop(session_id, None)
            if worker is not None:
                worker.running.discard(session_id)
            self.metrics.running.set(len(self._sessions))
        return worker

    def _ended(self, end: SessionEnd) -> None:
        if self._settle(end.session) is None:
            return  # reported already (its worker died, or it was never opened)
        self.metrics.record(end)
        self.log.write(end)

    def _collect(self) -> None:
        """Hear every session's end from the workers; replace a worker that died."""
        while not self._stopped.is_set():
            try:
                self._ended(self._events.get(timeout=0.5))
            except queue.Empty:
                pass
            except (EOFError, OSError, ValueError):
                return  # the queue was closed under it: the service is stopping
            for worker in list(self.workers):
                if not self._closing and worker.port is not None and not worker.alive():
                    self._replace(worker)

    def _replace(self, dead: Worker) -> None:
        """Count a dead worker's sessions as failed and start its replacement (in a thread: the others' ends keep coming)."""
        log.error("worker %d exited with code %s; starting another", dead.index, dead.process.exitcode)
        with self._lock:
            lost = list(dead.running)
            dead.port = None  # no new session goes to it, and it is replaced once
        for session_id in lost:
            self._ended(SessionEnd(session=session_id, role=SERVER, outcome=PeerError.kind, latency_s=0.0, error="its worker process exited"))
        thread = threading.Thread(target=self._start_replacement, args=(dead,), name="twinfer-serve-respawn", daemon=True)
        thread.start()
        self._threads.append(thread)

    def _start_replacement(self, dead: Worker) -> None:
        fresh = self._new_worker(dead.index)
        try:
            fresh.wait_ready()
        except TwinferError as err:
            self._failure = err  # the model served before: a worker that cannot start now is fatal
            fresh.stop(1)
            return
        with self._lock:
            closing = self._closing
            if not closing:
                self.workers[self.workers.index(dead)] = fresh
        dead.stop(0)
        if closing:  # the service stopped while it started
            fresh.stop(1)

    def running(self) -> int:
        with self._lock:
            return len(self._sessions)

    # -- stopping -----------------------------------------------------------------------------

    def failure(self) -> BaseException | None:
        return self._failure

    def drain(self, timeout_s: float) -> int:
        """Refuse new sessions and report NOT_SERVING; wait up to `timeout_s` for the running ones.
        The number still running then."""
        with self._lock:
            self._draining = True
        self.health.drain()
        wait_until(lambda: self.running() == 0, timeout_s)
        return self.running()

    def close(self) -> None:
        """Stop everything this service started: workers, front door, metrics page, threads."""
        self._closing = True
        for worker in self.workers:
            worker.stop()
        self._stopped.set()
        for thread in self._threads:
            thread.join(timeout=5)
        for session_id in list(self._sessions):  # cut by a drain past its timeout
            self._ended(SessionEnd(session=session_id, role=SERVER, outcome="drained", latency_s=0.0, error="ended by the server's shutdown"))
        if self._server is not None:
            self._server.stop(grace=0.5).wait(5)
            self._server = None
        self.metrics.close()
        if self._events is not None:
            self._events.close()
            self._events.join_thread()
            self._events = None
