"""The fss backend's DCF (BCG+21) and one-round ReLU: exact, serialisable, and alpha-hiding."""

from __future__ import annotations

import numpy as np
import pytest

from tests.helpers.masks import ChosenMasks
from twinfer.protocols.backends.fss.dcf import DcfKey, dcf_eval, dcf_keygen, key_bytes_per_element
from twinfer.protocols.backends.fss.prg import AesCtrPrg
from twinfer.protocols.backends.fss.relu import (
    ReluKey,
    drelu_eval,
    drelu_keys,
    key_bytes_per_relu,
    masked_share,
    relu_eval,
    relu_keys,
)

U64 = np.uint64
I64_MIN, I64_MAX = -(1 << 63), (1 << 63) - 1


def _prg(tag: int) -> AesCtrPrg:
    # fixed seeds: the tests are reproducible (production seeds come from os.urandom)
    return AesCtrPrg(bytes([tag]) * 16)


def _reconstruct(alpha, beta, x, bits, rng) -> tuple[np.ndarray, np.ndarray]:
    k0, k1 = dcf_keygen(alpha, beta, bits, rng)
    got = dcf_eval(0, k0, x) + dcf_eval(1, k1, x)
    want = np.where((np.asarray(x, U64) < np.asarray(alpha, U64))[:, None], np.broadcast_to(beta, got.shape), U64(0))
    return got, want


@pytest.mark.parametrize("k", [2, 1, 3])
def test_dcf_exhaustive_at_8_bits(k: int) -> None:
    values = np.arange(256, dtype=U64)
    alpha, x = np.repeat(values, 256), np.tile(values, 256)  # every (alpha, x)
    beta = _prg(1).uint64((alpha.size, k))
    got, want = _reconstruct(alpha, beta, x, 8, _prg(2))
    assert np.array_equal(got, want)


@pytest.mark.parametrize("bits", [1, 2, 5])
def test_dcf_exhaustive_at_tiny_widths(bits: int) -> None:
    values = np.arange(1 << bits, dtype=U64)
    alpha, x = np.repeat(values, values.size), np.tile(values, values.size)
    got, want = _reconstruct(alpha, np.array([7, (1 << 64) - 1], U64), x, bits, _prg(3))
    assert np.array_equal(got, want)


def _boundaries_64() -> np.ndarray:
    b = [0, 1, 2, (1 << 62) - 1, 1 << 62, (1 << 62) + 1, (1 << 63) - 2, (1 << 63) - 1, 1 << 63, (1 << 63) + 1]
    b += [(1 << 64) - (1 << 62) - 1, (1 << 64) - (1 << 62), (1 << 64) - (1 << 62) + 1, (1 << 64) - 2, (1 << 64) - 1]
    return np.array(b, U64)


def test_dcf_64_bits_boundaries_neighbours_and_random() -> None:
    rng = _prg(4)
    b = _boundaries_64()
    rand_alpha = rng.uint64(2000)
    alphas = np.concatenate([b, rand_alpha])
    # every boundary pair; x = alpha - 1, alpha, alpha + 1 (wrapping); x differing from alpha in one bit
    pairs_a = [np.repeat(b, b.size)]
    pairs_x = [np.tile(b, b.size)]
    for d in (-1, 0, 1):
        pairs_a.append(alphas)
        pairs_x.append(alphas + U64(d % (1 << 64)))
    for j in range(64):
        pairs_a.append(alphas[:64])
        pairs_x.append(alphas[:64] ^ U64(1 << j))
    pairs_a.append(rng.uint64(20000))
    pairs_x.append(rng.uint64(20000))
    alpha, x = np.concatenate(pairs_a), np.concatenate(pairs_x)
    beta = rng.uint64((alpha.size, 2))
    got, want = _reconstruct(alpha, beta, x, 64, rng)
    assert np.array_equal(got, want)
    assert (x < alpha).any() and (x >= alpha).any()


def test_dcf_multiword_payload_and_broadcast_beta_at_64_bits() -> None:
    rng = _prg(5)
    alpha, x = rng.uint64(3000), rng.uint64(3000)
    x[:1000] = alpha[:1000]
    got, want = _reconstruct(alpha, rng.uint64((3000, 5)), x, 64, rng)
    assert np.array_equal(got, want)
    got, want = _reconstruct(alpha, np.array([1, (1 << 64) - 1, 3], U64), x, 64, rng)  # (k,) for all
    assert np.array_equal(got, want)


