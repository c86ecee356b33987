"""The plaintext interpreter: the reference every private result is compared with."""

from __future__ import annotations

import numpy as np
import torch

from ..ops import op_for
from .graph import Graph, GraphError


def run_plain(graph: Graph, weights: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Evaluate the graph in plaintext with torch."""
    values: dict[str, torch.Tensor] = {graph.input_name: x}
    for node in graph.nodes:
        values[node.output] = op_for(node).plain(node, [values[i] for i in node.inputs], [weights[k] for k in node.weights])
    return values[graph.output_name]


def annotate_shapes(graph: Graph, weights: dict[str, np.ndarray]) -> None:
    """Run one zero sample through the graph: checks it executes and records each output shape."""
    values: dict[str, torch.Tensor] = {graph.input_name: torch.zeros((1, *graph.input_shape))}
    tw = {k: torch.from_numpy(v) for k, v in weights.items()}
    for node in graph.nodes:
        op = op_for(node)
        try:
            out = op.plain(node, [values[n] for n in node.inputs], [tw[k] for k in node.weights])
        except RuntimeError as err:
            shapes = [tuple(values[n].shape) for n in node.inputs]
            raise GraphError(f"node '{node.name}' ({node.op}) cannot run on input {', '.join(map(str, shapes))}: {err}") from None
        values[node.output] = out
        node.attrs["out_shape"] = list(out.shape[1:])
        op.annotate(node, out)
