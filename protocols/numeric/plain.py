"""The secure evaluation on float64 values: what actual samples reach in every layer, and what
the protocol truncates and compares on the way (the calibration of `twinfer optimize`, the
check of a caller that holds model and inputs)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ..backends.base import LOCAL, Truncation
from .base import AnalysisBackend, Value, as_float, window_size
from .records import DIVISION, PRODUCT


class PlainValue(Value):
    _tensors = ("v",)

    def __init__(self, v: torch.Tensor) -> None:
        self.v = v

    @staticmethod
    def _operand(other: Any) -> torch.Tensor:
        return other.v if isinstance(other, PlainValue) else as_float(other)

    def __add__(self, other: Any) -> "PlainValue":
        return PlainValue(self.v + self._operand(other))

    __radd__ = __add__

    def __sub__(self, other: Any) -> "PlainValue":
        return PlainValue(self.v - self._operand(other))

    def __neg__(self) -> "PlainValue":
        return PlainValue(-self.v)


class PlainBackend(AnalysisBackend):
    """Float64 values; records every truncation's |value| (before it) and every comparison's."""

    name = "plain"

    def share(self, value: torch.Tensor, src: int, *, constant: str | None = None) -> PlainValue:
        return PlainValue(value.to(torch.float64))

    def _product(self, y: torch.Tensor, truncation: Truncation) -> PlainValue:
        self.records.truncate(y.abs(), PRODUCT, truncation)
        return PlainValue(y)

    def conv2d(self, x, w, *, stride, padding, dilation, groups, truncation=LOCAL):
        return self._product(F.conv2d(x.v, w.v, None, stride, padding, dilation, groups), truncation)

    def matmul(self, x, w, truncation=LOCAL):
        return self._product(torch.matmul(x.v, w.v), truncation)

    def linear(self, x, w, truncation=LOCAL):
        return self._product(F.linear(x.v, w.v), truncation)

    def mul(self, x, y, truncation=LOCAL):
        return self._product(x.v * y.v, truncation)

    def square(self, x, truncation=LOCAL):
        return self._product(x.v * x.v, truncation)

    def scale(self, x, factor, truncation=LOCAL):
        return self._product(x.v * as_float(factor), truncation)

    def note_least(self, x):
        if x.nelement():
            self.records.least(float(x.v.min()))

    def relu(self, x, bits=None):
        self.records.compare(x.v.abs())
        return PlainValue(torch.relu(x.v))

    def max_pool2d(self, x, *, kernel, stride, padding, bits=None):
        if x.nelement():
            self.records.compare(2 * x.v.abs().max())  # a tree of max(a, b) = b + ReLU(a - b) compares differences
            if any(padding):
                self.records.least(float(x.v.min()))
        return PlainValue(F.max_pool2d(x.v, kernel, stride, padding))

    def divide(self, x, divisor, truncation=LOCAL):
        self.records.truncate(x.v.abs(), DIVISION, truncation)
        return PlainValue(x.v / divisor)

    def avg_pool2d(self, x, *, kernel, stride, padding, truncation=LOCAL):
        k = window_size(kernel)
        sums = F.avg_pool2d(x.v, kernel, stride, padding, count_include_pad=True) * k
        self.records.truncate(sums.abs(), DIVISION, truncation)
        return PlainValue(sums / k)
