"""Evaluate a twinfer graph on secret shares, one secure layer per node.

Activations and weights are CrypTen MPCTensors; attributes, shapes and the graph itself are
public. Linear layers with secret weights are Beaver products (conv2d, matmul, mul); ReLU and
max-pooling are secure comparisons. This module never opens a value on purpose: the caller
decides who learns the output.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

from .graph import Graph, Node, UnsupportedOpError, resolve_reshape
from .masked_activation import secure_masked_relu, secure_relu

LayerScope = Callable[[str], contextlib.AbstractContextManager]


@contextlib.contextmanager
def _no_scope(name: str) -> Iterator[None]:
    yield


def _conv(x, w, node: Node):
    a = node.attrs
    y = x.conv2d(w[0], stride=tuple(a["stride"]), padding=tuple(a["padding"]), dilation=tuple(a["dilation"]), groups=a["group"])
    if len(w) > 1:
        y = y + w[1].reshape(1, -1, 1, 1)
    return y


def _gemm(x, w, node: Node):
    y = x.matmul(w[0].t())
    return y + w[1] if len(w) > 1 else y


def _pool(x, node: Node, kind: str):
    a = node.attrs
    kernel, stride, padding = tuple(a["kernel"]), tuple(a["stride"]), tuple(a["padding"])
    if kind == "max":
        return x.max_pool2d(kernel, padding=padding, stride=stride)
    return x.avg_pool2d(kernel, stride=stride, padding=padding)


def secure_op(node: Node, args: list[Any], w: list[Any], counts: Counter | None = None) -> Any:
    """One node on MPCTensors; `counts["relu_count"]` grows by the elements compared."""
    x = args[0]
    if node.op == "Conv":
        return _conv(x, w, node)
    if node.op == "Gemm":
        return _gemm(x, w, node)
    if node.op == "Relu":
        return secure_relu(x, counts)
    if node.op == "MaskedRelu":
        return secure_masked_relu(x, node, counts)
    if node.op == "MaxPool":
        return _pool(x, node, "max")
    if node.op == "AveragePool":
        return _pool(x, node, "avg")
    if node.op == "GlobalAveragePool":
        return x.avg_pool2d(tuple(x.shape[2:]))
    if node.op == "Affine":
        return x * w[0] + w[1]
    if node.op == "Flatten":
        return x.flatten(start_dim=node.attrs["axis"])
    if node.op == "Reshape":
        return x.reshape(resolve_reshape(x.shape, node.attrs["shape"]))
    if node.op == "Add":
        return x + (args[1] if len(args) > 1 else w[0])
    if node.op == "Embedding":  # x: the client's one-hot ids (protocols/embedding.encode_input)
        from .embedding import secure_embedding

        return secure_embedding(x, w[0])
    raise UnsupportedOpError([(node.name, node.op)])


def run_secure(
    graph: Graph, weights: dict[str, Any], x: Any, scope: LayerScope = _no_scope, counts: Counter | None = None
) -> Any:
    """Evaluate `graph` on the shared input `x` with shared `weights`; returns shared logits.

    `scope(node.name)` wraps each layer so the caller can attribute time, rounds and bytes;
    `counts["relu_count"]` counts the elements that went through a secure comparison.
    """
    values: dict[str, Any] = {graph.input_name: x}
    remaining = _last_use(graph)
    for i, node in enumerate(graph.nodes):
        with scope(node.name):
            values[node.output] = secure_op(
                node, [values[n] for n in node.inputs], [weights[k] for k in node.weights], counts
            )
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
