"""The fss backend's faithful truncation and fused truncated ReLU: never wrong where the local one is."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tests.helpers.masks import ChosenMasks
from twinfer.protocols.backends.base import DealerSeeds
from twinfer.protocols.backends.fss import ring
from twinfer.protocols.backends.fss.correlations import CORRELATIONS, TRUNC, TRUNC_RELU
from twinfer.protocols.backends.fss.dcf import key_bytes_per_element
from twinfer.protocols.backends.fss.prg import AesCtrPrg
from twinfer.protocols.backends.fss.truncation import (
    TruncKey,
    TruncReluKey,
    key_bytes_per_trunc,
    key_bytes_per_trunc_relu,
    trunc_eval,
    trunc_header_bytes,
    trunc_keys,
    trunc_masked_share,
    trunc_relu_eval,
    trunc_relu_header_bytes,
    trunc_relu_keys,
    trunc_relu_masked_share,
)
from twinfer.protocols.roles import CLIENT, SERVER

U64 = np.uint64


def _prg(tag: int) -> AesCtrPrg:
    # fixed seeds: the tests are reproducible (production seeds come from os.urandom)
    return AesCtrPrg(bytes([tag]) * 16)


def _values(rng: AesCtrPrg, size: int, bits: int) -> np.ndarray:
    """Uniform int64 values in [-2^(bits-1), 2^(bits-1))."""
    return (rng.uint64(size) >> U64(64 - bits)).view(np.int64) - np.int64(1 << (bits - 1)) if bits < 64 else rng.uint64(size).view(np.int64)


def _split(y: np.ndarray, rng: AesCtrPrg) -> tuple[np.ndarray, np.ndarray]:
    y0 = rng.uint64(y.shape)
    return y0, y.view(U64) - y0


def _trunc(k0: TruncKey, k1: TruncKey, y0: np.ndarray, y1: np.ndarray) -> np.ndarray:
    """Both messages opened (the one round), both parties' outputs added: q as int64."""
    u = trunc_masked_share(k0, y0) + trunc_masked_share(k1, y1)
    return (trunc_eval(0, k0, u) + trunc_eval(1, k1, u)).view(np.int64)


def _trunc_relu(k0: TruncReluKey, k1: TruncReluKey, y0: np.ndarray, y1: np.ndarray) -> np.ndarray:
    u = trunc_relu_masked_share(k0, y0) + trunc_relu_masked_share(k1, y1)
    return (trunc_relu_eval(0, k0, u) + trunc_relu_eval(1, k1, u)).view(np.int64)


def _mask(k0, k1) -> np.ndarray:
    """The dealer's mask r, put back together from both keys' shares (a test can do that)."""
    return k0.r + k1.r


def _faithful(y: np.ndarray, r: np.ndarray, s: int) -> np.ndarray:
    """floor(y / 2^s) + [(y mod 2^s) + (r mod 2^s) >= 2^s]: the documented rounding under mask r."""
    low = U64((1 << s) - 1)
    carry = ((y.view(U64) & low) + (r & low)) >> U64(s)
    return (y >> np.int64(s)) + carry.astype(np.int64)


def _local(y0: np.ndarray, y1: np.ndarray, s: int) -> np.ndarray:
    """SecureML's local truncation (`ring.truncate`), reconstructed."""
    t0 = ring.truncate(torch.from_numpy(y0.view(np.int64)), 0, s)
    t1 = ring.truncate(torch.from_numpy(y1.view(np.int64)), 1, s)
    return (t0 + t1).numpy()


def _boundary_shares(y: np.ndarray, bits: int, rng: AesCtrPrg) -> tuple[np.ndarray, np.ndarray]:
    """Share pairs whose y_0 lies in a window of width 2^bits around 2^63 - y, where the signed
    shares overflow for about one pair in eight (one in four at 64 bits): there the local
    truncation is off by 2^(64 - s)."""
    window = rng.uint64(y.shape) >> U64(64 - bits) if bits < 64 else rng.uint64(y.shape)
    y0 = U64(1 << 63) - y.view(U64) + window - U64(1 << (bits - 1))
    return y0, y.view(U64) - y0


