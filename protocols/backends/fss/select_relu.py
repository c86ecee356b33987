"""ReLU in two online rounds from a one-bit comparison and a select: keys half the one-round size.

SIGMA's construction (Gupta et al., PETS 2024: DReLU from a DPF-based comparison, then a
select), on additive shares in Z_2^64. For a comparison width n, x' and r' are the low n-1
bits and msb the bit n-1, as in `relu.py`:

1. Dealer: draws r uniform in Z_2^64 and a bit rho; keys a one-bit comparison (`bit_dcf.py`) on
   n-1 bits at alpha = r'; deals additive shares of r, rho and rho r, and xor shares of
   msb(r) xor rho.
2. Round 1: each party sends its share of x + r; both learn x_hat.
3. Each party's comparison output, xored with its share of msb(r) xor rho (and, at party 0, with
   the public 1 xor msb(x_hat)), is its xor share of d_hat = DReLU(x) xor rho, since
   DReLU = 1 xor msb(x_hat) xor msb(r) xor [x_hat' < r'].
4. Round 2: each party sends its bit (packed, 1/8 byte per element); both learn d_hat, which
   rho hides.
5. With d = d_hat + (1 - 2 d_hat) rho and x = x_hat - r, ReLU(x) = d x is
   d_hat x_hat + (1 - 2 d_hat) x_hat rho - d_hat r - (1 - 2 d_hat) rho r: local, party 0 adding
   the public term.

Exact while -2^(n-1) <= x < 2^(n-1) in ring units, like the one-round ReLU. Key per element and
party: 16 (n - 6) bytes of comparison key (from n = 8; its tree stops 7 levels short), three
ring shares and one byte (the bit), against `relu.py`'s 32 n + 24: one more round buys it.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike

from .bit_dcf import HEADER_BYTES as BIT_DCF_HEADER_BYTES
from .bit_dcf import BitDcfKey, bit_dcf_eval, bit_dcf_keygen, key_bytes_per_comparison
from .dcf import KeyOfDcf, read_header, word_views
from .prg import AesCtrPrg
from .relu import _low, _msb, _share, _x_hat, draw_mask

U64 = np.uint64
_ONE = U64(1)

MAGIC = b"TWFSSRL\x00"
VERSION = 1
# magic, version, party, bits (n of the comparison), (padding), elements
_HEADER = struct.Struct("<8sHBB4xQ")


@dataclass(frozen=True, eq=False)
class SelectReluKey(KeyOfDcf):
    """One party's keys for N two-round ReLUs at comparison width `bits`: the comparison key on
    bits - 1 bits; r, rho, rho_r (N,) uint64 additive shares; e (N,) uint8 its bit of msb(r) xor rho."""

    party: int
    bits: int
    dcf: BitDcfKey
    r: np.ndarray
    rho: np.ndarray
    rho_r: np.ndarray
    e: np.ndarray

    def __post_init__(self) -> None:
        self.check_comparison("comparison key")
        N = self.dcf.n_elements
        for name, dtype in (("r", U64), ("rho", U64), ("rho_r", U64), ("e", np.uint8)):
            a = getattr(self, name)
            if a.dtype != dtype or a.shape != (N,):
                raise ValueError(f"ReLU key {name} must be {np.dtype(dtype)} of shape ({N},), got {a.dtype} {a.shape}")

    @property
    def nbytes(self) -> int:
        return _HEADER.size + (8 * 3 + 1) * self.n_elements + self.dcf.nbytes

    def blob_parts(self) -> list[bytes | memoryview]:
        head = _HEADER.pack(MAGIC, VERSION, self.party, self.bits, self.n_elements)
        return [head, *word_views((self.r, self.rho, self.rho_r)), memoryview(np.ascontiguousarray(self.e)).cast("B"), *self.dcf.blob_parts()]

    @classmethod
    def from_bytes(cls, blob: bytes | bytearray | memoryview) -> "SelectReluKey":
        """The key `to_bytes` wrote; a blob cut short or garbled raises ValueError."""
        blob = memoryview(blob).cast("B")
        party, bits, N = read_header(blob, _HEADER, MAGIC, VERSION, "two-round ReLU key")
        if party not in (0, 1) or not 2 <= bits <= 64:
            raise ValueError(f"two-round ReLU key blob header garbled: party {party}, bits {bits}")
        off = _HEADER.size
        if len(blob) < off + 25 * N:
            raise ValueError(f"two-round ReLU key blob truncated: {len(blob)} bytes, its shares end at byte {off + 25 * N}")
        arrays = {}
        for name in ("r", "rho", "rho_r"):
            arrays[name] = np.frombuffer(blob, "<u8", N, off).astype(U64, copy=False)
            off += 8 * N
        arrays["e"] = np.frombuffer(blob, np.uint8, N, off)
        off += N
        try:
            dcf = BitDcfKey.from_bytes(blob[off:])
        except ValueError as e:
            raise ValueError(f"two-round ReLU key blob: its comparison key is bad: {e}") from None
        if dcf.n_elements != N:
            raise ValueError(f"two-round ReLU key blob garbled: header says {N} elements, its comparison key {dcf.n_elements}")
        if arrays["e"].size and arrays["e"].max() > 1:
            raise ValueError("two-round ReLU key blob garbled: its bit shares hold values other than 0 and 1")
        return cls(party, bits, dcf, **arrays)


def select_relu_header_bytes() -> int:
    """The fixed part of one party's serialised key: its header and its comparison key's."""
    return _HEADER.size + BIT_DCF_HEADER_BYTES


def key_bytes_per_select_relu(bits: int) -> int:
    """One party's key bytes per element (headers aside)."""
    return key_bytes_per_comparison(bits - 1) + 8 * 3 + 1


