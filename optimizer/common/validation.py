"""The optimizer's one validation split: a seeded fraction of the training examples held out.

Every method picks checkpoints or learning rates on held-out training data, never on the test
set. The callers differ in how they have always drawn the split, and their published figures
depend on it, so the two choices are parameters, not separate copies:

- `shuffle`: "numpy" (`np.random.default_rng(seed).permutation`) or "torch"
  (`torch.randperm` with a generator seeded by `seed`);
- `rounding`: the held-out count is `fraction * n` rounded to the nearest ("nearest", Python's
  `round`) or down ("down"), and at least `at_least`.

The first rows of the permutation are the validation part, the rest the training part, each in
permutation order.
"""

from __future__ import annotations

from typing import Literal, TypeVar

import numpy as np
import torch

Rows = TypeVar("Rows", np.ndarray, torch.Tensor)


def validation_split(
    x: Rows,
    y: Rows,
    *,
    fraction: float = 0.1,
    seed: int = 0,
    shuffle: Literal["numpy", "torch"] = "numpy",
    rounding: Literal["nearest", "down"] = "nearest",
    at_least: int = 0,
) -> tuple[tuple[Rows, Rows], tuple[Rows, Rows]]:
    """((x_train, y_train), (x_val, y_val)): rows of `x` and `y` (same length) split at random."""
    n = len(x)
    if len(y) != n:
        raise ValueError(f"{n} examples but {len(y)} labels")
    if shuffle == "numpy":
        order = np.random.default_rng(seed).permutation(n)
    elif shuffle == "torch":
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    else:
        raise ValueError(f"shuffle must be 'numpy' or 'torch', got {shuffle!r}")
    if rounding == "nearest":
        n_val = int(round(n * fraction))
    elif rounding == "down":
        n_val = int(n * fraction)
    else:
        raise ValueError(f"rounding must be 'nearest' or 'down', got {rounding!r}")
    n_val = max(at_least, n_val)
    val, train = order[:n_val], order[n_val:]
    return (x[train], y[train]), (x[val], y[val])
