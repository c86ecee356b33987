"""Evaluate a twinfer graph on secret shares, one secure layer per node, on a backend.

Activations and weights are the backend's shared tensors; attributes, shapes and the graph
itself are public. Each node is dispatched through the op table (`protocols/ops/`) to its
op's secure evaluation, which receives the session's backend. This module never opens a
value on purpose: the caller decides who learns the output.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

from .backends.base import Backend
from .ir.graph import Graph
from .passes.plain import public_operands
from .ops import SecureContext, op_for

LayerScope = Callable[[str], contextlib.AbstractContextManager]


@contextlib.contextmanager
def _no_scope(name: str) -> Iterator[None]:
    yield


def run_secure(
    graph: Graph,
    weights: dict[str, Any],
    x: Any,
    backend: Backend,
    scope: LayerScope = _no_scope,
    counts: Counter | None = None,
    public: dict[str, Any] | None = None,
) -> Any:
    """Evaluate `graph` on the shared input `x` with shared `weights`; returns shared logits.

    `scope(node.name)` wraps each layer so the caller can attribute time, rounds and bytes;
    `counts` gets `relu_count` and `comparisons` (see ops.registry.SecureContext); `public`: the
    public values the graph reads (its public program's outputs for this batch, as torch tensors).
    """
    ctx = SecureContext(backend, counts if counts is not None else Counter())
    values: dict[str, Any] = {graph.input_name: x, **public_operands(graph, public)}
    remaining = _last_use(graph)
    for i, node in enumerate(graph.nodes):
        op = op_for(node)
        with scope(node.name):
            values[node.output] = op.secure(node, [values[n] for n in node.inputs], [weights[k] for k in node.weights], ctx)
        for name in node.inputs:  # free shares as soon as no later layer reads them
            if remaining.get(name) == i and name != graph.output_name:
                values.pop(name, None)
    return values[graph.output_name]


def _last_use(graph: Graph) -> dict[str, int]:
    last: dict[str, int] = {}
    for i, node in enumerate(graph.nodes):
        for name in node.inputs:
            last[name] = i
    return last