def select_relu_keys(n_elements: int, bits: int = 64, rng: AesCtrPrg | None = None) -> tuple[SelectReluKey, SelectReluKey]:
    """The dealer's keys for n_elements two-round ReLUs at comparison width `bits` (party 0's, 1's)."""
    rng, r = draw_mask(n_elements, bits, rng)
    rho = rng.uint8(n_elements) & np.uint8(1)
    d0, d1 = bit_dcf_keygen(_low(r, bits), bits - 1, rng)
    r0, r1 = _share(r, rng)
    rho64 = rho.astype(U64)
    p0, p1 = _share(rho64, rng)
    q0, q1 = _share(rho64 * r, rng)
    e0 = rng.uint8(n_elements) & np.uint8(1)
    e1 = e0 ^ rho ^ _msb(r, bits).astype(np.uint8)
    return SelectReluKey(0, bits, d0, r0, p0, q0, e0), SelectReluKey(1, bits, d1, r1, p1, q1, e1)


def select_bits(party: int, key: SelectReluKey, x_hat: ArrayLike) -> np.ndarray:
    """This party's xor share of DReLU(x) xor rho from the opened x_hat: (N,) uint8, what it sends
    in the second round."""
    if party != key.party:
        raise ValueError(f"party {party} was given party {key.party}'s ReLU key")
    xh = _x_hat(key, x_hat)
    z = bit_dcf_eval(party, key.dcf, _low(xh, key.bits))
    z ^= key.e
    if party == 0:
        z ^= (_msb(xh, key.bits) ^ _ONE).astype(np.uint8)
    return z


def select_relu_eval(party: int, key: SelectReluKey, x_hat: ArrayLike, d_hat: ArrayLike) -> np.ndarray:
    """This party's additive share of ReLU(x) in Z_2^64 (uint64), shaped like x_hat, from the
    opened x_hat and d_hat = DReLU(x) xor rho (0 or 1 per element)."""
    if party != key.party:
        raise ValueError(f"party {party} was given party {key.party}'s ReLU key")
    shape = np.shape(x_hat)
    xh = _x_hat(key, x_hat)
    dh = np.asarray(d_hat).reshape(-1)
    if dh.size != xh.size:
        raise ValueError(f"d_hat has {dh.size} elements, x_hat {xh.size}")
    dh = dh.astype(U64)
    one_m2 = _ONE - (dh << _ONE)
    out = one_m2 * key.rho
    out *= xh
    out -= dh * key.r
    out -= one_m2 * key.rho_r
    if party == 0:
        out += dh * xh
    return out.reshape(shape)
