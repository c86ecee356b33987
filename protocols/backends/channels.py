"""What a backend needs of the party that builds it: a channel to its peer and a source of
correlated randomness. Declared here so that `protocols/` states its dependencies; `parties/`
provides them (parties/wire/transport.py, parties/dealer/client.py) without `protocols/`
importing either."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np
import torch


@runtime_checkable
class RoundCounter(Protocol):
    def count_round(self) -> None:
        """One more round of messages in the current layer."""


@runtime_checkable
class PeerChannel(Protocol):
    """Tagged arrays to and from the other party, in order, each wait under the session's deadline."""

    metrics: RoundCounter

    def send(self, tag: str, array: np.ndarray) -> None: ...

    def recv(self, tag: str) -> np.ndarray: ...


@runtime_checkable
class CorrelationSource(Protocol):
    """This party's side of the dealer: a seed shared with it, and correlations by index.

    Both parties draw indices in the same order, so one index names the same correlation on each."""

    key: bytes  # the AES-CTR seed for backends that expand masks locally (empty where unused)

    def next_index(self) -> int: ...

    def generator(self, index: int) -> torch.Generator:
        """A generator seeded for `index`, identical to the dealer's."""

    def request(self, kind: str, args_json: str, index: int) -> dict[str, np.ndarray]:
        """The correlation `kind` at `index` with the JSON arguments; the arrays it is made of."""
