"""The secure evaluation on elementwise intervals [lo, hi] (float64): a sound bound on every value
for every input of a declared range, and on what the protocol truncates and compares.

Affine maps take center and radius (|W| times the radius), monotone ones the endpoints; a
product of an interval with a known weight or public factor takes the extreme of the endpoint
products. An op whose terms share an input (a clip as two ReLUs, a polynomial) is looser here
than its true range, and refines its output in `Op.interval`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ..backends.base import LOCAL, Truncation
from .base import AnalysisBackend, Value, as_float, window_size
from .records import DIVISION, PRODUCT


class IntervalValue(Value):
    _tensors = ("lo", "hi")

    def __init__(self, lo: torch.Tensor, hi: torch.Tensor) -> None:
        self.lo, self.hi = lo, hi

    @property
    def magnitude(self) -> torch.Tensor:
        return torch.maximum(self.lo.abs(), self.hi.abs())

    def __add__(self, other: Any) -> "IntervalValue":
        if isinstance(other, IntervalValue):
            return IntervalValue(self.lo + other.lo, self.hi + other.hi)
        c = as_float(other)
        return IntervalValue(self.lo + c, self.hi + c)

    __radd__ = __add__

    def __sub__(self, other: Any) -> "IntervalValue":
        if isinstance(other, IntervalValue):
            return IntervalValue(self.lo - other.hi, self.hi - other.lo)
        c = as_float(other)
        return IntervalValue(self.lo - c, self.hi - c)

    def __neg__(self) -> "IntervalValue":
        return IntervalValue(-self.hi, -self.lo)

    def intersect(self, lo: torch.Tensor, hi: torch.Tensor) -> "IntervalValue":
        """Both bounds hold, so their intersection does: the tighter of the two."""
        return IntervalValue(torch.maximum(self.lo, lo), torch.minimum(self.hi, hi))


def _scaled(x: IntervalValue, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    a, b = x.lo * c, x.hi * c
    return torch.minimum(a, b), torch.maximum(a, b)


class IntervalBackend(AnalysisBackend):
    """Weights are point intervals (the server checks its own model); activations bounds."""

    name = "interval"

    def share(self, value: torch.Tensor, src: int, *, constant: str | None = None) -> IntervalValue:
        v = value.to(torch.float64)
        return IntervalValue(v, v)

    def _product(self, lo: torch.Tensor, hi: torch.Tensor, truncation: Truncation) -> IntervalValue:
        y = IntervalValue(lo, hi)
        self.records.truncate(y.magnitude, PRODUCT, truncation)
        return y

    def _affine(self, fn, x: IntervalValue, w: IntervalValue, truncation: Truncation) -> IntervalValue:
        """fn(x, w) for a bilinear fn, by centres and radii; a weight is a point (no radius), another
        activation (attention's products) adds the terms of its own radius."""
        center, radius = (x.hi + x.lo) / 2, (x.hi - x.lo) / 2
        w_center, w_radius = (w.hi + w.lo) / 2, (w.hi - w.lo) / 2
        middle, spread = fn(center, w_center), fn(radius, w_center.abs())
        if bool((w_radius > 0).any()):
            spread = spread + fn(center.abs(), w_radius) + fn(radius, w_radius)
        return self._product(middle - spread, middle + spread, truncation)

    def conv2d(self, x, w, *, stride, padding, dilation, groups, truncation=LOCAL):
        return self._affine(lambda a, b: F.conv2d(a, b, None, stride, padding, dilation, groups), x, w, truncation)

    def matmul(self, x, w, truncation=LOCAL):
        return self._affine(torch.matmul, x, w, truncation)

    def linear(self, x, w, truncation=LOCAL):
        return self._affine(F.linear, x, w, truncation)

    def mul(self, x, y, truncation=LOCAL):
        if bool((y.hi > y.lo).any()):  # another activation: the extremes of the endpoint products
            ends = torch.stack(torch.broadcast_tensors(x.lo * y.lo, x.lo * y.hi, x.hi * y.lo, x.hi * y.hi))
            return self._product(ends.amin(dim=0), ends.amax(dim=0), truncation)
        return self._product(*_scaled(x, y.lo), truncation)

    def scale(self, x, factor, truncation=LOCAL):
        return self._product(*_scaled(x, as_float(factor)), truncation)

    def square(self, x, truncation=LOCAL):
        a, b = x.lo * x.lo, x.hi * x.hi
        straddles = (x.lo <= 0) & (x.hi >= 0)
        return self._product(torch.where(straddles, torch.zeros_like(a), torch.minimum(a, b)), torch.maximum(a, b), truncation)

    def relu(self, x, bits=None):
        self.records.compare(x.magnitude)
        return IntervalValue(x.lo.clamp(min=0), x.hi.clamp(min=0))

    def max_pool2d(self, x, *, kernel, stride, padding, bits=None):
        if x.nelement():
            self.records.compare(2 * x.magnitude.max())
            if any(padding):
                self.records.least(float(x.lo.min()))
        pool = lambda t: F.max_pool2d(t, kernel, stride, padding)  # noqa: E731  (monotone: endpoints)
        return IntervalValue(pool(x.lo), pool(x.hi))

    def divide(self, x, divisor, truncation=LOCAL):
        self.records.truncate(x.magnitude, DIVISION, truncation)
        return IntervalValue(x.lo / divisor, x.hi / divisor)

    def avg_pool2d(self, x, *, kernel, stride, padding, truncation=LOCAL):
        k = window_size(kernel)
        pool = lambda t: F.avg_pool2d(t, kernel, stride, padding, count_include_pad=True)  # noqa: E731
        y = IntervalValue(pool(x.lo), pool(x.hi))
        self.records.truncate(y.magnitude * k, DIVISION, truncation)
        return y