def test_dcf_refuses_bad_arguments() -> None:
    k0, k1 = dcf_keygen(np.array([3, 4], U64), np.ones((2, 2), U64), 8, _prg(6))
    with pytest.raises(ValueError, match="party 1 was given party 0"):
        dcf_eval(1, k0, np.array([1, 2], U64))
    with pytest.raises(ValueError, match=r"\[0, 2\^8\)"):
        dcf_eval(0, k0, np.array([1, 256], U64))
    with pytest.raises(ValueError, match="holds 2 elements"):
        dcf_eval(0, k0, np.array([1], U64))
    with pytest.raises(ValueError, match=r"\[0, 2\^8\)"):
        dcf_keygen(np.array([256], U64), np.ones((1, 1), U64), 8)
    with pytest.raises(ValueError, match="bit width"):
        dcf_keygen(np.array([1], U64), np.ones((1, 1), U64), 65)


def test_dcf_key_round_trip_and_refusals() -> None:
    rng = _prg(7)
    alpha, x = rng.uint64(300), rng.uint64(300)
    k0, k1 = dcf_keygen(alpha, rng.uint64((300, 2)), 64, rng)
    blob = k0.to_bytes()
    assert len(blob) == k0.nbytes == 24 + 300 * key_bytes_per_element(64, 2)
    back = DcfKey.from_bytes(blob)
    assert back.party == 0 and back.bits == 64 and back.payload_words == 2
    for name in ("seed", "seed_cw", "value_cw", "final_cw"):
        assert np.array_equal(getattr(back, name), getattr(k0, name))
    assert np.array_equal(dcf_eval(0, back, x), dcf_eval(0, k0, x))
    assert np.array_equal(dcf_eval(1, DcfKey.from_bytes(bytearray(k1.to_bytes())), x), dcf_eval(1, k1, x))

    with pytest.raises(ValueError, match=r"truncated.*cut in final_cw"):
        DcfKey.from_bytes(blob[:-1])
    with pytest.raises(ValueError, match=r"truncated.*cut in seed_cw"):
        DcfKey.from_bytes(blob[: 24 + 300 * 16 + 5])
    with pytest.raises(ValueError, match="shorter than its 24-byte header"):
        DcfKey.from_bytes(blob[:10])
    with pytest.raises(ValueError, match="too long"):
        DcfKey.from_bytes(blob + b"\0")
    with pytest.raises(ValueError, match="not a DCF key blob"):
        DcfKey.from_bytes(b"X" + blob[1:])
    with pytest.raises(ValueError, match="version 9"):
        DcfKey.from_bytes(blob[:8] + bytes([9, 0]) + blob[10:])
    with pytest.raises(ValueError, match="header garbled"):
        DcfKey.from_bytes(blob[:10] + bytes([5]) + blob[11:])  # party 5
    with pytest.raises(ValueError, match="expected"):
        DcfKey.from_bytes(blob[:16] + (10**12).to_bytes(8, "little") + blob[24:])  # a huge N


# -- one party's key alone says nothing about alpha ---------------------------------------------------

_Z_LIMIT = 5.5  # max |z| over ~2,300 bit positions of same-distribution keys stays near 4 (p ~ 1e-4 above 5.5)


def _bit_matrix(key: DcfKey) -> np.ndarray:
    """One row per element: every bit of that element's key, in the blob's order."""
    parts = [key.seed.reshape(key.n_elements, -1), key.seed_cw.transpose(1, 0, 2).reshape(key.n_elements, -1),
             key.value_cw.transpose(1, 0, 2).reshape(key.n_elements, -1), key.final_cw]
    words = np.ascontiguousarray(np.concatenate(parts, axis=1))
    return np.unpackbits(words.view(np.uint8), axis=1)


def _max_z(a: np.ndarray, b: np.ndarray) -> float:
    """Largest two-proportion z statistic between the bit frequencies of two sets of keys."""
    pa, pb = a.mean(axis=0), b.mean(axis=0)
    p = (pa + pb) / 2
    var = p * (1 - p) * (1 / a.shape[0] + 1 / b.shape[0])
    live = var > 0  # the party's own control bit is a constant
    return float(np.max(np.abs(pa - pb)[live] / np.sqrt(var[live])))


