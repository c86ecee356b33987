"""One no-grad forward pass with forward hooks on chosen modules: layer order, shapes, inputs."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn


def run_hooked(model: nn.Module, x: torch.Tensor, modules: Iterable[nn.Module], hook: Callable) -> None:
    """One no-grad forward pass of `x` with `hook(module, inputs, output)` on each of `modules`."""
    handles = [m.register_forward_hook(hook) for m in modules]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
