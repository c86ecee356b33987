"""The fss backend's PRGs: AES-CTR streams addressed by (seed, stream, offset), fixed-key MMO."""

from __future__ import annotations

import numpy as np
import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from twinfer.protocols.backends.fss.prg import AesCtrPrg, FixedKeyAes, ctr_uint8, ctr_uint64, new_seed

SEED = bytes(range(16))


def _reference_stream(seed: bytes, stream: int, nbytes: int) -> bytes:
    """AES_k(stream * 2^64 + i) for i = 0, 1, ...: the documented layout, block by block."""
    enc = Cipher(algorithms.AES(seed), modes.ECB()).encryptor()
    blocks = b"".join(((stream << 64) | i).to_bytes(16, "big") for i in range(-(-nbytes // 16)))
    return enc.update(blocks)[:nbytes]


@pytest.mark.parametrize("stream", [0, 1, 7, (1 << 64) - 1])
def test_ctr_matches_the_documented_counter_layout(stream: int) -> None:
    ref = _reference_stream(SEED, stream, 1000)
    assert ctr_uint8(SEED, 1000, stream).tobytes() == ref
    assert ctr_uint64(SEED, 125, stream).tobytes() == ref


def test_ctr_offsets_and_sequential_reads_agree() -> None:
    whole = ctr_uint8(SEED, 5000, stream=3)
    for offset in (0, 1, 15, 16, 17, 4095):
        assert np.array_equal(ctr_uint8(SEED, 100, stream=3, offset=offset), whole[offset : offset + 100])
    prg = AesCtrPrg(SEED, stream=3)
    parts = [prg.uint8(n) for n in (1, 15, 16, 33, 7, 900)]
    assert np.array_equal(np.concatenate(parts), whole[:972])
    assert prg.position == 972
    prg.seek(40)
    assert np.array_equal(prg.uint8(10), whole[40:50])
    # a word read continues where the bytes stopped
    assert prg.uint64(2).tobytes() == whole[50:66].tobytes()


@pytest.mark.parametrize("nbytes", [0, 1, 15, 16, 60, 61, (1 << 20) - 1, (1 << 20) + 14, (1 << 20) + 15, (1 << 20) + 16, 3 * (1 << 20) + 5])
def test_ctr_fill_sizes_around_the_internal_chunk(nbytes: int) -> None:
    got = AesCtrPrg(SEED, 2).uint8(nbytes).tobytes()
    ref = Cipher(algorithms.AES(SEED), modes.CTR((2 << 64).to_bytes(16, "big"))).encryptor().update(bytes(nbytes))
    assert got == ref


def test_streams_and_seeds_differ_and_shapes_hold() -> None:
    a, b = ctr_uint64(SEED, 64, 0), ctr_uint64(SEED, 64, 1)
    assert not np.array_equal(a, b)
    assert len(new_seed()) == 16 and new_seed() != new_seed()
    prg = AesCtrPrg()
    assert prg.blocks((3, 5)).shape == (3, 5, 2) and prg.uint64((2, 3)).dtype == np.uint64
    assert AesCtrPrg(SEED).fork(1).uint64(64).tobytes() == b.tobytes()
    with pytest.raises(ValueError, match="16 bytes"):
        AesCtrPrg(b"short")
    with pytest.raises(ValueError, match="stream id"):
        AesCtrPrg(SEED, stream=-1)


def test_fixed_key_aes_is_aes_and_mmo() -> None:
    # FIPS-197 appendix C.1
    key = bytes.fromhex("000102030405060708090a0b0c0d0e0f")
    pt = np.frombuffer(bytes.fromhex("00112233445566778899aabbccddeeff"), np.uint8).reshape(1, 16)
    h = FixedKeyAes(key)
    assert h.encrypt(pt).tobytes().hex() == "69c4e0d86a7b0430d8cdb78070b4c55a"
    mmo = bytes(a ^ b for a, b in zip(bytes.fromhex("69c4e0d86a7b0430d8cdb78070b4c55a"), pt.tobytes()))
    assert h.hash(pt).tobytes() == mmo
    # uint64 pairs are the same bytes; the tweak is xored into the low bits
    blocks = AesCtrPrg(SEED).blocks(1000)
    as_bytes = blocks.view(np.uint8).reshape(1000, 16)
    assert h.hash(blocks).tobytes() == h.hash(as_bytes).tobytes()
    tweaked = blocks.copy()
    tweaked[:, 0] ^= np.uint64(3)
    assert np.array_equal(h.hash(blocks, 3), h.hash(tweaked))
    out = np.empty_like(blocks)
    assert np.array_equal(h.hash_into(blocks, out), h.hash(blocks))
    inplace = blocks.copy()
    h.hash_into(inplace, inplace)
    assert np.array_equal(inplace, out)
    with pytest.raises(ValueError, match="C-contiguous"):
        h.hash_into(blocks[::2], np.empty((500, 2), np.uint64))
