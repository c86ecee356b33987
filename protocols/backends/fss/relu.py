"""ReLU and DReLU in one online round on additive shares in Z_2^64 from one DCF (BCG+21, LLAMA).

Boyle et al., Eurocrypt 2021 ("BCG+21"), and Gupta et al., "LLAMA", PETS 2022; twinfer's
research note `fss.md`. For a comparison width n (2..64), x' and r' are the low n-1 bits and
msb the bit n-1:

1. Dealer: draws a mask r uniform in Z_2^64 and keys a DCF on n-1 bits at alpha = r' with
   payload (1 - 2 msb(r), (1 - 2 msb(r)) r); deals additive shares of r, msb(r) and msb(r) r.
2. Online (the one round): each party sends its share of x + r; both learn x_hat = x + r.
3. Each party evaluates the DCF at x_hat'; with c = [x_hat' < r'] its two outputs are shares of
   (1 - 2 msb(r)) c and (1 - 2 msb(r)) c r; adding its shares of msb(r) and msb(r) r gives
   shares of q = msb(r) xor c and q r. msb(x) = msb(x_hat) xor q (c is the borrow out of the
   low bits, so there is no wrap-around error), and with the public m = 1 xor msb(x_hat):
   DReLU = m + (1 - 2m) q, DReLU r = m r + (1 - 2m) q r, ReLU(x) = DReLU x_hat - DReLU r,
   all local; the public m is added by party 0 only.

At n = 64 the result is exact for every int64 x. At n < 64 it is exact while
-2^(n-1) <= x < 2^(n-1) in ring units (the sign is read off bit n-1); outside that range the
sign is that of x's low n bits and nothing detects it. A DReLU key is the same with a
one-word payload (1 - 2 msb(r)) and no share of msb(r) r.
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

MAGIC = b"TWFSRLU\x00"
VERSION = 1
# magic, version, party, bits (n of the comparison), kind (1 DReLU, 2 ReLU), (padding), elements
_HEADER = struct.Struct("<8sHBBB3xQ")
_KINDS = {1: "drelu", 2: "relu"}


@dataclass(frozen=True, eq=False)
class ReluKey(KeyOfDcf):
    """One party's keys for N ReLUs (or DReLUs) at comparison width `bits`.

    dcf: the DCF key on bits - 1 bits (payload 2 words for ReLU, 1 for DReLU); r, msb_r,
    msb_r_r: (N,) uint64 shares of the mask r, of msb(r) and of msb(r) r (empty for DReLU).
    """

    party: int
    bits: int
    dcf: DcfKey
    r: np.ndarray
    msb_r: np.ndarray
    msb_r_r: np.ndarray

    def __post_init__(self) -> None:
        self.check_comparison("DCF key")
        if self.dcf.payload_words not in _KINDS:
            raise ValueError(f"ReLU key's DCF payload must be 1 (DReLU) or 2 (ReLU) words, got {self.dcf.payload_words}")
        N = self.dcf.n_elements
        want_rr = N if self.kind == "relu" else 0
        for name, size in (("r", N), ("msb_r", N), ("msb_r_r", want_rr)):
            a = getattr(self, name)
            if a.dtype != U64 or a.shape != (size,):
                raise ValueError(f"ReLU key {name} must be uint64 of shape ({size},), got {a.dtype} {a.shape}")

    @property
    def kind(self) -> str:
        """'relu' or 'drelu'."""
        return _KINDS[self.dcf.payload_words]


    @property
    def nbytes(self) -> int:
        return _HEADER.size + 8 * (self.r.size + self.msb_r.size + self.msb_r_r.size) + self.dcf.nbytes


    def blob_parts(self) -> list[bytes | memoryview]:
        """The pieces of `to_bytes()` without copying the arrays: joined, each is copied once."""
        head = _HEADER.pack(MAGIC, VERSION, self.party, self.bits, self.dcf.payload_words, self.n_elements)
        return [head, *word_views((self.r, self.msb_r, self.msb_r_r)), *self.dcf.blob_parts()]

    @classmethod
    def from_bytes(cls, blob: bytes | bytearray | memoryview) -> "ReluKey":
        """The key `to_bytes` wrote; a blob cut short or garbled raises ValueError."""
        blob = memoryview(blob).cast("B")
        party, bits, words, N = read_header(blob, _HEADER, MAGIC, VERSION, "ReLU key")
        if party not in (0, 1) or not 2 <= bits <= 64 or words not in _KINDS:
            raise ValueError(f"ReLU key blob header garbled: party {party}, bits {bits}, payload words {words}")
        sizes = (("r", N), ("msb_r", N), ("msb_r_r", N if words == 2 else 0))
        off = _HEADER.size
        arrays = {}
        for name, size in sizes:
            if len(blob) < off + 8 * size:
                raise ValueError(f"ReLU key blob truncated in {name}: {len(blob)} bytes, {name} ends at byte {off + 8 * size}")
            arrays[name] = np.frombuffer(blob, "<u8", size, off).astype(U64, copy=False)
            off += 8 * size
        try:
            dcf = DcfKey.from_bytes(blob[off:])
        except ValueError as e:
            raise ValueError(f"ReLU key blob: its DCF key is bad: {e}") from None
        if dcf.n_elements != N or dcf.payload_words != words:
            raise ValueError(f"ReLU key blob garbled: header says {N} elements of payload {words}, its DCF key {dcf.n_elements} of {dcf.payload_words}")
        return cls(party, bits, dcf, **arrays)


def relu_key_header_bytes() -> int:
    """The fixed part of one party's serialised key, whatever its length: its header and its DCF key's."""
    return _HEADER.size + DCF_HEADER_BYTES


def key_bytes_per_relu(bits: int = 64, kind: str = "relu") -> int:
    """One party's key bytes per element (headers aside)."""
    words = 2 if kind == "relu" else 1
    return key_bytes_per_element(bits - 1, words) + 8 * (1 + words)


