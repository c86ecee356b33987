"""A CrypTen communicator for two parties over a twinfer Transport; no torch.distributed.

For two parties every collective is "send mine, receive theirs, combine", so each one is one
round on the wire. The methods keep CrypTen's names and signatures and its `_logging`
decorator, so CrypTen's own statistics count this backend exactly as they count gloo.

The transport is any object with `send(tag, array)`, `recv(tag) -> array` and `metrics`
(parties' Transport); this module opens no socket. It subclasses CrypTen's Communicator, so
it is imported only after `patches.load_crypten()`.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import torch

from ...roles import CLIENT, SERVER
from ..base import RING_BYTES
from ..channels import PeerChannel
from . import patches

patches.require_loaded()
from crypten.communicator.communicator import Communicator, _logging  # noqa: E402

try:  # ReduceOp lives in torch.distributed, which may be built without backends
    from torch.distributed import ReduceOp

    _BXOR = ReduceOp.BXOR
except Exception:  # pragma: no cover - torch builds without distributed
    _BXOR = "BXOR"



def _to_numpy(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().cpu().contiguous().numpy()


def _combine(mine: torch.Tensor, theirs: torch.Tensor, op: Any) -> torch.Tensor:
    if op is None or op == ReduceOp.SUM:
        return mine + theirs  # int64 shares wrap around, which is the ring arithmetic
    if op == _BXOR:
        return mine ^ theirs
    raise NotImplementedError(f"reduce op {op} is not supported by the twinfer communicator")


def _encode_obj(obj: Any) -> np.ndarray:
    """Objects travel as JSON, never pickled: only what CrypTen sends (sizes, numbers)."""

    def tag_sizes(o: Any) -> Any:
        # torch.Size is a tuple, which json writes as a plain list without asking `default`.
        if isinstance(o, torch.Size):
            return {"__size__": list(o)}
        if isinstance(o, (list, tuple)):
            return [tag_sizes(v) for v in o]
        if isinstance(o, dict):
            return {k: tag_sizes(v) for k, v in o.items()}
        return o

    def default(o: Any) -> Any:
        raise TypeError(f"cannot send object of type {type(o).__name__} to the peer (JSON only)")

    return np.frombuffer(json.dumps(tag_sizes(obj), default=default).encode(), dtype=np.uint8)


def _decode_obj(array: np.ndarray) -> Any:
    def hook(d: dict) -> Any:
        return torch.Size(d["__size__"]) if set(d) == {"__size__"} else d

    return json.loads(array.tobytes().decode(), object_hook=hook)


class _Completed:
    """The handle isend returns: the frame is already queued."""

    def wait(self) -> None:
        return None

    def is_completed(self) -> bool:
        return True


class _PendingRecv:
    """The handle irecv returns: receives into the caller's tensor on wait()."""

    def __init__(self, comm: "TransportCommunicator", tensor: torch.Tensor) -> None:
        self._comm = comm
        self._tensor = tensor
        self._done = False

    def wait(self) -> None:
        if not self._done:
            self._tensor.copy_(self._comm._recv_tensor("p2p").reshape(self._tensor.shape))
            self._done = True

    def is_completed(self) -> bool:
        return self._done


