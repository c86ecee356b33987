"""A dealer in this process for unit tests of backends: the same correlation kinds, no gRPC."""

from __future__ import annotations

import json
import os

import numpy as np
import torch

from twinfer.protocols.backends import correlation_kind
from twinfer.protocols.backends.base import DealerSeeds
from twinfer.protocols.backends.crypten.correlations import tuple_generator
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

    # CrypTen's TTP client interface, as parties/dealer/client.py offers it
    def generator(self, index: int) -> torch.Generator:
        return tuple_generator(self._dealer.seeds.torch[self.rank], index)

    def get_generator(self, device=None) -> torch.Generator:
        self._current = self.next_index()
        return self.generator(self._current)

    def ttp_request(self, func_name: str, device, *args, **kwargs) -> torch.Tensor:
        def plain(v):
            return [plain(x) for x in v] if isinstance(v, (tuple, list, torch.Size)) else v

        args_json = json.dumps({"args": plain(args), "kwargs": {k: plain(v) for k, v in kwargs.items()}})
        index = getattr(self, "_current", None)
        if index is None:
            index = self.next_index()
        self._current = None
        return torch.from_numpy(self.request(func_name, args_json, index)["share"].copy())

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
