"""A comparison [x < alpha] with a one-bit output from a DPF key: no value words (SIGMA's idea).

Gupta et al., "SIGMA", PETS 2024, and Boyle, Gilboa, Ishai, "Function Secret Sharing:
Improvements and Extensions", CCS 2016 (the DPF). The dealer keys a point function at alpha:
a GGM tree whose nodes on alpha's path carry control bits t_0 xor t_1 = 1 and whose other nodes
carry equal seeds and equal control bits in both keys. Walking x's path, at every level where
x goes left the right sibling is on alpha's path exactly when alpha went right there, while
the prefixes agree: the one level where x and alpha part with x < alpha. So

    [x < alpha] = xor, over the levels i with x_i = 0, of t_0 xor t_1 at the right child,

and each party's xor of its own control bits there is its xor share of the comparison.

Key of party b: its root block (control bit b in the low bit) and, per level, one seed
correction word with the two control-bit corrections t_CW^L, t_CW^R in its two low bits, the
same words `dcf.py` makes, without the value correction words: 16 bytes per level against the
DCF's 16 + 8 k. Evaluation hashes two blocks per level (the path's child and the right child).
The output is a bit share; turning it into arithmetic shares needs a round (`select_relu.py`).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike

from .dcf import _CLEAR2, _EVAL_CHUNK, _GEN_CHUNK, _ONE, MAX_BITS, U64, _as_u64, _check_range, _hashes, _shift, read_header, word_views
from .prg import AesCtrPrg, FixedKeyAes

MAGIC = b"TWFSBDC\x00"
VERSION = 1
# magic, version, party, bits, (padding), elements
_HEADER = struct.Struct("<8sHBB4xQ")
HEADER_BYTES = _HEADER.size


@dataclass(frozen=True, eq=False)
class BitDcfKey:
    """One party's keys for N comparisons of n bits: seed (N, 2) its root blocks; seed_cw (n, N, 2)
    the correction words, the same in both parties' keys."""

    party: int
    bits: int
    seed: np.ndarray
    seed_cw: np.ndarray

    def __post_init__(self) -> None:
        if self.party not in (0, 1):
            raise ValueError(f"comparison key party must be 0 or 1, got {self.party}")
        if not 1 <= self.bits <= MAX_BITS:
            raise ValueError(f"comparison bit width must be in 1..{MAX_BITS}, got {self.bits}")
        N = self.seed.shape[0] if self.seed.ndim == 2 else -1
        for name, shape in (("seed", (N, 2)), ("seed_cw", (self.bits, N, 2))):
            a = getattr(self, name)
            if a.dtype != U64 or a.shape != shape:
                raise ValueError(f"comparison key {name} must be uint64 of shape {shape}, got {a.dtype} {a.shape}")

    @property
    def n_elements(self) -> int:
        return self.seed.shape[0]

    @property
    def nbytes(self) -> int:
        return _HEADER.size + key_bytes_per_comparison(self.bits) * self.n_elements

    def blob_parts(self) -> list[bytes | memoryview]:
        head = _HEADER.pack(MAGIC, VERSION, self.party, self.bits, self.n_elements)
        return [head, *word_views((self.seed, self.seed_cw))]

    @classmethod
    def from_bytes(cls, blob: bytes | bytearray | memoryview) -> "BitDcfKey":
        """The key `blob_parts` wrote (joined); a blob cut short, too long or garbled raises ValueError."""
        blob = memoryview(blob).cast("B")
        party, bits, N = read_header(blob, _HEADER, MAGIC, VERSION, "comparison key")
        if party not in (0, 1) or not 1 <= bits <= MAX_BITS:
            raise ValueError(f"comparison key blob header garbled: party {party}, bits {bits}")
        want = _HEADER.size + key_bytes_per_comparison(bits) * N
        if len(blob) != want:
            kind = "truncated" if len(blob) < want else "too long"
            raise ValueError(f"comparison key blob {kind}: {len(blob)} bytes, expected {want} for {N} elements of {bits} bits")
        seed = np.frombuffer(blob, "<u8", 2 * N, _HEADER.size).astype(U64, copy=False).reshape(N, 2)
        cw = np.frombuffer(blob, "<u8", 2 * N * bits, _HEADER.size + 16 * N).astype(U64, copy=False).reshape(bits, N, 2)
        return cls(party, bits, seed, cw)


def key_bytes_per_comparison(bits: int) -> int:
    """One party's key bytes per element (the header aside): its root block and n correction words."""
    return 16 * (1 + bits)