class TransportCommunicator(Communicator):
    """CrypTen's Communicator interface for exactly two parties over a Transport."""

    BYTES_PER_ELEMENT = RING_BYTES

    def __init__(self, transport: PeerChannel, rank: int) -> None:
        if rank not in (0, 1):
            raise ValueError(f"rank must be 0 (server) or 1 (client), got {rank}")
        self.transport = transport
        self.rank = rank
        self.world_size = 2
        self._name = (SERVER, CLIENT)[rank]
        self.reset_communication_stats()

    # -- plumbing -------------------------------------------------------------------------------

    def _send_tensor(self, tag: str, tensor: torch.Tensor) -> None:
        self.transport.send(tag, _to_numpy(tensor))

    def _recv_tensor(self, tag: str) -> torch.Tensor:
        return torch.from_numpy(self.transport.recv(tag))

    def _exchange(self, tag: str, tensor: torch.Tensor) -> torch.Tensor:
        self.transport.metrics.count_round()
        self._send_tensor(tag, tensor)
        return self._recv_tensor(tag)

    def _one_way(self, tag: str, tensor: torch.Tensor | None, sender: int) -> torch.Tensor | None:
        self.transport.metrics.count_round()
        if self.rank == sender:
            self._send_tensor(tag, tensor)
            return None
        return self._recv_tensor(tag)

    # -- point to point ------------------------------------------------------------------------

    @_logging
    def send(self, tensor, dst):
        self._one_way("p2p", tensor, sender=self.rank)

    @_logging
    def recv(self, tensor, src=None):
        self.transport.metrics.count_round()
        return self._recv_tensor("p2p").reshape(tensor.shape)

    @_logging
    def isend(self, tensor, dst):
        self._send_tensor("p2p", tensor)
        return _Completed()

    @_logging
    def irecv(self, tensor, src=None):
        self.transport.metrics.count_round()
        return _PendingRecv(self, tensor)

    # -- collectives ------------------------------------------------------------------------------

    @_logging
    def all_reduce(self, input, op=None, batched=False):
        if batched:
            theirs = self._exchange_list("all_reduce", input)
            return [_combine(m, t, op) for m, t in zip(input, theirs)]
        return _combine(input, self._exchange("all_reduce", input), op)

    @_logging
    def reduce(self, input, dst, op=None, batched=False):
        if batched:
            if self.rank == dst:
                theirs = self._receive_list("reduce", len(input))
                return [_combine(m, t, op) for m, t in zip(input, theirs)]
            self._send_list("reduce", input)
            return None
        theirs = self._one_way("reduce", input, sender=1 - dst)
        return _combine(input, theirs, op) if self.rank == dst else None

    @_logging
    def broadcast(self, input, src, group=None, batched=False):
        if batched:
            if self.rank == src:
                self._send_list("broadcast", input)
                return input
            return [t.reshape(x.shape) for x, t in zip(input, self._receive_list("broadcast", len(input)))]
        received = self._one_way("broadcast", input, sender=src)
        return input if received is None else received.reshape(input.shape)

    @_logging
    def gather(self, tensor, dst):
        received = self._one_way("gather", tensor, sender=1 - dst)
        if self.rank != dst:
            return [None]
        pair = [tensor, received]
        return pair if self.rank == 0 else pair[::-1]

    @_logging
    def all_gather(self, tensor):
        theirs = self._exchange("all_gather", tensor)
        return [tensor, theirs] if self.rank == 0 else [theirs, tensor]

    @_logging
    def scatter(self, scatter_list, src, size=None, device=None):
        if self.rank == src:
            self._one_way("scatter", scatter_list[1 - src], sender=src)
            return scatter_list[src]
        return self._one_way("scatter", None, sender=src)

    @_logging
    def barrier(self):
        self._exchange("barrier", torch.zeros(0, dtype=torch.uint8))

    def _send_list(self, tag: str, tensors: list[torch.Tensor]) -> None:
        self.transport.metrics.count_round()
        for t in tensors:
            self._send_tensor(tag, t)

    def _receive_list(self, tag: str, n: int) -> list[torch.Tensor]:
        self.transport.metrics.count_round()
        return [self._recv_tensor(tag) for _ in range(n)]

    def _exchange_list(self, tag: str, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        self.transport.metrics.count_round()
        for t in tensors:
            self._send_tensor(tag, t)
        return [self._recv_tensor(tag) for _ in tensors]

    # -- objects (JSON, never pickle) --------------------------------------------------------------

    @_logging
    def send_obj(self, obj, dst, group=None):
        self.transport.metrics.count_round()
        self.transport.send("obj", _encode_obj(obj))

    @_logging
    def recv_obj(self, src, group=None):
        self.transport.metrics.count_round()
        return _decode_obj(self.transport.recv("obj"))

    @_logging
    def broadcast_obj(self, obj, src, group=None):
        self.transport.metrics.count_round()
        if self.rank == src:
            self.transport.send("obj", _encode_obj(obj))
            return obj
        return _decode_obj(self.transport.recv("obj"))

    # -- identity ----------------------------------------------------------------------------------

    def get_world_size(self) -> int:
        return self.world_size

    def get_rank(self) -> int:
        return self.rank

    def set_name(self, name: str) -> None:
        self._name = name

    def get_name(self) -> str:
        return self._name