def _keys_at(alpha: int, n: int, bits: int, rng: AesCtrPrg) -> tuple[DcfKey, DcfKey]:
    return dcf_keygen(np.full(n, alpha, U64), np.full((n, 2), 5, U64), bits, rng)


@pytest.mark.parametrize("party", [0, 1])
def test_one_key_is_independent_of_alpha(party: int) -> None:
    bits, n = 8, 4000
    lo = _keys_at(0, n, bits, _prg(8))[party]
    hi = _keys_at((1 << bits) - 1, n, bits, _prg(9))[party]
    assert _max_z(_bit_matrix(lo), _bit_matrix(hi)) < _Z_LIMIT


def test_the_independence_statistic_catches_a_leaky_generator() -> None:
    """The statistic has power: keys whose control-bit corrections skip the seeds' masking
    (t_CW^L = alpha_i xor 1, t_CW^R = alpha_i) or whose root seed carries alpha are caught."""
    bits, n = 8, 4000

    def leaky(alpha: int, rng: AesCtrPrg, how: str) -> DcfKey:
        k0 = _keys_at(alpha, n, bits, rng)[0]
        seed_cw, seed = k0.seed_cw.copy(), k0.seed.copy()
        if how == "control bits":
            a = np.array([(alpha >> (bits - 1 - i)) & 1 for i in range(bits)], U64)[:, None]
            seed_cw[:, :, 0] = (seed_cw[:, :, 0] & U64(~3 % (1 << 64))) | (a ^ U64(1)) | (a << U64(1))
        else:
            field = U64(((1 << bits) - 1) << 40)
            seed[:, 1] = (seed[:, 1] & ~field) | (U64(alpha) << U64(40))  # alpha written into the seed
        return DcfKey(0, bits, seed, seed_cw, k0.value_cw, k0.final_cw)

    for how in ("control bits", "seed"):
        z = _max_z(_bit_matrix(leaky(0, _prg(10), how)), _bit_matrix(leaky((1 << bits) - 1, _prg(11), how)))
        assert z > 10 * _Z_LIMIT, how


# -- ReLU and DReLU in one round ----------------------------------------------------------------------


def _specials_64() -> np.ndarray:
    s = [0, -1, 1, -2, 2, 1 << 62, -(1 << 62), (1 << 62) + 1, (1 << 62) - 1, -(1 << 62) + 1, -(1 << 62) - 1,
         I64_MAX, I64_MIN, I64_MAX - 1, I64_MIN + 1, 1 << 31, -(1 << 31)]
    return np.array(s, np.int64)


def _run(x: np.ndarray, bits: int, rng: AesCtrPrg, kind: str = "relu") -> np.ndarray:
    """Share x, open x + r, evaluate both parties' keys; the reconstructed int64 result."""
    k0, k1 = (relu_keys if kind == "relu" else drelu_keys)(x.size, bits, rng)
    x0 = rng.uint64(x.shape)
    x1 = x.view(U64) - x0
    x_hat = masked_share(k0, x0) + masked_share(k1, x1)  # the one round: both shares of x + r opened
    ev = relu_eval if kind == "relu" else drelu_eval
    return (ev(0, k0, x_hat) + ev(1, k1, x_hat)).view(np.int64)


def test_relu_exact_at_64_bits() -> None:
    rng = _prg(12)
    x = np.concatenate([rng.uint64(20000).view(np.int64), _specials_64(), (rng.uint64(2000) >> U64(40)).view(np.int64) - (1 << 23)])
    assert np.array_equal(_run(x, 64, rng), np.maximum(x, 0))
    assert np.array_equal(_run(x, 64, rng, "drelu"), (x >= 0).astype(np.int64))