def _msb(a: np.ndarray, bits: int) -> np.ndarray:
    return (a >> U64(bits - 1)) & _ONE


def _low(a: np.ndarray, bits: int) -> np.ndarray:
    return a & U64((1 << (bits - 1)) - 1)


def _share(value: np.ndarray, rng: AesCtrPrg) -> tuple[np.ndarray, np.ndarray]:
    s0 = rng.uint64(value.shape)
    return s0, value - s0


def draw_mask(n_elements: int, bits: int, rng: AesCtrPrg | None) -> tuple[AesCtrPrg, np.ndarray]:
    """The dealer's PRG (a fresh one if None) and the masks r of n_elements comparisons of width
    `bits`, its first draw; bad arguments raise ValueError."""
    if not 2 <= bits <= 64:
        raise ValueError(f"comparison bit width must be in 2..64, got {bits}")
    if n_elements < 0:
        raise ValueError(f"number of elements must be >= 0, got {n_elements}")
    rng = AesCtrPrg() if rng is None else rng
    return rng, rng.uint64(n_elements)


def _keys(n_elements: int, bits: int, rng: AesCtrPrg | None, relu: bool) -> tuple[ReluKey, ReluKey]:
    rng, r = draw_mask(n_elements, bits, rng)
    msb = _msb(r, bits)
    sign = _ONE - (msb << _ONE)  # 1 - 2 msb(r)
    beta = np.stack([sign, sign * r], axis=1) if relu else sign[:, None]
    d0, d1 = dcf_keygen(_low(r, bits), beta, bits - 1, rng)
    r0, r1 = _share(r, rng)
    m0, m1 = _share(msb, rng)
    if relu:
        p0, p1 = _share(msb * r, rng)
    else:
        p0 = p1 = np.empty(0, U64)
    return ReluKey(0, bits, d0, r0, m0, p0), ReluKey(1, bits, d1, r1, m1, p1)


def relu_keys(n_elements: int, bits: int = 64, rng: AesCtrPrg | None = None) -> tuple[ReluKey, ReluKey]:
    """The dealer's keys for n_elements ReLUs at comparison width `bits` (party 0's, party 1's)."""
    return _keys(n_elements, bits, rng, relu=True)


def drelu_keys(n_elements: int, bits: int = 64, rng: AesCtrPrg | None = None) -> tuple[ReluKey, ReluKey]:
    """The dealer's keys for n_elements comparisons [x >= 0] at width `bits`."""
    return _keys(n_elements, bits, rng, relu=False)


def _x_hat(key: ReluKey, x_hat: ArrayLike) -> np.ndarray:
    x_hat = np.asarray(x_hat)
    if x_hat.dtype == np.int64:
        x_hat = x_hat.view(U64)
    if x_hat.dtype != U64:
        raise ValueError(f"x_hat must be uint64 or int64 ring elements, got {x_hat.dtype}")
    if x_hat.size != key.n_elements:
        raise ValueError(f"key holds {key.n_elements} elements, x_hat has {x_hat.size}")
    return x_hat.reshape(-1)


def masked_share(key: ReluKey, x_share: ArrayLike) -> np.ndarray:
    """This party's share of x_hat = x + r: what it sends in the one online round."""
    x_share = np.asarray(x_share)
    x_share = x_share.view(U64) if x_share.dtype == np.int64 else x_share
    if x_share.size != key.n_elements:
        raise ValueError(f"key holds {key.n_elements} elements, the share has {x_share.size}")
    return (x_share.reshape(-1) + key.r).reshape(x_share.shape)


def _q_and_m(party: int, key: ReluKey, x_hat: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Shares of q = msb(r) xor [x_hat' < r'] (and of q r for ReLU), and the public m."""
    if party != key.party:
        raise ValueError(f"party {party} was given party {key.party}'s ReLU key")
    c = dcf_eval(party, key.dcf, _low(x_hat, key.bits))
    q = c[:, 0] + key.msb_r
    qr = c[:, 1] + key.msb_r_r if key.kind == "relu" else None
    m = _msb(x_hat, key.bits) ^ _ONE
    return q, qr, m


def _drelu_share(party: int, q: np.ndarray, m: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The DReLU share (1 - 2m) q, plus the public m at party 0 only; and 1 - 2m."""
    one_m2 = _ONE - (m << _ONE)
    d = one_m2 * q
    if party == 0:
        d += m
    return d, one_m2


def drelu_eval(party: int, key: ReluKey, x_hat: ArrayLike) -> np.ndarray:
    """This party's additive share of DReLU(x) = [x >= 0] in Z_2^64, shaped like x_hat."""
    shape = np.shape(x_hat)
    q, _, m = _q_and_m(party, key, _x_hat(key, x_hat))
    return _drelu_share(party, q, m)[0].reshape(shape)


def relu_eval(party: int, key: ReluKey, x_hat: ArrayLike) -> np.ndarray:
    """This party's additive share of ReLU(x) in Z_2^64 (uint64), shaped like x_hat = x + r."""
    if key.kind != "relu":
        raise ValueError("relu_eval needs a ReLU key (payload of 2 words), got a DReLU key")
    shape = np.shape(x_hat)
    xh = _x_hat(key, x_hat)
    q, qr, m = _q_and_m(party, key, xh)
    d, one_m2 = _drelu_share(party, q, m)
    dr = m * key.r  # the share of DReLU r: m r + (1 - 2m) q r
    dr += one_m2 * qr
    d *= xh
    d -= dr
    return d.reshape(shape)
