"""The worker processes of a standing server: each loads the model once and serves sessions on its own port.

A worker is a spawned Python process running a ServerHost (one listener, one thread per
session; parties/runtime/host.py). The main process tells it which session ids to expect over a
pipe, one request and one reply at a time; the worker reports every session's end
(parties.runtime.serving.SessionEnd) on a queue shared by all workers. A worker ignores
SIGINT and SIGTERM (the main process decides when to stop) and exits at once when the main
process goes away (its pipe closes), so that no worker outlives the service and every client of
a killed server sees its connection drop.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import signal
import threading
import time
from typing import Any

from twinfer.parties.errors import PeerError, PeerTimeoutError, TwinferError
from twinfer.parties.runtime.serving import SessionEnd
from twinfer.parties.runtime.session import SERVER, PartyConfig, PartyReport

log = logging.getLogger(__name__)

READY_TIMEOUT_S = 180.0  # spawning and importing torch and CrypTen on a loaded 2-core machine
REPLY_TIMEOUT_S = 30.0


def _worker_main(index: int, model: bytes, template: PartyConfig, capacity: int, conn: Any, events: Any) -> None:
    """A worker process: load the model, listen, then open the sessions the main process names."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    import torch

    torch.set_num_threads(1)  # sessions of several workers share the cores
    from twinfer.parties.runtime.host import ServerHost
    from twinfer.parties.runtime.model_file import parse_model

    from ..launch.wiring import party_failure

    try:
        graph, weights = parse_model(model)
        host = ServerHost(graph, weights, template, max_sessions=capacity)
    except BaseException as err:  # noqa: BLE001 - the main process must hear why, not wait
        conn.send(("failed", party_failure(SERVER, err)))
        return
    started: dict[str, tuple[float, Any]] = {}
    lock = threading.Lock()

    def ended(session_id: str, outcome: PartyReport | TwinferError) -> None:
        with lock:
            opened, party = started.pop(session_id, (time.monotonic(), None))
        peer = party.transport.peer_address if party is not None else None
        events.put(SessionEnd.of(session_id, SERVER, outcome, opened, peer))

    host.on_end(ended)
    conn.send(("ready", host.listener.port, os.getpid()))
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            os._exit(1)  # the main process is gone: so are this worker's sessions
        if message[0] == "open":
            session_id = message[1]
            opened = time.monotonic()
            try:
                with lock:
                    started[session_id] = (opened, None)
                party = host.open(session_id)  # not under the lock: a session ending at once calls ended() here
                with lock:
                    if session_id in started:
                        started[session_id] = (opened, party)
                conn.send(("opened", session_id))
            except Exception as err:  # noqa: BLE001 - refused, and the worker serves on
                with lock:
                    started.pop(session_id, None)
                conn.send(("refused", session_id, party_failure(SERVER, err)))
        elif message[0] == "stop":
            host.close(grace_s=0.5)
            conn.send(("stopped",))
            conn.close()
            os._exit(0)  # sessions cut by a drain past its timeout must not hold the process


class Worker:
    """The main process's handle on one worker process."""

    def __init__(self, ctx: Any, index: int, model: bytes, template: PartyConfig, capacity: int, events: Any) -> None:
        self.index = index
        self.capacity = capacity
        self.running: set[str] = set()  # the main process's count, kept by the service under its lock
        self._conn, child = ctx.Pipe()
        self._lock = threading.Lock()  # one request and its reply at a time
        self.process = ctx.Process(
            target=_worker_main, args=(index, model, template, capacity, child, events), name=f"twinfer-worker-{index}", daemon=True
        )
        self.process.start()
        child.close()
        self.port: int | None = None
        self.pid: int | None = None

    def wait_ready(self, timeout_s: float = READY_TIMEOUT_S) -> None:
        """Until the worker listens; its failure (a model it cannot serve, an address in use) raised as is."""
        reply = self._reply(timeout_s, "start")
        if reply[0] == "failed":
            raise reply[1]
        _, self.port, self.pid = reply

    def _reply(self, timeout_s: float, what: str) -> tuple:
        deadline = time.monotonic() + timeout_s
        while not self._conn.poll(0.1):
            if not self.process.is_alive():
                raise PeerError(f"worker {self.index} exited (code {self.process.exitcode}) during {what}", origin=SERVER)
            if time.monotonic() > deadline:
                raise PeerTimeoutError(f"worker {self.index} did not answer {what} within {timeout_s:g} s", origin=SERVER)
        try:
            return self._conn.recv()
        except (EOFError, OSError) as err:
            raise PeerError(f"worker {self.index} went away during {what}: {err!r}", origin=SERVER) from None

    def open(self, session_id: str) -> None:
        """Have the worker expect a client for `session_id`; the refusal it gives raised."""
        with self._lock:
            try:
                self._conn.send(("open", session_id))
            except (BrokenPipeError, OSError) as err:
                raise PeerError(f"worker {self.index} is gone: {err!r}", origin=SERVER) from None
            reply = self._reply(REPLY_TIMEOUT_S, "open")
        if reply[0] == "refused":
            raise reply[2]

    def alive(self) -> bool:
        return self.process.is_alive()

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop the worker (its running sessions end); killed if it does not exit in time."""
        if self.process.is_alive():
            with self._lock:
                try:
                    self._conn.send(("stop",))
                    self._reply(timeout_s, "stop")
                except (TwinferError, OSError):
                    pass  # killed below
        self.process.join(timeout=timeout_s)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(timeout=10)
        self._conn.close()


def spawn_context() -> Any:
    """Spawn, not fork: a worker must not inherit the main process's gRPC threads."""
    return mp.get_context("spawn")
