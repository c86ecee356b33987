"""The fixed-point computation the parties run, without the shares: a run's error, simulated.

Values are what the two shares of a value sum to: int64 ring elements at the session's
fractional bits, encoded as the backends encode (inputs and weights to the nearest multiple of
2^-f; public factors and addends as the backend does, `Backend.public_rounding`); products are
exact in the ring (wrapping as the parties' would); every truncation and division rounds
stochastically, as both the two-party local truncation and the exact one do given uniform
shares or masks (floor(y / 2^s) + 1 with probability frac(y / 2^s)); comparisons are exact;
a padded max-pool pads with the backend's pad value. What is left out: the local truncation's
rare failure (|y| / 2^64 per value, stated separately), which no simulation should draw.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ..backends.base import LOCAL, Truncation
from ..backends.fss import ring
from .base import AnalysisBackend, Value, as_float, pool_windows, window_size
from .records import DIVISION, PRODUCT

_EXACT_FLOAT = 2.0**53  # below this every partial sum of integer products is exact in float64
_RING = 2.0**63


class RingValue(Value):
    """The ring element the shares of a value sum to, with its fractional bits."""

    _tensors = ("v",)

    def __init__(self, v: torch.Tensor, frac: int, backend: "FixedPointBackend") -> None:
        self.v, self.frac, self.backend = v, frac, backend

    def _aligned(self, other: "RingValue") -> tuple[torch.Tensor, torch.Tensor, int]:
        frac = max(self.frac, other.frac)
        return self.v << (frac - self.frac), other.v << (frac - other.frac), frac

    def __add__(self, other: Any) -> "RingValue":
        if isinstance(other, RingValue):
            a, b, frac = self._aligned(other)
            return self._with(v=a + b, frac=frac)
        return self._with(v=self.v + self.backend.encode_public(other, self.frac))

    __radd__ = __add__

    def __sub__(self, other: Any) -> "RingValue":
        if isinstance(other, RingValue):
            a, b, frac = self._aligned(other)
            return self._with(v=a - b, frac=frac)
        return self._with(v=self.v - self.backend.encode_public(other, self.frac))

    def __neg__(self) -> "RingValue":
        return self._with(v=-self.v)

    def decode(self) -> torch.Tensor:
        return self.v.to(torch.float64) / float(1 << self.frac)


class FixedPointBackend(AnalysisBackend):
    """The session's fixed point on the values themselves, for a backend's conventions."""

    name = "fixed_point"

    def __init__(self, fraction_bits: int, *, public_rounding: str = "nearest", pool_pad_bits: int = 62, seed: int = 0) -> None:
        super().__init__(fraction_bits)
        self.public_rounding = public_rounding
        self.pool_pad = -(1 << pool_pad_bits)
        self.generator = torch.Generator().manual_seed(seed)

    # -- encoding ------------------------------------------------------------------------------

    def encode_public(self, value: Any, frac: int) -> torch.Tensor:
        scaled = as_float(value) * float(1 << frac)
        return (torch.round(scaled) if self.public_rounding == "nearest" else torch.trunc(scaled)).to(torch.int64)

    def share(self, value: torch.Tensor, src: int, *, constant: str | None = None) -> RingValue:
        return RingValue(ring.encode(value, self.fraction_bits), self.fraction_bits, self)

    def reveal(self, x: RingValue, dst: int) -> torch.Tensor:
        return ring.decode(x.v, x.frac)

    # -- truncation ------------------------------------------------------------------------------

    def _round(self, y: torch.Tensor, divisor: int) -> torch.Tensor:
        """floor(y / divisor) + 1 with probability frac(y / divisor): what the parties' truncation yields."""
        q = torch.div(y, divisor, rounding_mode="floor")
        rest = y - q * divisor
        draw = torch.randint(0, divisor, y.shape, generator=self.generator, dtype=torch.int64)
        return q + (draw < rest).to(torch.int64)

    def _truncated(self, y: torch.Tensor, frac: int, truncation: Truncation) -> RingValue:
        """A product at `frac` bits brought back to the session's: recorded, then rounded."""
        self.records.truncate(y.abs().to(torch.float64) / float(1 << frac), PRODUCT, truncation)
        shift = frac - self.fraction_bits
        return RingValue(self._round(y, 1 << shift), self.fraction_bits, self)

    def _product(self, fn, x: RingValue, w: RingValue, truncation: Truncation, terms: int, summed: int | None = None) -> RingValue:
        """fn(x, w) exact in the ring: in float64 where every partial sum stays below 2^53, else in
        limbs. `summed`: the axis of w each output sums over (None: each output sums one term, or
        w's rows, conv and linear); the bound is max |x| times the most |w| any output sums."""
        if not x.nelement():
            return self._truncated(fn(x.v.to(torch.float64), w.v.to(torch.float64)).to(torch.int64), x.frac + w.frac, truncation)
        a = w.v.abs().to(torch.float64)
        if summed is not None:
            widest = a.sum(dim=summed).max()
        elif terms:
            widest = a.reshape(a.shape[0], -1).sum(dim=1).max()
        else:
            widest = a.max()
        if float(x.v.abs().max()) * float(widest) < _EXACT_FLOAT:
            y = fn(x.v.to(torch.float64), w.v.to(torch.float64)).to(torch.int64)
        else:
            approx = fn(x.v.to(torch.float64), w.v.to(torch.float64))
            if approx.numel() and float(approx.abs().max()) >= _RING:
                self.records.overflowed(float(approx.abs().max()) / float(1 << (x.frac + w.frac)))
            y = ring.ring_product(fn, x.v, w.v, terms) if terms else x.v * w.v
        return self._truncated(y, x.frac + w.frac, truncation)

    # -- products ------------------------------------------------------------------------------

    def conv2d(self, x, w, *, stride, padding, dilation, groups, truncation=LOCAL):
        fn = lambda a, b: F.conv2d(a, b, None, stride, padding, dilation, groups)  # noqa: E731
        return self._product(fn, x, w, truncation, int(w.v[0].numel()))

    def matmul(self, x, w, truncation=LOCAL):
        return self._product(torch.matmul, x, w, truncation, int(x.v.shape[-1]), summed=-2)

    def linear(self, x, w, truncation=LOCAL):
        return self._product(F.linear, x, w, truncation, int(x.v.shape[-1]))

    def mul(self, x, y, truncation=LOCAL):
        return self._product(torch.mul, x, y, truncation, 0)

    def square(self, x, truncation=LOCAL):
        return self._product(torch.mul, x, x, truncation, 0)

    def scale(self, x, factor, truncation=LOCAL):
        c = RingValue(self.encode_public(factor, self.fraction_bits), self.fraction_bits, self)
        return self._product(torch.mul, x, c, truncation, 0)

    def note_least(self, x):
        if x.nelement():
            self.records.least(float(x.decode().min()))

    # -- comparisons -------------------------------------------------------------------------

    def relu(self, x, bits=None):
        self.records.compare(x.v.abs().to(torch.float64) / float(1 << x.frac))
        return x._with(v=torch.clamp(x.v, min=0))

    def max_pool2d(self, x, *, kernel, stride, padding, bits=None):
        if x.nelement():
            self.records.compare(2 * x.v.abs().max().to(torch.float64) / float(1 << x.frac))
            if any(padding):
                self.records.least(float(x.v.min()) / float(1 << x.frac))
        windows = pool_windows(x.v, kernel, stride, padding, self.pool_pad)
        return x._with(v=windows.amax(dim=-1))

    def divide(self, x, divisor, truncation=LOCAL):
        self.records.truncate(x.v.abs().to(torch.float64) / float(1 << x.frac), DIVISION, truncation)
        return x._with(v=self._round(x.v, int(divisor)))

    def avg_pool2d(self, x, *, kernel, stride, padding, truncation=LOCAL):
        k = window_size(kernel)
        sums = pool_windows(x.v, kernel, stride, padding, 0).sum(dim=-1)
        self.records.truncate(sums.abs().to(torch.float64) / float(1 << x.frac), DIVISION, truncation)
        return x._with(v=self._round(sums, k))
