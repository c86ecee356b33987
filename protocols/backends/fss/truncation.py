"""Faithful truncation (division by a public d) and its fused ReLU, in one online round, from DCFs.

Boyle et al., "Function Secret Sharing for Mixed-Mode and Fixed-Point Secure Computation",
Eurocrypt 2021 ("BCG+21", section 5: splines and truncation from a masked opening), and Gupta et
al., "LLAMA", PETS 2022 (signed truncation and its fusion with the comparison). The local
truncation of SecureML (Mohassel and Zhang 2017; `ring.truncate`) is off by 2^(64-f) with
probability about |y| / 2^64 (uniform shares); these are never wrong for y in range.
Throughout, n = `bits`, -2^(n-1) <= y < 2^(n-1) (the caller's guarantee: outside it nothing
detects the error), y' = y + 2^(n-1) in [0, 2^n) and everything is mod 2^64 on uint64 arrays.

Division by d >= 1 (`TruncKey`):

1. Dealer: r uniform in Z_2^64, r_lo = r mod 2^n; a DCF on n bits at alpha = r_lo with payload
   1; additive shares of r and of R = floor(r_lo / d).
2. Online (the one round): party i sends y_i + r_i, party 0 adding 2^(n-1); both learn
   u = y' + r. (Only the message is computed here: the exchange is the backend's.)
3. With u_lo = u mod 2^n, y' = u_lo - r_lo + 2^n c where c = [u_lo < r_lo] (the DCF at u_lo).
   With C = round(2^(n-1) / d) (halves up) and K = 2 C, party i outputs
   [i = 0] (floor(u_lo / d) - C) - R_i + c_i K.

Error: write u_lo = d P + a and r_lo = d R + b with a, b in [0, d). Then y / d =
P - R + (a - b) / d + c 2^n / d - 2^(n-1) / d, and q - y / d = (b - a) / d + e with
e = (2^(n-1) - C d) / d when c = 0 and -e when c = 1 (this is why K = 2 C rather than
round(2^n / d): each of the two cases gets the nearest constant). |2^(n-1) - C d| <= floor(d / 2), so

    |q - y / d| <= (d - 1 + floor(d / 2)) / d < 3 / 2.

When d divides 2^(n-1) (d = 2^s, s <= n - 1), e = 0 and q = floor(y / d) + [a < b], where
a < b exactly when (y mod d) + b >= d: for a uniform mask, q rounds y / d up with probability
frac(y / d) (stochastic rounding, unbiased) and |q - y / d| < 1. d = 1 gives q = y.

ReLU of the division by 2^s, 1 <= s <= n - 1, in the same one round (`TruncReluKey`): with
u' = u mod 2^(n-1), r' = r mod 2^(n-1), u_t and r_t the bits n-1 of u and r,
c' = [u' < r'] (the borrow into bit n-1 of u - r), P' = floor(u' / 2^s), R' = floor(r' / 2^s):

   y' mod 2^(n-1) = u' - r' + 2^(n-1) c'  and  D = [y >= 0] = bit n-1 of y' = u_t xor r_t xor c',
   so y = 2^(n-1) (D - 1) + u' - r' + 2^(n-1) c' and its truncation
   t = 2^(n-1-s) (D - 1) + P' - R' + 2^(n-1-s) c' = floor(y / 2^s) + [a < b]
   (a, b the low s bits of u and r, as above: the same q as `TruncKey` under the same mask).
   t >= 0 when y >= 0 and t <= 0 when y < 0 (floor plus a carry), so ReLU(t) = D t and, as D^2 = D,

   ReLU(t) = D P' - D R' + 2^(n-1-s) D c'.

This needs only the borrow c' out of the low n-1 bits, not also c out of all n bits (the same
key bytes and rounding as a form in c, fewer terms online). With z = r_t xor c' = r_t + c' - 2 r_t c'
and the public h = 1 - 2 u_t: D = u_t + h z, D c' = u_t c' + h (1 - r_t) c' (z c' = (1 - r_t) c'),
D R' = u_t R' + h (r_t R' + (1 - 2 r_t) c' R').

1. Dealer: r uniform; a DCF on n-1 bits at alpha = r' with payload (1, r_t, (1 - 2 r_t) R'),
   whose outputs are shares of c', r_t c' and (1 - 2 r_t) c' R'; shares of r, r_t, R', r_t R'.
2. Online: the same one message as above, u = y' + r opened.
3. Local: the three products above from those shares and the public u_t, P'; the public terms
   (u_t in D) are added by party 0 only.

Key bytes per element: 8 (3 n + 5) for division (DCF on n bits, 1 word, plus r and R);
8 (5 (n - 1) + 9) for the fused ReLU (DCF on n-1 bits, 3 words, plus 4 shares).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike

from .dcf import HEADER_BYTES as DCF_HEADER_BYTES
from .dcf import DcfKey, KeyOfDcf, dcf_eval, dcf_keygen, key_bytes_per_element, read_header, word_views
from .prg import AesCtrPrg

U64 = np.uint64
_ONE = U64(1)

VERSION = 1
TRUNC_MAGIC = b"TWFSTRC\x00"
TRUNC_RELU_MAGIC = b"TWFSTRR\x00"
# magic, version, party, bits (n), (padding), divisor, elements
_TRUNC_HEADER = struct.Struct("<8sHBB4xQQ")
# magic, version, party, bits (n), shift (s), (padding), elements
_TRUNC_RELU_HEADER = struct.Struct("<8sHBBB3xQ")


def _check_width(bits: int) -> None:
    if not 2 <= bits <= 64:
        raise ValueError(f"truncation bit width must be in 2..64, got {bits}")


def _check_divisor(divisor: int) -> None:
    if not 1 <= divisor < 1 << 64:
        raise ValueError(f"truncation divisor must be an integer in [1, 2^64), got {divisor}")


def _check_shift(shift: int, bits: int) -> None:
    if not 1 <= shift <= bits - 1:
        raise ValueError(f"truncation shift must be in 1..bits-1 = {bits - 1}, got {shift}")


def _check_arrays(what: str, key: TruncKey | TruncReluKey, names: tuple[str, ...]) -> None:
    N = key.dcf.n_elements
    for name in names:
        a = getattr(key, name)
        if not isinstance(a, np.ndarray) or a.dtype != U64 or a.shape != (N,):
            raise ValueError(f"{what} {name} must be uint64 of shape ({N},), got {getattr(a, 'dtype', type(a).__name__)} {getattr(a, 'shape', '')}")


def _read_arrays(blob: memoryview, off: int, N: int, names: tuple[str, ...], what: str) -> tuple[dict, int]:
    """N-word uint64 arrays one after another from byte `off` (views of the blob, no copies)."""
    arrays = {}
    for name in names:
        if len(blob) < off + 8 * N:
            raise ValueError(f"{what} blob truncated in {name}: {len(blob)} bytes, {name} ends at byte {off + 8 * N}")
        arrays[name] = np.frombuffer(blob, "<u8", N, off).astype(U64, copy=False)
        off += 8 * N
    return arrays, off


def _read_dcf(blob: memoryview, what: str, N: int, bits: int, words: int) -> DcfKey:
    try:
        dcf = DcfKey.from_bytes(blob)
    except ValueError as e:
        raise ValueError(f"{what} blob: its DCF key is bad: {e}") from None
    if (dcf.n_elements, dcf.bits, dcf.payload_words) != (N, bits, words):
        raise ValueError(f"{what} blob garbled: header wants a DCF of {N} elements on {bits} bits with {words} payload words, "
                         f"its DCF key has {dcf.n_elements} on {dcf.bits} bits with {dcf.payload_words}")  # fmt: skip
    return dcf


# -- division by a public d ----------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class TruncKey(KeyOfDcf):
    """One party's keys for N divisions by `divisor` of values of `bits` bits.

    dcf: the DCF key on `bits` bits, payload 1 word (shares of [u_lo < r_lo]); r, quotient: (N,)
    uint64 shares of the mask r and of R = floor((r mod 2^bits) / divisor).
    """

    party: int
    bits: int
    divisor: int
    dcf: DcfKey
    r: np.ndarray
    quotient: np.ndarray

    def __post_init__(self) -> None:
        if self.party not in (0, 1) or self.dcf.party != self.party:
            raise ValueError(f"truncation key of party {self.party} holds a DCF key of party {self.dcf.party}")
        _check_width(self.bits)
        _check_divisor(self.divisor)
        if self.dcf.bits != self.bits or self.dcf.payload_words != 1:
            raise ValueError(f"truncation key of width {self.bits} needs a DCF on {self.bits} bits with 1 payload word, "
                             f"got {self.dcf.bits} bits, {self.dcf.payload_words} words")  # fmt: skip
        _check_arrays("truncation key", self, ("r", "quotient"))


    @property
    def nbytes(self) -> int:
        """Size of `to_bytes()`."""
        return _TRUNC_HEADER.size + 16 * self.n_elements + self.dcf.nbytes


    def blob_parts(self) -> list[bytes | memoryview]:
        """The pieces of `to_bytes()` without copying the arrays: joined, each is copied once."""
        head = _TRUNC_HEADER.pack(TRUNC_MAGIC, VERSION, self.party, self.bits, self.divisor, self.n_elements)
        return [head, *word_views((self.r, self.quotient)), *self.dcf.blob_parts()]

    @classmethod
    def from_bytes(cls, blob: bytes | bytearray | memoryview) -> "TruncKey":
        """The key `to_bytes` wrote; a blob cut short or garbled raises ValueError."""
        what = "truncation key"
        blob = memoryview(blob).cast("B")
        party, bits, divisor, N = read_header(blob, _TRUNC_HEADER, TRUNC_MAGIC, VERSION, what)
        if party not in (0, 1) or not 2 <= bits <= 64 or divisor < 1:
            raise ValueError(f"{what} blob header garbled: party {party}, bits {bits}, divisor {divisor}")
        arrays, off = _read_arrays(blob, _TRUNC_HEADER.size, N, ("r", "quotient"), what)
        return cls(party, bits, divisor, _read_dcf(blob[off:], what, N, bits, 1), **arrays)


def trunc_header_bytes() -> int:
    """The fixed part of one party's serialised division key: its header and its DCF key's."""
    return _TRUNC_HEADER.size + DCF_HEADER_BYTES


def key_bytes_per_trunc(bits: int = 64) -> int:
    """One party's division key bytes per element (headers aside), whatever the divisor."""
    return key_bytes_per_element(bits, 1) + 16


