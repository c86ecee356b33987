"""Distributed comparison function f(x) = beta if x < alpha else 0, vectorised (BCG+21, section 3).

Boyle, Chandran, Gilboa, Gupta, Ishai, Kumar, Rathee, "Function Secret Sharing for Mixed-Mode
and Fixed-Point Secure Computation", Eurocrypt 2021 ("BCG+21"), the DCF construction; x and
alpha in [0, 2^n), beta a vector of k elements of Z_2^64.

1. Gen: party b's root block is a random seed whose low bit, its control bit t_b, is b. At each
   level i the dealer expands both parties' seeds with H(s, j) (j = 0, 1: left and right child
   blocks, whose low bits are the children's control bits; j = 2, 3: left and right value
   words), keeps the side alpha's bit i takes and publishes one seed correction word s_CW, the
   xor of the two parties' seeds on the side it loses, with the two control-bit corrections
   t_CW^L = t_0^L xor t_1^L xor alpha_i xor 1 and t_CW^R = t_0^R xor t_1^R xor alpha_i in its
   two low bits; and one value correction word V_CW = (-1)^t_1 (v_1^lose - v_0^lose - V_alpha
   + alpha_i beta), so that the two shares leaving the path there sum to beta when x goes left
   where alpha goes right (x < alpha) and to 0 otherwise. V_alpha tracks the sum along the path;
   the final word cancels it at the leaf (f(alpha) = 0), with the leaf's value words H(s, 2).
2. Eval: party b walks x's bits from the top: expands its seed (the path's child block and the
   path's value block: two blocks per level), xors the seed correction into the child when its
   control bit is set and adds V_CW then, adds the value words; at the leaf adds H(s, 2) and
   the final word (times its control bit); party 1 negates its sum.
3. The two outputs are additive shares mod 2^64 of f(x). Each key alone is pseudo-random
   whatever alpha: the other party's seeds mask every correction word.

Vectorised over elements: one level is one fixed-key AES call over all of a chunk's blocks and
a few numpy operations; the loop runs over levels and over cache-sized chunks only. Payloads of
more than two words take their further value blocks from further fixed keys. The fixed AES
keys are public constants; the seeds and masks come from the caller's AES-CTR PRG.
"""

from __future__ import annotations

import hashlib
import struct
import sys
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike

from .prg import AesCtrPrg, FixedKeyAes

if sys.byteorder != "little":  # blocks are uint64 pairs viewed as AES bytes: the host order matters
    raise ImportError("the fss DCF supports little-endian hosts only")

MAX_BITS = 64
U64 = np.uint64
_ONE = U64(1)
_CLEAR2 = U64(0xFFFF_FFFF_FFFF_FFFC)  # clears a block's two low bits (control bit and tweak room)
# elements per pass, so that a chunk's working buffers stay in cache (measured best on this machine)
_GEN_CHUNK = 1 << 13
_EVAL_CHUNK = 1 << 15

MAGIC = b"TWFSDCF\x00"
VERSION = 1
# magic, version, party, bits, payload words, (padding), elements
_HEADER = struct.Struct("<8sHBBH2xQ")
HEADER_BYTES = _HEADER.size


def _fixed_key(index: int) -> bytes:
    """The public fixed AES key for value block `index` (0 also expands the seeds)."""
    return hashlib.sha256(b"twinfer fss dcf fixed key %d" % index).digest()[:16]