def bit_dcf_keygen(alpha: ArrayLike, bits: int, rng: AesCtrPrg | None = None) -> tuple[BitDcfKey, BitDcfKey]:
    """Both parties' keys of [x < alpha_i] for N elements; alpha: (N,) in [0, 2^bits)."""
    if not 1 <= bits <= MAX_BITS:
        raise ValueError(f"comparison bit width must be in 1..{MAX_BITS}, got {bits}")
    alpha = _as_u64(alpha, "alpha").reshape(-1)
    _check_range(alpha, bits, "alpha")
    N = alpha.size
    rng = AesCtrPrg() if rng is None else rng
    roots = rng.blocks((2, N))
    roots[:, :, 0] &= ~_ONE
    roots[1, :, 0] |= _ONE  # t_0 = 0, t_1 = 1
    seed_cw = np.empty((bits, N, 2), U64)
    hash0 = _hashes(1)[0]
    work: dict[int, _GenWork] = {}
    for c0 in range(0, N, _GEN_CHUNK):
        c1 = min(N, c0 + _GEN_CHUNK)
        w = work.get(c1 - c0) or work.setdefault(c1 - c0, _GenWork(c1 - c0))
        _gen_chunk(w, hash0, bits, alpha[c0:c1], roots[:, c0:c1], seed_cw[:, c0:c1])
    return BitDcfKey(0, bits, roots[0], seed_cw), BitDcfKey(1, bits, roots[1], seed_cw)


class _GenWork:
    """Preallocated buffers of one generation chunk of C elements (both parties)."""

    def __init__(self, C: int) -> None:
        self.S = np.empty((2, C, 2), U64)
        self.inp = np.empty((2, 2, C, 2), U64)  # party, child (left, right), element, block
        self.out = np.empty((2, 2, C, 2), U64)
        self.d = np.empty((2, C, 2), U64)
        self.keep = np.empty((2, C, 2), U64)
        self.lose = np.empty((2, C, 2), U64)
        self.a = np.empty(C, U64)
        self.amask = np.empty(C, U64)
        self.amask2 = np.empty((C, 2), U64)
        self.low = np.empty(C, U64)
        self.u = np.empty(C, U64)
        self.tx = np.empty((2, C), U64)
        self.tmask = np.empty((2, C), U64)
        self.tmask2 = np.empty((2, C, 2), U64)
        self.corr = np.empty((C, 2), U64)


def _widen(src: np.ndarray, dst: np.ndarray) -> None:
    for j in range(dst.shape[-1]):
        np.copyto(dst[..., j], src)


def _gen_chunk(w: _GenWork, hash0: FixedKeyAes, bits: int, alpha, roots, seed_cw) -> None:
    S, inp, out, a, amask, low, u, tx, tmask = w.S, w.inp, w.out, w.a, w.amask, w.low, w.u, w.tx, w.tmask
    np.copyto(S, roots)
    for i in range(bits):
        np.right_shift(alpha, _shift(bits, i), out=a)
        np.bitwise_and(a, _ONE, out=a)
        np.negative(a, out=amask)  # all ones where alpha goes right
        _widen(amask, w.amask2)
        np.bitwise_and(S[:, :, 0], _ONE, out=tmask)
        np.negative(tmask, out=tmask)
        _widen(tmask, w.tmask2)
        np.bitwise_and(S[:, :, 0], _CLEAR2, out=S[:, :, 0])
        np.copyto(inp, S[:, None])
        inp[:, 1, :, 0] |= _ONE  # tweak 1: the right child
        hash0.hash_into(inp, out)
        sl, sr = out[:, 0], out[:, 1]
        np.bitwise_xor(sl, sr, out=w.d)
        np.bitwise_and(w.d, w.amask2[None], out=w.keep)
        np.bitwise_xor(w.keep, sl, out=w.keep)
        np.bitwise_xor(w.keep, w.d, out=w.lose)
        cw = seed_cw[i]
        np.bitwise_xor(w.lose[0], w.lose[1], out=cw)
        # control-bit corrections: bit 0 = t0L ^ t1L ^ a ^ 1, bit 1 = t0R ^ t1R ^ a
        np.bitwise_xor(out[0, :, :, 0], out[1, :, :, 0], out=tx)
        np.bitwise_and(tx, _ONE, out=tx)
        np.left_shift(tx[1], _ONE, out=u)
        np.bitwise_or(tx[0], u, out=low)
        np.add(a, _ONE, out=u)
        np.bitwise_xor(low, u, out=low)
        cw_lo = cw[:, 0]
        np.bitwise_and(cw_lo, _CLEAR2, out=cw_lo)
        np.bitwise_or(cw_lo, low, out=cw_lo)
        # next blocks: alpha's side, corrected where the party's control bit is set
        np.right_shift(cw_lo, a, out=u)
        np.bitwise_and(u, _ONE, out=u)
        np.bitwise_and(cw_lo, _CLEAR2, out=w.corr[:, 0])
        np.bitwise_or(w.corr[:, 0], u, out=w.corr[:, 0])
        w.corr[:, 1] = cw[:, 1]
        np.bitwise_and(w.corr[None], w.tmask2, out=S)
        np.bitwise_xor(S, w.keep, out=S)


