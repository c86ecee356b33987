"""A comparison [x < alpha] with a one-bit output from a DPF key: no value words (SIGMA's idea).

Gupta et al., "SIGMA", PETS 2024, and Boyle, Gilboa, Ishai, "Function Secret Sharing:
Improvements and Extensions", CCS 2016 (the DPF). The dealer keys a point function at alpha:
a GGM tree whose nodes on alpha's path carry control bits t_0 xor t_1 = 1 and whose other nodes
carry equal seeds and equal control bits in both keys. Walking x's path, at every level where
x goes left the right sibling is on alpha's path exactly when alpha went right there, while
the prefixes agree: the one level where x and alpha part with x < alpha. So

    [x < alpha] = xor, over the levels i with x_i = 0, of t_0 xor t_1 at the right child,

and each party's xor of its own control bits there is its xor share of the comparison.

Early termination (BGI16): the tree stops LEAF_BITS = 7 levels short of n; a leaf's 128-bit
block, hashed, holds one output bit for each of the 128 values of x's low 7 bits. The leaf
correction word is the xor of both parties' hashed leaves on alpha's path and of the indicator
of [x_low < alpha_low], so that at alpha's leaf the two parties' bits at x_low xor to that
comparison, and anywhere else (equal leaves) to 0. With the levels above,
[x < alpha] = [x_high < alpha_high] xor ([x_high = alpha_high] and [x_low < alpha_low]).

Key of party b: its root block (control bit b in the low bit), per level one seed correction
word with the two control-bit corrections t_CW^L, t_CW^R in its two low bits (the words
`dcf.py` makes, without the value correction words) and the leaf word: 16 (n - 5) bytes for
n >= 7, against the DCF's (16 + 8 k) n. Evaluation hashes two blocks per level (the path's
child and the right child) and one at the leaf. The output is a bit share; turning it into
arithmetic shares needs a round (`select_relu.py`).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike

from .dcf import (
    _CLEAR2, _EVAL_CHUNK, _GEN_CHUNK, _ONE, MAX_BITS, U64, _as_u64, _check_range, _hashes, _shift, _widen, chunks, eval_input,
    SeedWork, path_child, read_header, seed_level, word_views,
)  # fmt: skip
from .prg import AesCtrPrg, FixedKeyAes

MAGIC = b"TWFSBDC\x00"
VERSION = 1
LEAF_BITS = 7  # a leaf's 128-bit block holds the outputs of the last 7 levels
# magic, version, party, bits, (padding), elements
_HEADER = struct.Struct("<8sHBB4xQ")
HEADER_BYTES = _HEADER.size


def tree_levels(bits: int) -> int:
    """Levels of the tree for comparisons of `bits` bits: the rest are a leaf's."""
    return bits - min(bits, LEAF_BITS)


@dataclass(frozen=True, eq=False)
class BitDcfKey:
    """One party's keys for N comparisons of n bits: seed (N, 2) its root blocks; seed_cw
    (tree_levels(n), N, 2) and leaf_cw (N, 2) the correction words, the same in both parties' keys."""

    party: int
    bits: int
    seed: np.ndarray
    seed_cw: np.ndarray
    leaf_cw: np.ndarray

    def __post_init__(self) -> None:
        if self.party not in (0, 1):
            raise ValueError(f"comparison key party must be 0 or 1, got {self.party}")
        if not 1 <= self.bits <= MAX_BITS:
            raise ValueError(f"comparison bit width must be in 1..{MAX_BITS}, got {self.bits}")
        N = self.seed.shape[0] if self.seed.ndim == 2 else -1
        for name, shape in (("seed", (N, 2)), ("seed_cw", (tree_levels(self.bits), N, 2)), ("leaf_cw", (N, 2))):
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
        return [head, *word_views((self.seed, self.seed_cw, self.leaf_cw))]

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
        levels, off, arrays = tree_levels(bits), _HEADER.size, []
        for shape in ((N, 2), (levels, N, 2), (N, 2)):
            count = int(np.prod(shape))
            arrays.append(np.frombuffer(blob, "<u8", count, off).astype(U64, copy=False).reshape(shape))
            off += 8 * count
        return cls(party, bits, *arrays)


def key_bytes_per_comparison(bits: int) -> int:
    """One party's key bytes per element (the header aside): its root block, a correction word per
    level and the leaf's."""
    return 16 * (2 + tree_levels(bits))


def _low_mask(bits: int) -> np.uint64:
    return U64((1 << min(bits, LEAF_BITS)) - 1)


