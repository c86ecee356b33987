"""What CrypTen's protocols send, read off CrypTen 0.4.1 with two parties and a dealer.

Bytes are one party's payload, sent plus received, in the 64-bit ring; each opened element
is an exchange (send my share, receive theirs), 16 bytes of one party's count.

1. Products (conv, matmul, mul) and squares: Beaver (1991), CrypTen `mpc/primitives/beaver.py`:
   the masked operands are opened in one round; bias additions and two-party truncation are
   local.
2. ReLU x * (x >= 0) (CrypTen `common/functions/logic.py`, `mpc/primitives/circuit.py`):
   A2B is a binary adder of the two parties' shares: one AND on the word (2 words opened),
   then the set-propagate-kill tree, log2(64) = 6 levels of an AND on two stacked words (4 words
   each); the sign bit goes back with B2A_single_bit (1 word opened); the final x * bit is a
   Beaver product (2 words). 29 words = 464 bytes per element, 9 rounds.
3. Max-pooling over windows of n elements (CrypTen `common/functions/maximum.py`, max_method
   "log_reduction"): int(ln n) halving steps, each a comparison (a ReLU without its product:
   27 words, 8 rounds) and a `where` (2 products); a pairwise argmax over the r values left
   ((r - 1) r comparisons, a product tree), a tie-breaking `weighted_index` (a random fixed-point
   value: 16 bit conversions; a product; r comparisons); the max as a product; then, for the
   argmax that max_pool2d discards, an equality test per window element (6 ANDs + B2A: 13
   words, 7 rounds) and another `weighted_index` over the n elements. `maxpool_words` counts it
   (2x2: 370 words, 46 rounds per window).
4. An exact truncation (a layer's choice) is twinfer's dealer-keyed one (fss/truncation.py) on
   CrypTen's shares: its masked values opened (2 words), one round.
"""

from __future__ import annotations

import math

from ..base import OPEN_BYTES, Cost, Pricing, Truncation
from ..fss.pricing import exact_truncation

RELU_WORDS = 2 + 4 * 6 + 1 + 2  # adder AND, 6 SPK levels, B2A bit, final product
RELU_ROUNDS = 1 + 6 + 1 + 1
CMP_WORDS, CMP_ROUNDS = RELU_WORDS - 2, RELU_ROUNDS - 1  # x < 0 without the final product
EQ_WORDS, EQ_ROUNDS = 2 * 6 + 1, 6 + 1  # 6 ANDs of one word, B2A of the bit
RAND_WORDS = 16  # crypten.rand: a 16-bit fixed-point value from 16 single-bit B2As, one round


def maxpool_words(windows: int, n: int) -> tuple[int, int]:
    """Words each party sends, and rounds, for CrypTen's max_pool2d over `windows` windows of n."""
    if n < 2:
        return 0, 0
    words = rounds = 0

    def cmp(e: int) -> None:
        nonlocal words, rounds
        words, rounds = words + CMP_WORDS * e, rounds + CMP_ROUNDS

    def mul(e: int) -> None:
        nonlocal words, rounds
        words, rounds = words + 2 * e, rounds + 1

    def weighted_index(r: int) -> None:
        nonlocal words, rounds
        words, rounds = words + RAND_WORDS * windows, rounds + 1
        mul(windows)
        cmp(windows * r)

    m = n
    for _ in range(int(math.log(n))):  # CrypTen's step count uses the natural logarithm
        half = m // 2
        cmp(windows * half)
        mul(windows * half)  # where(x >= y, x, y): (1 - c) * y, then x * c
        mul(windows * half)
        m = half + m % 2
    cmp(windows * m * (m - 1))  # pairwise: every value against the m - 1 others
    size = m - 1
    while size > 1:  # product over the comparisons
        mul(windows * m * (size // 2))
        size = size // 2 + size % 2
    weighted_index(m)
    mul(windows * m)  # the max, as (values * one-hot).sum()
    words, rounds = words + EQ_WORDS * windows * n, rounds + EQ_ROUNDS  # argmax: values == max
    weighted_index(n)
    return words, rounds


class CryptenPricing(Pricing):
    def product(self, activations: int, weights: int, outputs: int) -> Cost:
        """With a dealer, a weight's mask is opened once, when it is shared: only x - a goes online."""
        return Cost(OPEN_BYTES * activations, 1)

    def relu(self, n: int, bits: int = 64) -> Cost:
        return Cost(n * RELU_WORDS * OPEN_BYTES, RELU_ROUNDS) if n else Cost()

    def max_pool(self, windows: int, n: int, bits: int = 64) -> Cost:
        words, rounds = maxpool_words(windows, n)
        return Cost(words * OPEN_BYTES, rounds)

    def truncation(self, n: int, truncation: Truncation) -> Cost:
        """An exact truncation is the fss backend's protocol (truncation.py) on CrypTen's shares; never fused."""
        return exact_truncation(n, truncation)
