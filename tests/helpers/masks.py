"""A PRG for key-generation tests whose first draw (a key's mask r) is chosen: masks on the ring's edges."""

from __future__ import annotations

import numpy as np

from twinfer.protocols.backends.fss.prg import AesCtrPrg


class ChosenMasks(AesCtrPrg):
    """An AES-CTR PRG (fixed seed `tag`) whose first uint64 draw returns `r`."""

    def __init__(self, r: np.ndarray, tag: int = 0) -> None:
        super().__init__(bytes([tag]) * 16)
        self._r = r

    def uint64(self, shape):
        if self._r is not None:
            r, self._r = self._r, None
            assert r.shape == ((shape,) if isinstance(shape, int) else tuple(shape))
            return r.copy()
        return super().uint64(shape)
