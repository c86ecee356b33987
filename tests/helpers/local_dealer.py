"""A dealer in this process for unit tests of backends: the same correlation kinds, no gRPC."""

from __future__ import annotations

import os

import numpy as np

from twinfer.protocols.backends import correlation_kind
from twinfer.protocols.backends.base import DealerSeeds
from twinfer.protocols.roles import CLIENT, SERVER


class LocalDealer:
    """One session's seeds; `party(rank)` is what that party's DealerClient would be."""

    def __init__(self) -> None:
        self.seeds = DealerSeeds(
            torch={0: int.from_bytes(os.urandom(7), "big"), 1: int.from_bytes(os.urandom(7), "big")},
            aes={0: os.urandom(16), 1: os.urandom(16)},
            dealer=os.urandom(16),
        )
        self.bytes_sent = {SERVER: 0, CLIENT: 0}

    def party(self, rank: int) -> "LocalDealerClient":
        return LocalDealerClient(self, rank)


class LocalDealerClient:
    def __init__(self, dealer: LocalDealer, rank: int) -> None:
        self._dealer, self.rank, self.role = dealer, rank, (SERVER, CLIENT)[rank]
        self.key = dealer.seeds.aes[rank]
        self._index = 0

    def next_index(self) -> int:
        index, self._index = self._index, self._index + 1
        return index

    def request(self, kind: str, args_json: str, index: int) -> dict[str, np.ndarray]:
        spec = correlation_kind(kind)
        if self.role not in spec.requesters:
            raise PermissionError(f"the {self.role} may not ask for '{kind}'")
        args, kwargs = spec.decode(args_json)
        arrays = spec.make(self._dealer.seeds, index, self.role, args, kwargs)
        if spec.paired:
            arrays = arrays[self.role]
        self._dealer.bytes_sent[self.role] += sum(a.nbytes for a in arrays.values())
        return arrays
