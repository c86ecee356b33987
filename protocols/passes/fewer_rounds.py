"""Exact rewrites of a graph and its weights that save rounds, applied once a model is compiled.

1. Products of one input with several weights (attention's query, key and value projections)
   become one product with the weights stacked, then local slices: one opening of the input,
   one round, instead of one each.
2. A constant scale of a product of two activations (attention's 1/sqrt(d) on Q K^T) moves
   into the weights and bias of the projection its left operand comes from, through the
   reshapes and transposes between: one Beaver product with a secret scalar fewer.

Both hold for every input, in plaintext and in the ring alike (up to the rounding of a product
of weights, which the fixed point encodes once either way). The rewritten nodes say so in their
`rewrite` attribute. The server's weights change with the graph; an artifact compiles without
these rewrites (its masks and calibration are for the graph as exported).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from ..ir.graph import Graph, Node
from .rewrite import readers_of


def _plain_gemm(node: Node) -> bool:
    """A Gemm without bias or truncation plan, its weight 2-D (outputs first)."""
    return node.op == "Gemm" and len(node.weights) == 1 and "truncation" not in node.attrs


def _stack_siblings(graph: Graph, weights: dict[str, np.ndarray]) -> tuple[Graph, dict[str, np.ndarray]] | None:
    """One group of bias-free Gemms reading the same input made one Gemm and slices, or None."""
    groups: dict[str, list[Node]] = {}
    for node in graph.nodes:
        if _plain_gemm(node) and weights[node.weights[0]].ndim == 2:
            groups.setdefault(node.inputs[0], []).append(node)
    group = next((g for g in groups.values() if len(g) > 1), None)
    if group is None:
        return None
    first = group[0]
    key = f"{first.name}.stacked_weight"
    stacked = np.concatenate([weights[n.weights[0]] for n in group], axis=0)
    weights = {k: v for k, v in weights.items() if k not in {n.weights[0] for n in group}} | {key: stacked}
    out_shape = list(first.attrs["out_shape"][:-1]) + [int(stacked.shape[0])]
    why = f"one product for {', '.join(repr(n.name) for n in group)}"
    fused = Node(f"{first.name}.stacked", "Gemm", first.inputs, f"{first.output}.stacked", (key,), {"out_shape": out_shape, "rewrite": why})
    slices, start = {}, 0
    for n in group:
        end = start + int(n.attrs["out_shape"][-1])
        slices[n.name] = Node(n.name, "Slice", (fused.output,), n.output, (), {"start": start, "end": end, "out_shape": list(n.attrs["out_shape"]), "rewrite": why})
        start = end
    nodes = []
    for node in graph.nodes:
        if node is first:
            nodes.append(fused)
        nodes.append(slices.get(node.name, node))
    shapes = {k: v for k, v in graph.weight_shapes.items() if k in weights} | {key: tuple(stacked.shape)}
    return dataclasses.replace(graph, nodes=nodes, weight_shapes=shapes), weights


def _scale_of(node: Node, weights: dict[str, np.ndarray]) -> float | None:
    """The factor of an Affine that only scales by one constant (its shift all zeros), else None."""
    if node.op != "Affine" or "truncation" in node.attrs:
        return None
    scale, shift = (weights[k] for k in node.weights)
    return float(scale.reshape(-1)[0]) if scale.size == 1 and not shift.any() else None


def _fold_product_scale(graph: Graph, weights: dict[str, np.ndarray]) -> tuple[Graph, dict[str, np.ndarray]] | None:
    """One scale of a product of activations folded into the projection of its left operand, or None."""
    readers = readers_of(graph)
    by_output = {n.output: n for n in graph.nodes}
    for node in graph.nodes:
        factor = _scale_of(node, weights)
        product = by_output.get(node.inputs[0]) if factor is not None else None
        if product is None or product.op != "MatMul" or readers.get(product.output) != [node]:
            continue
        chain, value = [], product.inputs[0]
        while (step := by_output.get(value)) is not None and readers.get(value) == [product if not chain else chain[-1]]:
            chain.append(step)
            if step.op in ("Reshape", "Transpose") or (step.op == "Add" and len(step.weights) == 1):
                value = step.inputs[0]
                continue
            break
        if not chain or chain[-1].op not in ("Gemm", "Conv") or "truncation" in chain[-1].attrs:
            continue
        scaled = {k: weights[k] * np.float32(factor) for n in chain for k in n.weights}
        why = f"scaled by {factor:g}, folded from '{node.name}'"
        marked = {n.name for n in chain}
        nodes = []
        for n in graph.nodes:
            if n is node:
                continue
            if n.name in marked:
                n = Node(n.name, n.op, n.inputs, n.output, n.weights, dict(n.attrs) | {"rewrite": why})
            if node.output in n.inputs:
                n = Node(n.name, n.op, tuple(product.output if i == node.output else i for i in n.inputs), n.output, n.weights, dict(n.attrs))
            nodes.append(n)
        output = product.output if graph.output_name == node.output else graph.output_name
        kept = {k: v for k, v in weights.items() if k not in node.weights} | scaled
        shapes = {k: v for k, v in graph.weight_shapes.items() if k in kept}
        return dataclasses.replace(graph, nodes=nodes, output_name=output, weight_shapes=shapes), kept
    return None


def fewer_rounds(graph: Graph, weights: dict[str, np.ndarray]) -> tuple[Graph, dict[str, np.ndarray]]:
    """The graph and weights after every rewrite above, applied until none applies (each removes a
    node that opens a value, so this ends)."""
    while True:
        rewritten = _fold_product_scale(graph, weights) or _stack_siblings(graph, weights)
        if rewritten is None:
            return graph, weights
        graph, weights = rewritten
