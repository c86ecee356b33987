"""An in-process Transport pair for unit tests of code above the wire (same checks, no sockets)."""

from __future__ import annotations

import queue

import numpy as np

from twinfer.parties.errors import PeerError, PeerTimeoutError, ProtocolError, TwinferError
from twinfer.parties.metrics import Metrics
from twinfer.parties.wire.transport import Transport


class MemoryTransport(Transport):
    def __init__(self, role: str, peer_role: str, session_id: str, timeout_s: float = 10.0) -> None:
        self.role, self.peer_role, self.session_id = role, peer_role, session_id
        self.timeout_s = timeout_s
        self.metrics = Metrics()
        self.inbox: queue.Queue = queue.Queue()
        self.peer: MemoryTransport | None = None

    @classmethod
    def pair(cls, session_id: str = "test", timeout_s: float = 10.0) -> tuple["MemoryTransport", "MemoryTransport"]:
        a, b = cls("server", "client", session_id, timeout_s), cls("client", "server", session_id, timeout_s)
        a.peer, b.peer = b, a
        return a, b

    def send(self, tag: str, array: np.ndarray) -> None:
        self.peer.inbox.put((tag, np.array(array, copy=True)))
        self.metrics.count_send(array.nbytes)

    def recv(self, tag: str) -> np.ndarray:
        try:
            item = self.inbox.get(timeout=self.timeout_s)
        except queue.Empty:
            raise PeerTimeoutError(f"no '{tag}' message from {self.peer_role} within {self.timeout_s:g} s") from None
        if isinstance(item, TwinferError):
            raise PeerError(str(item), error_id=item.error_id)
        got, array = item
        if got != tag:
            raise ProtocolError(f"expected '{tag}' from {self.peer_role}, got '{got}'")
        self.metrics.count_receive(array.nbytes, 0.0)
        return array

    def fail(self, error: TwinferError) -> None:
        self.peer.inbox.put(error)

    def close(self) -> None:
        return None
