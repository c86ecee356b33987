"""What the analysis backends share: values with the shape operations of shares, a backend
base with no peer, and the per-node records."""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from ..backends.base import DEFAULT_FRACTION_BITS, LOCAL, Backend, BackendError, Pricing, Truncation
from .records import Records


class Value:
    """The shape operations of a shared tensor, applied to each tensor a value holds."""

    _tensors: ClassVar[tuple[str, ...]]

    def _with(self, **tensors: torch.Tensor) -> "Value":
        out = object.__new__(type(self))
        out.__dict__.update(self.__dict__)
        out.__dict__.update(tensors)
        return out

    def _map(self, fn) -> "Value":
        return self._with(**{name: fn(getattr(self, name)) for name in self._tensors})

    @property
    def _first(self) -> torch.Tensor:
        return getattr(self, self._tensors[0])

    @property
    def shape(self) -> torch.Size:
        return self._first.shape

    def size(self) -> torch.Size:
        return self._first.shape

    def nelement(self) -> int:
        return self._first.nelement()

    def reshape(self, *shape) -> "Value":
        return self._map(lambda t: t.reshape(*shape))

    def flatten(self, start_dim: int = 0) -> "Value":
        return self._map(lambda t: t.flatten(start_dim=start_dim))

    def index_select(self, dim: int, index: torch.Tensor) -> "Value":
        return self._map(lambda t: t.index_select(dim, index))

    def t(self) -> "Value":
        return self._map(lambda t: t.t())

    def permute(self, *dims: int) -> "Value":
        return self._map(lambda t: t.permute(*dims))

    def sum(self, dim: int, keepdim: bool = False) -> "Value":
        return self._map(lambda t: t.sum(dim=dim, keepdim=keepdim))

    def __rsub__(self, other: Any) -> "Value":
        return (-self) + other


def as_float(value: Any) -> torch.Tensor:
    """A public operand (number or tensor) as float64."""
    return torch.as_tensor(value, dtype=torch.float64)


def cat_values(parts: list[Value], dim: int) -> Value:
    first = parts[0]
    return first._with(**{name: torch.cat([getattr(p, name) for p in parts], dim=dim) for name in first._tensors})


class AnalysisBackend(Backend):
    """A backend without a peer: the party-facing lifecycle does nothing, `records` fills up."""

    name = "analysis"
    pricing: ClassVar[Pricing]  # never priced
    correlations = ()

    def __init__(self, fraction_bits: int = DEFAULT_FRACTION_BITS) -> None:
        self.rank = 0
        self.fraction_bits = fraction_bits
        self.records = Records()

    @classmethod
    def create(cls, rank, transport, dealer, fraction_bits=DEFAULT_FRACTION_BITS):
        raise BackendError(f"the {cls.__name__} analyses a graph; it runs no session")

    def reveal(self, x: Any, dst: int) -> Any:
        return x

    def cat(self, parts: list[Any], dim: int) -> Any:
        return cat_values(parts, dim)

    def relu_and_square(self, x: Any, y: Any, bits: int | None = None, truncation: Truncation = LOCAL) -> tuple[Any, Any]:
        return self.relu(x, bits), self.square(y, truncation)


def pool_windows(t: torch.Tensor, kernel, stride, padding, fill: float) -> torch.Tensor:
    """(N, C, OH, OW, k) windows of an N x C x H x W tensor, padded with `fill`."""
    ph, pw = padding
    if ph or pw:
        t = F.pad(t, (pw, pw, ph, ph), value=fill)
    kh, kw = kernel
    sh, sw = stride
    w = t.unfold(2, kh, sh).unfold(3, kw, sw)
    return w.reshape(*w.shape[:4], kh * kw)


def window_size(kernel) -> int:
    return int(np.prod(kernel))
