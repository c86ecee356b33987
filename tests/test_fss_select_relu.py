"""fss-compact's one-bit comparison (a DPF key) and two-round ReLU: exact, serialisable, alpha-hiding, small."""

from __future__ import annotations

import numpy as np
import pytest

from tests.helpers.masks import ChosenMasks
from tests.test_fss_dcf import _Z_LIMIT, _max_z
from twinfer.protocols.backends.fss.bit_dcf import BitDcfKey, bit_dcf_eval, bit_dcf_keygen, key_bytes_per_comparison
from twinfer.protocols.backends.fss.prg import AesCtrPrg
from twinfer.protocols.backends.fss.relu import key_bytes_per_relu, masked_share
from twinfer.protocols.backends.fss.select_relu import (
    SelectReluKey,
    key_bytes_per_select_relu,
    select_bits,
    select_relu_eval,
    select_relu_keys,
)

U64 = np.uint64


def _prg(tag: int) -> AesCtrPrg:
    return AesCtrPrg(bytes([100 + tag]) * 16)


def _compare(alpha: np.ndarray, x: np.ndarray, bits: int, rng: AesCtrPrg) -> np.ndarray:
    k0, k1 = bit_dcf_keygen(alpha, bits, rng)
    return bit_dcf_eval(0, k0, x) ^ bit_dcf_eval(1, k1, x)


@pytest.mark.parametrize("bits", [1, 2, 3, 7, 8, 10])
def test_comparison_exhaustive_at_small_widths(bits: int) -> None:
    """Widths below, at and above the leaf's 7 bits: every (alpha, x)."""
    values = np.arange(1 << bits, dtype=U64)
    alpha, x = np.repeat(values, values.size), np.tile(values, values.size)  # every (alpha, x)
    assert np.array_equal(_compare(alpha, x, bits, _prg(1)), (x < alpha).astype(np.uint8))


@pytest.mark.parametrize("bits", [24, 63, 64])
def test_comparison_at_alpha_its_neighbours_and_random(bits: int) -> None:
    rng = _prg(2)
    top = U64((1 << bits) - 1) if bits < 64 else U64((1 << 64) - 1)
    alpha = rng.uint64(3000) & top
    alpha[:8] = [0, 1, 63, 64, 127, 128, top - U64(1), top]  # the leaf's words and its edges
    x = np.concatenate([alpha, alpha - U64(1), alpha + U64(1), rng.uint64(3000)]) & top
    got = _compare(np.tile(alpha, 4), x, bits, rng)
    assert np.array_equal(got, (x < np.tile(alpha, 4)).astype(np.uint8))


def _keys_at(alpha: int, n: int, bits: int, rng: AesCtrPrg) -> tuple[BitDcfKey, BitDcfKey]:
    return bit_dcf_keygen(np.full(n, alpha, U64), bits, rng)


def _bit_matrix(key: BitDcfKey) -> np.ndarray:
    words = [key.seed.reshape(key.n_elements, -1), key.seed_cw.transpose(1, 0, 2).reshape(key.n_elements, -1), key.leaf_cw]
    return np.unpackbits(np.ascontiguousarray(np.concatenate(words, axis=1)).view(np.uint8), axis=1)


@pytest.mark.parametrize("party", [0, 1])
def test_one_comparison_key_is_independent_of_alpha(party: int) -> None:
    bits, top = 12, (1 << 12) - 1  # 5 levels of tree, then the leaf's 7 bits
    lo, hi = _keys_at(0, 4000, bits, _prg(3))[party], _keys_at(top, 4000, bits, _prg(4))[party]
    assert _max_z(_bit_matrix(lo), _bit_matrix(hi)) < _Z_LIMIT

    # and it sees alpha in keys whose corrections skip the seeds' masking
    def leaky(alpha: int, tag: int, where: str) -> BitDcfKey:
        key = _keys_at(alpha, 4000, bits, _prg(tag))[party]
        if where == "control bits":
            a = np.array([(alpha >> (bits - 1 - i)) & 1 for i in range(5)], U64)[:, None]
            key.seed_cw[:, :, 0] = (key.seed_cw[:, :, 0] & U64(~3 % (1 << 64))) | (a ^ U64(1)) | (a << U64(1))
        else:  # the leaf word without the hashed leaves: the indicator of alpha's low bits in the clear
            key.leaf_cw[:] = 0 if alpha == 0 else (1 << 64) - 1
        return key

    for where in ("control bits", "leaf"):
        assert _max_z(_bit_matrix(leaky(0, 5, where)), _bit_matrix(leaky(top, 11, where))) > 10 * _Z_LIMIT, where