@pytest.mark.parametrize("bits", [64, 16])
def test_relu_exact_for_masks_on_the_edges(bits: int) -> None:
    edge_r = [0, 1, (1 << (bits - 1)) - 1, 1 << (bits - 1), (1 << (bits - 1)) + 1, (1 << bits) - 1, (1 << 64) - 1, 1 << 63]
    lim = 1 << (bits - 1)
    xs = np.array([0, -1, 1, lim - 1, -lim, -lim + 1, lim // 2, -lim // 2], np.int64)
    x = np.tile(xs, len(edge_r))
    r = np.repeat(np.array(edge_r, U64), xs.size)
    assert np.array_equal(_run(x, bits, ChosenMasks(r)), np.maximum(x, 0))


@pytest.mark.parametrize("bits", [16, 2])
def test_relu_exact_within_a_small_width(bits: int) -> None:
    lim = 1 << (bits - 1)
    x = np.arange(-lim, lim, dtype=np.int64)  # every value the width admits
    rng = _prg(13)
    assert np.array_equal(_run(x, bits, rng), np.maximum(x, 0))
    assert np.array_equal(_run(x, bits, rng, "drelu"), (x >= 0).astype(np.int64))


def test_relu_at_31_bits_and_outside_the_width_as_documented() -> None:
    rng = _prg(14)
    lim = 1 << 30
    x = np.concatenate([(rng.uint64(5000) >> U64(33)).view(np.int64) - lim, [lim - 1, -lim, 0, -1]]).astype(np.int64)
    assert np.array_equal(_run(x, 31, rng), np.maximum(x, 0))
    # outside [-2^(n-1), 2^(n-1)) the sign is that of the low n bits: 2^30 reads as negative,
    # -2^30 - 1 as positive (nothing detects it: the documented risk of a smaller width)
    out = _run(np.array([lim, -lim - 1], np.int64), 31, rng)
    assert out.tolist() == [0, -lim - 1]


def test_relu_key_sizes_round_trip_and_refusals() -> None:
    rng = _prg(15)
    assert key_bytes_per_relu(63) == 2040 <= 2100  # the ceiling at n = 63
    assert key_bytes_per_relu(31) == 1016
    x = rng.uint64(500).view(np.int64)
    k0, k1 = relu_keys(500, 64, rng)
    assert k0.nbytes == len(k0.to_bytes()) and k0.nbytes < 500 * (key_bytes_per_relu(64) + 1)
    b0, b1 = ReluKey.from_bytes(k0.to_bytes()), ReluKey.from_bytes(memoryview(k1.to_bytes()))
    assert (b0.party, b0.bits, b0.kind, b1.party) == (0, 64, "relu", 1)
    x0 = rng.uint64(500)
    x_hat = masked_share(k0, x0) + masked_share(k1, x.view(U64) - x0)
    assert np.array_equal((relu_eval(0, b0, x_hat) + relu_eval(1, b1, x_hat)).view(np.int64), np.maximum(x, 0))
    d0, _ = drelu_keys(7, 20, rng)
    assert ReluKey.from_bytes(d0.to_bytes()).kind == "drelu"

    blob = k0.to_bytes()
    with pytest.raises(ValueError, match="truncated"):
        ReluKey.from_bytes(blob[:-3])
    with pytest.raises(ValueError, match="truncated in msb_r"):
        ReluKey.from_bytes(blob[: 24 + 8 * 500 + 100])
    with pytest.raises(ValueError, match="not a ReLU key blob"):
        ReluKey.from_bytes(bytes(len(blob)))
    with pytest.raises(ValueError, match="its DCF key is bad"):
        ReluKey.from_bytes(blob + b"junk")
    with pytest.raises(ValueError, match="party 1 was given party 0"):
        relu_eval(1, k0, x_hat)
    with pytest.raises(ValueError, match="needs a ReLU key"):
        relu_eval(0, d0, np.zeros(7, U64))
    with pytest.raises(ValueError, match="bit width"):
        relu_keys(3, 1)


def test_relu_keeps_the_shape_of_its_input() -> None:
    rng = _prg(16)
    x = (rng.uint64((3, 4, 5)) >> U64(2)).view(np.int64) - (1 << 61)
    k0, k1 = relu_keys(x.size, 64, rng)
    x_hat = masked_share(k0, np.zeros(x.shape, U64)) + masked_share(k1, x.view(U64))
    y = relu_eval(0, k0, x_hat) + relu_eval(1, k1, x_hat)
    assert y.shape == (3, 4, 5) and np.array_equal(y.view(np.int64), np.maximum(x, 0))