def _indicator(alpha_low: np.ndarray, out: np.ndarray) -> None:
    """out (C, 2): the 128-bit blocks whose bits j < alpha_low are set (alpha_low in [0, 128))."""
    for word in (0, 1):
        count = np.clip(alpha_low.astype(np.int64) - 64 * word, 0, 64).astype(U64)
        full = count == U64(64)
        np.left_shift(_ONE, np.where(full, U64(0), count), out=out[:, word])
        out[:, word] -= _ONE
        out[full, word] = U64((1 << 64) - 1)


def _leaf_bits(block: np.ndarray, x_low: np.ndarray) -> np.ndarray:
    """Bit x_low of each 128-bit block (C, 2), as uint64 0 or 1."""
    word = block[np.arange(block.shape[0]), (x_low >> U64(6)).astype(np.intp)]
    return (word >> (x_low & U64(63))) & _ONE


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
    seed_cw = np.empty((tree_levels(bits), N, 2), U64)
    leaf_cw = np.empty((N, 2), U64)
    hash0 = _hashes(1)[0]
    for w, c0, c1 in chunks(N, _GEN_CHUNK, lambda C: SeedWork(C, 2)):  # tweaks 0 and 1: the two children
        _gen_chunk(w, hash0, bits, alpha[c0:c1], roots[:, c0:c1], seed_cw[:, c0:c1], leaf_cw[c0:c1])
    return BitDcfKey(0, bits, roots[0], seed_cw, leaf_cw), BitDcfKey(1, bits, roots[1], seed_cw, leaf_cw)


def _gen_chunk(w: SeedWork, hash0: FixedKeyAes, bits: int, alpha, roots, seed_cw, leaf_cw) -> None:
    S, inp, out, a, amask, tmask = w.S, w.inp, w.out, w.a, w.amask, w.tmask
    np.copyto(S, roots)
    for i in range(tree_levels(bits)):
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
        seed_level(w, out[:, 0], out[:, 1], a, seed_cw[i])
    # the leaf: both parties' hashed blocks (tweak 2) and the indicator of [x_low < alpha_low]
    leaf = w.lose  # contiguous buffers, free after the last level
    np.copyto(leaf, S)
    np.bitwise_and(leaf[..., 0], _CLEAR2, out=leaf[..., 0])
    np.bitwise_or(leaf[..., 0], U64(2), out=leaf[..., 0])
    hashed = hash0.hash_into(leaf, w.d)
    np.bitwise_and(alpha, _low_mask(bits), out=a)
    _indicator(a, leaf_cw)
    np.bitwise_xor(leaf_cw, hashed[0], out=leaf_cw)
    np.bitwise_xor(leaf_cw, hashed[1], out=leaf_cw)


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
    x = eval_input(party, key, x, "comparison key")
    hash0 = _hashes(1)[0]
    result = np.empty(key.n_elements, U64)
    for w, c0, c1 in chunks(key.n_elements, _EVAL_CHUNK, _EvalWork):
        _eval_chunk(w, hash0, key, c0, c1, x[c0:c1], result[c0:c1])
    return result.astype(np.uint8)


def _eval_chunk(w: _EvalWork, hash0: FixedKeyAes, key: BitDcfKey, c0: int, c1: int, x, result) -> None:
    S, inp, out, xi, tmask, u, v, corr = w.S, w.inp, w.out, w.xi, w.tmask, w.u, w.v, w.corr
    np.copyto(S, key.seed[c0:c1])
    result.fill(0)
    for i in range(tree_levels(key.bits)):
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
        # where x goes left, the right child's corrected control bit (t_CW^R in bit 1) joins the share
        np.right_shift(corr[:, 0], _ONE, out=u)
        np.bitwise_xor(u, out[1, :, 0], out=v)
        np.bitwise_and(v, _ONE, out=v)
        np.bitwise_xor(xi, _ONE, out=u)
        np.bitwise_and(v, u, out=v)
        np.bitwise_xor(result, v, out=result)
        path_child(out[0], corr, xi, S, u)
    # the leaf: this party's hashed block, corrected where its control bit is set; its bit at x_low
    np.bitwise_and(S[:, 0], _ONE, out=tmask)
    np.negative(tmask, out=tmask)
    _widen(tmask, w.tmask2)
    leaf = inp[0]
    np.copyto(leaf, S)
    np.bitwise_and(leaf[:, 0], _CLEAR2, out=leaf[:, 0])
    np.bitwise_or(leaf[:, 0], U64(2), out=leaf[:, 0])
    hashed = hash0.hash_into(leaf, out[0])
    np.bitwise_and(key.leaf_cw[c0:c1], w.tmask2, out=corr)
    np.bitwise_xor(hashed, corr, out=hashed)
    np.bitwise_and(x, _low_mask(key.bits), out=u)
    np.bitwise_xor(result, _leaf_bits(hashed, u), out=result)