def _relu(x: np.ndarray, bits: int, rng: AesCtrPrg) -> np.ndarray:
    """Share x, open x + r, open the bits, select: the reconstructed int64 result (both rounds)."""
    k0, k1 = select_relu_keys(x.size, bits, rng)
    x0 = _prg(6).uint64(x.shape)
    x_hat = masked_share(k0, x0) + masked_share(k1, x.view(U64) - x0)
    d_hat = select_bits(0, k0, x_hat) ^ select_bits(1, k1, x_hat)
    return (select_relu_eval(0, k0, x_hat, d_hat) + select_relu_eval(1, k1, x_hat, d_hat)).view(np.int64)


@pytest.mark.parametrize("bits", [2, 16])
def test_relu_exact_on_every_value_the_width_admits(bits: int) -> None:
    lim = 1 << (bits - 1)
    x = np.arange(-lim, lim, dtype=np.int64)
    assert np.array_equal(_relu(x, bits, _prg(7)), np.maximum(x, 0))


@pytest.mark.parametrize("bits", [64, 25])
def test_relu_exact_for_masks_on_the_edges(bits: int) -> None:
    edge_r = [0, 1, (1 << (bits - 1)) - 1, 1 << (bits - 1), (1 << (bits - 1)) + 1, (1 << bits) - 1, (1 << 64) - 1, 1 << 63]
    lim = 1 << (bits - 1)
    xs = np.array([0, -1, 1, lim - 1, -lim, -lim + 1, lim // 2, -lim // 2], np.int64)
    x, r = np.tile(xs, len(edge_r)), np.repeat(np.array([v % (1 << 64) for v in edge_r], U64), xs.size)
    assert np.array_equal(_relu(x, bits, ChosenMasks(r)), np.maximum(x, 0))


def test_relu_random_at_64_bits_and_the_select_bit_hides_the_sign() -> None:
    rng = _prg(8)
    x = rng.uint64(20000).view(np.int64)
    assert np.array_equal(_relu(x, 64, rng), np.maximum(x, 0))
    # d_hat = DReLU xor rho: what both parties see in the second round is a fair coin whatever x is
    k0, k1 = select_relu_keys(20000, 64, rng)
    positive = np.full(20000, 5, np.int64).view(U64)
    x_hat = masked_share(k0, np.zeros(20000, U64)) + masked_share(k1, positive)
    d_hat = select_bits(0, k0, x_hat) ^ select_bits(1, k1, x_hat)
    assert abs(d_hat.mean() - 0.5) < 0.02


def test_keys_are_about_half_the_one_round_keys_and_within_600_bytes_where_models_compare() -> None:
    for bits in (16, 25, 33, 41):  # 16 (n - 6) + 25 bytes from n = 8: widths up to 41 bits
        assert key_bytes_per_select_relu(bits) <= 600
    assert key_bytes_per_select_relu(42) > 600
    for bits in (25, 33, 64):
        assert key_bytes_per_select_relu(bits) < 0.5 * key_bytes_per_relu(bits)
    assert key_bytes_per_comparison(24) == 16 * (2 + 24 - 7) and key_bytes_per_comparison(5) == 32  # a leaf alone
    k0, _ = select_relu_keys(300, 25, _prg(9))
    assert k0.nbytes == len(k0.to_bytes()) < 300 * (key_bytes_per_select_relu(25) + 1)


def test_relu_key_round_trip_and_refusals() -> None:
    rng = _prg(10)
    x = (rng.uint64(500) >> U64(40)).view(np.int64) - (1 << 23)
    k0, k1 = select_relu_keys(500, 25, rng)
    b0, b1 = SelectReluKey.from_bytes(k0.to_bytes()), SelectReluKey.from_bytes(memoryview(k1.to_bytes()))
    assert (b0.party, b0.bits, b1.party, b0.n_elements) == (0, 25, 1, 500)
    x_hat = masked_share(b0, np.zeros(500, U64)) + masked_share(b1, x.view(U64))
    d_hat = select_bits(0, b0, x_hat) ^ select_bits(1, b1, x_hat)
    assert np.array_equal((select_relu_eval(0, b0, x_hat, d_hat) + select_relu_eval(1, b1, x_hat, d_hat)).view(np.int64), np.maximum(x, 0))

    blob = k0.to_bytes()
    with pytest.raises(ValueError, match="truncated"):
        SelectReluKey.from_bytes(blob[:-3])
    with pytest.raises(ValueError, match="shares end at byte"):
        SelectReluKey.from_bytes(blob[:100])
    with pytest.raises(ValueError, match="not a two-round ReLU key blob"):
        SelectReluKey.from_bytes(bytes(len(blob)))
    with pytest.raises(ValueError, match="its comparison key is bad"):
        SelectReluKey.from_bytes(blob + b"junk")
    garbled = bytearray(blob)
    garbled[24 + 3 * 8 * 500] = 7  # a bit share that is not a bit
    with pytest.raises(ValueError, match="other than 0 and 1"):
        SelectReluKey.from_bytes(bytes(garbled))
    with pytest.raises(ValueError, match="party 1 was given party 0"):
        select_bits(1, k0, x_hat)
    with pytest.raises(ValueError, match="d_hat has 3 elements"):
        select_relu_eval(0, k0, x_hat, np.zeros(3, np.uint8))
    with pytest.raises(ValueError, match="bit width"):
        select_relu_keys(3, 1)
    with pytest.raises(ValueError, match=r"must lie in \[0, 2\^4\)"):
        bit_dcf_keygen(np.array([16], U64), 4)


@pytest.mark.parametrize("bad", ["not json", '{"n": 4}', '{"n": 4, "bits": 1}', '{"n": 4, "bits": 20.5}', '{"n": -1, "bits": 20}'])
def test_the_dealer_kind_refuses_bad_requests(bad: str) -> None:
    from twinfer.protocols.backends import correlation_kind

    with pytest.raises(ValueError, match="fss.select_relu"):
        correlation_kind("fss.select_relu").decode(bad)


def test_the_dealer_kind_makes_both_parties_keys_for_fss_compact_only() -> None:
    import json

    from twinfer.protocols.backends import backend_class, correlation_kind
    from twinfer.protocols.backends.base import DealerSeeds
    from twinfer.protocols.roles import CLIENT, SERVER

    kind = correlation_kind("fss.select_relu")
    assert kind in backend_class("fss-compact").correlations and kind not in backend_class("fss").correlations
    assert kind.paired and kind.requesters == (SERVER, CLIENT)
    args, kwargs = kind.decode(json.dumps({"n": 300, "bits": 25}))
    seeds = DealerSeeds(torch={}, aes={}, dealer=bytes([65]) * 16)
    made = kind.make(seeds, 5, SERVER, args, kwargs)
    k0, k1 = (SelectReluKey.from_bytes(made[role]["key"]) for role in (SERVER, CLIENT))
    assert (k0.party, k1.party, k0.bits, k0.n_elements) == (0, 1, 25, 300)
    assert np.array_equal(kind.make(seeds, 5, CLIENT, args, kwargs)[SERVER]["key"], made[SERVER]["key"])  # the stream of index 5
    x = (_prg(11).uint64(300) >> U64(41)).view(np.int64) - (1 << 22)
    x_hat = masked_share(k0, np.zeros(300, U64)) + masked_share(k1, x.view(U64))
    d_hat = select_bits(0, k0, x_hat) ^ select_bits(1, k1, x_hat)
    assert np.array_equal((select_relu_eval(0, k0, x_hat, d_hat) + select_relu_eval(1, k1, x_hat, d_hat)).view(np.int64), np.maximum(x, 0))


def test_a_peer_message_of_another_shape_or_type_is_refused_by_name() -> None:
    """The second round's bits are uint8: a peer sending ring elements instead is refused before torch reads them."""
    import types

    import torch

    from twinfer.protocols.backends.base import BackendError
    from twinfer.protocols.backends.fss.backend import FssCompactBackend

    class Peer:
        metrics = types.SimpleNamespace(count_round=lambda: None)

        def __init__(self, reply: np.ndarray) -> None:
            self.reply = reply

        def send(self, tag: str, array: np.ndarray) -> None:
            pass

        def recv(self, tag: str) -> np.ndarray:
            return self.reply

    dealer = types.SimpleNamespace(key=bytes(16))
    mine = torch.zeros(3, dtype=torch.uint8)
    for reply, found in ((np.zeros(3, np.uint64), r"\(3,\) and type uint64"), (np.zeros(4, np.uint8), r"\(4,\) and type uint8")):
        backend = FssCompactBackend(1, Peer(reply), dealer)
        with pytest.raises(BackendError, match=rf"got 'fss.select' of shape {found} from its peer, expected \(3,\) and uint8"):
            backend._exchange("fss.select", mine)
    assert torch.equal(FssCompactBackend(1, Peer(np.ones(3, np.uint8)), dealer)._exchange("fss.select", mine), torch.ones(3, dtype=torch.uint8))
