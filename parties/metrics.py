"""Per-party counters: messages, bytes, rounds and time, in total and per layer."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field


@dataclass
class LayerCounters:
    rounds: int = 0
    messages_sent: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    bytes_offline: int = 0
    wait_s: float = 0.0  # blocked on the peer's messages
    dealer_wait_s: float = 0.0  # blocked on the dealer's correlations (made, sent, or still being prefetched)
    wall_s: float = 0.0

    def add(self, other: "LayerCounters") -> None:
        for name, value in asdict(other).items():
            setattr(self, name, getattr(self, name) + value)


@dataclass
class Metrics:
    """Counters keyed by the layer the party is executing; '' outside any layer."""

    layers: dict[str, LayerCounters] = field(default_factory=dict)
    current: str = ""
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def _now(self) -> LayerCounters:
        return self.layers.setdefault(self.current, LayerCounters())

    def count_send(self, nbytes: int) -> None:
        with self._lock:
            c = self._now()
            c.messages_sent += 1
            c.bytes_sent += nbytes

    def count_receive(self, nbytes: int, wait_s: float) -> None:
        with self._lock:
            c = self._now()
            c.bytes_received += nbytes
            c.wait_s += wait_s

    def count_dealer_wait(self, seconds: float) -> None:
        with self._lock:
            self._now().dealer_wait_s += seconds

    def count_round(self) -> None:
        with self._lock:
            self._now().rounds += 1

    def count_offline(self, nbytes: int) -> None:
        with self._lock:
            self._now().bytes_offline += nbytes

    @contextlib.contextmanager
    def layer(self, name: str) -> Iterator[None]:
        """Attribute everything counted inside the block to layer `name`."""
        previous, self.current = self.current, name
        start = time.perf_counter()
        try:
            yield
        finally:
            elapsed = time.perf_counter() - start
            with self._lock:
                self._now().wall_s += elapsed
            self.current = previous

    def total(self) -> LayerCounters:
        out = LayerCounters()
        for counters in self.layers.values():
            out.add(counters)
        return out

    def walls(self) -> dict[str, float]:
        """Seconds spent in each layer so far."""
        with self._lock:
            return {name: c.wall_s for name, c in self.layers.items()}

    def reset(self) -> None:
        with self._lock:
            self.layers.clear()

    def snapshot(self) -> dict[str, dict]:
        """Counters per layer, with compute_s = wall time not spent waiting on the peer or the dealer."""
        with self._lock:
            return {
                name: asdict(c) | {"compute_s": max(0.0, c.wall_s - c.wait_s - c.dealer_wait_s)} for name, c in self.layers.items()
            }
