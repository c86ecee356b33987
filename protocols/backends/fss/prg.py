"""AES pseudo-random generators of the fss backend.

1. `AesCtrPrg`: AES-128-CTR keystreams keyed by a 128-bit seed from `os.urandom`. Byte p of
   stream s under seed k is byte p mod 16 of AES_k(s * 2^64 + floor(p / 16)) (the counter
   block is big-endian), so whoever holds (seed, stream, offset) derives the same masks: the
   dealer and a party alike (DESIGN.md, invariants).
2. `FixedKeyAes`: fixed-key AES-128 in Matyas-Meyer-Oseas form, H(x) = AES_K(x) xor x, for a
   public key K, over arrays of 128-bit blocks: the PRG of the DCF tree (Boyle et al., "Function
   Secret Sharing for Mixed-Mode and Fixed-Point Secure Computation", Eurocrypt 2021, "BCG+21";
   Guo, Katz, Wang, Yu, "Efficient and Secure Multiparty Computation from Fixed-Key Block
   Ciphers", S&P 2020, on MMO's correlation robustness). Tweaks j are xored into the low bits of
   the block by the caller: H(s, j) = H(s xor j).

Blocks are numpy arrays of shape (..., 2) uint64 (little-endian words: word 0 holds bytes 0-7,
so "the low bits of a block" are the low bits of word 0) or (..., 16) uint8.
"""

from __future__ import annotations

import os

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

SEED_BYTES = 16
BLOCK_BYTES = 16
# update_into wants room for one more block than the data, less one byte
_SLACK = BLOCK_BYTES - 1
_CHUNK = 1 << 20  # CTR keystream is made in 1 MiB pieces from one reused zero buffer


def new_seed() -> bytes:
    """A fresh 128-bit seed from the operating system."""
    return os.urandom(SEED_BYTES)


def _check_seed(seed: bytes) -> bytes:
    if not isinstance(seed, (bytes, bytearray, memoryview)) or len(seed) != SEED_BYTES:
        raise ValueError(f"an AES seed is {SEED_BYTES} bytes, got {type(seed).__name__} of length {len(seed) if hasattr(seed, '__len__') else '?'}")
    return bytes(seed)


def _byte_view(a: np.ndarray, what: str) -> np.ndarray:
    """The bytes of a C-contiguous array as a flat uint8 view (no copy)."""
    if not a.flags.c_contiguous:
        raise ValueError(f"{what} must be C-contiguous")
    return a.reshape(-1).view(np.uint8)


