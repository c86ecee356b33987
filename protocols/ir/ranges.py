"""Value ranges at the secure comparisons, and the comparison widths they allow.

A comparison on n bits (the fss backend's DCF) is exact while the compared value v satisfies
|v| < 2^(n-1) ring units (16 fractional bits: 2^(n-17) in real units); beyond that its sign
is read off the low n bits and nothing detects it. `comparison_widths` runs calibration data
through the plaintext graph, takes each comparison's largest |v| (ReLU: its input; Clip: the
differences to its bounds; max-pool: differences of window values, at most twice the largest
input), multiplies it by a stated margin, and picks the smallest width that holds it. The
margin is the risk the artifact names: an input that takes a layer past margin times what the
calibration data did can be compared wrongly.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..ops import op_for
from ..ops.registry import FULL_BITS
from .graph import Graph

FRACTION_BITS = 16  # both backends' fixed-point encoding
COMPARISON_OPS = ("Relu", "MaskedRelu", "Clip", "MaxPool")


def _compared(node, x: torch.Tensor) -> float:
    """The largest |value| the node's comparisons see for input x."""
    peak = float(x.abs().max()) if x.numel() else 0.0
    if node.op == "Clip":
        bounds = [abs(b) for b in (node.attrs.get("min"), node.attrs.get("max")) if b is not None]
        return peak + max(bounds)
    if node.op == "MaxPool":
        return 2 * peak
    return peak


def comparison_ranges(graph: Graph, weights: dict[str, np.ndarray], samples: np.ndarray, batch: int = 256) -> dict[str, float]:
    """Per comparison node, the largest |compared value| over `samples` (real units)."""
    tw = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in weights.items()}
    peaks = {n.name: 0.0 for n in graph.nodes if n.op in COMPARISON_OPS}
    with torch.no_grad():
        for start in range(0, len(samples), batch):
            values = {graph.input_name: torch.from_numpy(np.ascontiguousarray(samples[start : start + batch], dtype=np.float32))}
            for node in graph.nodes:
                args = [values[i] for i in node.inputs]
                if node.name in peaks:
                    peaks[node.name] = max(peaks[node.name], _compared(node, args[0]))
                values[node.output] = op_for(node).plain(node, args, [tw[k] for k in node.weights])
    return peaks


def width_for(peak: float, margin: float) -> int:
    """The smallest width n with margin * peak < 2^(n - 1) ring units (at least 2, at most 64)."""
    ring = max(peak * margin, 2.0**-FRACTION_BITS) * 2.0**FRACTION_BITS
    return int(min(FULL_BITS, max(2, math.floor(math.log2(ring)) + 2)))


def comparison_widths(graph: Graph, weights: dict[str, np.ndarray], samples: np.ndarray, margin: float = 4.0) -> dict[str, int]:
    """Per comparison node, the width that holds margin x its calibration range. A padded
    max-pool compares against its padding value, so it keeps the full width."""
    if margin < 1:
        raise ValueError(f"the margin multiplies the observed range and must be at least 1, got {margin}")
    widths = {}
    for name, peak in comparison_ranges(graph, weights, samples).items():
        node = next(n for n in graph.nodes if n.name == name)
        padded = node.op == "MaxPool" and any(node.attrs.get("padding", [0]))
        widths[name] = FULL_BITS if padded else width_for(peak, margin)
    return widths
