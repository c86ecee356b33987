"""Prometheus metrics of a standing server or dealer, on their own registry and HTTP port.

Names follow the cost vocabulary of DESIGN.md (rounds, bytes_online, bytes_offline,
latency); every series carries the role that counted it.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from twinfer.parties.runtime.serving import SessionEnd

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class ServeMetrics:
    """Sessions started, finished, failed and refused; latency; rounds and bytes."""

    def __init__(self, role: str) -> None:
        self.registry = r = CollectorRegistry()
        labels = {"role": role}
        self.started = Counter("twinfer_sessions_started", "sessions opened", ["role"], registry=r).labels(**labels)
        self.finished = Counter("twinfer_sessions_finished", "sessions that ended with a result", ["role"], registry=r).labels(**labels)
        self._failed = Counter("twinfer_sessions_failed", "sessions that ended with an error, by its kind", ["role", "kind"], registry=r)
        self._refused = Counter("twinfer_sessions_refused", "sessions refused before they began, by reason", ["role", "reason"], registry=r)
        self.running = Gauge("twinfer_sessions_running", "sessions open now", ["role"], registry=r).labels(**labels)
        self.latency = Histogram(
            "twinfer_inference_latency_seconds", "an inference's wall time (its batches), per session", ["role"],
            buckets=LATENCY_BUCKETS, registry=r,
        ).labels(**labels)  # fmt: skip
        self.session_time = Histogram(
            "twinfer_session_seconds", "a session's wall time from its opening to its end", ["role"],
            buckets=LATENCY_BUCKETS, registry=r,
        ).labels(**labels)  # fmt: skip
        self.samples = Counter("twinfer_samples", "samples inferred", ["role"], registry=r).labels(**labels)
        self.rounds = Counter("twinfer_rounds", "online rounds of finished sessions", ["role"], registry=r).labels(**labels)
        self.bytes_online = Counter("twinfer_bytes_online", "client<->server bytes of finished sessions", ["role"], registry=r).labels(**labels)
        self.bytes_offline = Counter("twinfer_bytes_offline", "dealer bytes of finished sessions", ["role"], registry=r).labels(**labels)
        self.role = role
        self._http = None

    def refused(self, reason: str) -> None:
        self._refused.labels(role=self.role, reason=reason).inc()

    def record(self, end: SessionEnd) -> None:
        """Count one finished session."""
        self.session_time.observe(end.latency_s)
        self.bytes_offline.inc(end.bytes_offline)
        if end.outcome != "ok":
            self._failed.labels(role=self.role, kind=end.outcome).inc()
            return
        self.finished.inc()
        self.samples.inc(end.samples)
        self.rounds.inc(end.rounds)
        self.bytes_online.inc(end.bytes_online)
        if end.samples:
            self.latency.observe(end.inference_s)

    def serve(self, port: int, host: str = "127.0.0.1") -> int:
        """Serve /metrics over HTTP on `host:port` (0 picks a port); the port it listens on."""
        self._http, _ = start_http_server(port, addr=host, registry=self.registry)
        return int(self._http.server_port)

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