def _hashes(k: int) -> list[FixedKeyAes]:
    return [FixedKeyAes(_fixed_key(m)) for m in range((k + 1) // 2)]


@dataclass(frozen=True, eq=False)
class DcfKey:
    """One party's DCF keys for N elements of n bits and a payload of k words.

    seed: (N, 2) uint64, the root block (control bit = party in its low bit); seed_cw: (n, N, 2)
    the seed correction words, control-bit corrections t_CW^L, t_CW^R in bits 0 and 1; value_cw:
    (n, N, k); final_cw: (N, k). The correction words are the same in both parties' keys.
    Arrays may be read-only views of a blob (`from_bytes`).
    """

    party: int
    bits: int
    seed: np.ndarray
    seed_cw: np.ndarray
    value_cw: np.ndarray
    final_cw: np.ndarray

    def __post_init__(self) -> None:
        if self.party not in (0, 1):
            raise ValueError(f"DCF key party must be 0 or 1, got {self.party}")
        if not 1 <= self.bits <= MAX_BITS:
            raise ValueError(f"DCF bit width must be in 1..{MAX_BITS}, got {self.bits}")
        n, N, k = self.bits, self.seed.shape[0] if self.seed.ndim == 2 else -1, self.final_cw.shape[-1]
        expected = {"seed": (N, 2), "seed_cw": (n, N, 2), "value_cw": (n, N, k), "final_cw": (N, k)}
        for name, shape in expected.items():
            a = getattr(self, name)
            if a.dtype != U64 or a.shape != shape:
                raise ValueError(f"DCF key {name} must be uint64 of shape {shape}, got {a.dtype} {a.shape}")
        if k < 1:
            raise ValueError("DCF payload must have at least one word")

    @property
    def n_elements(self) -> int:
        return self.seed.shape[0]

    @property
    def payload_words(self) -> int:
        return self.final_cw.shape[1]

    @property
    def nbytes(self) -> int:
        """Size of `to_bytes()`."""
        return _HEADER.size + 8 * _body_words(self.n_elements, self.bits, self.payload_words)

    def to_bytes(self) -> bytes:
        """Header (magic, version, party, bits, k, N) then the four arrays, little-endian uint64."""
        return b"".join(self.blob_parts())

    def blob_parts(self) -> list[bytes | memoryview]:
        """The pieces of `to_bytes()` without copying the arrays (for a writer that sends pieces)."""
        head = _HEADER.pack(MAGIC, VERSION, self.party, self.bits, self.payload_words, self.n_elements)
        return [head, *word_views((self.seed, self.seed_cw, self.value_cw, self.final_cw))]

    @classmethod
    def from_bytes(cls, blob: bytes | bytearray | memoryview) -> "DcfKey":
        """The key `to_bytes` wrote; a blob cut short, too long or garbled raises ValueError."""
        blob = memoryview(blob).cast("B")
        party, bits, k, N = read_header(blob, _HEADER, MAGIC, VERSION, "DCF key")
        if party not in (0, 1) or not 1 <= bits <= MAX_BITS or k < 1:
            raise ValueError(f"DCF key blob header garbled: party {party}, bits {bits}, payload words {k}")
        sections = (("seed", (N, 2)), ("seed_cw", (bits, N, 2)), ("value_cw", (bits, N, k)), ("final_cw", (N, k)))
        want = _HEADER.size + 8 * _body_words(N, bits, k)
        if len(blob) != want:
            where, off = "after its last array", _HEADER.size
            for name, shape in sections:
                off += 8 * int(np.prod(shape))
                if len(blob) < off:
                    where = f"in {name}"
                    break
            kind = "truncated" if len(blob) < want else "too long"
            raise ValueError(f"DCF key blob {kind}: {len(blob)} bytes, expected {want} for {N} elements of {bits} bits and {k} payload words (cut {where})")
        arrays, off = {}, _HEADER.size
        for name, shape in sections:
            count = int(np.prod(shape))
            arrays[name] = np.frombuffer(blob, "<u8", count, off).astype(U64, copy=False).reshape(shape)
            off += 8 * count
        return cls(party, bits, **arrays)


class KeyOfDcf:
    """What a key built on a DCF (ReLU, truncation) shares: its element count and its blob."""

    dcf: DcfKey

    @property
    def n_elements(self) -> int:
        return self.dcf.n_elements

    def blob_parts(self) -> list[bytes | memoryview]:
        raise NotImplementedError

    def check_comparison(self, what: str) -> None:
        """A ReLU key of width `bits` holds its own party's `what` on bits - 1 bits; else ValueError."""
        if self.party not in (0, 1) or self.dcf.party != self.party:
            raise ValueError(f"ReLU key of party {self.party} holds a {what} of party {self.dcf.party}")
        if not 2 <= self.bits <= 64 or self.dcf.bits != self.bits - 1:
            raise ValueError(f"ReLU key of width {self.bits} needs a {what} on {self.bits - 1} bits, got {self.dcf.bits}")

    def to_bytes(self) -> bytes:
        """The header, the share arrays, then the DCF key blob (`blob_parts`, joined)."""
        return b"".join(self.blob_parts())


def over_chunks(keys: list[KeyOfDcf], values: np.ndarray, fn) -> np.ndarray:
    """fn(key, its chunk of `values`) over consecutive chunks of the keys' sizes, concatenated (a
    layer's keys come in chunks; each evaluates its own)."""
    out, start = [], 0
    for key in keys:
        out.append(fn(key, values[start : start + key.n_elements]))
        start += key.n_elements
    return np.concatenate(out)


def word_views(arrays: tuple[np.ndarray, ...]) -> list[memoryview]:
    """The arrays' bytes as little-endian uint64, without a copy where they already are: joined
    into a blob, they are copied once."""
    return [memoryview(np.ascontiguousarray(a, "<u8").reshape(-1)).cast("B") for a in arrays]


def read_header(blob: memoryview, header: struct.Struct, magic: bytes, version: int, what: str) -> tuple:
    """A key blob's header fields after its magic and version, which must be this code's."""
    if len(blob) < header.size:
        raise ValueError(f"{what} blob truncated: {len(blob)} bytes, shorter than its {header.size}-byte header")
    found, found_version, *fields = header.unpack_from(blob)
    if found != magic:
        raise ValueError(f"not a {what} blob: magic {found!r}, expected {magic!r}")
    if found_version != version:
        raise ValueError(f"{what} blob version {found_version} is not supported (this code reads {version})")
    return tuple(fields)


def _body_words(N: int, bits: int, k: int) -> int:
    return N * (2 + bits * (2 + k) + k)


def key_bytes_per_element(bits: int, k: int) -> int:
    """One party's key bytes per element (the header aside): seed, n (s_CW, V_CW), final word."""
    return 8 * (2 + bits * (2 + k) + k)


def _as_u64(a: ArrayLike, what: str) -> np.ndarray:
    """Ring elements as uint64: uint64 as is, int64 reinterpreted (two's complement), Python
    ints (of either sign, up to 2^64) reduced mod 2^64; anything else is refused."""
    if not isinstance(a, np.ndarray):
        obj = np.asarray(a, dtype=object)
        if obj.size and all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in obj.flat):
            if all(-(1 << 63) <= int(v) < 1 << 64 for v in obj.flat):
                return np.array([int(v) % (1 << 64) for v in obj.flat], U64).reshape(obj.shape)
            raise ValueError(f"{what} holds integers outside [-2^63, 2^64)")
    a = np.asarray(a)
    if a.dtype == np.int64:
        return a.view(U64)
    if a.dtype != U64:
        if a.dtype.kind not in "iu":
            raise ValueError(f"{what} must be integers (uint64 or int64), got {a.dtype}")
        if a.size and a.min() < 0:
            raise ValueError(f"{what} must be uint64 or int64; got negative {a.dtype} values")
        a = a.astype(U64)
    return a


def _check_range(a: np.ndarray, bits: int, what: str) -> None:
    if bits < MAX_BITS and a.size and int(a.max()) >> bits:
        raise ValueError(f"{what} must lie in [0, 2^{bits}); got {int(a.max())}")


def _shift(bits: int, level: int) -> np.uint64:
    return U64(bits - 1 - level)


def chunks(N: int, size: int, make_work):
    """(buffers, start, end) for each chunk of at most `size` of N elements; the buffers (from
    make_work(chunk size)) are made once per chunk size and reused."""
    work: dict[int, object] = {}
    for c0 in range(0, N, size):
        c1 = min(N, c0 + size)
        yield work.get(c1 - c0) or work.setdefault(c1 - c0, make_work(c1 - c0)), c0, c1


def eval_input(party: int, key, x: ArrayLike, what: str) -> np.ndarray:
    """x as (N,) uint64 in [0, 2^n) for `key` (N elements of n bits), held by `party`; else ValueError."""
    if party != key.party:
        raise ValueError(f"party {party} was given party {key.party}'s {what}")
    x = _as_u64(x, "x").reshape(-1)
    if x.size != key.n_elements:
        raise ValueError(f"{what} holds {key.n_elements} elements, x has {x.size}")
    _check_range(x, key.bits, "x")
    return x


def seed_level(w, sl: np.ndarray, sr: np.ndarray, a: np.ndarray, cw: np.ndarray) -> None:
    """One level of the tree a DCF and a one-bit comparison share, for both parties at once:
    from the children sl, sr (2, C, 2) and alpha's bits a (C,), the correction word cw (C, 2)
    (the xor of the parties' blocks on the side alpha loses, the control-bit corrections
    t_CW^L = t0L ^ t1L ^ a ^ 1 and t_CW^R = t0R ^ t1R ^ a in its two low bits), and the next
    blocks w.S: alpha's side, corrected where the party's control bit (w.tmask2, all ones where
    set) is. w.keep, w.lose hold the two sides after it; w.amask2 must hold a's all-ones mask."""
    u, low, tx = w.u, w.low, w.tx
    np.bitwise_xor(sl, sr, out=w.d)
    np.bitwise_and(w.d, w.amask2[None], out=w.keep)
    np.bitwise_xor(w.keep, sl, out=w.keep)
    np.bitwise_xor(w.keep, w.d, out=w.lose)
    np.bitwise_xor(w.lose[0], w.lose[1], out=cw)
    np.bitwise_xor(sl[0, :, 0], sl[1, :, 0], out=tx[0])
    np.bitwise_xor(sr[0, :, 0], sr[1, :, 0], out=tx[1])
    np.bitwise_and(tx, _ONE, out=tx)
    np.left_shift(tx[1], _ONE, out=u)
    np.bitwise_or(tx[0], u, out=low)
    np.add(a, _ONE, out=u)
    np.bitwise_xor(low, u, out=low)
    cw_lo = cw[:, 0]
    np.bitwise_and(cw_lo, _CLEAR2, out=cw_lo)
    np.bitwise_or(cw_lo, low, out=cw_lo)
    np.right_shift(cw_lo, a, out=u)
    np.bitwise_and(u, _ONE, out=u)
    np.bitwise_and(cw_lo, _CLEAR2, out=w.corr[:, 0])
    np.bitwise_or(w.corr[:, 0], u, out=w.corr[:, 0])
    w.corr[:, 1] = cw[:, 1]
    np.bitwise_and(w.corr[None], w.tmask2, out=w.S)
    np.bitwise_xor(w.S, w.keep, out=w.S)


def path_child(child: np.ndarray, corr: np.ndarray, xi: np.ndarray, S: np.ndarray, u: np.ndarray) -> None:
    """S = the evaluator's next block: the path's child xor its correction corr (t s_CW), whose
    control bit took t t_CW^L; corrected to t t_CW^R where x_i = 1 (bit 1 of a block is never
    read: each expansion clears it)."""
    np.bitwise_xor(child, corr, out=S)
    lo = corr[:, 0]
    np.right_shift(lo, _ONE, out=u)
    np.bitwise_xor(u, lo, out=u)
    np.bitwise_and(u, xi, out=u)
    np.bitwise_xor(S[:, 0], u, out=S[:, 0])


def _value_words(hashes: list[FixedKeyAes], blocks_in: np.ndarray, first: np.ndarray, k: int) -> np.ndarray:
    """The k value words of blocks whose first hashed block (key 0) is `first`: (..., C, k)."""
    if len(hashes) == 1:
        return first[..., :k]
    src = np.ascontiguousarray(blocks_in)
    more = [first] + [h.hash_into(src, np.empty_like(src)) for h in hashes[1:]]
    return np.concatenate(more, axis=-1)[..., :k]


def _widen(src: np.ndarray, dst: np.ndarray) -> None:
    """dst[..., j] = src for every j: one long strided copy per word."""
    for j in range(dst.shape[-1]):
        np.copyto(dst[..., j], src)


def dcf_keygen(alpha: ArrayLike, beta: ArrayLike, bits: int, rng: AesCtrPrg | None = None) -> tuple[DcfKey, DcfKey]:
    """Keys of f_i(x) = beta_i if x < alpha_i else 0 for N elements at once.

    alpha: (N,) in [0, 2^bits); beta: (N, k) or (k,) ring elements (uint64 or int64); rng: the
    dealer's AES-CTR PRG (a fresh OS seed if None).
    """
    if not 1 <= bits <= MAX_BITS:
        raise ValueError(f"DCF bit width must be in 1..{MAX_BITS}, got {bits}")
    alpha = _as_u64(alpha, "alpha").reshape(-1)
    _check_range(alpha, bits, "alpha")
    N = alpha.size
    beta = _as_u64(beta, "beta")
    if beta.ndim == 1:
        beta = np.broadcast_to(beta, (N, beta.size))
    if beta.ndim != 2 or beta.shape[0] != N or beta.shape[1] < 1:
        raise ValueError(f"beta must have shape (N, k) or (k,) with N = {N}, got {beta.shape}")
    k = beta.shape[1]
    rng = AesCtrPrg() if rng is None else rng

    roots = rng.blocks((2, N))
    roots[:, :, 0] &= ~_ONE
    roots[1, :, 0] |= _ONE  # t_0 = 0, t_1 = 1
    seed_cw = np.empty((bits, N, 2), U64)
    value_cw = np.empty((bits, N, k), U64)
    final_cw = np.empty((N, k), U64)
    hashes = _hashes(k)
    for w, c0, c1 in chunks(N, _GEN_CHUNK, lambda C: _GenWork(C, k)):
        _gen_chunk(w, hashes, bits, alpha[c0:c1], beta[c0:c1], roots[:, c0:c1], seed_cw[:, c0:c1], value_cw[:, c0:c1], final_cw[c0:c1])
    return (DcfKey(0, bits, roots[0], seed_cw, value_cw, final_cw), DcfKey(1, bits, roots[1], seed_cw, value_cw, final_cw))


class SeedWork:
    """Buffers of one generation chunk of C elements (both parties) that `seed_level` works in."""

    def __init__(self, C: int, tweaks: int) -> None:
        self.S = np.empty((2, C, 2), U64)  # both parties' current blocks
        self.inp = np.empty((2, tweaks, C, 2), U64)  # party, tweak j, element, block
        self.out = np.empty((2, tweaks, C, 2), U64)
        self.d = np.empty((2, C, 2), U64)
        self.keep = np.empty((2, C, 2), U64)
        self.lose = np.empty((2, C, 2), U64)
        self.a = np.empty(C, U64)
        self.amask = np.empty(C, U64)
        self.low = np.empty(C, U64)
        self.u = np.empty(C, U64)
        self.tx = np.empty((2, C), U64)
        self.corr = np.empty((C, 2), U64)
        self.tmask = np.empty((2, C), U64)
        # per-element masks widened to the words of a block: numpy is slow when a broadcast runs
        # along a short last axis, fast along a long one
        self.amask2 = np.empty((C, 2), U64)
        self.tmask2 = np.empty((2, C, 2), U64)


class _GenWork(SeedWork):
    """Preallocated buffers of one DCF generation chunk: the seeds' and the value words'."""

    def __init__(self, C: int, k: int) -> None:
        super().__init__(C, 4)
        self.dv = np.empty((2, C, k), U64)  # party 1's value words less party 0's, per side
        self.x = np.empty((C, k), U64)
        self.y = np.empty((C, k), U64)
        self.ab = np.empty((C, k), U64)
        self.valpha = np.empty((C, k), U64)
        self.sign1 = np.empty(C, U64)
        self.amaskk = self.amask2 if k == 2 else np.empty((C, k), U64)
        self.sign1k = np.empty((C, k), U64)
        self.tweak = np.arange(4, dtype=U64)[None, :, None]  # j, in the low word of the block


def _gen_chunk(w: _GenWork, hashes: list[FixedKeyAes], bits: int, alpha, beta, roots, seed_cw, value_cw, final_cw) -> None:
    S, inp, out, k = w.S, w.inp, w.out, beta.shape[1]
    a, amask, sign1, u, tmask = w.a, w.amask, w.sign1, w.u, w.tmask
    dv, x, y, ab, valpha = w.dv, w.x, w.y, w.ab, w.valpha
    amask2, amaskk, tmask2, sign1k = w.amask2, w.amaskk, w.tmask2, w.sign1k
    np.copyto(S, roots)
    valpha.fill(0)
    for i in range(bits):
        np.right_shift(alpha, _shift(bits, i), out=a)
        np.bitwise_and(a, _ONE, out=a)
        np.negative(a, out=amask)  # all ones where alpha goes right
        _widen(amask, amask2)
        if amaskk is not amask2:
            _widen(amask, amaskk)
        # control bits before this level: masks t_b, and (-1)^t_1 = 1 - 2 t_1
        np.bitwise_and(S[:, :, 0], _ONE, out=tmask)
        np.left_shift(tmask[1], _ONE, out=sign1)
        np.subtract(_ONE, sign1, out=sign1)
        _widen(sign1, sign1k)
        np.negative(tmask, out=tmask)
        _widen(tmask, tmask2)
        # expand: one AES call over both parties' four blocks, j in the cleared low bits
        # (S is rebuilt below from the children: clear its low bits in place)
        np.bitwise_and(S[:, :, 0], _CLEAR2, out=S[:, :, 0])
        np.copyto(inp, S[:, None])
        np.bitwise_or(inp[:, 1:, :, 0], w.tweak[:, 1:], out=inp[:, 1:, :, 0])
        hashes[0].hash_into(inp, out)
        seed_level(w, out[:, 0], out[:, 1], a, seed_cw[i])  # the correction word and the next blocks (w.S)
        # values: only party 1's less party 0's words matter, on the lose and keep sides
        vals = _value_words(hashes, inp[:, 2:4], out[:, 2:4], k)
        np.subtract(vals[1], vals[0], out=dv)
        np.bitwise_xor(dv[0], dv[1], out=x)
        np.bitwise_and(x, amaskk, out=y)
        np.bitwise_xor(y, dv[1], out=y)  # lose side: v1lose - v0lose
        np.bitwise_xor(x, y, out=x)  # keep side: v1keep - v0keep
        np.bitwise_and(beta, amaskk, out=ab)
        np.add(y, ab, out=y)
        vcw = value_cw[i]
        # V_CW = (-1)^t1 (v1lose - v0lose - V_alpha + a beta)
        np.subtract(y, valpha, out=vcw)
        np.multiply(vcw, sign1k, out=vcw)
        # V_alpha' = V_alpha - (v1keep - v0keep) + (-1)^t1 V_CW = (v1lose - v0lose + a beta) - (v1keep - v0keep)
        np.subtract(y, x, out=valpha)
    # leaf: value words H(s, 2) of both parties; the final word cancels the path's sum
    np.bitwise_and(S[1, :, 0], _ONE, out=u)
    np.left_shift(u, _ONE, out=sign1)
    np.subtract(_ONE, sign1, out=sign1)
    _widen(sign1, sign1k)
    leaf_in = w.lose
    np.copyto(leaf_in, S)
    np.bitwise_and(leaf_in[..., 0], _CLEAR2, out=leaf_in[..., 0])
    np.bitwise_or(leaf_in[..., 0], U64(2), out=leaf_in[..., 0])
    conv = _value_words(hashes, leaf_in, hashes[0].hash_into(leaf_in, w.d), k)
    np.subtract(conv[1], conv[0], out=final_cw)
    np.subtract(final_cw, valpha, out=final_cw)
    np.multiply(final_cw, sign1k, out=final_cw)


class _EvalWork:
    """Preallocated buffers of one evaluation chunk of C elements."""

    def __init__(self, C: int, k: int) -> None:
        self.S = np.empty((C, 2), U64)
        self.inp = np.empty((2, C, 2), U64)  # path child block, path value block
        self.out = np.empty((2, C, 2), U64)
        self.v = np.empty((C, k), U64)
        self.tmp = np.empty((C, k), U64)
        self.xi = np.empty(C, U64)
        self.tmask = np.empty(C, U64)
        self.tmask2 = np.empty((C, 2), U64)
        self.tmaskk = self.tmask2 if k == 2 else np.empty((C, k), U64)
        self.u = np.empty(C, U64)
        self.corr = np.empty((C, 2), U64)
        self.value_tweak = np.array([[0], [2]], U64)


def dcf_eval(party: int, key: DcfKey, x: ArrayLike) -> np.ndarray:
    """Party `party`'s additive shares mod 2^64 of f(x), shape (N, k) uint64; x: (N,) in [0, 2^n)."""
    x = eval_input(party, key, x, "DCF key")
    N, k = key.n_elements, key.payload_words
    hashes = _hashes(k)
    result = np.empty((N, k), U64)
    for w, c0, c1 in chunks(N, _EVAL_CHUNK, lambda C: _EvalWork(C, k)):
        _eval_chunk(w, hashes, key, c0, c1, x[c0:c1], result[c0:c1])
    if party == 1:
        np.negative(result, out=result)
    return result


def _eval_chunk(w: _EvalWork, hashes: list[FixedKeyAes], key: DcfKey, c0: int, c1: int, x, result) -> None:
    bits, k = key.bits, key.payload_words
    S, inp, out, v, tmp, xi, u, corr = w.S, w.inp, w.out, w.v, w.tmp, w.xi, w.u, w.corr
    tmask, tmask2, tmaskk = w.tmask, w.tmask2, w.tmaskk
    np.copyto(S, key.seed[c0:c1])
    v.fill(0)
    for i in range(bits):
        np.right_shift(x, _shift(bits, i), out=xi)
        np.bitwise_and(xi, _ONE, out=xi)
        np.bitwise_and(S[:, 0], _ONE, out=tmask)
        np.negative(tmask, out=tmask)
        _widen(tmask, tmask2)
        if tmaskk is not tmask2:
            _widen(tmask, tmaskk)
        # the path's child block (tweak x_i) and value block (tweak 2 + x_i): one AES call
        np.bitwise_and(S[:, 0], _CLEAR2, out=u)
        np.bitwise_xor(u, xi, out=u)
        np.bitwise_or(u[None, :], w.value_tweak, out=inp[:, :, 0])
        np.copyto(inp[:, :, 1], S[None, :, 1])
        hashes[0].hash_into(inp, out)
        np.bitwise_and(key.seed_cw[i, c0:c1], tmask2, out=corr)
        path_child(out[0], corr, xi, S, u)
        # value: v += H(s, 2 + x_i) + t V_CW
        vals = _value_words(hashes, inp[1], out[1], k)
        np.add(v, vals, out=v)
        np.bitwise_and(key.value_cw[i, c0:c1], tmaskk, out=tmp)
        np.add(v, tmp, out=v)
    # leaf: v += H(s, 2) + t CW_{n+1}
    np.bitwise_and(S[:, 0], _ONE, out=tmask)
    np.negative(tmask, out=tmask)
    _widen(tmask, tmaskk)
    leaf_in = inp[1]
    np.copyto(leaf_in, S)
    np.bitwise_and(leaf_in[:, 0], _CLEAR2, out=leaf_in[:, 0])
    np.bitwise_or(leaf_in[:, 0], U64(2), out=leaf_in[:, 0])
    vals = _value_words(hashes, leaf_in, hashes[0].hash_into(leaf_in, out[1]), k)
    np.add(v, vals, out=v)
    np.bitwise_and(key.final_cw[c0:c1], tmaskk, out=tmp)
    np.add(v, tmp, out=result)
