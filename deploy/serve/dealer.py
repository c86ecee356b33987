"""`twinfer dealer`'s process: a dealer that keeps running and opens sessions as parties name them."""

from __future__ import annotations

import logging
import time

from twinfer.parties.dealer.core import DealerCore, DealerSession, OnDemand
from twinfer.parties.runtime.serving import SessionEnd
from twinfer.parties.runtime.session import DEALER, PartyListener
from twinfer.parties.wire.tls import TlsIdentity
from twinfer.parties.wire.transport import TransportOptions

from .lifecycle import Health, SessionLog, wait_until
from .metrics import ServeMetrics

log = logging.getLogger(__name__)


class StandingDealer:
    """The dealer's listener with on-demand sessions, gRPC health, metrics and a JSON line per session end."""

    def __init__(
        self,
        listen: str,
        options: TransportOptions,
        *,
        tls: TlsIdentity | None = None,
        insecure: bool = False,
        max_sessions: int = 256,
        metrics_port: int | None = None,
        metrics_host: str = "127.0.0.1",
        session_log: SessionLog | None = None,
    ) -> None:
        self.metrics = ServeMetrics(DEALER)
        self.log = session_log or SessionLog()
        self.health = Health("twinfer.Dealer")
        # A party's keepalive reaches the dealer every few seconds; silence past the receive deadline means it is gone.
        self.policy = OnDemand(max_sessions)
        self.core = DealerCore(self.policy, idle_timeout_s=options.recv_timeout_s, bind_roles=tls is not None, on_end=self._ended)
        self.listener = PartyListener(DEALER, listen, options, tls, insecure, dealer=self.core, extra=(self.health.pair,))
        self.address = self.listener.address
        self.core.start()
        self.metrics.running.set_function(self.core.open_count)
        try:
            self.metrics_port = self.metrics.serve(metrics_port, metrics_host) if metrics_port is not None else None
        except BaseException:
            self.close()
            raise

    def _ended(self, session: DealerSession) -> None:
        error = session.error
        outcome = "ok" if error is None else (error.kind or "error")
        end = SessionEnd(
            session=session.session_id, role=DEALER, outcome=outcome, latency_s=time.monotonic() - session.started,
            bytes_offline=session.bytes_sent, error_id=error.error_id if error else None, error=error.message if error else None,
        )  # fmt: skip
        self.metrics.record(end)
        self.log.write(end)

    def failure(self) -> BaseException | None:
        return None

    def drain(self, timeout_s: float) -> int:
        """Open no new session, report NOT_SERVING, wait for the open ones; how many are left."""
        self.policy.draining = True
        self.health.drain()
        wait_until(lambda: self.core.open_count() == 0, timeout_s)
        return self.core.open_count()

    def close(self) -> None:
        self.core.stop()
        self.listener.close(grace=0.5)
        self.metrics.close()