# -- division by 2^s and by any d ---------------------------------------------------------------------

_KEYS = 100_000


@pytest.mark.parametrize("bits,batches", [(20, 5), (40, 3), (64, 2)])  # 10^6 share pairs in all
def test_trunc_exact_where_the_local_truncation_fails(bits: int, batches: int) -> None:
    """One set of keys evaluated on several batches of share pairs (the result depends on y and
    r only, so reusing a mask here tests the same thing at less keygen time)."""
    s, rng = 16, _prg(bits)
    k0, k1 = trunc_keys(_KEYS, bits, 1 << s, rng)
    r = _mask(k0, k1)
    local_wrong = 0
    for _ in range(batches):
        y = _values(rng, _KEYS, bits)
        y[:4] = [-(1 << (bits - 1)), (1 << (bits - 1)) - 1, 0, -1]
        y0, y1 = _boundary_shares(y, bits, rng)
        q = _trunc(k0, k1, y0, y1)
        floor = y >> np.int64(s)
        assert ((q - floor) >= 0).all() and ((q - floor) <= 1).all()
        assert np.array_equal(q, _faithful(y, r, s))
        local_wrong += int((np.abs(_local(y0, y1, s) - floor) > 1).sum())
    assert local_wrong > _KEYS * batches // 10  # the test could fail: the local truncation does, often


