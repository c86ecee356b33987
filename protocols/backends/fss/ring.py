"""Arithmetic in Z_2^64 on int64 torch tensors, and the fixed-point encoding of the fss backend.

int64 addition and multiplication wrap around, which is the ring arithmetic. torch has no
int64 convolution, so ring products that sum many terms (conv2d, matmul) split each operand
into limbs (three of 22 bits, or four of 16 when an output sums more than 2^9 terms) and run
the limb products in float64, where every partial sum is an exact integer, then recombine mod
2^64; limb pairs whose weight is 2^64 or more vanish (6 of 9 products, or 10 of 16, are needed).
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

FRACTION_BITS = 16  # the same precision as CrypTen's encoder
SCALE = 1 << FRACTION_BITS
_LIMB_WIDTHS = (22, 16)  # limb widths tried in turn: the widest whose products stay exact


def encode(x: torch.Tensor, bits: int = FRACTION_BITS) -> torch.Tensor:
    """Fixed point: round(x * 2^bits) as int64 (values beyond the ring are refused before any
    party starts: protocols/passes/ranges.py)."""
    return torch.round(x.to(torch.float64) * float(1 << bits)).to(torch.int64)


def decode(x: torch.Tensor, bits: int = FRACTION_BITS) -> torch.Tensor:
    return (x.to(torch.float64) / float(1 << bits)).to(torch.float32)


def truncate(share: torch.Tensor, party: int, bits: int = FRACTION_BITS) -> torch.Tensor:
    """Two-party local truncation (SecureML, Mohassel and Zhang 2017): party 0 shifts its share,
    party 1 shifts the negation of its share and negates back. The result is off by at most
    one unit in the last place, and wrong with probability about |x| / 2^63."""
    if party == 0:
        return share >> bits
    return -((-share) >> bits)


def divide(share: torch.Tensor, party: int, divisor: int) -> torch.Tensor:
    """`truncate` by any positive integer: the shares of x / divisor within one unit, wrong with
    the same probability. Average pooling divides its window sums so, exactly, where multiplying
    by an encoded 1/k would carry that encoding's rounding (0.04% at k = 49) into every output."""
    if divisor < 1:
        raise ValueError(f"divisor must be a positive integer, got {divisor}")
    if party == 0:
        return torch.div(share, divisor, rounding_mode="floor")
    return -torch.div(-share, divisor, rounding_mode="floor")


def _limbs(x: torch.Tensor, bits: int) -> list[torch.Tensor]:
    """x = sum_i limb_i 2^(bits i) mod 2^64, each limb in [0, 2^bits) as float64."""
    if bits == 16 and sys.byteorder == "little":  # each limb is one uint16 of the int64: cast, no shifts
        quarters = x.contiguous().numpy().view(np.uint16).reshape(-1, 4)
        limbs = np.empty((4, len(quarters)), dtype=np.float64)
        for i in range(4):  # one contiguous row per limb: BLAS is 4x slower on strided operands
            limbs[i] = quarters[:, i]
        return [torch.from_numpy(limb).reshape(x.shape) for limb in limbs]
    mask = (1 << bits) - 1
    return [((x >> (bits * i)) & mask).to(torch.float64) for i in range(-(-64 // bits))]


class Split:
    """A ring operand that many products reuse (a session constant's W - B and B_i): its float64
    limbs are made once per width, not once per product."""

    __slots__ = ("value", "_limbs", "_transposed")

    def __init__(self, value: torch.Tensor, limbs: dict[int, list[torch.Tensor]] | None = None, transposed: bool = False) -> None:
        self.value, self._limbs, self._transposed = value, ({} if limbs is None else limbs), transposed

    @property
    def shape(self) -> torch.Size:
        return self.value.shape

    def t(self) -> "Split":
        """The transpose, sharing these limbs (a linear layer's x W^T)."""
        return Split(self.value.t(), self._limbs, not self._transposed)

    def limbs(self, bits: int) -> list[torch.Tensor]:
        if bits not in self._limbs:
            self._limbs[bits] = _limbs(self.value.t() if self._transposed else self.value, bits)
        return [limb.t() for limb in self._limbs[bits]] if self._transposed else self._limbs[bits]


Operand = torch.Tensor | Split


def _split(x: Operand, bits: int) -> list[torch.Tensor]:
    return x.limbs(bits) if isinstance(x, Split) else _limbs(x, bits)


def ring_product(op: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], a: Operand, b: Operand, terms: int) -> torch.Tensor:
    """op(a, b) mod 2^64 for a bilinear op (conv2d, matmul) whose outputs each sum `terms` products.

    Each limb product is below 2^(2 w) * terms < 2^53 for w-bit limbs, so float64 holds it
    exactly and its int64 cast is exact; the shifted sum then wraps in int64 as the ring does.
    Few terms allow 22-bit limbs (3 limbs, 6 products); more take 16-bit limbs (4 limbs, 10).
    """
    bits = next((w for w in _LIMB_WIDTHS if terms < 1 << (53 - 2 * w)), None)
    if bits is None:
        raise ValueError(f"a ring product summing {terms} terms per output exceeds float64's exact range (2^21)")
    la, lb = _split(a, bits), _split(b, bits)
    out = None
    for i in range(len(la)):
        for j in range(len(la)):
            if bits * (i + j) >= 64:  # weight 2^64 or more: zero in the ring
                continue
            term = op(la[i], lb[j]).to(torch.int64) << (bits * (i + j))
            out = term if out is None else out.add_(term)
    return out


def conv2d(x: Operand, w: Operand, *, stride, padding, dilation, groups: int) -> torch.Tensor:
    """Ring conv2d of int64 tensors."""
    terms = int(w.shape[1] * w.shape[2] * w.shape[3])
    return ring_product(lambda a, b: F.conv2d(a, b, None, stride, padding, dilation, groups), x, w, terms)


def matmul(a: Operand, b: Operand) -> torch.Tensor:
    """Ring matmul of int64 tensors (broadcasting as torch.matmul)."""
    return ring_product(torch.matmul, a, b, int(a.shape[-1]))


def to_numpy_u64(x: torch.Tensor) -> np.ndarray:
    return x.contiguous().numpy().view(np.uint64)


def from_numpy_u64(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a).view(np.int64))
