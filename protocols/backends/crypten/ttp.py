"""CrypTen's TTP client over twinfer's dealer: what `crypten.mpc.provider.ttp_provider.TrustedThirdParty`
calls, made of a CorrelationSource (channels.py) that any backend could use.

Protocol (CrypTen's trusted third party; see correlations.py for the dealer's side):
1. Every provider method first calls `get_generator()`: this party's generator of the session's
   next correlation index, from which it draws its shares locally.
2. Party 0 then calls `ttp_request(kind, device, *sizes)`: its share of that correlation, asked
   of the dealer by public kind and sizes (JSON), at the index step 1 took.
CrypTen reaches its client through `TTPClient.get()`; patches.bind_session makes it this class,
one client per thread (per session).
"""

from __future__ import annotations

import json
import threading

import torch

from ..channels import CorrelationSource


def _jsonable(value):
    if isinstance(value, (torch.Size, tuple, list)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    raise TypeError(f"tuple request argument of type {type(value).__name__} cannot be sent to the dealer")


class TtpClient:
    """Stands in for CrypTen's TTPClient: the class gives each thread its session's client, an
    instance adapts that session's correlation source to the two calls CrypTen makes."""

    _local = threading.local()

    def __init__(self, source: CorrelationSource) -> None:
        self.source = source
        self._current: int | None = None  # the index get_generator() opened, until its request

    # -- CrypTen's TTPClient class interface: one client per thread ------------------------------

    @classmethod
    def bind(cls, source: CorrelationSource) -> TtpClient:
        """Make `source` this thread's dealer for CrypTen's provider."""
        cls._local.client = client = cls(source)
        return client

    @classmethod
    def get(cls) -> TtpClient:
        client = getattr(cls._local, "client", None)
        if client is None:
            raise RuntimeError("no dealer session is active in this thread")
        return client

    @staticmethod
    def _init() -> None:
        return None

    @classmethod
    def uninit(cls) -> None:
        cls._local.client = None

    # -- what TrustedThirdParty calls ------------------------------------------------------------

    def get_generator(self, device=None) -> torch.Generator:
        """The generator of the next correlation; every provider method calls this exactly once, first."""
        if device is not None and torch.device(device).type != "cpu":
            raise ValueError("twinfer's dealer serves CPU tensors only")
        self._current = self.source.next_index()
        return self.source.generator(self._current)

    def ttp_request(self, func_name: str, device, *args, **kwargs) -> torch.Tensor:
        """Party 0's share of the current correlation: prefetched if it matches, else fetched now."""
        args_json = json.dumps({"args": _jsonable(args), "kwargs": {k: _jsonable(v) for k, v in kwargs.items()}})
        index = self._current if self._current is not None else self.source.next_index()  # no local draws: its own index
        self._current = None
        return torch.from_numpy(self.source.request(func_name, args_json, index)["share"])
