"""What an analysis backend records per node: the values the secure protocol truncates,
divides and compares, in real units, over the samples (or bounds) it ran on."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import numpy as np
import torch

from ..backends.base import LOCAL, Truncation

PRODUCT, DIVISION = 2, 1  # fractional bits, in multiples of f, that a truncated value carries


class Records:
    """Per node: the largest |value| truncated (products carry 2f fractional bits, divided window
    sums f), their sum over elements (with `samples`: per sample), the largest |value| compared,
    the smallest input of a padded max-pool (or variance of a LayerNorm), and the truncation each
    call asked for."""

    def __init__(self) -> None:
        self.node = ""
        self.samples = 0  # samples run so far: the sums are divided by it
        self.truncated: dict[str, float] = defaultdict(float)
        self.truncated_total: dict[str, float] = defaultdict(float)
        self.divided: dict[str, float] = defaultdict(float)
        self.divided_total: dict[str, float] = defaultdict(float)
        self.compared: dict[str, float] = {}
        self.floor: dict[str, float] = {}
        self.truncations: dict[str, Truncation] = {}
        self.overflow: dict[str, float] = {}  # simulation: a product or value beyond the ring (its |value|)

    def truncate(self, magnitude: torch.Tensor, multiple: int = PRODUCT, truncation: Truncation = LOCAL) -> None:
        """|values| (real units, batch first) that one truncation of the current node sees."""
        if not magnitude.numel():
            return
        peak, total = float(magnitude.max()), float(magnitude.sum())
        if multiple == PRODUCT:
            self.truncated[self.node] = max(self.truncated[self.node], peak)
            self.truncated_total[self.node] += total
        else:
            self.divided[self.node] = max(self.divided[self.node], peak)
            self.divided_total[self.node] += total
        if truncation.exact:
            self.truncations[self.node] = truncation

    def compare(self, magnitude: torch.Tensor | float) -> None:
        value = float(magnitude.max()) if isinstance(magnitude, torch.Tensor) and magnitude.numel() else float(magnitude or 0.0)
        self.compared[self.node] = max(self.compared.get(self.node, 0.0), value)

    def least(self, smallest: float) -> None:
        """The smallest value the current node reads where that matters: a padded max-pool's input
        (against its pad), a LayerNorm's variance (how finely it normalises)."""
        self.floor[self.node] = min(self.floor.get(self.node, np.inf), smallest)

    def overflowed(self, magnitude: float) -> None:
        self.overflow[self.node] = max(self.overflow.get(self.node, 0.0), magnitude)

    def per_sample(self, table: dict[str, float]) -> dict[str, float]:
        return {k: v / max(self.samples, 1) for k, v in table.items()}

    def tables(self) -> dict[str, Any]:
        """The figures as ValueRanges takes them (sums per sample)."""
        return {
            "truncated": dict(self.truncated), "truncated_sum": self.per_sample(self.truncated_total),
            "divided": dict(self.divided), "divided_sum": self.per_sample(self.divided_total),
            "compared": dict(self.compared), "floor": dict(self.floor),
        }  # fmt: skip
