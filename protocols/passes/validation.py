"""Checks of a graph, and its JSON form as the client receives it (not trusted)."""

from __future__ import annotations

import json

from ..ops import op_for
from ..ops.registry import check_truncation
from ..ir.graph import Graph, GraphError, Node, check_input_range
from .public_inputs import PublicValue


def validate_graph(graph: Graph) -> None:
    """Ops are known, each op's attributes are well formed, every value is produced before use."""
    known = {graph.input_name, *graph.public}
    for node in graph.nodes:
        op = op_for(node)
        for name in node.inputs:
            if name not in known:
                raise GraphError(f"node '{node.name}' reads '{name}' before anything produces it")
            if name in graph.public and not op.reads_public:
                raise GraphError(f"node '{node.name}' ({node.op}) reads the public value '{name}'; only PublicAdd and PublicMul do")
        for w in node.weights:
            if w not in graph.weight_shapes:
                raise GraphError(f"node '{node.name}' uses weight '{w}' that the graph does not declare")
        op.check(node, graph)
        check_truncation(node)
        known.add(node.output)
    if graph.output_name not in known:
        raise GraphError(f"the graph never produces its output '{graph.output_name}'")


def _public_value(raw: dict) -> PublicValue:
    lo, hi = (float(v) for v in raw["range"])
    return PublicValue(tuple(int(d) for d in raw["shape"]), lo, hi)


def graph_from_json(text: str) -> Graph:
    """Parse and validate a graph description (Graph.to_json's output)."""
    try:
        raw = json.loads(text)
        nodes = [
            Node(
                name=str(n["name"]),
                op=str(n["op"]),
                inputs=tuple(n["inputs"]),
                output=str(n["output"]),
                weights=tuple(n["weights"]),
                attrs=dict(n["attrs"]),
            )
            for n in raw["nodes"]
        ]
        graph = Graph(
            input_name=str(raw["input_name"]),
            input_shape=tuple(int(d) for d in raw["input_shape"]),
            output_name=str(raw["output_name"]),
            nodes=nodes,
            weight_shapes={k: tuple(int(d) for d in v) for k, v in raw["weight_shapes"].items()},
            input_range=check_input_range(raw["input_range"], "the graph's input_range") if "input_range" in raw else None,
            public_inputs={str(k): tuple(int(d) for d in v) for k, v in raw.get("public_inputs", {}).items()},
            public={str(k): _public_value(v) for k, v in raw.get("public", {}).items()},
        )
    except GraphError:
        raise
    except (KeyError, TypeError, ValueError) as err:
        raise GraphError(f"malformed graph description: {err}") from None
    validate_graph(graph)
    return graph
