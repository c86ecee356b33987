"""The secure evaluation on error moments: per element a magnitude |x| and the mean square of
x's fixed-point error, for a statistical estimate of the outputs' error when no truncation fails.

With u = 2^-f: every public factor, addend and weight is encoded as the backend encodes it,
and its own encoding error e_c is known exactly; a truncation rounds stochastically (the
shares' randomness; the exact truncation the same), mean square at most u^2/4, a division by a
window's size at most u^2. A product of x (error e, mean square m) with c (encoding error e_c)
errs by c e + x e_c + e e_c: mean square c^2 m + (|x| + sqrt m)^2 e_c^2, summed over a
product's terms as independent; a square 4 x^2 m + 3 m^2; sums of activations add their RMS
errors (Minkowski: whatever their correlation), of an activation and a weight their mean
squares; a ReLU or a maximum errs no more than its inputs (a max-pool: the window's sum).
The magnitudes are the driver's (observed peaks, or bounds), set on every node's output.
An estimate, not a worst case (every error of one sign), which is far looser and never seen.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ..backends.base import LOCAL
from .base import AnalysisBackend, Value, as_float, window_size


def encoded(value: torch.Tensor, fraction_bits: int, rounding: str = "nearest") -> torch.Tensor:
    """What the fixed point holds for public `value`: round(x 2^f) / 2^f, or CrypTen's int(x 2^f) / 2^f."""
    scale = float(1 << fraction_bits)
    scaled = value.to(torch.float64) * scale
    return (torch.round(scaled) if rounding == "nearest" else torch.trunc(scaled)) / scale


class ErrorValue(Value):
    """`peak`: |x| per element; `ms`: the mean square of its error; `constant`: a weight, whose
    encoding error is independent of any activation's."""

    _tensors = ("peak", "ms")

    def __init__(self, peak: torch.Tensor, ms: torch.Tensor, constant: bool = False, rounding: str = "nearest", bits: int = 16) -> None:
        self.peak, self.ms, self.constant, self.rounding, self.bits = peak, ms, constant, rounding, bits

    def __add__(self, other: Any) -> "ErrorValue":
        if isinstance(other, ErrorValue):
            if self.constant or other.constant:
                ms = self.ms + other.ms
            else:
                ms = (self.ms.sqrt() + other.ms.sqrt()) ** 2
            return self._with(peak=self.peak + other.peak, ms=ms, constant=False)
        c = as_float(other)
        e = encoded(c, self.bits, self.rounding) - c
        return self._with(peak=self.peak + c.abs(), ms=self.ms + e * e)

    __radd__ = __add__

    def __sub__(self, other: Any) -> "ErrorValue":
        return self + (-other)

    def __neg__(self) -> "ErrorValue":
        return self._with()

    def sum(self, dim: int, keepdim: bool = False) -> "ErrorValue":
        """A sum of activations: their RMS errors add (Minkowski), as for `+`."""
        return self._with(peak=self.peak.sum(dim=dim, keepdim=keepdim), ms=self.ms.sqrt().sum(dim=dim, keepdim=keepdim) ** 2)


class ErrorBackend(AnalysisBackend):
    """Mean-square errors through the secure structure, at the session's fraction bits."""

    name = "error"

    def __init__(self, fraction_bits: int, public_rounding: str = "nearest") -> None:
        super().__init__(fraction_bits)
        self.rounding = public_rounding
        u2 = 2.0 ** (-2 * fraction_bits)
        self.truncation_ms = u2 / 4  # stochastic rounding: frac (1 - frac) u^2 at most
        self.division_ms = u2
        self.input_ms = u2 / 12  # an input rounded to the nearest multiple of u
        self.floor: dict[str, float] = {}  # per node, the smallest value it reads where that matters (ValueRanges.floor)

    def value(self, peak: torch.Tensor, ms: torch.Tensor, constant: bool = False) -> ErrorValue:
        return ErrorValue(peak, ms, constant, self.rounding, self.fraction_bits)

    def share(self, value: torch.Tensor, src: int, *, constant: str | None = None) -> ErrorValue:
        v = value.to(torch.float64)
        if constant is None:
            return self.value(v.abs(), torch.full_like(v, self.input_ms))
        e = encoded(v, self.fraction_bits) - v  # both backends round weights to the nearest
        return self.value((v + e).abs(), e * e, constant=True)

    def _bilinear(self, fn, x: ErrorValue, w: ErrorValue) -> ErrorValue:
        """fn(x, w) for a bilinear fn whose terms' errors are independent."""
        carried = fn(x.ms, w.peak * w.peak)
        encoding = fn((x.peak + x.ms.sqrt()) ** 2, w.ms)
        return self.value(fn(x.peak, w.peak), carried + encoding + self.truncation_ms)

    def conv2d(self, x, w, *, stride, padding, dilation, groups, truncation=LOCAL):
        return self._bilinear(lambda a, b: F.conv2d(a, b, None, stride, padding, dilation, groups), x, w)

    def matmul(self, x, w, truncation=LOCAL):
        return self._bilinear(torch.matmul, x, w)

    def linear(self, x, w, truncation=LOCAL):
        return self._bilinear(F.linear, x, w)

    def mul(self, x, y, truncation=LOCAL):
        return self._bilinear(torch.mul, x, y)

    def scale(self, x, factor, truncation=LOCAL):
        c = as_float(factor)
        e = encoded(c, self.fraction_bits, self.rounding) - c
        return self._bilinear(torch.mul, x, self.value((c + e).abs(), e * e, constant=True))

    def square(self, x, truncation=LOCAL):
        return self.value(x.peak * x.peak, 4 * x.peak * x.peak * x.ms + 3 * x.ms * x.ms + self.truncation_ms)

    def relu(self, x, bits=None):
        return self.value(x.peak, x.ms)

    def max_pool2d(self, x, *, kernel, stride, padding, bits=None):
        k = window_size(kernel)
        window_sum = F.avg_pool2d(x.ms, kernel, stride, padding, count_include_pad=True) * k
        return self.value(F.max_pool2d(x.peak, kernel, stride, padding), window_sum)

    def divide(self, x, divisor, truncation=LOCAL):
        return self.value(x.peak / divisor, x.ms / (divisor * divisor) + self.division_ms)

    def avg_pool2d(self, x, *, kernel, stride, padding, truncation=LOCAL):
        pool = lambda t: F.avg_pool2d(t, kernel, stride, padding, count_include_pad=True)  # noqa: E731
        return self.value(pool(x.peak), pool(x.ms.sqrt()) ** 2 + self.division_ms)
