"""What a standing server and a standing dealer share: gRPC health, the session log, and the run
until SIGTERM (or SIGINT) followed by a drain."""

from __future__ import annotations

import logging
import signal
import sys
import threading
import time
from typing import Protocol, TextIO

from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from twinfer.parties.runtime.serving import SessionEnd

log = logging.getLogger(__name__)


class Health:
    """The standard grpc.health.v1 service: SERVING for "" and `service`, NOT_SERVING once draining."""

    def __init__(self, service: str) -> None:
        self.servicer = health.HealthServicer()
        for name in ("", service):
            self.servicer.set(name, health_pb2.HealthCheckResponse.SERVING)

    @property
    def pair(self) -> tuple[object, object]:
        """The (servicer, add_to_server) pair a gRPC server is started with."""
        return self.servicer, health_pb2_grpc.add_HealthServicer_to_server

    def drain(self) -> None:
        self.servicer.enter_graceful_shutdown()  # every service NOT_SERVING, and no later change


class SessionLog:
    """One JSON line per finished session on `stream` (default stdout), whole lines only."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stdout
        self._lock = threading.Lock()

    def write(self, end: SessionEnd) -> None:
        with self._lock:
            self.stream.write(end.to_json() + "\n")
            self.stream.flush()


class Drainable(Protocol):
    def drain(self, timeout_s: float) -> int: ...

    def close(self) -> None: ...

    def failure(self) -> BaseException | None: ...


def wait_until(done, timeout_s: float, poll_s: float = 0.1) -> bool:
    """Poll `done()` until it is true or `timeout_s` passes; whether it became true."""
    deadline = time.monotonic() + timeout_s
    while not done():
        if time.monotonic() >= deadline:
            return False
        time.sleep(poll_s)
    return True


def run_until_stopped(service: Drainable, drain_timeout_s: float) -> int:
    """Serve until SIGTERM or SIGINT, then drain (running sessions finish within `drain_timeout_s`),
    close and return 0; a failure of the service itself is raised instead."""
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda signum, frame: stop.set()) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        while not stop.wait(0.5):
            failure = service.failure()
            if failure is not None:
                raise failure
        log.warning("stopping: no new session; waiting up to %g s for the running ones", drain_timeout_s)
        cut = service.drain(drain_timeout_s)
        if cut:
            log.warning("%d session(s) still running after --drain-timeout %g s were ended", cut, drain_timeout_s)
        return 0
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        service.close()
