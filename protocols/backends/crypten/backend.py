"""The `crypten` backend: CrypTen's MPCTensor protocols over twinfer's transport and dealer.

The party builds it with its communicator (`communicator.TransportCommunicator` over the
session's transport) and its dealer client (or None for CrypTen's insecure trusted first
party); `start` binds both to the calling thread (`patches.bind_session`) and initialises
CrypTen, `stop` undoes it.
"""

from __future__ import annotations

from typing import Any

import torch

from ..base import DEFAULT_FRACTION_BITS, Backend, check_fraction_bits
from . import correlations, patches
from .pricing import CryptenPricing


class CryptenBackend(Backend):
    name = "crypten"
    pricing = CryptenPricing()
    correlations = correlations.CORRELATIONS
    pool_pad_bits = 24  # CrypTen pads max-pool windows with -2^24 ring units (common/functions/pooling.py)

    def __init__(self, rank: int, communicator: Any, dealer: Any | None, fraction_bits: int = DEFAULT_FRACTION_BITS) -> None:
        self.rank = rank
        self._communicator = communicator
        self._dealer = dealer
        self.fraction_bits = check_fraction_bits(fraction_bits)
        self._crypten = None
        self._attached = False

    @classmethod
    def prepare(cls) -> None:
        patches.load_crypten()

    @classmethod
    def create(cls, rank: int, transport: Any, dealer: Any | None, fraction_bits: int = DEFAULT_FRACTION_BITS) -> "CryptenBackend":
        cls.prepare()
        from .communicator import TransportCommunicator  # subclasses CrypTen's, so only once loaded

        return cls(rank, TransportCommunicator(transport, rank), dealer, fraction_bits)

    @classmethod
    def attach(cls, rank: int) -> "CryptenBackend":
        """A backend over a CrypTen the caller initialised itself (stock CrypTen over gloo, the
        baseline of benchmarks/transport_vs_gloo.py); start and stop do nothing then."""
        backend = cls(rank, None, None)
        backend._crypten = patches.load_crypten()
        backend._attached = True
        return backend

    def start(self) -> None:
        crypten = patches.load_crypten()
        patches.bind_session(self._communicator, self._dealer, precision_bits=self.fraction_bits)
        crypten.cfg.communicator.verbose = True
        crypten.init()
        self._crypten = crypten

    def stop(self) -> None:
        if self._crypten is not None and not self._attached:
            patches.unbind_session()
            self._crypten = None

    def reset_stats(self) -> None:
        self._communicator.reset_communication_stats()

    def stats(self) -> dict[str, float]:
        return dict(self._communicator.get_communication_stats())

    def share(self, value: torch.Tensor, src: int, *, constant: str | None = None) -> Any:
        # CrypTen's encoder cuts x * 2^f toward zero, an error of the same sign for every weight of
        # one sign; rounded to the grid first (exactly, in float64), the encoding rounds to nearest.
        scale = float(1 << self.fraction_bits)
        return self._crypten.cryptensor(torch.round(value.to(torch.float64) * scale) / scale, src=src)

    def reveal(self, x: Any, dst: int) -> torch.Tensor | None:
        return x.get_plain_text(dst=dst)

    def cat(self, parts: list[Any], dim: int) -> Any:
        return self._crypten.cat(parts, dim=dim)

    def conv2d(self, x, w, *, stride, padding, dilation, groups):
        return x.conv2d(w, stride=stride, padding=padding, dilation=dilation, groups=groups)

    def matmul(self, x, w):
        return x.matmul(w)

    def mul(self, x, y):
        return x * y

    def square(self, x):
        return x.square()

    def relu(self, x, bits=None):
        return x.relu()  # CrypTen compares on the full 64-bit ring: a narrower width changes nothing

    def max_pool2d(self, x, *, kernel, stride, padding, bits=None):
        return x.max_pool2d(kernel, padding=padding, stride=stride)

    def avg_pool2d(self, x, *, kernel, stride, padding):
        return x.avg_pool2d(kernel, stride=stride, padding=padding)
