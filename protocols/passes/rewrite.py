"""Exact rewrites of a graph that save secure comparisons, applied once a model is compiled.

Each gives the same outputs for every input, in plaintext and in the ring alike:

1. A ReLU (or a Clip) whose only reader is a max-pool moves after it: both are monotone, so
   pool(relu(x)) = relu(pool(x)) (a padded window's pad is below every value either way). A 2x2
   window then costs 3 + 1 comparisons instead of 4 + 3.
2. A ReLU of a ReLU's output is the identity: dropped.
3. A ReLU read only by a Clip whose lower bound is at least 0 is dropped: the clip's own lower
   comparison does its work.

Each rewritten node says so in its `rewrite` attribute (public structure, like the graph), so
that the counts and the cost model of the served graph are those of what runs. Masked sites
(an optimizer's partial ReLUs) are never moved: their masks are for the place they were fitted.
"""

from __future__ import annotations

import dataclasses

from ..ops import op_for
from ..ir.graph import Graph, Node


def readers_of(graph: Graph) -> dict[str, list[Node]]:
    """Per value, the nodes that read it, in graph order."""
    out: dict[str, list[Node]] = {}
    for node in graph.nodes:
        for name in node.inputs:
            out.setdefault(name, []).append(node)
    return out


def _swap_before_pool(graph: Graph) -> Graph | None:
    """One activation moved after the max-pool that alone reads it, or None if there is none."""
    readers = readers_of(graph)
    for i, node in enumerate(graph.nodes[:-1]):
        them = readers.get(node.output, [])
        pool = graph.nodes[i + 1]
        if not op_for(node).commutes_with_max or node.output == graph.output_name or them != [pool] or pool.op != "MaxPool":
            continue
        moved_pool = Node(pool.name, pool.op, node.inputs, node.output, pool.weights, dict(pool.attrs))
        attrs = dict(node.attrs) | {"out_shape": list(pool.attrs["out_shape"]), "rewrite": f"moved after max-pool '{pool.name}'"}
        if "elements" in attrs:
            attrs["elements"] = int(_size(pool.attrs["out_shape"]))
        moved = Node(node.name, node.op, (node.output,), pool.output, node.weights, attrs)
        return dataclasses.replace(graph, nodes=graph.nodes[:i] + [moved_pool, moved] + graph.nodes[i + 2 :])
    return None


def _drop_redundant_relu(graph: Graph) -> Graph | None:
    """One ReLU dropped whose work another comparison already does, or None."""
    readers = readers_of(graph)
    by_output = {n.output: n for n in graph.nodes}
    for node in graph.nodes:
        if node.op != "Relu":
            continue
        producer = by_output.get(node.inputs[0])
        them = readers.get(node.output, [])
        after_relu = producer is not None and producer.op == "Relu"
        floor = them[0].attrs.get("min") if len(them) == 1 and them[0].op == "Clip" else None
        before_clip = node.output != graph.output_name and floor is not None and floor >= 0
        if not (after_relu or before_clip):
            continue
        why = f"dropped '{node.name}': " + (f"a ReLU of ReLU '{producer.name}'" if after_relu else f"clip '{them[0].name}' floors at 0 itself")
        return _without(graph, node, why)
    return None


def _without(graph: Graph, node: Node, why: str) -> Graph:
    """The graph with `node` removed: its readers read its input instead, noting why."""
    source = node.inputs[0]
    nodes = []
    for n in graph.nodes:
        if n is node:
            continue
        if node.output in n.inputs:
            inputs = tuple(source if i == node.output else i for i in n.inputs)
            n = Node(n.name, n.op, inputs, n.output, n.weights, dict(n.attrs) | {"rewrite": why})
        nodes.append(n)
    output = source if graph.output_name == node.output else graph.output_name
    return dataclasses.replace(graph, nodes=nodes, output_name=output)


def _size(shape) -> int:
    size = 1
    for d in shape:
        size *= int(d)
    return size


def fewer_comparisons(graph: Graph) -> Graph:
    """The graph after every rewrite above, applied until none applies (each strictly removes or
    shrinks a comparison, so this ends)."""
    while True:
        rewritten = _drop_redundant_relu(graph) or _swap_before_pool(graph)
        if rewritten is None:
            return graph
        graph = rewritten
