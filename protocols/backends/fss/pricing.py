"""What the fss backend's protocols send online (one party's count: sent + received).

1. A product with a session constant opens only the activation's mask, E = X - A: 16 bytes per
   element, one round (W - B was opened once, when the weight was shared).
2. A square opens x - r: 16 bytes per element, one round.
3. A ReLU opens x + r: 16 bytes per element (8 each way), one round, whatever the width.
4. A max-pool over windows of n is a tree of n - 1 ReLUs per window, ceil(log2 n) rounds.
"""

from __future__ import annotations

import math

from ..base import OPEN_BYTES, Cost, Pricing


class FssPricing(Pricing):
    def product(self, activations: int, weights: int) -> Cost:
        return Cost(OPEN_BYTES * activations, 1)

    def relu(self, n: int) -> Cost:
        return Cost(OPEN_BYTES * n, 1) if n else Cost()

    def max_pool(self, windows: int, n: int) -> Cost:
        if n < 2:
            return Cost()
        return Cost(OPEN_BYTES * windows * (n - 1), math.ceil(math.log2(n)))