@pytest.mark.parametrize("divisor", [9, 49])
def test_trunc_by_a_divisor_that_is_not_a_power_of_two(divisor: int) -> None:
    bits, rng = 40, _prg(divisor)
    y = _values(rng, 50_000, bits)
    y0, y1 = _boundary_shares(y, bits, rng)
    q = _trunc(*trunc_keys(y.size, bits, divisor, rng), y0, y1)
    err = np.abs(q * divisor - y)  # |q - y / d| in units of 1 / d (no overflow at 40 bits)
    assert err.max() < 2 * divisor
    assert err.max() <= divisor - 1 + divisor // 2  # the documented bound, < 3/2
    assert (np.abs(ring.divide(torch.from_numpy(y0.view(np.int64)), 0, divisor).numpy()
                   + ring.divide(torch.from_numpy(y1.view(np.int64)), 1, divisor).numpy() - y // divisor) > 1).any()  # fmt: skip


def _edge_masks(bits: int) -> list[int]:
    e = [0, 1, (1 << (bits - 2)) - 1 if bits > 2 else 0, 1 << (bits - 2), (1 << (bits - 1)) - 1, 1 << (bits - 1),
         (1 << (bits - 1)) + 1, (1 << bits) - 1, (1 << 64) - 1, 1 << 63, (1 << bits) % (1 << 64), 0x5555_5555_5555_5555]  # fmt: skip
    return sorted(set(e))


@pytest.mark.parametrize("bits", [64, 2, 3, 8, 20, 63])
def test_trunc_at_the_extremes_and_masks_on_the_edges(bits: int) -> None:
    lim = 1 << (bits - 1)
    ys = np.array(sorted({-lim, lim - 1, 0, -1, min(1, lim - 1), -lim + 1}), np.int64)
    masks = _edge_masks(bits) + [int(v) for v in _prg(bits).uint64(6)]
    y = np.tile(ys, len(masks))
    r = np.repeat(np.array(masks, U64), ys.size)
    rng = _prg(100 + bits)
    divisors = sorted({1, 2, 3, 7, 1 << min(16, bits - 1), 1 << (bits - 1), (1 << bits) - 1, (1 << bits) % (1 << 64) or 3, (1 << 64) - 1})
    for d in divisors:
        keys = trunc_keys(y.size, bits, d, ChosenMasks(r, bits))
        q = _trunc(*keys, *_split(y, rng))
        err = [abs(int(a) * d - int(b)) for a, b in zip(q.tolist(), y.tolist())]
        assert max(err) <= d - 1 + d // 2, d
        if d & (d - 1) == 0 and d <= lim:  # d = 2^s divides 2^(n-1): floor plus the carry, exactly
            assert np.array_equal(q, _faithful(y, r, d.bit_length() - 1)), d
    assert np.array_equal(_trunc(*trunc_keys(y.size, bits, 1, rng), *_split(y, rng)), y)  # d = 1: q = y
    for s in sorted({1, min(16, bits - 1), bits - 2 or 1, bits - 1}):
        keys = trunc_relu_keys(y.size, bits, s, ChosenMasks(r, bits))
        assert np.array_equal(_trunc_relu(*keys, *_split(y, rng)), np.maximum(_faithful(y, r, s), 0)), s


def test_trunc_rounds_stochastically_and_without_bias() -> None:
    """P(round up) = frac(y / 2^s) over the masks, so the mean error is 0."""
    bits, s, groups, per = 40, 16, 8, 12_500
    rng = _prg(30)
    frac = np.array([0, 1, 1 << 14, 1 << 15, 3 << 14, (1 << 16) - 1, 12345, 54321], np.int64)
    y = ((_values(rng, groups * per, bits - s) >> np.int64(1)) << np.int64(s)) + np.repeat(frac, per)
    q = _trunc(*trunc_keys(y.size, bits, 1 << s, rng), *_split(y, rng))
    up = (q - (y >> np.int64(s))).reshape(groups, per)
    assert set(np.unique(up)) <= {0, 1}
    p = frac / float(1 << s)
    sigma = np.sqrt(np.maximum(p * (1 - p), 1e-6) / per)
    assert (np.abs(up.mean(axis=1) - p) < 5 * sigma).all(), up.mean(axis=1) - p
    err = q - y / float(1 << s)
    assert abs(err.mean()) < 5 * 0.5 / np.sqrt(y.size)
    assert (np.abs(err) < 1).all()


# -- ReLU of the truncation, fused ----------------------------------------------------------------------


def _signed_mix(bits: int, s: int, size: int, rng: AesCtrPrg) -> np.ndarray:
    """Uniform values, values within a few 2^s of 0, and the specials, across both signs."""
    lim = 1 << (bits - 1)
    small = _values(rng, size // 2, min(bits, s + 3))
    specials = [0, -1, 1, -lim, lim - 1, -lim + 1, 1 << s, -(1 << s), (1 << s) - 1, -(1 << s) - 1, (1 << s) + 1, -(1 << s) + 1]
    y = np.concatenate([_values(rng, size - size // 2 - len(specials), bits), small, np.array(specials, np.int64)])
    return y


@pytest.mark.parametrize("bits,s,size", [(24, 16, 100_000), (40, 16, 100_000), (64, 16, 100_000), (40, 1, 20_000), (64, 1, 10_000)])
def test_trunc_relu_is_relu_of_the_faithful_truncation(bits: int, s: int, size: int) -> None:
    rng = _prg(40 + bits + s)
    y = _signed_mix(bits, s, size, rng)
    k0, k1 = trunc_relu_keys(y.size, bits, s, rng)
    y0, y1 = _boundary_shares(y, bits, rng)
    got = _trunc_relu(k0, k1, y0, y1)
    assert np.array_equal(got, np.maximum(_faithful(y, _mask(k0, k1), s), 0))
    assert (got > 0).any() and (y < 0).any()


def test_trunc_relu_equals_relu_of_trunc_under_the_same_mask() -> None:
    bits, s = 40, 16
    rng = _prg(50)
    y = _signed_mix(bits, s, 20_000, rng)
    r = rng.uint64(y.size)
    q = _trunc(*trunc_keys(y.size, bits, 1 << s, ChosenMasks(r, 1)), *_split(y, rng))
    t = _trunc_relu(*trunc_relu_keys(y.size, bits, s, ChosenMasks(r, 2)), *_split(y, rng))
    assert np.array_equal(t, np.maximum(q, 0))


# -- keys: sizes, serialisation, refusals ------------------------------------------------------------


def test_key_sizes() -> None:
    for n in (24, 40, 64):
        assert key_bytes_per_trunc(n) == 8 * (3 * n + 5) == key_bytes_per_element(n, 1) + 16
        assert key_bytes_per_trunc_relu(n) == 8 * (2 + 5 * (n - 1) + 3) + 32
    assert (key_bytes_per_trunc(24), key_bytes_per_trunc(40), key_bytes_per_trunc(64)) == (616, 1000, 1576)
    assert (key_bytes_per_trunc_relu(24), key_bytes_per_trunc_relu(40), key_bytes_per_trunc_relu(64)) == (992, 1632, 2592)
    assert trunc_header_bytes() == 32 + 24 and trunc_relu_header_bytes() == 24 + 24


def test_trunc_key_round_trip_and_refusals() -> None:
    rng, N, bits = _prg(60), 300, 40
    k0, k1 = trunc_keys(N, bits, 49, rng)
    blob = k0.to_bytes()
    assert len(blob) == k0.nbytes == trunc_header_bytes() + N * key_bytes_per_trunc(bits)
    assert b"".join(bytes(p) for p in k1.blob_parts()) == k1.to_bytes()
    b0, b1 = TruncKey.from_bytes(blob), TruncKey.from_bytes(memoryview(bytearray(k1.to_bytes())))
    assert (b0.party, b0.bits, b0.divisor, b0.n_elements, b1.party) == (0, bits, 49, N, 1)
    y = _values(rng, N, bits)
    y0, y1 = _split(y, rng)
    assert np.array_equal(_trunc(b0, b1, y0, y1), _trunc(k0, k1, y0, y1))

    head = 32
    with pytest.raises(ValueError, match="truncated"):
        TruncKey.from_bytes(blob[:-3])
    with pytest.raises(ValueError, match="truncated in quotient"):
        TruncKey.from_bytes(blob[: head + 8 * N + 100])
    with pytest.raises(ValueError, match="shorter than its 32-byte header"):
        TruncKey.from_bytes(blob[:20])
    with pytest.raises(ValueError, match="not a truncation key blob"):
        TruncKey.from_bytes(bytes(len(blob)))
    with pytest.raises(ValueError, match="version 7"):
        TruncKey.from_bytes(blob[:8] + bytes([7, 0]) + blob[10:])
    with pytest.raises(ValueError, match="header garbled: party 5"):
        TruncKey.from_bytes(blob[:10] + bytes([5]) + blob[11:])
    with pytest.raises(ValueError, match="header garbled.*bits 65"):
        TruncKey.from_bytes(blob[:11] + bytes([65]) + blob[12:])
    with pytest.raises(ValueError, match="divisor 0"):
        TruncKey.from_bytes(blob[:16] + bytes(8) + blob[24:])
    with pytest.raises(ValueError, match="header wants a DCF of 300 elements on 41 bits"):
        TruncKey.from_bytes(blob[:11] + bytes([41]) + blob[12:])
    with pytest.raises(ValueError, match="its DCF key is bad.*too long"):
        TruncKey.from_bytes(blob + b"junk")
    with pytest.raises(ValueError, match="not a truncation key blob"):
        TruncKey.from_bytes(trunc_relu_keys(3, 8, 2, rng)[0].to_bytes())
    with pytest.raises(ValueError, match="party 1 was given party 0"):
        trunc_eval(1, k0, np.zeros(N, U64))
    with pytest.raises(ValueError, match="holds 300 elements"):
        trunc_eval(0, k0, np.zeros(N + 1, U64))
    with pytest.raises(ValueError, match="uint64 or int64"):
        trunc_masked_share(k0, np.zeros(N, np.float64))
    with pytest.raises(ValueError, match="bit width"):
        trunc_keys(3, 1, 2)
    with pytest.raises(ValueError, match="divisor"):
        trunc_keys(3, 20, 0)
    with pytest.raises(ValueError, match="uint64 of shape"):
        TruncKey(0, bits, 49, k0.dcf, k0.r[:-1], k0.quotient)


def test_trunc_relu_key_round_trip_and_refusals() -> None:
    rng, N, bits, s = _prg(61), 300, 24, 16
    k0, k1 = trunc_relu_keys(N, bits, s, rng)
    blob = k1.to_bytes()
    assert len(blob) == k1.nbytes == trunc_relu_header_bytes() + N * key_bytes_per_trunc_relu(bits)
    b0, b1 = TruncReluKey.from_bytes(bytearray(k0.to_bytes())), TruncReluKey.from_bytes(blob)
    assert (b1.party, b1.bits, b1.shift, b1.n_elements) == (1, bits, s, N)
    y = _signed_mix(bits, s, N, rng)
    y0, y1 = _split(y, rng)
    assert np.array_equal(_trunc_relu(b0, b1, y0, y1), np.maximum(_faithful(y, _mask(k0, k1), s), 0))

    head = 24
    with pytest.raises(ValueError, match="truncated"):
        TruncReluKey.from_bytes(blob[:-1])
    with pytest.raises(ValueError, match="truncated in r_top_quotient"):
        TruncReluKey.from_bytes(blob[: head + 8 * 3 * N + 8])
    with pytest.raises(ValueError, match="not a truncated-ReLU key blob"):
        TruncReluKey.from_bytes(k0.to_bytes()[:8].replace(b"R", b"C") + k0.to_bytes()[8:])
    with pytest.raises(ValueError, match="shift 24"):
        TruncReluKey.from_bytes(blob[:12] + bytes([24]) + blob[13:])
    with pytest.raises(ValueError, match="shift 0"):
        TruncReluKey.from_bytes(blob[:12] + bytes([0]) + blob[13:])
    with pytest.raises(ValueError, match="header wants a DCF of 300 elements on 24 bits"):
        TruncReluKey.from_bytes(blob[:11] + bytes([25]) + blob[12:])
    with pytest.raises(ValueError, match="its DCF key is bad"):
        TruncReluKey.from_bytes(blob + b"\0")
    with pytest.raises(ValueError, match="party 0 was given party 1"):
        trunc_relu_eval(0, k1, np.zeros(N, U64))
    with pytest.raises(ValueError, match="shift"):
        trunc_relu_keys(3, 24, 24)
    with pytest.raises(ValueError, match="shift"):
        trunc_relu_keys(3, 24, 0)


def test_shapes_and_int64_inputs_are_kept() -> None:
    rng = _prg(62)
    y = _values(rng, 60, 30).reshape(3, 4, 5)
    y0, y1 = _split(y, rng)
    k0, k1 = trunc_keys(60, 30, 1 << 8, rng)
    u = trunc_masked_share(k0, y0.view(np.int64)) + trunc_masked_share(k1, y1)
    assert u.shape == (3, 4, 5) and u.dtype == U64
    q = trunc_eval(0, k0, u) + trunc_eval(1, k1, u.view(np.int64))
    assert q.shape == (3, 4, 5) and q.dtype == U64
    assert np.array_equal(q.view(np.int64), _faithful(y, _mask(k0, k1).reshape(3, 4, 5), 8))
    r0, r1 = trunc_relu_keys(60, 30, 8, rng)
    t = _trunc_relu(r0, r1, y0, y1)
    assert t.shape == (3, 4, 5) and np.array_equal(t, np.maximum(_faithful(y, _mask(r0, r1).reshape(3, 4, 5), 8), 0))


# -- the dealer's correlation kinds -------------------------------------------------------------------


def _kind(name: str):
    return next(k for k in CORRELATIONS if k.name == name)


@pytest.mark.parametrize(
    "name,bad",
    [
        (TRUNC, "not json"),
        (TRUNC, json.dumps({"n": 4, "bits": 20})),
        (TRUNC, json.dumps([4, 20, 2])),
        (TRUNC, json.dumps({"n": 4, "bits": 20, "divisor": 2.5})),
        (TRUNC, json.dumps({"n": 4, "bits": 20, "divisor": True})),
        (TRUNC, json.dumps({"n": 4, "bits": 20, "divisor": 0})),
        (TRUNC, json.dumps({"n": 4, "bits": 20, "divisor": 2**64})),
        (TRUNC, json.dumps({"n": 4, "bits": 1, "divisor": 2})),
        (TRUNC, json.dumps({"n": 4, "bits": 65, "divisor": 2})),
        (TRUNC, json.dumps({"n": -1, "bits": 20, "divisor": 2})),
        (TRUNC, json.dumps({"n": 2**27 + 1, "bits": 20, "divisor": 2})),
        (TRUNC_RELU, json.dumps({"n": 4, "bits": 20, "shift": 0})),
        (TRUNC_RELU, json.dumps({"n": 4, "bits": 20, "shift": 20})),
        (TRUNC_RELU, json.dumps({"n": 4, "bits": 20, "shift": "16"})),
        (TRUNC_RELU, json.dumps({"n": 4, "bits": 20})),
        (TRUNC_RELU, json.dumps({"n": 4, "bits": 70, "shift": 16})),
    ],
)
def test_correlation_kinds_refuse_bad_requests(name: str, bad: str) -> None:
    with pytest.raises(ValueError, match=name):
        _kind(name).decode(bad)


@pytest.mark.parametrize("name,arg,value", [(TRUNC, "divisor", 1 << 16), (TRUNC_RELU, "shift", 16)])
def test_correlation_kinds_make_both_parties_keys(name: str, arg: str, value: int) -> None:
    kind = _kind(name)
    assert kind.paired and kind.requesters == (SERVER, CLIENT)
    args, kwargs = kind.decode(json.dumps({"n": 500, "bits": 40, arg: value}))
    seeds = DealerSeeds(torch={}, aes={}, dealer=bytes([63]) * 16)
    made = kind.make(seeds, 3, CLIENT, args, kwargs)
    assert set(made) == {SERVER, CLIENT}
    key_type = TruncKey if name == TRUNC else TruncReluKey
    k0, k1 = (key_type.from_bytes(made[role]["key"]) for role in (SERVER, CLIENT))
    assert (k0.party, k1.party, k0.bits, k0.n_elements) == (0, 1, 40, 500)
    assert made[SERVER]["key"].dtype == np.uint8 and made[SERVER]["key"].size == k0.nbytes
    again = kind.make(seeds, 3, SERVER, args, kwargs)
    assert np.array_equal(again[CLIENT]["key"], made[CLIENT]["key"])  # the dealer's stream of index 3
    assert not np.array_equal(kind.make(seeds, 4, SERVER, args, kwargs)[CLIENT]["key"], made[CLIENT]["key"])
    rng = _prg(64)
    y = _signed_mix(40, 16, 500, rng)
    y0, y1 = _split(y, rng)
    q = _faithful(y, _mask(k0, k1), 16)
    if name == TRUNC:
        assert np.array_equal(_trunc(k0, k1, y0, y1), q)
    else:
        assert np.array_equal(_trunc_relu(k0, k1, y0, y1), np.maximum(q, 0))


@pytest.mark.parametrize("terms", [300, 30522], ids=["22-bit limbs", "16-bit limbs"])
def test_ring_products_in_float64_limbs_equal_int64_arithmetic(terms):
    """matmul mod 2^64 through float64 limbs (ring.py), with a session constant split once
    (ring.Split, also transposed as a linear layer reads it): the int64 product, bit for bit."""
    g = torch.Generator().manual_seed(terms)
    a = torch.randint(-(2**62), 2**62, (3, terms), generator=g)
    w = torch.randint(-(2**62), 2**62, (terms, 5), generator=g)
    split = ring.Split(w)
    expected = a @ w
    assert torch.equal(ring.matmul(a, w), expected) and torch.equal(ring.matmul(a, split), expected)
    assert torch.equal(ring.matmul(a, split), expected)  # its cached limbs
    assert torch.equal(ring.matmul(a, ring.Split(w.t().contiguous()).t()), expected)
