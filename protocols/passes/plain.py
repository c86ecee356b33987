"""The plaintext interpreter: the reference every private result is compared with."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from ..ops import op_for
from ..ir.graph import Graph, GraphError


def public_operands(graph: Graph, public: Mapping[str, Any] | None) -> dict[str, Any]:
    """The public values a graph's nodes read (its public program's outputs), checked by name."""
    given = dict(public or {})
    if set(given) != set(graph.public):
        raise GraphError(f"the graph reads the public values {sorted(graph.public)}, given {sorted(given)}")
    return given


def run_plain(graph: Graph, weights: dict[str, torch.Tensor], x: torch.Tensor, public: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
    """Evaluate the graph in plaintext with torch; `public`: the values its public program gave."""
    values: dict[str, torch.Tensor] = {graph.input_name: x, **public_operands(graph, public)}
    for node in graph.nodes:
        values[node.output] = op_for(node).plain(node, [values[i] for i in node.inputs], [weights[k] for k in node.weights])
    return values[graph.output_name]


def annotate_shapes(graph: Graph, weights: dict[str, np.ndarray]) -> None:
    """Run one zero sample through the graph: checks it executes and records each output shape."""
    values: dict[str, torch.Tensor] = {graph.input_name: torch.zeros((1, *graph.input_shape))}
    values |= {name: torch.ones((1, *spec.shape)) for name, spec in graph.public.items()}
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
