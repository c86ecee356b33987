"""The secure evaluation on shapes alone, priced: what a composite op (softmax, LayerNorm, GeLU)
costs under a backend's pricing, read off the very calls its secure evaluation makes.

Each backend call is one step of the protocol, priced as the backend's `Pricing` prices that
primitive for the elements involved (a batch of them), and steps add up one after the other:
the cost model of an op built from primitives is then its secure evaluation, written once.
"""

from __future__ import annotations

from typing import Any

import torch

from ..backends.base import LOCAL, Cost, Pricing, Truncation
from .base import AnalysisBackend, Value


class ShapeValue(Value):
    """A shared tensor's shape (a meta tensor: no storage), with the local operations of shares;
    `constant`: a session constant (a weight), whose products open only the other operand."""

    _tensors = ("v",)

    def __init__(self, v: torch.Tensor, constant: bool = False) -> None:
        self.v, self.constant = v, constant

    @staticmethod
    def _operand(other: Any) -> torch.Tensor:
        return other.v if isinstance(other, ShapeValue) else torch.as_tensor(other, dtype=torch.float32).to("meta")

    def __add__(self, other: Any) -> "ShapeValue":
        return ShapeValue(self.v + self._operand(other))

    __radd__ = __add__

    def __sub__(self, other: Any) -> "ShapeValue":
        return ShapeValue(self.v - self._operand(other))

    def __neg__(self) -> "ShapeValue":
        return ShapeValue(-self.v)


def shape_value(shape: tuple[int, ...]) -> ShapeValue:
    return ShapeValue(torch.empty(shape, device="meta"))


class PricedBackend(AnalysisBackend):
    """Adds up the cost of every protocol step it is asked for (`total`)."""

    name = "priced"

    def __init__(self, pricing: Pricing) -> None:
        super().__init__()
        self.pricing = pricing
        self.total = Cost(bytes_offline=0)

    def _add(self, cost: Cost) -> None:
        self.total = self.total + cost

    def _product(self, out: torch.Tensor, cost: Cost, truncation: Truncation) -> ShapeValue:
        """A step that truncates its n outputs as `truncation` says, after `cost`."""
        self._add(cost + self.pricing.truncation(out.numel(), truncation))
        return ShapeValue(out)

    def share(self, value: torch.Tensor, src: int, *, constant: str | None = None) -> ShapeValue:
        return ShapeValue(torch.empty(value.shape, device="meta"), constant=constant is not None)

    def _bilinear(self, out: torch.Tensor, x: ShapeValue, y: ShapeValue, truncation: Truncation) -> ShapeValue:
        if y.constant:
            cost = self.pricing.product(x.nelement(), y.nelement(), out.numel())
        else:
            cost = self.pricing.secret_product(x.nelement(), y.nelement(), out.numel())
        return self._product(out, cost, truncation)

    def matmul(self, x, w, truncation=LOCAL):
        return self._bilinear(torch.matmul(x.v, w.v), x, w, truncation)

    def mul(self, x, y, truncation=LOCAL):
        return self._bilinear(x.v * y.v, x, y, truncation)

    def square(self, x, truncation=LOCAL):
        return self._product(x.v, self.pricing.square(x.nelement()), truncation)

    def scale(self, x, factor, truncation=LOCAL):
        out = x.v * torch.as_tensor(factor, dtype=torch.float32).to("meta")
        return self._product(out, Cost(bytes_offline=0), truncation)

    def divide(self, x, divisor, truncation=LOCAL):
        return self._product(x.v / divisor, Cost(bytes_offline=0), truncation)

    def relu(self, x, bits=None):
        self._add(self.pricing.relu(x.nelement(), bits or 64))
        return x

    def conv2d(self, x, w, *, stride, padding, dilation, groups, truncation=LOCAL):
        raise NotImplementedError("composite ops price their convolutions as the Conv op does")

    def linear(self, x, w, truncation=LOCAL):
        raise NotImplementedError("composite ops price their linear layers as the Gemm op does")

    def max_pool2d(self, x, *, kernel, stride, padding, bits=None):
        raise NotImplementedError("composite ops price their max-pools as the MaxPool op does")

    def avg_pool2d(self, x, *, kernel, stride, padding, truncation=LOCAL):
        raise NotImplementedError("composite ops price their average pools as the AveragePool op does")
