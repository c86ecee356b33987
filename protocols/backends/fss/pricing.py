"""What the fss backend's protocols send online (one party's count: sent + received).

1. A product with a session constant opens only the activation's mask, E = X - A: 16 bytes per
   element, one round (W - B was opened once, when the weight was shared); a product of two
   activations opens both masks in that one round.
2. A square opens x - r: 16 bytes per element, one round.
3. A ReLU opens x + r: 16 bytes per element (8 each way), one round, whatever the width.
4. A max-pool over windows of n is a tree of n - 1 ReLUs per window, ceil(log2 n) rounds.
5. A masked site's ReLUs (kept positions) and squares (the others) share their one round.
   fss-compact's ReLU (`select_relu.py`) takes a second round, one packed bit per element each
   way, for keys of about half the size: max-pools and masked sites take twice the rounds.

6. An exact truncation opens its masked values: 16 bytes per element, one round; fused into the
   ReLU that reads the product, no bytes or round of its own.

Offline (the dealer's bytes to both parties, per batch): the server's share of each product
(C_0: one ring element per output) and of each square (s_0); each party's ReLU key, a header
per call and `key_bytes_per_relu` per element (`relu.py`); each party's truncation key
(`truncation.py`: `key_bytes_per_trunc`, or `key_bytes_per_trunc_relu` for a fused ReLU, whose
key replaces the ReLU's). The weight masks are session set-up.
"""

from __future__ import annotations


from ..base import OPEN_BYTES, RING_BYTES, Cost, Pricing, Truncation
from .relu import key_bytes_per_relu, relu_key_header_bytes
from .select_relu import key_bytes_per_select_relu, select_relu_header_bytes
from .truncation import key_bytes_per_trunc, key_bytes_per_trunc_relu, trunc_header_bytes, trunc_relu_header_bytes

KEY_CHUNK = 1 << 18  # ReLU keys per dealer request, at most: bounds the dealer's and a reply's memory


def _keys(elements: int, calls: int, bits: int) -> int:
    """ReLU keys for both parties: a header per key (a call's keys come in chunks), the rest per element."""
    return 2 * (calls * relu_key_header_bytes() + elements * key_bytes_per_relu(bits))


def _chunks(n: int) -> int:
    return -(-n // KEY_CHUNK)


def exact_truncation(n: int, truncation: Truncation) -> Cost:
    """n exact truncations in one round (their masked values opened), keyed in chunks as ReLUs are;
    a fused one is priced with the ReLU it is fused into. Both backends run the same protocol."""
    if not truncation.exact or truncation.fused or not n:
        return Cost(bytes_offline=0)
    return Cost(OPEN_BYTES * n, 1, 2 * (_chunks(n) * trunc_header_bytes() + n * key_bytes_per_trunc(truncation.bits)))


class FssPricing(Pricing):
    def product(self, activations: int, weights: int, outputs: int) -> Cost:
        return Cost(OPEN_BYTES * activations, 1, RING_BYTES * outputs)

    def secret_product(self, left: int, right: int, outputs: int) -> Cost:
        return Cost(OPEN_BYTES * (left + right), 1, RING_BYTES * outputs)

    def square(self, n: int) -> Cost:
        return Cost(OPEN_BYTES * n, 1, RING_BYTES * n) if n else Cost(bytes_offline=0)

    def relu(self, n: int, bits: int = 64, fused: Truncation | None = None) -> Cost:
        """`fused`: the exact truncation of the product the ReLU reads, in the same round (larger keys)."""
        if not n:
            return Cost(bytes_offline=0)
        if fused is not None:
            return Cost(OPEN_BYTES * n, 1, 2 * (_chunks(n) * trunc_relu_header_bytes() + n * key_bytes_per_trunc_relu(fused.bits)))
        return Cost(OPEN_BYTES * n, 1, _keys(n, _chunks(n), bits))

    def truncation(self, n: int, truncation: Truncation) -> Cost:
        return exact_truncation(n, truncation)

    def relu_and_square(self, relus: int, squares: int, bits: int = 64) -> Cost:
        """Both opened in one message: the round of either, the bytes and keys of both."""
        a, b = self.relu(relus, bits), self.square(squares)
        return Cost(a.bytes_online + b.bytes_online, max(a.rounds, b.rounds), a.bytes_offline + b.bytes_offline)

    def max_pool(self, windows: int, n: int, bits: int = 64) -> Cost:
        """A tree of ReLU calls, one per level over that level's pairs (backend.max_pool2d)."""
        total, left = Cost(bytes_offline=0), n
        while left > 1:
            total, left = total + self.relu(windows * (left // 2), bits), left - left // 2
        return total


class FssCompactPricing(FssPricing):
    """fss-compact: a ReLU is two rounds, x + r then one bit per element (packed) each way, from
    keys about half the size (`select_relu.py`); a fused truncation's ReLU stays one round."""

    def relu(self, n: int, bits: int = 64, fused: Truncation | None = None) -> Cost:
        if not n or fused is not None:
            return super().relu(n, bits, fused)
        keys = 2 * (_chunks(n) * select_relu_header_bytes() + n * key_bytes_per_select_relu(bits))
        return Cost(OPEN_BYTES * n + 2 * packed_bits_bytes(n), 2, keys)


def packed_bits_bytes(n: int) -> int:
    """Bytes of n bits packed eight to a byte: what one party sends in a select's round."""
    return -(-n // 8)