class AesCtrPrg:
    """A sequential reader of one AES-128-CTR keystream, addressed by (seed, stream, offset)."""

    def __init__(self, seed: bytes | None = None, stream: int = 0, offset: int = 0) -> None:
        self._seed = new_seed() if seed is None else _check_seed(seed)
        if not 0 <= stream < 1 << 64:
            raise ValueError(f"stream id must be in [0, 2^64), got {stream}")
        self._stream = stream
        self._zeros = np.zeros(_CHUNK + _SLACK, np.uint8)
        self._scratch = np.empty(_CHUNK + _SLACK, np.uint8)
        self.seek(offset)

    @property
    def seed(self) -> bytes:
        return self._seed

    @property
    def stream(self) -> int:
        return self._stream

    @property
    def position(self) -> int:
        """Bytes of the stream read so far (the offset of the next byte)."""
        return self._pos

    def seek(self, offset: int) -> None:
        """Continue reading at byte `offset` of the stream."""
        if not 0 <= offset < 1 << 68:
            raise ValueError(f"stream offset must be in [0, 2^68), got {offset}")
        counter = (self._stream << 64) | (offset // BLOCK_BYTES)
        self._enc = Cipher(algorithms.AES(self._seed), modes.CTR(counter.to_bytes(16, "big"))).encryptor()
        self._pos = offset - offset % BLOCK_BYTES
        skip = offset % BLOCK_BYTES
        if skip:
            self.fill(np.empty(skip, np.uint8))

    def fork(self, stream: int) -> "AesCtrPrg":
        """Another stream under the same seed, from its start."""
        return AesCtrPrg(self._seed, stream)

    def fill(self, out: np.ndarray) -> np.ndarray:
        """Overwrite every byte of `out` (C-contiguous, any dtype) with the next keystream bytes."""
        buf = _byte_view(out, "the output array")
        total, pos = buf.size, 0
        while pos < total:
            left = total - pos
            if left > _CHUNK + _SLACK:
                n = _CHUNK
                self._enc.update_into(self._zeros[:n], buf[pos:])
            elif left > 4 * _SLACK:
                # write in place, leaving the last bytes to the scratch path for update_into's slack
                n = left - _SLACK
                self._enc.update_into(self._zeros[:n], buf[pos:])
            else:
                n = left
                self._enc.update_into(self._zeros[:n], self._scratch)
                buf[pos:] = self._scratch[:n]
            pos += n
        self._pos += total
        return out

    def bytes(self, n: int) -> bytes:
        return self.fill(np.empty(n, np.uint8)).tobytes()

    def uint8(self, shape: int | tuple[int, ...]) -> np.ndarray:
        return self.fill(np.empty(shape, np.uint8))

    def uint64(self, shape: int | tuple[int, ...]) -> np.ndarray:
        """Uniform elements of Z_2^64 (little-endian words of the keystream)."""
        # the keystream's words are little-endian whatever the host (no copy on little-endian hosts)
        return self.fill(np.empty(shape, "<u8")).astype(np.uint64, copy=False)

    def blocks(self, shape: int | tuple[int, ...]) -> np.ndarray:
        """Uniform 128-bit blocks as uint64 pairs, shape (*shape, 2)."""
        shape = (shape,) if isinstance(shape, int) else tuple(shape)
        return self.uint64(shape + (2,))


def ctr_uint64(seed: bytes, shape: int | tuple[int, ...], stream: int = 0, offset: int = 0) -> np.ndarray:
    """Elements of Z_2^64 from bytes [offset, offset + 8 * size) of stream `stream` under `seed`."""
    return AesCtrPrg(seed, stream, offset).uint64(shape)


def ctr_uint8(seed: bytes, shape: int | tuple[int, ...], stream: int = 0, offset: int = 0) -> np.ndarray:
    """Bytes [offset, offset + size) of stream `stream` under `seed`."""
    return AesCtrPrg(seed, stream, offset).uint8(shape)


class FixedKeyAes:
    """H(x) = AES_K(x) xor x for a public fixed key K, over arrays of 128-bit blocks.

    The object keeps an ECB encryptor and a scratch buffer: one per thread (a DCF call makes its
    own), never shared between concurrent callers.
    """

    def __init__(self, key: bytes) -> None:
        self._key = _check_seed(key)
        self._enc = Cipher(algorithms.AES(self._key), modes.ECB()).encryptor()
        self._scratch = np.empty(0, np.uint8)

    @property
    def key(self) -> bytes:
        return self._key

    def _aes(self, x: np.ndarray) -> np.ndarray:
        """AES_K of every block of x into the scratch buffer, viewed like x."""
        xb = _byte_view(x, "the input blocks")
        if xb.size % BLOCK_BYTES:
            raise ValueError(f"input is {xb.size} bytes, not a whole number of 16-byte blocks")
        if self._scratch.size < xb.size + _SLACK:
            self._scratch = np.empty(xb.size + BLOCK_BYTES, np.uint8)
        self._enc.update_into(xb, self._scratch)
        return self._scratch[: xb.size].view(x.dtype).reshape(x.shape)

    def encrypt(self, x: np.ndarray) -> np.ndarray:
        """AES_K(x) alone (a new array), for tests against the standard."""
        return self._aes(np.ascontiguousarray(x)).copy()

    def hash_into(self, x: np.ndarray, out: np.ndarray) -> np.ndarray:
        """out = AES_K(x) xor x; `out` may be `x` itself; both C-contiguous, same shape and dtype."""
        if out.shape != x.shape or out.dtype != x.dtype:
            raise ValueError(f"output {out.shape} {out.dtype} does not match input {x.shape} {x.dtype}")
        np.bitwise_xor(self._aes(x), x, out=out)
        return out

    def hash(self, x: np.ndarray, tweak: int = 0) -> np.ndarray:
        """H(x, j) = AES_K(x xor j) xor (x xor j) as a new array; j is xored into the low bits."""
        x = np.array(x, copy=True, order="C")
        if tweak:
            if x.dtype == np.uint64:
                x[..., 0] ^= np.uint64(tweak)
            elif x.dtype == np.uint8:
                x[..., 0] ^= np.uint8(tweak)
            else:
                raise ValueError(f"blocks are uint64 pairs or 16 uint8, got {x.dtype}")
        return self.hash_into(x, x)