class _EvalWork:
    def __init__(self, C: int) -> None:
        self.S = np.empty((C, 2), U64)
        self.inp = np.empty((2, C, 2), U64)  # the path's child block, the right child block
        self.out = np.empty((2, C, 2), U64)
        self.xi = np.empty(C, U64)
        self.tmask = np.empty(C, U64)
        self.tmask2 = np.empty((C, 2), U64)
        self.u = np.empty(C, U64)
        self.v = np.empty(C, U64)
        self.corr = np.empty((C, 2), U64)
        self.tweak = np.array([[0], [1]], U64)


def bit_dcf_eval(party: int, key: BitDcfKey, x: ArrayLike) -> np.ndarray:
    """Party `party`'s xor share of [x < alpha], (N,) uint8 of 0 and 1; x: (N,) in [0, 2^n)."""
    if party != key.party:
        raise ValueError(f"party {party} was given party {key.party}'s comparison key")
    x = _as_u64(x, "x").reshape(-1)
    N, bits = key.n_elements, key.bits
    if x.size != N:
        raise ValueError(f"comparison key holds {N} elements, x has {x.size}")
    _check_range(x, bits, "x")
    hash0 = _hashes(1)[0]
    result = np.empty(N, U64)
    work: dict[int, _EvalWork] = {}
    for c0 in range(0, N, _EVAL_CHUNK):
        c1 = min(N, c0 + _EVAL_CHUNK)
        w = work.get(c1 - c0) or work.setdefault(c1 - c0, _EvalWork(c1 - c0))
        _eval_chunk(w, hash0, key, c0, c1, x[c0:c1], result[c0:c1])
    return result.astype(np.uint8)


def _eval_chunk(w: _EvalWork, hash0: FixedKeyAes, key: BitDcfKey, c0: int, c1: int, x, result) -> None:
    S, inp, out, xi, tmask, u, v, corr = w.S, w.inp, w.out, w.xi, w.tmask, w.u, w.v, w.corr
    np.copyto(S, key.seed[c0:c1])
    result.fill(0)
    for i in range(key.bits):
        np.right_shift(x, _shift(key.bits, i), out=xi)
        np.bitwise_and(xi, _ONE, out=xi)
        np.bitwise_and(S[:, 0], _ONE, out=tmask)
        np.negative(tmask, out=tmask)
        _widen(tmask, w.tmask2)
        # the path's child (tweak x_i) and the right child (tweak 1): one AES call
        np.bitwise_and(S[:, 0], _CLEAR2, out=u)
        np.bitwise_or(u[None, :], w.tweak, out=inp[:, :, 0])
        np.bitwise_or(inp[0, :, 0], xi, out=inp[0, :, 0])
        np.copyto(inp[:, :, 1], S[None, :, 1])
        hash0.hash_into(inp, out)
        np.bitwise_and(key.seed_cw[i, c0:c1], w.tmask2, out=corr)
        lo = corr[:, 0]
        # where x goes left, the right child's corrected control bit joins the share
        np.right_shift(lo, _ONE, out=u)
        np.bitwise_xor(u, out[1, :, 0], out=v)
        np.bitwise_and(v, _ONE, out=v)
        np.bitwise_xor(xi, _ONE, out=u)
        np.bitwise_and(v, u, out=v)
        np.bitwise_xor(result, v, out=result)
        # the path's child, its control bit corrected by t_CW^L, or t_CW^R where x_i = 1
        np.bitwise_xor(out[0], corr, out=S)
        np.right_shift(lo, _ONE, out=u)
        np.bitwise_xor(u, lo, out=u)
        np.bitwise_and(u, xi, out=u)
        np.bitwise_xor(S[:, 0], u, out=S[:, 0])
