"""ONNX import: a standard ONNX model -> a public graph and the server's weights.

The importer walks the ONNX graph once; each ONNX op type is handled by the importer its op
family registered (`protocols/ops/`), which calls back into `Importer` to name values, take
weights and emit nodes.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from ..ops import onnx_importer, supported_onnx_ops
from ..ops.attention import mark_convex_products
from ..ops.public import import_with_public
from ..ir.graph import Graph, GraphError, Node, UnsupportedOpError, check_finite
from .onnx_patterns import fold_public_shapes, fuse_spelled_out, refuse_unfolded
from .plain import annotate_shapes
from .public_inputs import MASK_BIAS, PublicProgram, split_public
from .fewer_rounds import fewer_rounds
from .rewrite import fewer_comparisons
from .validation import validate_graph


def _attrs(node: onnx.NodeProto) -> dict[str, Any]:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


class Importer:
    """Walks an ONNX graph once, producing twinfer nodes and the weights they use."""

    def __init__(self, model: onnx.ModelProto, fixed_batch: bool = False, public: frozenset[str] = frozenset()) -> None:
        self.model = model
        self.public = public  # values the public program computes (public_inputs.py)
        # Shapes were folded for one sample: a constant shape's leading 1 is the batch (onnx_patterns.py).
        self.fixed_batch = fixed_batch
        self.init = {t.name: numpy_helper.to_array(t).astype(np.float32, copy=True) for t in model.graph.initializer}
        for name, value in self.init.items():
            check_finite(value, f"initializer '{name}'")
        self.ints: dict[str, np.ndarray] = {
            t.name: numpy_helper.to_array(t) for t in model.graph.initializer if t.data_type == onnx.TensorProto.INT64
        }
        self.weights: dict[str, np.ndarray] = {}
        self.nodes: list[Node] = []
        self.alias: dict[str, str] = {}
        self.consumers: dict[str, int] = {}
        for n in model.graph.node:
            for i in n.input:
                self.consumers[i] = self.consumers.get(i, 0) + 1
        for o in model.graph.output:
            self.consumers[o.name] = self.consumers.get(o.name, 0) + 1

    def name(self, value: str) -> str:
        while value in self.alias:
            value = self.alias[value]
        return value

    def weight(self, node: onnx.NodeProto, value: str, role: str, array: np.ndarray | None = None) -> str:
        if array is None:
            if value not in self.init:
                raise GraphError(f"node '{node.name}' ({node.op_type}): {role} '{value}' must be a constant weight")
            array = self.init[value]
        key = f"{node.name or node.output[0]}.{role}"
        self.weights[key] = np.ascontiguousarray(array, dtype=np.float32)
        return key

    def emit(self, node: onnx.NodeProto, op: str, inputs: list[str], weights: list[str], attrs: dict[str, Any]) -> None:
        self.nodes.append(
            Node(
                name=node.name or node.output[0],
                op=op,
                inputs=tuple(self.name(i) for i in inputs),
                output=node.output[0],
                weights=tuple(weights),
                attrs=attrs,
            )
        )

    @staticmethod
    def symmetric_pads(node: onnx.NodeProto, pads: list[int]) -> list[int]:
        half = len(pads) // 2
        if pads[:half] != pads[half:]:
            raise GraphError(f"node '{node.name}' ({node.op_type}) has asymmetric padding {pads}; pad symmetrically")
        return list(pads[:half])

    def run(self) -> None:
        unsupported = [(n.name or n.output[0], n.op_type) for n in self.model.graph.node if onnx_importer(n.op_type) is None]
        unsupported += [(n.name or n.output[0], f"{n.domain}.{n.op_type}") for n in self.model.graph.node if n.domain not in ("", "ai.onnx")]
        if unsupported:
            raise UnsupportedOpError(unsupported, supported_onnx_ops())
        for node in self.model.graph.node:
            reads_public = any(i in self.public for i in node.input)
            (import_with_public if reads_public else onnx_importer(node.op_type))(self, node, _attrs(node))


def _private_input(model: onnx.ModelProto, private: str | None) -> tuple[str, tuple[int, ...]]:
    """The client's secret input (`private`, else the model's first) and its shape per sample."""
    initializers = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in initializers]
    if not inputs:
        raise GraphError("the model has no input")
    chosen = inputs[0] if private is None else next((i for i in inputs if i.name == private), None)
    if chosen is None:
        raise GraphError(f"the model has no input '{private}'; its inputs are {', '.join(repr(i.name) for i in inputs)}")
    dims = chosen.type.tensor_type.shape.dim
    shape = tuple(int(d.dim_value) if d.HasField("dim_value") else -1 for d in dims)
    if len(shape) < 2 or any(d <= 0 for d in shape[1:]):
        raise GraphError(f"input '{chosen.name}' needs fixed dimensions after the batch, got {shape}")
    return chosen.name, shape[1:]


def _floor_mask_biases(graph: Graph, program: PublicProgram) -> None:
    """A public value that is only ever added to a softmax's input (a mask's bias) is raised to
    -MASK_BIAS: the same probabilities (public_inputs.py), a bounded fixed point."""
    readers: dict[str, list] = {}
    for node in graph.nodes:
        for name in node.inputs:
            readers.setdefault(name, []).append(node)
    for name in program.outputs:
        adds = readers.get(name, [])
        if adds and all(n.op == "PublicAdd" and [r.op for r in readers.get(n.output, [])] == ["Softmax"] for n in adds):
            program.floors[name] = -MASK_BIAS


def graph_from_onnx(model: onnx.ModelProto, *, rewrite: bool = True, private: str | None = None) -> tuple[Graph, dict[str, np.ndarray]]:
    """Compile an ONNX model into a public graph and the server's weights; `rewrite`: with the exact
    rewrites that save comparisons (rewrite.py) and rounds (fewer_rounds.py). An artifact compiles
    without them: its masks and calibration are for the graph as exported. `private`: the client's
    secret input (else the first); every other input is public (an attention mask: public_inputs.py)."""
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as err:
        raise GraphError(f"invalid ONNX model: {str(err).splitlines()[0]}") from None
    if len(model.graph.output) != 1:
        raise GraphError(f"the model must have exactly one output, it has {len(model.graph.output)}")
    input_name, input_shape = _private_input(model, private)  # before any folding
    model, folded = fold_public_shapes(model)
    model, program = split_public(model, input_name)
    refuse_unfolded(model)
    importer = Importer(fuse_spelled_out(model), fixed_batch=folded, public=frozenset(program.outputs if program else ()))
    importer.run()
    graph = Graph(
        input_name=input_name,
        input_shape=input_shape,
        output_name=importer.name(model.graph.output[0].name),
        nodes=importer.nodes,
        weight_shapes={k: tuple(v.shape) for k, v in importer.weights.items()},
    )
    if program is not None:
        _floor_mask_biases(graph, program)
        graph.public_inputs, graph.public, graph.public_program = dict(program.inputs), program.bounds(), program
    for key, value in importer.weights.items():  # also what import derived, such as a folded BatchNorm's
        check_finite(value, f"weight '{key}'")
    mark_convex_products(graph)
    validate_graph(graph)
    annotate_shapes(graph, importer.weights)
    if not rewrite:
        return graph, importer.weights
    return fewer_rounds(fewer_comparisons(graph), importer.weights)