def _constants(bits: int, divisor: int) -> tuple[np.uint64, np.uint64]:
    """C = round(2^(n-1) / d), halves up, and K = 2 C, mod 2^64 (see the module docstring)."""
    C = ((1 << (bits - 1)) + divisor // 2) // divisor
    return U64(C % (1 << 64)), U64((2 * C) % (1 << 64))


def _low_mask(bits: int) -> np.uint64:
    return U64((1 << bits) - 1)


def _share(value: np.ndarray, rng: AesCtrPrg) -> tuple[np.ndarray, np.ndarray]:
    s0 = rng.uint64(value.shape)
    return s0, value - s0


def _check_count(n_elements: int) -> None:
    if n_elements < 0:
        raise ValueError(f"number of elements must be >= 0, got {n_elements}")


def trunc_keys(n_elements: int, bits: int, divisor: int, rng: AesCtrPrg | None = None) -> tuple[TruncKey, TruncKey]:
    """The dealer's keys for n_elements divisions by `divisor` at width `bits` (party 0's, party 1's)."""
    _check_width(bits)
    _check_divisor(divisor)
    _check_count(n_elements)
    rng = AesCtrPrg() if rng is None else rng
    r = rng.uint64(n_elements)  # drawn first: tests choose masks by replacing this draw
    r_lo = r & _low_mask(bits)
    d0, d1 = dcf_keygen(r_lo, np.ones(1, U64), bits, rng)
    r0, r1 = _share(r, rng)
    q0, q1 = _share(r_lo // U64(divisor), rng)
    return TruncKey(0, bits, divisor, d0, r0, q0), TruncKey(1, bits, divisor, d1, r1, q1)


def _ring(a: ArrayLike, what: str) -> np.ndarray:
    """Ring elements as uint64 (int64 reinterpreted, two's complement); anything else is refused."""
    a = np.asarray(a)
    if a.dtype == np.int64:
        return a.view(U64)
    if a.dtype != U64:
        raise ValueError(f"{what} must be uint64 or int64 ring elements, got {a.dtype}")
    return a


def _masked(key: TruncKey | TruncReluKey, share: ArrayLike) -> np.ndarray:
    """share + r_i, plus 2^(n-1) at party 0 (which moves y into [0, 2^n)), shaped like share."""
    share = _ring(share, "the share")
    if share.size != key.n_elements:
        raise ValueError(f"key holds {key.n_elements} elements, the share has {share.size}")
    m = share.reshape(-1) + key.r
    if key.party == 0:
        m += U64(1 << (key.bits - 1))
    return m.reshape(share.shape)


def _opened(party: int, key: TruncKey | TruncReluKey, u: ArrayLike) -> np.ndarray:
    if party != key.party:
        raise ValueError(f"party {party} was given party {key.party}'s {type(key).__name__}")
    u = _ring(u, "u")
    if u.size != key.n_elements:
        raise ValueError(f"key holds {key.n_elements} elements, u has {u.size}")
    return u.reshape(-1)


def trunc_masked_share(key: TruncKey, share: ArrayLike) -> np.ndarray:
    """What party key.party sends in the one round: its share of u = y + 2^(n-1) + r."""
    return _masked(key, share)


def trunc_eval(party: int, key: TruncKey, u: ArrayLike) -> np.ndarray:
    """This party's additive share (uint64) of q, |q - y / d| < 3/2 (see above), shaped like u."""
    shape = np.shape(u)
    u = _opened(party, key, u)
    u_lo = u & _low_mask(key.bits)
    C, K = _constants(key.bits, key.divisor)
    out = dcf_eval(party, key.dcf, u_lo)[:, 0]  # shares of c = [u_lo < r_lo]
    out *= K
    out -= key.quotient
    if party == 0:  # the public part, once
        out += u_lo // U64(key.divisor)
        out -= C
    return out.reshape(shape)


# -- ReLU of the division by 2^s, fused ----------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class TruncReluKey(KeyOfDcf):
    """One party's keys for N values ReLU(y / 2^shift), truncated faithfully, of `bits` bits.

    dcf: the DCF key on bits - 1 bits, payload (1, r_t, (1 - 2 r_t) R'); r, r_top, quotient,
    r_top_quotient: (N,) uint64 shares of the mask r, of its bit r_t = bit bits-1, of
    R' = floor((r mod 2^(bits-1)) / 2^shift) and of r_t R'.
    """

    party: int
    bits: int
    shift: int
    dcf: DcfKey
    r: np.ndarray
    r_top: np.ndarray
    quotient: np.ndarray
    r_top_quotient: np.ndarray

    def __post_init__(self) -> None:
        if self.party not in (0, 1) or self.dcf.party != self.party:
            raise ValueError(f"truncated-ReLU key of party {self.party} holds a DCF key of party {self.dcf.party}")
        _check_width(self.bits)
        _check_shift(self.shift, self.bits)
        if self.dcf.bits != self.bits - 1 or self.dcf.payload_words != 3:
            raise ValueError(f"truncated-ReLU key of width {self.bits} needs a DCF on {self.bits - 1} bits with 3 payload words, "
                             f"got {self.dcf.bits} bits, {self.dcf.payload_words} words")  # fmt: skip
        _check_arrays("truncated-ReLU key", self, _RELU_ARRAYS)


    @property
    def nbytes(self) -> int:
        """Size of `to_bytes()`."""
        return _TRUNC_RELU_HEADER.size + 32 * self.n_elements + self.dcf.nbytes


    def blob_parts(self) -> list[bytes | memoryview]:
        """The pieces of `to_bytes()` without copying the arrays: joined, each is copied once."""
        head = _TRUNC_RELU_HEADER.pack(TRUNC_RELU_MAGIC, VERSION, self.party, self.bits, self.shift, self.n_elements)
        return [head, *word_views(tuple(getattr(self, name) for name in _RELU_ARRAYS)), *self.dcf.blob_parts()]

    @classmethod
    def from_bytes(cls, blob: bytes | bytearray | memoryview) -> "TruncReluKey":
        """The key `to_bytes` wrote; a blob cut short or garbled raises ValueError."""
        what = "truncated-ReLU key"
        blob = memoryview(blob).cast("B")
        party, bits, shift, N = read_header(blob, _TRUNC_RELU_HEADER, TRUNC_RELU_MAGIC, VERSION, what)
        if party not in (0, 1) or not 2 <= bits <= 64 or not 1 <= shift <= bits - 1:
            raise ValueError(f"{what} blob header garbled: party {party}, bits {bits}, shift {shift}")
        arrays, off = _read_arrays(blob, _TRUNC_RELU_HEADER.size, N, _RELU_ARRAYS, what)
        return cls(party, bits, shift, _read_dcf(blob[off:], what, N, bits - 1, 3), **arrays)


_RELU_ARRAYS = ("r", "r_top", "quotient", "r_top_quotient")


def trunc_relu_header_bytes() -> int:
    """The fixed part of one party's serialised truncated-ReLU key: its header and its DCF key's."""
    return _TRUNC_RELU_HEADER.size + DCF_HEADER_BYTES


def key_bytes_per_trunc_relu(bits: int = 64) -> int:
    """One party's truncated-ReLU key bytes per element (headers aside), whatever the shift."""
    return key_bytes_per_element(bits - 1, 3) + 32


def trunc_relu_keys(n_elements: int, bits: int, shift: int, rng: AesCtrPrg | None = None) -> tuple[TruncReluKey, TruncReluKey]:
    """The dealer's keys for n_elements ReLU(y / 2^shift) at width `bits` (party 0's, party 1's)."""
    _check_width(bits)
    _check_shift(shift, bits)
    _check_count(n_elements)
    rng = AesCtrPrg() if rng is None else rng
    r = rng.uint64(n_elements)  # drawn first: tests choose masks by replacing this draw
    r_low = r & _low_mask(bits - 1)
    r_top = (r >> U64(bits - 1)) & _ONE
    quotient = r_low >> U64(shift)
    beta = np.stack([np.ones_like(r), r_top, (_ONE - (r_top << _ONE)) * quotient], axis=1)
    d0, d1 = dcf_keygen(r_low, beta, bits - 1, rng)
    shares = [_share(v, rng) for v in (r, r_top, quotient, r_top * quotient)]
    k0 = TruncReluKey(0, bits, shift, d0, *(s[0] for s in shares))
    return k0, TruncReluKey(1, bits, shift, d1, *(s[1] for s in shares))


def trunc_relu_masked_share(key: TruncReluKey, share: ArrayLike) -> np.ndarray:
    """What party key.party sends in the one round: its share of u = y + 2^(n-1) + r."""
    return _masked(key, share)


def trunc_relu_eval(party: int, key: TruncReluKey, u: ArrayLike) -> np.ndarray:
    """This party's additive share (uint64) of ReLU(t), t = floor(y / 2^s) + [carry], shaped like u."""
    shape = np.shape(u)
    u = _opened(party, key, u)
    n, s = key.bits, key.shift
    u_top = (u >> U64(n - 1)) & _ONE
    u_low = u & _low_mask(n - 1)
    e = dcf_eval(party, key.dcf, u_low)  # shares of c', r_t c', (1 - 2 r_t) c' R'
    c, tc, cq = e[:, 0], e[:, 1], e[:, 2]
    h = _ONE - (u_top << _ONE)  # 1 - 2 u_t, public
    # z = r_t xor c' = r_t + c' - 2 r_t c';  D = u_t + h z (u_t at party 0 only)
    d = key.r_top + c - (tc << _ONE)
    d *= h
    if party == 0:
        d += u_top
    # D c' = u_t c' + h (c' - r_t c')
    dc = c - tc
    dc *= h
    dc += u_top * c
    # D R' = u_t R' + h (r_t R' + (1 - 2 r_t) c' R')
    dr = key.r_top_quotient + cq
    dr *= h
    dr += u_top * key.quotient
    # ReLU(t) = D P' - D R' + 2^(n-1-s) D c'
    d *= u_low >> U64(s)
    d -= dr
    d += dc << U64(n - 1 - s)
    return d.reshape(shape)
